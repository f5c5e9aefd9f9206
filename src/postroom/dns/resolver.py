"""The resolver: MX and address lookups for mail routing, with typed answers and errors.

What the answers mean for mail (RFC 5321 5.1, RFC 7505):

- MX records: the hosts to try, lowest preference first; hosts of equal preference are tried in
  random order (:meth:`MxResult.ordered`).
- No MX records but the name exists (NOERROR, empty answer): the domain itself is the one host,
  an *implicit MX* of preference 0.
- A single MX whose target is the root ``.``: a *null MX*, the domain accepts no mail; the caller
  bounces at once (5.1.10). A ``.`` among other MX records is a misconfiguration; it is skipped
  and the other hosts are used.
- NXDOMAIN: the domain does not exist; permanent (5.1.2).
- SERVFAIL, REFUSED, a timeout, no name server reachable: temporary (4.4.3); try again later.

The error tree::

    DnsError                    ``name``, ``status`` (RFC 3463 enhanced code), ``text``
    ├── DnsPermanentError       the DNS said no; retrying will not help
    │   ├── NoSuchDomain        NXDOMAIN                                      5.1.2
    │   ├── NullMx              RFC 7505 null MX                              5.1.10
    │   └── NoAddress           the host exists but has no A or AAAA record   5.4.4
    └── DnsTemporaryError       no usable answer now                          4.4.3

With name servers configured the dnspython resolver is built with ``configure=False``: it never
reads ``/etc/resolv.conf``. Only an empty list means "the system's name servers".
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from itertools import groupby
from typing import Final

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
from dns.rdtypes.ANY.MX import MX

from postroom.errors import PostroomError

#: dnspython's wait for one name server before it asks again (it backs off within the lifetime).
_TRY_TIMEOUT: Final = 2.0


class DnsError(PostroomError):
    """A lookup gave no usable answer. ``status`` is the enhanced code a bounce or deferral uses."""

    status = "4.4.3"  # RFC 3463 X.4.3: directory server failure

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name
        self.text = text

    @property
    def permanent(self) -> bool:
        return isinstance(self, DnsPermanentError)


class DnsPermanentError(DnsError):
    """The DNS answered, and the answer rules delivery out."""

    status = "5.1.2"


class NoSuchDomain(DnsPermanentError):
    """NXDOMAIN (RFC 1035 4.1.1, RCODE 3). For a mail domain: RFC 3463 X.1.2, bad system."""

    status = "5.1.2"


class NullMx(DnsPermanentError):
    """The domain publishes a null MX (RFC 7505 3): it accepts no mail. RFC 7505 4.1: 5.1.10."""

    status = "5.1.10"


class NoAddress(DnsPermanentError):
    """The host name exists but has no A or AAAA record. RFC 3463 X.4.4: unable to route."""

    status = "5.4.4"


class DnsTemporaryError(DnsError):
    """SERVFAIL, REFUSED, a timeout or no reachable name server: ask again later (X.4.3)."""

    status = "4.4.3"


class MxKind(Enum):
    LISTED = "listed"  # MX records were found
    IMPLICIT = "implicit"  # no MX records: the domain is its own host (RFC 5321 5.1)
    NULL = "null"  # RFC 7505 null MX: no mail accepted


@dataclass(frozen=True, slots=True)
class MxHost:
    preference: int
    host: str  # ASCII (A-label) host name, lower case, no final dot


@dataclass(frozen=True, slots=True)
class MxResult:
    """The MX answer for ``domain``: its kind and the hosts, sorted by preference then name."""

    domain: str
    kind: MxKind
    hosts: tuple[MxHost, ...]

    def ordered(self, rng: random.Random | None = None) -> list[MxHost]:
        """The hosts in the order to try them: by preference, equal preferences shuffled
        (RFC 5321 5.1: "randomize them to spread the load"). ``rng`` is for tests."""
        rng = rng or random.Random()
        out: list[MxHost] = []
        for _, group in groupby(self.hosts, key=lambda mx: mx.preference):
            same = list(group)
            rng.shuffle(same)
            out.extend(same)
        return out


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class Resolver:
    """dnspython's asyncio resolver with mail-routing answers.

    ``nameservers``: IP addresses to ask, all on ``port``; empty for the system's configuration
    (the only case that reads ``/etc/resolv.conf``). ``timeout``: seconds a whole lookup may take.
    ``cache_size``: answers kept (dnspython honours the TTLs); 0 for no cache.
    """

    def __init__(
        self,
        nameservers: Sequence[str] = (),
        *,
        port: int = 53,
        timeout: float = 10.0,
        cache_size: int = 1000,
    ) -> None:
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(ns, port) for ns in nameservers]
        else:
            resolver = dns.asyncresolver.Resolver(configure=True)
            resolver.port = port
        resolver.timeout = min(timeout, _TRY_TIMEOUT)
        resolver.lifetime = timeout
        resolver.retry_servfail = False
        resolver.search = []
        if cache_size > 0:
            resolver.cache = dns.resolver.LRUCache(cache_size)
        self._resolver = resolver

    @property
    def nameservers(self) -> list[str]:
        """``address@port`` of each name server asked, for messages."""
        out = []
        for ns in self._resolver.nameservers:
            if isinstance(ns, dns.nameserver.Do53Nameserver):
                out.append(f"{ns.address}@{ns.port}")
            else:
                out.append(str(ns))
        return out

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer:
        """One query; NoAnswer comes back as an Answer with ``rrset`` None. Errors are typed."""
        try:
            qname = dns.name.from_text(name)
        except (dns.exception.DNSException, UnicodeError) as exc:
            raise NoSuchDomain(name, f"bad domain name {name!r}: {exc}") from None
        try:
            return await self._resolver.resolve(qname, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(name, f"Host or domain name not found: {name} (type={rdtype}: "
                                     "NXDOMAIN)") from None
        except dns.resolver.LifetimeTimeout:
            raise DnsTemporaryError(name, f"DNS lookup of {name} (type={rdtype}) timed out") from None
        except dns.resolver.NoNameservers as exc:
            raise DnsTemporaryError(name, f"DNS lookup of {name} (type={rdtype}) failed: no name "
                                          f"server answered ({_first_error(exc)})") from None
        except dns.exception.DNSException as exc:
            raise DnsTemporaryError(name, f"DNS lookup of {name} (type={rdtype}) failed: "
                                          f"{exc}") from None

    async def mx_hosts(self, domain: str) -> MxResult:
        """The MX answer for ``domain`` (see the module docstring). Raises :class:`NoSuchDomain`
        or :class:`DnsTemporaryError`; a null MX is a result (``kind`` NULL), not an error, so the
        caller decides, and :meth:`MxResult.ordered` of it is empty."""
        domain = domain.rstrip(".").lower()
        answer = await self._query(domain, "MX")
        if answer.rrset is None:
            return MxResult(domain, MxKind.IMPLICIT, (MxHost(0, domain),))
        hosts: list[MxHost] = []
        roots = 0
        for rdata in answer.rrset:
            assert isinstance(rdata, MX)
            if rdata.exchange == dns.name.root:
                roots += 1
                continue
            host = rdata.exchange.to_text(omit_final_dot=True).lower()
            hosts.append(MxHost(int(rdata.preference), host))
        if not hosts:
            if roots:
                return MxResult(domain, MxKind.NULL, ())
            return MxResult(domain, MxKind.IMPLICIT, (MxHost(0, domain),))  # pragma: no cover
        hosts.sort(key=lambda mx: (mx.preference, mx.host))
        return MxResult(domain, MxKind.LISTED, tuple(hosts))

    async def addresses(self, host: str, families: Sequence[int] = (4, 6)) -> list[str]:
        """The host's addresses, family by family in the order of ``families`` (4: A,
        6: AAAA); the two queries run at once. An IP address is its own answer.

        One family failing temporarily while the other has addresses still gives those
        addresses. Raises :class:`NoSuchDomain` (NXDOMAIN), :class:`NoAddress` (no record of
        either type) or :class:`DnsTemporaryError` (no answer, and nothing else found).
        """
        host = host.rstrip(".")
        if _is_ip(host):
            version = ipaddress.ip_address(host).version
            return [host] if version in families else []
        rdtypes = {4: "A", 6: "AAAA"}
        answers = await asyncio.gather(
            *(self._query(host, rdtypes[family]) for family in families), return_exceptions=True
        )
        found: list[str] = []
        temporary: DnsTemporaryError | None = None
        missing: NoSuchDomain | None = None
        for result in answers:
            if isinstance(result, DnsTemporaryError):
                temporary = temporary or result
            elif isinstance(result, NoSuchDomain):
                missing = missing or result
            elif isinstance(result, BaseException):
                raise result
            elif result.rrset is not None:
                found.extend(rdata.to_text() for rdata in result.rrset)
        if found:
            return found
        if temporary is not None:
            raise temporary
        if missing is not None:
            raise missing
        raise NoAddress(host, f"Host found but no address record (A or AAAA) for {host}")


def _first_error(exc: dns.resolver.NoNameservers) -> str:
    """The first name server's complaint, e.g. ``127.0.0.1@5353 answered SERVFAIL``."""
    errors = exc.kwargs.get("errors") or []
    if errors:
        server, _tcp, _port, error = errors[0][:4]
        return f"{server} answered {error}"
    return "no name servers"
