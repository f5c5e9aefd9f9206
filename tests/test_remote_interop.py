"""The remote deliverer against a running ``postroom serve`` (STARTTLS with its self-signed
certificate, PIPELINING, CHUNKING, per-recipient answers), as one postroom relays to another."""

from __future__ import annotations

import asyncio

import pytest

from postroom.delivery.remote import AttemptResult, BytesSource, RemoteDeliverer, RemoteSettings
from postroom.delivery.route import NextHop, Router, RouteSettings, TlsPolicy
from postroom.dns import Resolver
from postroom.smtp.client import OutboundEnvelope, OutboundRecipient, Stage, Verdict
from tests.conftest import ServerHandle

MESSAGE = b"Subject: relayed\r\nFrom: x@example.net\r\n\r\n.leading dot\r\nbody\r\n"


def deliver(server: ServerHandle, policy: TlsPolicy, *rcpts: str) -> AttemptResult:
    hop = NextHop.parse(f"[127.0.0.1]:{server.port}")
    # the resolver is never asked: the next hop is an address (port 9 would refuse anyway)
    router = Router(Resolver(["127.0.0.1"], port=9, timeout=0.5),
                    RouteSettings(transports={"example.com": hop}))
    env = OutboundEnvelope("x@example.net", tuple(OutboundRecipient(r) for r in rcpts))

    async def go() -> AttemptResult:
        d = RemoteDeliverer(RemoteSettings(helo_name="relay.example.net", tls_policy=policy),
                            router)
        try:
            results = [await d.deliver("example.com", env, BytesSource(MESSAGE))
                       for _ in range(2)]
            assert d.cache.reused == 1
            return results[-1]
        finally:
            await d.close()

    return asyncio.run(go())


@pytest.mark.interop
@pytest.mark.parametrize("policy", [TlsPolicy.OPPORTUNISTIC, TlsPolicy.NONE])
def test_relay_into_postroom(server: ServerHandle, policy: TlsPolicy) -> None:
    result = deliver(server, policy, "alice@example.com", "nobody@example.com", "bob@example.com")
    alice, nobody, bob = result.recipients
    assert alice.verdict is Verdict.DELIVERED and bob.verdict is Verdict.DELIVERED
    assert alice.tls is (policy is TlsPolicy.OPPORTUNISTIC)
    assert alice.stage is Stage.BDAT and "queued as" in alice.detail
    assert nobody.verdict is Verdict.PERMANENT and nobody.stage is Stage.RCPT
    assert nobody.reply.enhanced == "5.1.1"
    server.wait_for(lambda: len(server.messages("alice@example.com")) == 2)
    stored = server.messages("alice@example.com")[0]
    assert stored.endswith(MESSAGE.replace(b"\r\n", b"\n"))  # Maildir keeps LF line ends
    assert len(server.messages("bob@example.com")) == 2
