"""The one DNS resolver postroom uses (dnspython's asyncio resolver), with typed answers.

- :mod:`.resolver`: :class:`Resolver` (configurable name servers, port and timeout),
  :class:`MxResult` (RFC 5321 5.1 MX, implicit MX; RFC 7505 null MX made explicit) and the error
  tree: :class:`DnsPermanentError` (NXDOMAIN, null MX, no address) and
  :class:`DnsTemporaryError` (SERVFAIL, timeout, no name server answered).

Everything above the resolver (routing, mail-auth checks) takes a :class:`Resolver` as an argument,
so tests pass one that asks a DNS server on 127.0.0.1 and nothing here reads ``/etc/resolv.conf``
unless no name servers are configured.
"""

from postroom.dns.resolver import (
    DnsError,
    DnsPermanentError,
    DnsTemporaryError,
    MxHost,
    MxKind,
    MxResult,
    NoAddress,
    NoSuchDomain,
    NullMx,
    Resolver,
)

__all__ = [
    "DnsError",
    "DnsPermanentError",
    "DnsTemporaryError",
    "MxHost",
    "MxKind",
    "MxResult",
    "NoAddress",
    "NoSuchDomain",
    "NullMx",
    "Resolver",
]
