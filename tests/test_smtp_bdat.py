"""BDAT (RFC 3030 CHUNKING): exact octet counts, replies per chunk, refusals that still consume.

Every script runs whole, in 7-octet segments and octet by octet (``run_all_ways``).
"""

from __future__ import annotations

import pytest

from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import (
    DataAborted,
    DataStart,
    EndOfData,
    Quit,
    Request,
    Reset,
)
from postroom.testing import DefaultPolicy, Transcript, run_all_ways, settings

TXN = b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
QUEUED = b"250 2.0.0 Ok: queued as TESTQUEUE001\r\n"
BYE = b"221 2.0.0 Bye\r\n"
OK = b"250 2.0.0 Ok\r\n"


def bdat(chunks: bytes, **options: object) -> Transcript:
    return run_all_ways(TXN + chunks + b"QUIT\r\n", **options)


def after_rcpt(t: Transcript) -> bytes:
    return t.output.split(b"250 2.1.5 Ok\r\n", 1)[1]


def test_one_last_chunk() -> None:
    t = bdat(b"BDAT 12 LAST\r\nSubject: b\r\n")
    assert after_rcpt(t) == QUEUED + BYE
    assert t.messages == [b"Subject: b\r\n"]
    assert DataStart("BDAT") in t.events and EndOfData(12) in t.events


def test_several_chunks_and_octets_that_look_like_commands() -> None:
    t = bdat(b"BDAT 6\r\nQUIT\r\nBDAT 12\r\n.\r\nRSET\r\n.\r\nBDAT 4 last\r\nend\n")
    assert after_rcpt(t) == (
        b"250 2.0.0 6 octets received\r\n250 2.0.0 12 octets received\r\n" + QUEUED + BYE
    )
    # no dot handling; the bare LF is stored as CRLF
    assert t.messages == [b"QUIT\r\n.\r\nRSET\r\n.\r\nend\r\n"]
    assert [type(e) for e in t.events].count(DataStart) == 1


def test_bdat_zero() -> None:
    t = bdat(b"BDAT 0 LAST\r\n")
    assert after_rcpt(t) == QUEUED + BYE
    assert t.messages == [b""]
    assert EndOfData(0) in t.events
    t = bdat(b"BDAT 3\r\nab\nBDAT 0\r\nBDAT 0 LAST\r\n")
    assert after_rcpt(t) == (
        b"250 2.0.0 3 octets received\r\n250 2.0.0 0 octets received\r\n" + QUEUED + BYE
    )
    assert t.messages == [b"ab\r\n"]


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    t = bdat(b"BDAT 3\r\nab\rBDAT 3 LAST\r\n\ncd")
    assert t.messages == [b"ab\r\ncd\r\n"]  # and the unfinished last line gets its CRLF
    assert after_rcpt(t).endswith(QUEUED + BYE)


def test_two_messages_by_bdat() -> None:
    t = run_all_ways(
        TXN + b"BDAT 3 LAST\r\none"
        + b"MAIL FROM:<>\r\nRCPT TO:<x@y.example>\r\nBDAT 5 LAST\r\ntwo\r\nQUIT\r\n"
    )
    assert t.messages == [b"one\r\n", b"two\r\n"]
    assert t.output.endswith(b"250 2.0.0 Ok: queued as TESTQUEUE002\r\n" + BYE)


@pytest.mark.parametrize(
    ("chunks", "reply"),
    [
        (b"BDAT 5\r\na\rb\r\n", b"554 5.6.0 Error: bare <CR> or NUL in message content\r\n"),
        (b"BDAT 5\r\na\x00b\r\n", b"554 5.6.0 Error: bare <CR> or NUL in message content\r\n"),
        (b"BDAT 3 LAST\r\nab\r", b"554 5.6.0 Error: bare <CR> or NUL in message content\r\n"),
    ],
)
def test_bad_content_refuses_and_later_chunks_get_503(chunks: bytes, reply: bytes) -> None:
    t = bdat(chunks + b"BDAT 6 LAST\r\nQUIT\r\n")
    assert after_rcpt(t) == reply + b"503 5.5.1 Error: need MAIL command\r\n" + BYE
    assert t.messages == []
    kinds = [type(e) for e in t.events]
    assert DataAborted in kinds and kinds[kinds.index(DataAborted) + 1] is Reset
    assert kinds[-1] is Quit  # the QUIT inside the skipped chunk was not a command


def test_bare_lf_refused_when_configured() -> None:
    t = bdat(b"BDAT 4 LAST\r\nab\nc", config=settings(reject_bare_lf=True))
    assert after_rcpt(t) == b"554 5.6.0 Error: bare <LF> in message content\r\n" + BYE


