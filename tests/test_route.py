"""Routing: overrides, smarthost, MX order, implicit and null MX, the destination policy."""

from __future__ import annotations

import asyncio
import ipaddress
import random
from collections.abc import Iterator

import pytest

from postroom.delivery.route import (
    Credentials,
    NextHop,
    Route,
    RouteError,
    Router,
    RouteSettings,
    Target,
    TlsPolicy,
)
from postroom.errors import ConfigError
from postroom.smtp.client import Verdict
from tests.dns_support import DnsTestServer, serve_dns

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

ZONE = {
    "example.test": ["MX 10 mx1.example.test.", "MX 10 mx2.example.test.", "MX 20 mx3.example.test."],
    "mx1.example.test": ["A 127.0.0.2", "AAAA ::1"],
    "mx2.example.test": ["A 127.0.0.3"],
    "mx3.example.test": ["A 127.0.0.4"],
    "null.test": ["MX 0 ."],
    "nomx.test": ["A 127.0.0.5"],
    "bare.test": ["TXT nothing"],
    "private.test": ["MX 10 inside.private.test."],
    "inside.private.test": ["A 10.1.2.3", "AAAA fe80::1"],
    "lost.test": ["MX 10 nowhere.lost.test.", "MX 20 alsonowhere.lost.test."],
    "flaky.test": ["MX 10 sick.flaky.test.", "MX 20 gone.flaky.test."],
    "sick.flaky.test": "SERVFAIL",
    "broken.test": "SERVFAIL",
    "self.test": ["MX 10 mx.self.test.", "MX 20 us.example.net.", "MX 30 after.self.test."],
    "mx.self.test": ["A 127.0.0.6"],
    "after.self.test": ["A 127.0.0.7"],
    "onlyus.test": ["MX 10 us.example.net."],
    "smart.example.net": ["A 127.0.0.8"],
    "relay.example.net": ["MX 5 smart.example.net."],
    "nat64.test": ["MX 10 mx.nat64.test.", "MX 20 tunnel.nat64.test."],
    "mx.nat64.test": ["AAAA 64:ff9b::a00:1"],
    "tunnel.nat64.test": ["AAAA 2002:a00:1::1"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with serve_dns(ZONE) as server:
        yield server


def router(dns_server: DnsTestServer, seed: int = 1, **settings: object) -> Router:
    opts: dict[str, object] = {"allow_networks": LOOPBACK, **settings}
    return Router(dns_server.resolver(), RouteSettings(**opts), random.Random(seed))  # type: ignore[arg-type]


def route(r: Router, domain: str) -> Route:
    return asyncio.run(r.route(domain))


def fail(r: Router, domain: str) -> RouteError:
    with pytest.raises(RouteError) as info:
        route(r, domain)
    return info.value


def test_mx_order_with_addresses(dns_server: DnsTestServer) -> None:
    result = route(router(dns_server, ip_versions=(6, 4)), "Example.test")
    hosts = [t.host for t in result.targets]
    assert set(hosts[:3]) == {"mx1.example.test", "mx2.example.test"}
    assert hosts[-1] == "mx3.example.test"
    mx1 = [t.ip for t in result.targets if t.host == "mx1.example.test"]
    assert mx1 == ["::1", "127.0.0.2"]  # IPv6 first when asked so
    assert result.targets[-1] == Target("mx3.example.test", "127.0.0.4", 25, 20)
    assert result.key == "example.test" and result.tls is None


def test_equal_mx_order_follows_the_random_source(dns_server: DnsTestServer) -> None:
    firsts = {route(router(dns_server, seed=s), "example.test").targets[0].host for s in range(12)}
    assert firsts == {"mx1.example.test", "mx2.example.test"}


def test_ipv4_only(dns_server: DnsTestServer) -> None:
    result = route(router(dns_server, ip_versions=(4,)), "example.test")
    assert all(":" not in t.ip for t in result.targets) and len(result.targets) == 3


def test_implicit_mx(dns_server: DnsTestServer) -> None:
    result = route(router(dns_server), "nomx.test")
    assert result.targets == (Target("nomx.test", "127.0.0.5", 25, None),)


def test_null_mx_bounces_5_1_10(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "null.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.1.10"


def test_nxdomain_bounces_5_1_2(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "nowhere.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.1.2"


def test_servfail_defers(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "broken.test")
    assert error.verdict is Verdict.TEMPORARY and error.reply.enhanced == "4.4.3"


def test_no_mx_no_address_bounces(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "bare.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.4.4"
    assert "no MX and no address" in error.reply.lines[0]


def test_mx_hosts_that_do_not_exist_bounce(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "lost.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.4.4"


def test_mx_host_lookup_trouble_defers(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "flaky.test")  # one SERVFAIL, one NXDOMAIN
    assert error.verdict is Verdict.TEMPORARY


def test_private_destinations_refused_by_default(dns_server: DnsTestServer) -> None:
    strict = router(dns_server, allow_networks=())
    error = fail(strict, "example.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.4.4"
    assert "127.0.0.2" in error.reply.lines[0] and "policy" in error.reply.lines[0]
    error = fail(router(dns_server), "private.test")  # loopback allowed, 10/8 and fe80:: not
    assert "10.1.2.3" in error.reply.lines[0]
    allowed = router(dns_server, allow_networks=(ipaddress.ip_network("10.0.0.0/8"),))
    assert [t.ip for t in route(allowed, "private.test").targets] == ["10.1.2.3"]


def test_policy_details() -> None:
    r = Router(resolver=None, settings=RouteSettings())  # type: ignore[arg-type]
    for ip in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.1.1", "224.0.0.1",
               "0.0.0.0", "::1", "fe80::1", "fc00::1", "ff02::1", "::", "::ffff:127.0.0.1",
               "240.0.0.1", "100.64.0.1", "192.0.2.1", "2001:db8::1"):
        assert r.refused(ip), ip
    for ip in ("8.8.8.8", "2001:4860:4860::8888", "::ffff:8.8.8.8"):
        assert not r.refused(ip), ip


@pytest.mark.parametrize("ip", [
    "::ffff:10.0.0.1", "::ffff:127.0.0.1",  # IPv4-mapped
    "64:ff9b::10.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::192.168.1.1",  # NAT64, RFC 6052
    "64:ff9b:1::808:808", "64:ff9b:1:a00:1::", "64:ff9b:1::a00:1",  # local-use NAT64, RFC 8215
    "2002:a00:1::1", "2002:7f00:1::25", "2002:c0a8:101::1",  # 6to4 of 10/8, 127/8, 192.168/16
    "2001:0:808:808:0:ffff:f5ff:fffe",  # Teredo whose client is 10.0.0.1 (inverted)
    "2001:0:a00:1::1",  # Teredo with a private server
    "::10.0.0.1", "::8.8.8.8",  # IPv4-compatible (deprecated)
    "::ffff:0:10.0.0.1", "::ffff:0:8.8.8.8",  # SIIT IPv4-translated
])
def test_ipv6_forms_of_an_ipv4_address_are_judged_by_it(ip: str) -> None:
    assert Router(resolver=None, settings=RouteSettings()).refused(ip)  # type: ignore[arg-type]


def test_ipv6_forms_of_public_ipv4_and_the_allow_list() -> None:
    r = Router(resolver=None, settings=RouteSettings())  # type: ignore[arg-type]
    for ip in ("64:ff9b::8.8.8.8", "2002:808:808::1", "::ffff:8.8.8.8"):
        assert not r.refused(ip), ip
    # allowing the IPv4 network allows its NAT64/6to4 forms; the local NAT64 prefix needs its own
    ten = Router(resolver=None,  # type: ignore[arg-type]
                 settings=RouteSettings(allow_networks=(ipaddress.ip_network("10.0.0.0/8"),)))
    assert not ten.refused("64:ff9b::10.0.0.1") and not ten.refused("2002:a00:1::1")
    assert ten.refused("64:ff9b::127.0.0.1") and ten.refused("64:ff9b:1::a00:1")
    nat64 = Router(resolver=None,  # type: ignore[arg-type]
                   settings=RouteSettings(allow_networks=(ipaddress.ip_network("64:ff9b:1::/48"),)))
    assert not nat64.refused("64:ff9b:1::a00:1")


def test_a_nat64_mx_of_a_private_address_is_refused(dns_server: DnsTestServer) -> None:
    error = fail(router(dns_server), "nat64.test")  # loopback is allowed; 10/8 behind NAT64 not
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.4.4"
    assert "64:ff9b::a00:1" in error.reply.lines[0] and "2002:a00:1::1" in error.reply.lines[0]


def test_some_refused_some_allowed_keeps_the_allowed(dns_server: DnsTestServer) -> None:
    only_two = router(dns_server, allow_networks=(ipaddress.ip_network("127.0.0.2/32"),))
    result = route(only_two, "example.test")
    assert [t.ip for t in result.targets] == ["127.0.0.2"]
    assert any("127.0.0.3" in note for note in result.notes)


def test_address_literals(dns_server: DnsTestServer) -> None:
    r = router(dns_server)
    assert route(r, "[127.0.0.9]").targets == (Target("[127.0.0.9]", "127.0.0.9", 25),)
    assert route(r, "[IPv6:::1]").targets[0].ip == "::1"
    assert fail(router(dns_server, allow_networks=()), "[127.0.0.9]").verdict is Verdict.PERMANENT
    assert fail(r, "[not.an.ip]").verdict is Verdict.PERMANENT


def test_own_name_in_mx_cuts_the_list(dns_server: DnsTestServer) -> None:
    r = router(dns_server, own_names=frozenset({"us.example.net"}))
    assert [t.host for t in route(r, "self.test").targets] == ["mx.self.test"]
    error = fail(r, "onlyus.test")
    assert error.verdict is Verdict.PERMANENT and error.reply.enhanced == "5.4.6"


def test_transport_override_and_subdomains(dns_server: DnsTestServer) -> None:
    transports = {"example.test": NextHop.parse("[127.0.0.50]:2525"),
                  ".sub.test": NextHop.parse("[smart.example.net]:26")}
    r = router(dns_server, transports=transports, allow_networks=())
    result = route(r, "example.test")
    assert result.targets == (Target("127.0.0.50", "127.0.0.50", 2525, None),)
    assert result.key == "[127.0.0.50]:2525"
    assert route(r, "a.b.sub.test").targets == (Target("smart.example.net", "127.0.0.8", 26, None),)
    # configured next hops are the operator's choice: not checked against the policy
    assert fail(r, "nomx.test").verdict is Verdict.PERMANENT  # but MX-routed mail still is


def test_smarthost_with_auth_and_tls(dns_server: DnsTestServer) -> None:
    hop = NextHop.parse("[smart.example.net]:587", tls=TlsPolicy.REQUIRED,
                        auth=Credentials("user", "pw"))
    r = router(dns_server, relayhost=hop, allow_networks=())
    result = route(r, "anything.test")
    assert result.targets == (Target("smart.example.net", "127.0.0.8", 587, None),)
    assert result.tls is TlsPolicy.REQUIRED and result.auth == Credentials("user", "pw")
    assert "pw" not in repr(result.auth)


def test_smarthost_without_brackets_looks_up_mx(dns_server: DnsTestServer) -> None:
    r = router(dns_server, relayhost=NextHop.parse("relay.example.net"))
    assert route(r, "x.test").targets == (Target("smart.example.net", "127.0.0.8", 25, None),)


def test_missing_smarthost_defers_never_bounces(dns_server: DnsTestServer) -> None:
    r = router(dns_server, relayhost=NextHop.parse("[gone.example.net]"))
    error = fail(r, "x.test")
    assert error.verdict is Verdict.TEMPORARY and "gone.example.net" in error.reply.lines[0]


def test_next_hop_syntax() -> None:
    assert NextHop.parse("[smtp.example.com]:587") == NextHop("smtp.example.com", 587, False)
    assert NextHop.parse("smtp.example.com") == NextHop("smtp.example.com", 25, True)
    assert NextHop.parse("smtp.example.com:2525") == NextHop("smtp.example.com", 2525, True)
    assert NextHop.parse("[2001:db8::1]:25") == NextHop("2001:db8::1", 25, False)
    assert NextHop.parse("192.0.2.1") == NextHop("192.0.2.1", 25, False)
    assert str(NextHop.parse("[a.example]:26")) == "[a.example]:26"
    for bad in ("[x", "[x]y", "host:0", "host:99999", "", "a b", "[x]:port"):
        with pytest.raises(ConfigError):
            NextHop.parse(bad)


def test_max_addresses(dns_server: DnsTestServer) -> None:
    assert len(route(router(dns_server, max_addresses=2), "example.test").targets) == 2


def test_relay_field() -> None:
    assert Target("mx.example.org", "192.0.2.1", 25).relay == "mx.example.org[192.0.2.1]:25"
