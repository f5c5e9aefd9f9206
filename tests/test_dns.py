"""The resolver against a real DNS server on 127.0.0.1 (dnslib): MX, null MX, implicit MX,
addresses, NXDOMAIN, SERVFAIL and a server that never answers."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.dns import (
    DnsTemporaryError,
    MxHost,
    MxKind,
    NoAddress,
    NoSuchDomain,
    Resolver,
)
from tests.dns_support import DnsTestServer, serve_dns, silent_dns

ZONE = """
example.test.        60 IN MX 20 backup.example.test.
example.test.        60 IN MX 10 mx-b.example.test.
example.test.        60 IN MX 10 mx-a.example.test.
example.test.        60 IN MX 10 mx-c.example.test.
mx-a.example.test.   60 IN A 127.0.0.2
mx-a.example.test.   60 IN AAAA ::1
mx-b.example.test.   60 IN A 127.0.0.3
backup.example.test. 60 IN A 127.0.0.4
null.test.           60 IN MX 0 .
mixed.test.          60 IN MX 0 .
mixed.test.          60 IN MX 10 mx-a.example.test.
nomx.test.           60 IN A 127.0.0.5
nomx.test.           60 IN TXT "v=spf1 -all"
txtonly.test.        60 IN TXT "hello"
www.nomx.test.       60 IN CNAME nomx.test.
"""


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with serve_dns(ZONE) as server:
        yield server


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_mx_sorted_by_preference(dns_server: DnsTestServer) -> None:
    result = run(dns_server.resolver().mx_hosts("Example.TEST."))
    assert result.kind is MxKind.LISTED and result.domain == "example.test"
    assert result.hosts == (
        MxHost(10, "mx-a.example.test"), MxHost(10, "mx-b.example.test"),
        MxHost(10, "mx-c.example.test"), MxHost(20, "backup.example.test"),
    )


def test_equal_preferences_are_shuffled_and_lower_first(dns_server: DnsTestServer) -> None:
    result = run(dns_server.resolver().mx_hosts("example.test"))
    seen = set()
    rng = random.Random(4)
    for _ in range(60):
        order = [mx.host for mx in result.ordered(rng)]
        assert order[-1] == "backup.example.test"
        seen.add(tuple(order[:3]))
    assert len(seen) == 6  # every order of the three equals turns up


def test_null_mx(dns_server: DnsTestServer) -> None:
    result = run(dns_server.resolver().mx_hosts("null.test"))
    assert result.kind is MxKind.NULL and result.hosts == () and result.ordered() == []


def test_null_mx_among_others_is_skipped(dns_server: DnsTestServer) -> None:
    result = run(dns_server.resolver().mx_hosts("mixed.test"))
    assert result.kind is MxKind.LISTED and result.hosts == (MxHost(10, "mx-a.example.test"),)


def test_implicit_mx(dns_server: DnsTestServer) -> None:
    result = run(dns_server.resolver().mx_hosts("nomx.test"))
    assert result.kind is MxKind.IMPLICIT and result.hosts == (MxHost(0, "nomx.test"),)


def test_nxdomain(dns_server: DnsTestServer) -> None:
    with pytest.raises(NoSuchDomain) as info:
        run(dns_server.resolver().mx_hosts("nowhere.test"))
    assert info.value.permanent and info.value.status == "5.1.2"


def test_addresses_both_families_in_order(dns_server: DnsTestServer) -> None:
    resolver = dns_server.resolver()
    assert run(resolver.addresses("mx-a.example.test")) == ["127.0.0.2", "::1"]
    assert run(resolver.addresses("mx-a.example.test", (6, 4))) == ["::1", "127.0.0.2"]
    assert run(resolver.addresses("mx-a.example.test", (4,))) == ["127.0.0.2"]
    assert run(resolver.addresses("www.nomx.test")) == ["127.0.0.5"]  # CNAME followed
    assert run(resolver.addresses("192.0.2.7")) == ["192.0.2.7"]  # no query for an address


def test_no_address_and_no_such_host(dns_server: DnsTestServer) -> None:
    resolver = dns_server.resolver()
    with pytest.raises(NoAddress) as info:
        run(resolver.addresses("txtonly.test"))
    assert info.value.status == "5.4.4"
    with pytest.raises(NoSuchDomain):
        run(resolver.addresses("mx-c.example.test"))


def test_servfail_is_temporary() -> None:
    with serve_dns({"broken.test": "SERVFAIL", "refused.test": "REFUSED"}) as server:
        resolver = server.resolver()
        for name in ("broken.test", "refused.test"):
            with pytest.raises(DnsTemporaryError) as info:
                run(resolver.mx_hosts(name))
            assert not info.value.permanent and info.value.status == "4.4.3"
        assert ("broken.test", "MX") in server.queries


def test_one_family_failing_still_gives_the_other() -> None:
    zone = {"half.test": ["A 127.0.0.9"], "half.test/AAAA": "SERVFAIL",
            "gone.test": ["TXT x"], "gone.test/AAAA": "SERVFAIL"}
    with serve_dns(zone) as server:
        resolver = server.resolver()
        assert run(resolver.addresses("half.test")) == ["127.0.0.9"]
        assert ("half.test", "AAAA") in server.queries
        # nothing found, and one family could not be asked: temporary, not "no address"
        with pytest.raises(DnsTemporaryError):
            run(resolver.addresses("gone.test"))


def test_timeout_is_temporary_and_bounded() -> None:
    with silent_dns() as port:
        resolver = Resolver(["127.0.0.1"], port=port, timeout=0.3, cache_size=0)
        started = time.monotonic()
        with pytest.raises(DnsTemporaryError, match="timed out"):
            run(resolver.mx_hosts("example.test"))
        assert time.monotonic() - started < 2.0


def test_cache_answers_repeat_questions(dns_server: DnsTestServer) -> None:
    resolver = dns_server.resolver(cache_size=100)
    before = len(dns_server.queries)
    run(resolver.mx_hosts("example.test"))
    run(resolver.mx_hosts("example.test"))
    assert len(dns_server.queries) == before + 1


def test_configured_name_servers_never_read_resolv_conf(monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    real_open = open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    resolver = Resolver(["127.0.0.1"], port=1)
    assert resolver.nameservers == ["127.0.0.1@1"]
    assert not any(Path(p).name == "resolv.conf" for p in opened)
