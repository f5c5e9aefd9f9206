"""A DNS server on 127.0.0.1 for tests (dnslib), so no test ever asks the system resolver.

Records come from zone text (``example.test. 60 IN MX 10 mx.example.test.``), from a dict, or
both::

    with serve_dns({"example.test": ["MX 10 mx.example.test."],
                    "mx.example.test": ["A 127.0.0.2", "AAAA ::1"],
                    "broken.test": "SERVFAIL"}) as dns_server:
        resolver = dns_server.resolver()

A name with records of other types only answers NOERROR with an empty answer (NoAnswer); a name
with no records at all answers NXDOMAIN; a name marked ``"SERVFAIL"`` or ``"REFUSED"`` answers
that rcode for every type; a CNAME is followed within the zone. Every question is recorded in
``queries`` as ``(name, type)``. :func:`silent_dns` is a UDP socket that never answers, for
timeouts.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from postroom.dns import Resolver

ZoneSpec = Mapping[str, Sequence[str] | str]


def _name(text: str) -> str:
    return text.rstrip(".").lower()


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    """Answers from a fixed set of records (dnslib's resolver interface)."""

    def __init__(self, zone_text: str = "", records: ZoneSpec | None = None) -> None:
        self.records: dict[str, list[RR]] = {}
        self.rcodes: dict[str, int] = {}
        self.queries: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        lines = [zone_text] if zone_text else []
        for name, spec in (records or {}).items():
            if isinstance(spec, str):
                host, slash, rtype = name.partition("/")
                self.rcodes[_name(host) + slash + rtype.upper()] = getattr(RCODE, spec)
                continue
            fqdn = name if name.endswith(".") else name + "."
            lines.extend(f"{fqdn} 60 IN {item}" for item in spec)
        for rr in RR.fromZone("\n".join(lines)) if lines else []:
            self.records.setdefault(_name(str(rr.rname)), []).append(rr)

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        reply = request.reply()
        qname = _name(str(request.q.qname))
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
        rcode = self.rcodes.get(f"{qname}/{qtype}", self.rcodes.get(qname))
        if rcode is not None:
            reply.header.rcode = rcode
            return reply
        name = qname
        for _ in range(8):  # follow CNAMEs inside the zone
            rrs = self.records.get(name)
            if rrs is None:
                if name == qname:
                    reply.header.rcode = RCODE.NXDOMAIN
                return reply
            cname = [rr for rr in rrs if QTYPE[rr.rtype] == "CNAME"]
            if cname and qtype != "CNAME":
                reply.add_answer(*cname)
                name = _name(str(cname[0].rdata))
                continue
            reply.add_answer(*(rr for rr in rrs if QTYPE[rr.rtype] == qtype))
            return reply
        return reply


class DnsTestServer:
    """A UDP DNS server on 127.0.0.1 and a random port, answering from a :class:`ZoneResolver`."""

    def __init__(self, zone: ZoneSpec | str | None = None, zone_text: str = "") -> None:
        if isinstance(zone, str):
            zone_text, zone = zone, None
        self.zone = ZoneResolver(zone_text, zone)
        quiet = DNSLogger(log="-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        self._server = DNSServer(self.zone, address="127.0.0.1", port=0, logger=quiet)
        self.port: int = self._server.server.server_address[1]

    @property
    def queries(self) -> list[tuple[str, str]]:
        return self.zone.queries

    def start(self) -> None:
        server = self._server.server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.server.shutdown()
        self._server.server.server_close()
        self._thread.join(5)

    def resolver(self, timeout: float = 2.0, cache_size: int = 0) -> Resolver:
        return Resolver(["127.0.0.1"], port=self.port, timeout=timeout, cache_size=cache_size)


@contextmanager
def serve_dns(zone: ZoneSpec | str | None = None, zone_text: str = "") -> Iterator[DnsTestServer]:
    server = DnsTestServer(zone, zone_text)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def silent_dns() -> Iterator[int]:
    """A UDP port on 127.0.0.1 where nothing ever answers; yields the port."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()
