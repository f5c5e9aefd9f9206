"""Routing for remote delivery: from a recipient's domain to the ordered places to try.

The choice, first match wins (Postfix habits):

1. a per-domain transport override (``transports``: ``"example.org" = "[10.0.0.5]:2525"``;
   a key ``".example.org"`` covers its subdomains);
2. the smarthost (``relayhost``), for everything else;
3. the domain's MX records (RFC 5321 5.1): by preference, equal preferences in random order
   (the random source is injectable), each host's addresses in the configured family order.
   No MX: the domain itself (implicit MX). A null MX (RFC 7505): bounce at once, 5.1.10.
   NXDOMAIN: bounce, 5.1.2. An MX list that names this host is cut before it (RFC 5321 5.1,
   "the SMTP client MUST ... discard" preferences equal or higher than its own); nothing left
   is a mail loop, 5.4.6. An address literal (``[192.0.2.1]``) is its own target.

A next hop written ``[host]:port`` is used as is; without brackets its MX records are looked
up, as Postfix does; a next hop that cannot be found defers the mail (a configuration error
must not bounce it). Configured next hops (1, 2) are the operator's choice and are not
checked against the destination policy; everything the DNS or a sender hands us is: addresses
that are not global (loopback, private, link-local, unspecified, reserved, shared, documentation:
IANA's special-purpose registries) and multicast are refused unless ``allow_networks`` has
them, so a domain cannot point us at our own network. IPv6 addresses that lead to an IPv4 host
(IPv4-mapped, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo) are refused when that IPv4
host would be, and the local NAT64 prefix ``64:ff9b:1::/48`` always. If that leaves nothing,
the route fails permanently (5.4.4, with the addresses named).

Failures are :class:`RouteError` carrying the reply a bounce or deferral should quote; the
``verdict`` of its code says which (one rule: :func:`postroom.smtp.client.verdict`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Final

from postroom.dns import (
    DnsError,
    DnsPermanentError,
    MxHost,
    MxKind,
    NoSuchDomain,
    Resolver,
)
from postroom.errors import ConfigError, PostroomError
from postroom.smtp.client import Verdict, verdict
from postroom.smtp.codes import Reply

SMTP_PORT: Final = 25
#: Addresses tried per delivery, over all MX hosts (Postfix smtp_mx_address_limit is 5).
MAX_ADDRESSES: Final = 10

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class TlsPolicy(StrEnum):
    NONE = "none"  # never STARTTLS
    OPPORTUNISTIC = "opportunistic"  # STARTTLS when offered, certificate not checked (RFC 3207)
    REQUIRED = "required"  # STARTTLS or no delivery; certificate and host name verified


@dataclass(frozen=True, slots=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NextHop:
    """A configured destination: ``[host]:port`` (no MX lookup) or ``host:port`` (MX lookup)."""

    host: str
    port: int = SMTP_PORT
    mx_lookup: bool = False
    tls: TlsPolicy | None = None  # None: the general policy
    auth: Credentials | None = None

    @classmethod
    def parse(cls, text: str, *, tls: TlsPolicy | None = None,
              auth: Credentials | None = None) -> NextHop:
        """``[smtp.example.com]:587``, ``smtp.example.com``, ``[2001:db8::1]:25``."""
        text = text.strip()
        port = SMTP_PORT
        if text.startswith("["):
            host, bracket, rest = text[1:].partition("]")
            if not bracket or not host or (rest and not rest.startswith(":")):
                raise ConfigError(f"bad next hop {text!r}: expected [host]:port")
            mx_lookup = False
            if rest:
                port = _port(text, rest[1:])
        else:
            host, colon, port_text = text.rpartition(":") if text.count(":") == 1 else (
                text, "", "")
            if colon:
                port = _port(text, port_text)
            mx_lookup = True
        if not host or any(c in host for c in " /\\@"):
            raise ConfigError(f"bad next hop {text!r}")
        if mx_lookup and _ip(host) is not None:
            mx_lookup = False
        return cls(host.lower().rstrip("."), port, mx_lookup, tls, auth)

    def __str__(self) -> str:
        host = f"[{self.host}]" if not self.mx_lookup else self.host
        return f"{host}:{self.port}"


def _port(text: str, value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ConfigError(f"bad port in next hop {text!r}")
    return int(value)


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052 2.1, the well-known prefix
_NAT64_LOCAL: Final = ipaddress.IPv6Network("64:ff9b:1::/48")  # RFC 8215, any layout
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")  # RFC 4291 2.5.5.1, deprecated
_SIIT: Final = ipaddress.IPv6Network("::ffff:0:0:0/96")  # RFC 2765 2.1
_TEREDO: Final = ipaddress.IPv6Network("2001::/32")  # RFC 4380
#: IPv6 ranges that are not globally reachable although Python 3.11's ``is_global`` says so:
#: the local-use NAT64 prefix (a translator of our own network), the deprecated
#: IPv4-compatible addresses and SIIT's IPv4-translated ones.
_NOT_GLOBAL_V6: Final = (_NAT64_LOCAL, _COMPATIBLE, _SIIT)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address leads to through a translator or a tunnel: NAT64's
    well-known prefix (RFC 6052 2.2, the last 32 bits of the /96), 6to4 (RFC 3056, bits
    16-47), Teredo (RFC 4380: the server, and the client's mapped address, stored inverted),
    and the IPv4-compatible and SIIT forms (the last 32 bits). IPv4-mapped addresses are the
    caller's (they are IPv4 sockets); RFC 8215's local NAT64 prefix is refused whole."""
    if address in _NAT64 or address in _SIIT or address in _COMPATIBLE:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address in _TEREDO and address.teredo is not None:
        return list(address.teredo)
    return []