def test_message_too_big() -> None:
    config = settings(max_message_size=10)
    t = bdat(b"BDAT 11 LAST\r\n0123456789\n", config=config)
    assert after_rcpt(t) == b"552 5.3.4 Error: message file too big\r\n" + BYE
    assert DataAborted(codes.MESSAGE_TOO_BIG) in t.events
    t = bdat(b"BDAT 6\r\n01234\nBDAT 6 LAST\r\n56789\n", config=config)
    assert after_rcpt(t) == (
        b"250 2.0.0 6 octets received\r\n552 5.3.4 Error: message file too big\r\n" + BYE
    )
    t = bdat(b"BDAT 10 LAST\r\n01234567\r\n", config=config)
    assert after_rcpt(t) == QUEUED + BYE


def test_line_too_long() -> None:
    t = bdat(b"BDAT 8\r\nabcdefgh" + b"BDAT 3 LAST\r\nij\n", config=settings(max_line_length=8))
    assert after_rcpt(t) == (
        b"250 2.0.0 8 octets received\r\n500 5.5.2 Line too long\r\n" + BYE
    )


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"EHLO c\r\nBDAT 6\r\nQUIT\r\n", b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"HELO c\r\nBDAT 6\r\nQUIT\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
        (b"BDAT 6 LAST\r\nQUIT\r\n", b"503 5.5.1 Error: send EHLO first\r\n"),
        (b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nBDAT 6\r\nQUIT\r\n",
         b"503 5.5.1 Error: need RCPT command\r\n"),
    ],
)
def test_refused_bdat_still_consumes_its_octets(script: bytes, reply: bytes) -> None:
    t = run_all_ways(script + b"NOOP\r\n")
    assert t.output.endswith(reply + OK)
    assert not t.closed


@pytest.mark.parametrize("command", [b"BDAT", b"BDAT x", b"BDAT -1", b"BDAT " + b"9" * 21])
def test_bdat_without_a_size_ends_the_session(command: bytes) -> None:
    """Its octets follow in an unknown number: nothing after it can be trusted as a command."""
    t = run_all_ways(TXN + command + b"\r\nNOOP\r\n")
    assert after_rcpt(t) == (
        b"421 4.5.4 mx.example.test Error: BDAT without a valid chunk size; "
        b"closing the connection\r\n"
    )
    assert t.closed


@pytest.mark.parametrize("command", [b"BDAT 4 FIRST", b"BDAT 4 LAST x"])
def test_bdat_syntax_error_still_skips_its_chunk(command: bytes) -> None:
    t = run_all_ways(TXN + command + b"\r\nRSET" + b"NOOP\r\n")
    assert after_rcpt(t) == b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n" + OK


def test_commands_inside_a_malformed_bdat_chunk_never_run() -> None:
    chunk = b"RSET\r\nMAIL FROM:<e@vil.example>\r\n"
    t = run_all_ways(TXN + b"BDAT %d LAST junk\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert after_rcpt(t) == b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n" + OK


def test_data_or_rcpt_after_bdat_is_a_sequence_error() -> None:
    t = bdat(b"BDAT 2\r\nab" + b"DATA\r\nRCPT TO:<x@y.example>\r\nMAIL FROM:<a@b.example>\r\n"
             b"BDAT 2 LAST\r\n\r\n")
    assert after_rcpt(t) == (
        b"250 2.0.0 2 octets received\r\n"
        b"503 5.5.1 Error: DATA after BDAT\r\n"
        b"503 5.5.1 Error: BDAT transaction in progress\r\n"
        b"503 5.5.1 Error: nested MAIL command\r\n" + QUEUED + BYE
    )
    assert t.messages == [b"ab\r\n"]


def test_rset_ends_a_bdat_transaction() -> None:
    t = bdat(b"BDAT 2\r\nabRSET\r\nBDAT 2 LAST\r\ncd")
    assert after_rcpt(t) == (
        b"250 2.0.0 2 octets received\r\n" + OK + b"503 5.5.1 Error: need MAIL command\r\n" + BYE
    )
    assert Reset() in t.events and t.messages == []


def test_refused_end_of_data_ends_the_transaction() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, EndOfData):
            return codes.LOOP
        return DefaultPolicy()(request)

    t = bdat(b"BDAT 2 LAST\r\nab" + b"BDAT 1 LAST\r\nc", policy=policy)
    assert after_rcpt(t) == (
        b"554 5.4.6 Too many hops: mail loop detected\r\n"
        b"503 5.5.1 Error: need MAIL command\r\n" + BYE
    )
    assert t.messages == []
