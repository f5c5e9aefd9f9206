"""8BITMIME downgrade on real connections (RFC 6152 3): Postfix's smtp-sink told not to offer
8BITMIME (``-8``) or ESMTP at all (``-e``), and receivers on postroom's server core with
8BITMIME left out of their EHLO reply. What arrives must be 7-bit, declare its converted size,
and decode (Python's email package) to the same parts; what cannot be converted bounces with
5.6.3 without being offered."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import re
import smtplib
import time
from collections.abc import Callable, Iterator
from email.message import Message
from pathlib import Path

import pytest

from postroom.delivery.remote import AttemptResult, BytesSource
from postroom.message.downgrade import downgrade, plan
from postroom.smtp.client import Stage, Verdict
from tests.conftest import make_server
from tests.dns_support import DnsTestServer, serve_dns
from tests.relay_support import relay_config
from tests.test_remote import (
    DNS,
    Receiver,
    Sink,
    deliverer,
    envelope,
    free_port,
    once,
    run,
    smtp_sinks,
)

SIGNED = (
    "Received: from a by b; today\r\n"
    "DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s; bh=xyz; b=abc\r\n"
    "From: Ana <ana@example.com>\r\nTo: bob@example.test\r\nSubject: greetings\r\n"
)
HEAD = "From: Ana <ana@example.com>\r\nTo: bob@example.test\r\nSubject: greetings\r\nMIME-Version: 1.0\r\n"
BODY = (
    'Content-Type: multipart/mixed; boundary="=_b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n'
    "--=_b\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    "Grüße aus Köln = café\r\n.a line with a leading dot\r\n" + "ü" * 200 + "\r\n"
    "--=_b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    "AAECAwQFBgc=\r\n--=_b--\r\n"
)
EIGHT_BIT = (HEAD + BODY).encode()


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., Sink]]:
    with smtp_sinks() as start:
        yield start


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with serve_dns(DNS) as server:
        yield server


def leaves(raw: bytes) -> list[tuple[str, bytes]]:
    """(type, decoded body) of every leaf, line ends made LF (smtp-sink's dump has LF)."""
    message: Message = email.message_from_bytes(raw, policy=email.policy.compat32)
    found = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            found.append((part.get_content_type(), payload.replace(b"\r\n", b"\n")))
    return found


def dumped(sink: Sink, wait: float = 3) -> bytes:
    deadline = time.monotonic() + wait
    while not list(sink.dump.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    (path,) = sink.dump.iterdir()
    return path.read_bytes()


def converted(message: bytes, *, utf8: bool = False) -> bytes:
    return b"".join(downgrade([message], plan([message], utf8_headers=utf8)))


# -- smtp-sink ------------------------------------------------------------------------------------
@pytest.mark.parametrize("option", ["-8", "-e"])  # no 8BITMIME; no EHLO at all (HELO)
def test_smtp_sink_without_8bitmime_gets_7bit_that_decodes_the_same(
        dns_server: DnsTestServer, sink_factory: Callable[..., Sink], option: str) -> None:
    sink = sink_factory(option)
    result = run(deliverer(dns_server, sink.port), "example.test",
                 envelope("bob@example.test", body="8BITMIME"), BytesSource(EIGHT_BIT))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED, rcpt.detail
    raw = dumped(sink)
    assert raw.isascii()
    mail_args = re.search(rb"X-Mail-Args: (.*)", raw)
    assert mail_args is not None and b"BODY=" not in mail_args[1]
    expected = converted(EIGHT_BIT)
    assert raw.endswith(expected.replace(b"\r\n", b"\n") + b"\n")
    assert leaves(raw) == leaves(EIGHT_BIT)
    assert any("does not offer 8BITMIME: 1 part(s) converted" in n for n in result.notes)


def test_smtp_sink_with_8bitmime_gets_the_message_as_it_is(
        dns_server: DnsTestServer, sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory()
    result = run(deliverer(dns_server, sink.port), "example.test",
                 envelope("bob@example.test", body="8BITMIME"), BytesSource(EIGHT_BIT))
    assert result.recipients[0].verdict is Verdict.DELIVERED
    raw = dumped(sink)
    assert b"BODY=8BITMIME" in raw and raw.endswith(EIGHT_BIT.replace(b"\r\n", b"\n") + b"\n")


# -- receivers on the server core -----------------------------------------------------------------
def to_receiver(dns_server: DnsTestServer, message: bytes, *, chunking: bool = True,
                mime_conversion: bool = True, **env_kw: object) -> tuple[AttemptResult, Receiver]:
    port = free_port()

    async def go() -> tuple[AttemptResult, Receiver]:
        receiver = await Receiver("127.0.0.1", port, no_8bitmime=True).start()
        try:
            return await once(deliverer(dns_server, port, chunking=chunking,
                                        mime_conversion=mime_conversion), "example.test",
                              envelope("bob@example.test", **env_kw),
                              BytesSource(message)), receiver
        finally:
            await receiver.stop()

    return asyncio.run(go())


@pytest.mark.parametrize("chunking", [True, False])  # BDAT chunks, or DATA with dot-stuffing
def test_the_converted_octets_arrive_exactly(dns_server: DnsTestServer, chunking: bool) -> None:
    result, receiver = to_receiver(dns_server, EIGHT_BIT, chunking=chunking, body="8BITMIME")
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert result.recipients[0].stage is (Stage.BDAT if chunking else Stage.END)
    (got,) = receiver.messages
    assert got.content == converted(EIGHT_BIT) and got.content.isascii()
    assert got.mail is not None and got.mail.body is None  # no BODY= without 8BITMIME
    assert got.mail.size == len(got.content) != len(EIGHT_BIT)  # SIZE= of what was sent
    assert leaves(got.content) == leaves(EIGHT_BIT)


def test_with_conversion_off_the_message_goes_as_it_is(dns_server: DnsTestServer) -> None:
    """outbound.mime_conversion = false (Postfix's disable_mime_output_conversion): the 8-bit
    message is sent unchanged, with no BODY= the server did not offer."""
    result, receiver = to_receiver(dns_server, EIGHT_BIT, body="8BITMIME", mime_conversion=False)
    assert result.recipients[0].verdict is Verdict.DELIVERED
    (got,) = receiver.messages
    assert got.content == EIGHT_BIT
    assert got.mail is not None and got.mail.body is None


def test_unlabelled_8bit_is_converted_too(dns_server: DnsTestServer) -> None:
    """No BODY=8BITMIME, no MIME: 8-bit octets still must not reach a 7-bit server."""
    message = b"From: a@example.com\r\nSubject: legacy\r\n\r\nGr\xfc\xdfe\r\n"
    result, receiver = to_receiver(dns_server, message)
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert receiver.messages[0].content == (
        b"From: a@example.com\r\nSubject: legacy\r\nContent-Transfer-Encoding: quoted-printable\r\n"
        b"MIME-Version: 1.0\r\n\r\nGr=FC=DFe\r\n")


def test_a_7bit_message_labelled_8bitmime_goes_unchanged(dns_server: DnsTestServer) -> None:
    message = b"Subject: plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nascii only\r\n"
    result, receiver = to_receiver(dns_server, message, body="8BITMIME")
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert receiver.messages[0].content == message
    assert not any("8BITMIME" in note for note in result.notes)


def test_an_unconvertible_message_bounces_with_5_6_3_without_being_offered(
        dns_server: DnsTestServer) -> None:
    message = ("Subject: Grüße\r\n\r\nbody\r\n").encode()  # 8-bit header, no SMTPUTF8
    result, receiver = to_receiver(dns_server, message, body="8BITMIME")
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.PERMANENT and rcpt.local and rcpt.dsn == "5.6.3"
    assert rcpt.reply.code == 554
    assert "Conversion required but not supported: 8-bit octets in a header field" in rcpt.detail
    assert rcpt.detail.startswith("mx.example.test[127.0.0.1]: ")
    assert receiver.messages == [] and "MailFrom" not in receiver.commands


def test_smtputf8_headers_stay_and_the_body_is_converted(dns_server: DnsTestServer) -> None:
    """The core server offers SMTPUTF8 (here without 8BITMIME): UTF-8 header fields are legal
    in that transaction (RFC 6532), so only the body needs converting."""
    message = "Subject: Grüße\r\nContent-Transfer-Encoding: 8bit\r\n\r\nnaïve\r\n".encode()
    result, receiver = to_receiver(dns_server, message, body="8BITMIME", smtputf8=True,
                                   utf8_headers=True)
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert receiver.messages[0].content == (
        "Subject: Grüße\r\nContent-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n"
        "\r\nna=C3=AFve\r\n".encode())


def test_a_dkim_signed_message_is_converted_and_the_log_says_so(
        dns_server: DnsTestServer, caplog: pytest.LogCaptureFixture) -> None:
    message = (SIGNED + "MIME-Version: 1.0\r\n" + BODY).encode()
    with caplog.at_level(logging.INFO, logger="postroom.delivery"):
        result, receiver = to_receiver(dns_server, message, body="8BITMIME")
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert receiver.messages[0].content.isascii()
    assert b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=s; bh=xyz; b=abc\r\n" in (
        receiver.messages[0].content)
    assert "breaks the message's DKIM signature" in caplog.text
    assert "does not offer 8BITMIME" in caplog.text


# -- end to end: a running postroom relays to smtp-sink -8 ----------------------------------------
def test_a_running_postroom_converts_for_a_7bit_mx_and_bounces_what_it_cannot(
        tmp_path: Path, sink_factory: Callable[..., Sink]) -> None:
    """Receipt with BODY=8BITMIME, the queue, the runner, the MX lookup and the conversion:
    smtp-sink on 127.0.0.2 without 8BITMIME gets 7-bit; an 8-bit header field comes back to
    the sender as a 5.6.3 bounce (RFC 3464)."""
    sink = sink_factory("-8", host="127.0.0.2")
    with serve_dns({"seven.test": ["MX 10 mx.seven.test."],
                    "mx.seven.test": ["A 127.0.0.2"]}) as dns:
        sender = make_server(tmp_path / "a", relay_config(dns.port, sink.port))
        sender.start()
        try:
            with smtplib.SMTP("127.0.0.1", sender.port, local_hostname="c.test",
                              timeout=15) as client:
                client.sendmail("alice@example.com", ["bob@seven.test"], EIGHT_BIT,
                                mail_options=["BODY=8BITMIME"])
                bad = ("From: alice@example.com\r\nTo: bob@seven.test\r\nSubject: Grüße\r\n"
                       "Message-ID: <bad@test>\r\n\r\nhallo\r\n").encode()
                client.sendmail("alice@example.com", ["bob@seven.test"], bad,
                                mail_options=["BODY=8BITMIME"])
            raw = dumped(sink, wait=20)
            assert raw.isascii() and b"BODY=" not in raw
            assert leaves(raw) == leaves(EIGHT_BIT)
            sender.wait_for(lambda: sender.messages("alice@example.com"), timeout=20)
            (notice,) = sender.messages("alice@example.com")
            report = email.message_from_bytes(notice, policy=email.policy.default)
            status = report.get_payload()[1].get_payload()[1]  # type: ignore[index,union-attr]
            assert status["Status"] == "5.6.3" and status["Action"] == "failed"
            assert "Conversion required but not supported" in sender.log()
        finally:
            sender.stop()