def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class RouteSettings:
    relayhost: NextHop | None = None
    transports: Mapping[str, NextHop] = field(default_factory=dict)
    allow_networks: Sequence[IPNetwork] = ()
    ip_versions: Sequence[int] = (4, 6)  # families to use, in order of preference
    port: int = SMTP_PORT  # where MX hosts listen (tests point it elsewhere)
    max_addresses: int = MAX_ADDRESSES
    own_names: frozenset[str] = frozenset()  # our host names, for MX loop detection


@dataclass(frozen=True, slots=True)
class Target:
    """One address to try."""

    host: str  # the name the address came from (for TLS verification and the log)
    ip: str
    port: int
    preference: int | None = None  # the MX preference, when the target came from an MX record

    @property
    def relay(self) -> str:
        """``mx.example.org[192.0.2.1]:25``, the mail log's ``relay=`` field."""
        return f"{self.host}[{self.ip}]:{self.port}"


@dataclass(frozen=True, slots=True)
class Route:
    domain: str
    key: str  # the next hop, for connection reuse: the domain, or ``[host]:port``
    targets: tuple[Target, ...]
    tls: TlsPolicy | None = None  # the next hop's own policy, else None (the general one)
    auth: Credentials | None = None
    notes: tuple[str, ...] = ()  # what was skipped and why (refused addresses, lookups failed)


