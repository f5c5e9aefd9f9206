"""Replies on the wire (RFC 5321 4.2, RFC 2034) and the named replies' codes."""

from __future__ import annotations

import pytest

from postroom.smtp import codes
from postroom.smtp.codes import Reply, ok_queued, with_host


def test_one_line_reply() -> None:
    assert Reply(250, "2.1.0", "Ok").to_bytes() == b"250 2.1.0 Ok\r\n"
    assert Reply(220, None, "mx ESMTP").to_bytes() == b"220 mx ESMTP\r\n"
    assert Reply(250, "2.0.0", "").to_bytes() == b"250 2.0.0\r\n"
    assert Reply(250, None, "").to_bytes() == b"250\r\n"


def test_multi_line_reply_has_the_enhanced_code_on_every_line() -> None:
    assert Reply(550, "5.7.1", ("first", "second", "third")).to_bytes() == (
        b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"
    )
    assert Reply(250, None, ("host", "SIZE 10")).to_bytes() == b"250-host\r\n250 SIZE 10\r\n"


def test_text_cannot_add_lines() -> None:
    assert Reply(550, "5.1.1", "<a@b>\r\n250 Ok").to_bytes() == b"550 5.1.1 <a@b>  250 Ok\r\n"


def test_helpers() -> None:
    assert ok_queued("4Q8X2B0C1DFG").to_bytes() == b"250 2.0.0 Ok: queued as 4Q8X2B0C1DFG\r\n"
    assert codes.octets_received(12).to_bytes() == b"250 2.0.0 12 octets received\r\n"
    assert with_host(codes.TIMEOUT, "mx").to_bytes() == (
        b"421 4.4.2 mx Error: timeout exceeded\r\n"
    )
    assert with_host(Reply(421, None, ("a", "b")), "mx").text == ("mx a", "b")
    assert Reply(354, None, "go").is_positive and not codes.BAD_SEQUENCE.is_positive


@pytest.mark.parametrize(
    ("reply", "code", "enhanced"),
    [
        (codes.OK, 250, "2.0.0"),
        (codes.OK_MAIL, 250, "2.1.0"),
        (codes.OK_RCPT, 250, "2.1.5"),
        (codes.BYE, 221, "2.0.0"),
        (codes.HELP, 214, "2.0.0"),
        (codes.CANNOT_VRFY, 252, "2.0.0"),
        (codes.START_DATA, 354, None),
        (codes.TIMEOUT, 421, "4.4.2"),
        (codes.SHUTDOWN, 421, "4.3.2"),
        (codes.TOO_MANY_ERRORS, 421, "4.7.0"),
        (codes.LOCAL_ERROR, 451, "4.3.0"),
        (codes.INSUFFICIENT_STORAGE, 452, "4.3.1"),
        (codes.TOO_MANY_RECIPIENTS, 452, "4.5.3"),
        (codes.LINE_TOO_LONG, 500, "5.5.2"),
        (codes.UNRECOGNIZED, 500, "5.5.2"),
        (codes.SYNTAX, 501, "5.5.4"),
        (codes.BAD_SENDER_SYNTAX, 501, "5.1.7"),
        (codes.BAD_RECIPIENT_SYNTAX, 501, "5.1.3"),
        (codes.NOT_IMPLEMENTED, 502, "5.5.1"),
        (codes.BAD_SEQUENCE, 503, "5.5.1"),
        (codes.PARAM_NOT_IMPLEMENTED, 504, "5.5.4"),
        (codes.PARAM_UNRECOGNIZED, 555, "5.5.4"),
        (codes.USER_UNKNOWN, 550, "5.1.1"),
        (codes.MESSAGE_TOO_BIG, 552, "5.3.4"),
        (codes.MAILBOX_FULL, 552, "5.2.2"),
        (codes.NON_ASCII, 553, "5.6.7"),
        (codes.RELAY_DENIED, 554, "5.7.1"),
        (codes.LOOP, 554, "5.4.6"),
        (codes.BAD_CONTENT, 554, "5.6.0"),
        (codes.BARE_LF, 554, "5.6.0"),
    ],
)
def test_named_replies(reply: Reply, code: int, enhanced: str | None) -> None:
    assert (reply.code, reply.enhanced) == (code, enhanced)
    if enhanced is not None:  # RFC 3463: the class digit matches the basic code's
        assert enhanced[0] == str(code)[0]
    assert codes.RELAY_DENIED.text == "Relay access denied"
