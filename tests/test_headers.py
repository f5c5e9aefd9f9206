"""The Received header we add, and the header-section looks policy needs."""

from __future__ import annotations

from postroom.message import headers
from postroom.message.headers import TraceInfo


def trace(**kw: object) -> TraceInfo:
    base: dict[str, object] = dict(
        helo="client.example", client_address="192.0.2.7", client_name="unknown",
        hostname="mx.example.com", protocol="ESMTP", queue_id="4QZ3B1HXK0F2",
        recipient="alice@example.com", timestamp=0.0,
    )
    base.update(kw)
    return TraceInfo(**base)  # type: ignore[arg-type]


def test_received_layout() -> None:
    text = headers.received_header(trace()).decode()
    lines = text.split("\r\n")
    assert lines[0] == "Received: from client.example (unknown [192.0.2.7])"
    assert lines[1] == "\tby mx.example.com (postroom) with ESMTP id 4QZ3B1HXK0F2"
    assert lines[2].startswith("\tfor <alice@example.com>; ")
    assert lines[2].endswith(("+0000", "-0000")) or lines[2][-5] in "+-"
    assert text.endswith("\r\n") and lines[3] == ""


def test_received_ipv6_and_no_for_clause() -> None:
    text = headers.received_header(trace(client_address="2001:db8::1", recipient=None)).decode()
    assert "[IPv6:2001:db8::1]" in text
    assert "for <" not in text
    assert "id 4QZ3B1HXK0F2; " in text


def test_hostile_helo_cannot_inject_header_lines() -> None:
    text = headers.received_header(trace(helo="x\r\nX-Evil: 1")).decode()
    assert "\r\nX-Evil" not in text
    assert text.count("\r\n") == 3


def test_protocol_names() -> None:
    assert headers.protocol_name(esmtp=False) == "SMTP"
    assert headers.protocol_name(esmtp=True) == "ESMTP"
    assert headers.protocol_name(esmtp=True, tls=True, auth=True) == "ESMTPSA"
    assert headers.protocol_name(esmtp=True, utf8=True) == "UTF8SMTP"


def test_count_received_and_message_id() -> None:
    section = (b"Received: a\r\nreceived :b\r\nX-Received: no\r\nSubject: Received: no\r\n"
               b"Message-ID:\r\n <id@x>\r\n\r\n")
    assert headers.count_received(section) == 2
    assert headers.message_id(section) == "<id@x>"
    assert headers.message_id(b"Subject: x\r\n\r\n") is None


def test_c1_controls_and_unicode_line_separators_are_replaced() -> None:
    text = headers.received_header(trace(helo="a\x85b\u2028c\u2029d\x9fe")).decode()
    assert "a?b?c?d?e" in text