class RouteError(PostroomError):
    """No target for the domain. ``reply`` says why, in the words a bounce or deferral uses."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.lines[0])
        self.reply = reply

    @property
    def verdict(self) -> Verdict:
        return verdict(self.reply.code)


def _temporary(status: str, text: str) -> RouteError:
    return RouteError(Reply(451, status, text))


def _permanent(status: str, text: str) -> RouteError:
    return RouteError(Reply(550, status, text))


class Router:
    """Routes domains with ``resolver`` under ``settings``; ``rng`` orders equal MX hosts."""

    def __init__(self, resolver: Resolver, settings: RouteSettings | None = None,
                 rng: random.Random | None = None) -> None:
        self.resolver = resolver
        self.settings = settings or RouteSettings()
        self._rng = rng or random.Random()

    def refused(self, ip: str) -> bool:
        """The destination policy: may we connect to ``ip`` when the DNS or a sender chose it?

        An IPv6 address that carries an IPv4 address (mapped, NAT64, 6to4, Teredo, the old
        compatible form) reaches that IPv4 host through a translator or tunnel, so the IPv4
        address inside is judged as well: ``64:ff9b::10.0.0.1`` is as private as ``10.0.0.1``."""
        address = ipaddress.ip_address(ip)
        if self._allowed(address):
            return False
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:  # ::ffff:0:0/96: the IPv4 socket itself
                return self._refused_ipv4(address.ipv4_mapped)
            if any(self._refused_ipv4(inner) for inner in embedded_ipv4(address)):
                return True
            if any(address in net for net in _NOT_GLOBAL_V6):
                return True
        # not global: loopback, private, link-local, unspecified, reserved, shared (RFC 6598),
        # documentation and benchmark ranges (the IANA special-purpose registries)
        return not address.is_global or address.is_multicast

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net
                   for net in self.settings.allow_networks)

    def _refused_ipv4(self, address: ipaddress.IPv4Address) -> bool:
        if self._allowed(address):
            return False
        return not address.is_global or address.is_multicast

    def next_hop(self, domain: str) -> NextHop | None:
        """The configured next hop for ``domain``, if any (override first, then smarthost)."""
        transports = self.settings.transports
        hop = transports.get(domain)
        labels = domain.split(".")
        for i in range(1, len(labels)):
            if hop is not None:
                break
            hop = transports.get("." + ".".join(labels[i:]))
        return hop or self.settings.relayhost

    async def route(self, domain: str) -> Route:
        """The targets for mail to ``domain``, in order; :class:`RouteError` when there are
        none now (temporary) or ever (permanent)."""
        domain = domain.lower().rstrip(".")
        hop = self.next_hop(domain)
        if hop is not None:
            return await self._configured(domain, hop)
        if domain.startswith("["):
            return self._literal(domain)
        try:
            mx = await self.resolver.mx_hosts(domain)
        except DnsError as exc:
            raise self._dns_error(exc, domain) from None
        if mx.kind is MxKind.NULL:
            raise _permanent("5.1.10", f"Domain {domain} does not accept mail (nullMX)")
        hosts = self._cut_own(domain, mx.ordered(self._rng))
        return await self._resolve(domain, domain, hosts, checked=True,
                                   implicit=mx.kind is MxKind.IMPLICIT)

    # -- pieces -------------------------------------------------------------------------------
    def _dns_error(self, exc: DnsError, domain: str) -> RouteError:
        if isinstance(exc, NoSuchDomain):
            return _permanent("5.1.2", f"Host or domain name not found: {domain} (NXDOMAIN)")
        if exc.permanent:
            return _permanent(exc.status, exc.text)
        return _temporary("4.4.3", exc.text)

    def _literal(self, domain: str) -> Route:
        """RFC 5321 4.1.3: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` names the host itself."""
        inner = domain[1:-1] if domain.endswith("]") else ""
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        address = _ip(inner)
        if address is None:
            raise _permanent("5.1.2", f"bad address literal {domain}")
        ip = str(address)
        if address.version not in self.settings.ip_versions:
            raise _permanent("5.4.4", f"{domain}: IPv{address.version} is not in use here")
        if self.refused(ip):
            raise _permanent("5.4.4", f"{domain}: destination address refused by policy")
        return Route(domain, domain, (Target(domain, ip, self.settings.port),))

    def _cut_own(self, domain: str, hosts: list[MxHost]) -> list[MxHost]:
        own = self.settings.own_names
        mine = [mx.preference for mx in hosts if mx.host in own]
        if not mine:
            return hosts
        kept = [mx for mx in hosts if mx.preference < min(mine)]
        if not kept:
            raise _permanent("5.4.6", f"mail for {domain} loops back to myself")
        return kept

    async def _configured(self, domain: str, hop: NextHop) -> Route:
        """A configured next hop that cannot be found is the operator's problem, not the
        sender's: every failure here defers (4.4.3 for DNS trouble, 4.4.4 for no address)."""
        try:
            return await self._configured_hop(domain, hop)
        except RouteError as exc:
            if exc.verdict is Verdict.PERMANENT:
                raise _temporary("4.4.4", f"next hop {hop}: {exc.reply.lines[0]}") from None
            raise

    async def _configured_hop(self, domain: str, hop: NextHop) -> Route:
        if hop.mx_lookup:
            try:
                mx = await self.resolver.mx_hosts(hop.host)
            except DnsError as exc:
                raise self._dns_error(exc, hop.host) from None
            if mx.kind is MxKind.NULL:
                raise _permanent("5.4.4", f"next hop {hop.host} publishes a null MX")
            hosts = mx.ordered(self._rng)
        else:
            hosts = [MxHost(0, hop.host)]
        route = await self._resolve(domain, str(hop), hosts, checked=False, implicit=False,
                                    port=hop.port)
        return Route(domain, route.key, route.targets, hop.tls, hop.auth, route.notes)

    async def _resolve(self, domain: str, key: str, hosts: list[MxHost], *, checked: bool,
                       implicit: bool, port: int | None = None) -> Route:
        """Addresses of ``hosts`` (looked up at once), filtered by the destination policy."""
        port = self.settings.port if port is None else port
        versions = tuple(self.settings.ip_versions)
        answers = await asyncio.gather(
            *(self.resolver.addresses(mx.host, versions) for mx in hosts), return_exceptions=True
        )
        targets: list[Target] = []
        notes: list[str] = []
        temporary: list[DnsError] = []
        permanent: list[DnsError] = []
        refused: list[str] = []
        for mx, answer in zip(hosts, answers, strict=True):
            if isinstance(answer, DnsError):
                (permanent if isinstance(answer, DnsPermanentError) else temporary).append(answer)
                notes.append(f"{mx.host}: {answer.text}")
                continue
            if isinstance(answer, BaseException):
                raise answer
            for ip in answer:
                if checked and self.refused(ip):
                    refused.append(f"{mx.host}[{ip}]")
                    notes.append(f"{mx.host}[{ip}]: destination address refused by policy")
                    continue
                preference = None if implicit or not checked else mx.preference
                targets.append(Target(mx.host, ip, port, preference))
        if targets:
            return Route(domain, key, tuple(targets[: self.settings.max_addresses]),
                         notes=tuple(notes))
        if temporary:
            raise _temporary("4.4.3", temporary[0].text)
        if refused:
            raise _permanent("5.4.4", f"no allowed address for {domain}: "
                                      f"{', '.join(refused[:5])} refused by the destination policy")
        if permanent:
            first = permanent[0]
            if implicit:
                text = f"{domain} has no MX and no address record ({first.text})"
            else:
                text = f"no address for the mail hosts of {domain} ({first.text})"
            raise _permanent("5.4.4", text)
        raise _permanent("5.4.4", f"no address for the mail hosts of {domain}")
