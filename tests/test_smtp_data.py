"""DATA content: the end marker, smuggling variants, dot-unstuffing, line ends, NUL, limits.

Every script runs whole, in 7-octet segments and octet by octet (``run_all_ways``).
"""

from __future__ import annotations

import pytest

from postroom.smtp import codes
from postroom.smtp.data import DataDecoder
from postroom.smtp.events import (
    DataAborted,
    DataChunk,
    DataStart,
    EndOfData,
    MailFrom,
    ProtocolViolation,
    Reset,
)
from postroom.smtp.server import ServerConnection
from postroom.testing import DefaultPolicy, Transcript, run_all_ways, settings

TXN = b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
QUEUED = b"250 2.0.0 Ok: queued as TESTQUEUE001\r\n"
BYE = b"221 2.0.0 Bye\r\n"
BAD = b"554 5.6.0 Error: bare <CR> or NUL in message content\r\n"
BARE_LF = b"554 5.6.0 Error: bare <LF> in message content\r\n"


def data(content: bytes, **options: object) -> Transcript:
    """Run a transaction whose DATA content is ``content`` (end marker included), then QUIT."""
    return run_all_ways(TXN + content + b"QUIT\r\n", **options)


def final(t: Transcript) -> bytes:
    """The replies after 354."""
    return t.output.split(b"354 End data with <CR><LF>.<CR><LF>\r\n", 1)[1]


# -- the end marker and dot-unstuffing ------------------------------------------------------------
def test_plain_message() -> None:
    t = data(b"Subject: x\r\n\r\nhello\r\n.\r\n")
    assert final(t) == QUEUED + BYE
    assert t.messages == [b"Subject: x\r\n\r\nhello\r\n"]
    assert EndOfData(len(b"Subject: x\r\n\r\nhello\r\n")) in t.events


def test_empty_message() -> None:
    t = data(b".\r\n")
    assert final(t) == QUEUED + BYE
    assert t.messages == [b""]
    assert EndOfData(0) in t.events
    assert not any(isinstance(e, DataChunk) for e in t.events)


@pytest.mark.parametrize(
    ("wire", "stored"),
    [
        (b"..\r\n", b".\r\n"),
        (b"...\r\n", b"..\r\n"),
        (b"..leading\r\n", b".leading\r\n"),
        (b"a\r\n..b\r\n..\r\nc.\r\n", b"a\r\n.b\r\n.\r\nc.\r\n"),
        (b"a\r\n.b\r\n", b"a\r\nb\r\n"),  # a lone dot is removed even when not doubled
        (b". \r\n", b" \r\n"),
    ],
)
def test_dot_unstuffing(wire: bytes, stored: bytes) -> None:
    t = data(wire + b".\r\n")
    assert t.messages == [stored]


def test_commands_pipelined_after_the_end_are_commands() -> None:
    t = data(b"x\r\n.\r\nNOOP\r\nRSET\r\n")
    assert final(t) == QUEUED + b"250 2.0.0 Ok\r\n" * 2 + BYE


def test_content_that_looks_like_commands_stays_content() -> None:
    body = b"QUIT\r\nMAIL FROM:<e@x.example>\r\n.QUIT\r\n"
    t = data(body + b".\r\n")
    assert final(t) == QUEUED + BYE
    assert t.messages == [b"QUIT\r\nMAIL FROM:<e@x.example>\r\nQUIT\r\n"]


# -- smuggling ------------------------------------------------------------------------------------
SMUGGLED = (
    b"MAIL FROM:<evil@x.example>\r\nRCPT TO:<bob@y.example>\r\nDATA\r\nsmuggled\r\n.\r\n"
)
LF_VARIANTS = [b"\n.\n", b"\n.\r\n", b"\r\n.\n"]
CR_NUL_VARIANTS = [
    b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n.\r\x00\n",
]


@pytest.mark.parametrize("smuggle", LF_VARIANTS)
def test_bare_lf_never_ends_data_and_is_stored_as_crlf(smuggle: bytes) -> None:
    t = data(b"Subject: s\r\n\r\nfirst" + smuggle + SMUGGLED)
    assert final(t) == QUEUED + BYE  # one message, one reply: nothing was smuggled
    assert sum(isinstance(e, MailFrom) for e in t.events) == 1
    assert t.messages == [
        b"Subject: s\r\n\r\nfirst\r\n\r\nMAIL FROM:<evil@x.example>\r\nRCPT TO:<bob@y.example>"
        b"\r\nDATA\r\nsmuggled\r\n"
    ]


@pytest.mark.parametrize("smuggle", LF_VARIANTS)
def test_bare_lf_refused_when_configured(smuggle: bytes) -> None:
    t = data(b"first" + smuggle + SMUGGLED, config=settings(reject_bare_lf=True))
    assert final(t) == BARE_LF + BYE
    assert t.messages == []
    reply = codes.BARE_LF
    assert t.events[-4:] == [ProtocolViolation(reply), DataAborted(reply), Reset(), t.events[-1]]


@pytest.mark.parametrize("smuggle", CR_NUL_VARIANTS)
def test_bare_cr_or_nul_refuses_after_the_real_end(smuggle: bytes) -> None:
    t = data(b"Subject: s\r\n\r\nfirst" + smuggle + SMUGGLED)
    assert final(t) == BAD + BYE
    assert t.messages == []
    assert sum(isinstance(e, MailFrom) for e in t.events) == 1
    kinds = [type(e) for e in t.events]
    assert kinds[3:] == [DataStart, ProtocolViolation, DataAborted, Reset, type(t.events[-1])]
    assert not any(isinstance(e, DataChunk) for e in t.events)  # the bad octet came first


def test_nul_before_a_real_end_refuses_and_what_follows_is_commands() -> None:
    t = data(b"first\x00\r\n.\r\nNOOP\r\n")
    assert final(t) == BAD + b"250 2.0.0 Ok\r\n" + BYE


def test_nothing_flows_after_bad_content() -> None:
    conn = ServerConnection(settings())
    conn.receive_data(TXN)
    for _ in range(3):
        event = conn.next_event()
        assert event is not None
        conn.respond(DefaultPolicy()(event))  # type: ignore[arg-type]
    assert conn.next_event() == DataStart("DATA")
    conn.receive_data(b"good line\r\n")
    assert conn.next_event() == DataChunk(b"good line\r\n")
    conn.receive_data(b"bad\rline\r\nmore\r\n")
    assert conn.next_event() is None  # refused content does not flow
    conn.receive_data(b".\r\n")
    assert conn.next_event() == ProtocolViolation(codes.BAD_CONTENT)
    assert conn.next_event() == DataAborted(codes.BAD_CONTENT)
    assert conn.next_event() == Reset()
    assert conn.data_to_send().endswith(BAD)
    assert not conn.in_transaction


# -- limits ---------------------------------------------------------------------------------------
def test_line_length_limit() -> None:
    config = settings(max_line_length=20)
    ok = data(b"x" * 20 + b"\r\n." + b"y" * 20 + b"\r\n.\r\n", config=config)  # dot not counted
    assert final(ok) == QUEUED + BYE
    t = data(b"x" * 21 + b"\r\n" + b"after\r\n.\r\n", config=config)
    assert final(t) == b"500 5.5.2 Line too long\r\n" + BYE
    assert DataAborted(codes.LINE_TOO_LONG) in t.events
    assert t.messages == []


def test_overlong_line_in_one_piece_then_end() -> None:
    # The overlong line's CRLF still counts: the "." after it ends the data.
    t = data(b"x" * 5000 + b"\r\n.\r\n", config=settings(max_line_length=100))
    assert final(t) == b"500 5.5.2 Line too long\r\n" + BYE


def test_overlong_line_memory_is_bounded() -> None:
    conn = ServerConnection(settings(max_line_length=1000))
    conn.receive_data(TXN)
    while (event := conn.next_event()) is not None:
        if not isinstance(event, DataStart):
            conn.respond(DefaultPolicy()(event))  # type: ignore[arg-type]
    for _ in range(100):
        conn.receive_data(b"z" * 10_000)
        assert conn.next_event() is None
        assert conn.buffered <= 1003
    conn.receive_data(b"\r\n.\r\n")
    assert conn.next_event() == DataAborted(codes.LINE_TOO_LONG)


def test_message_size_limit() -> None:
    body = b"y" * 98 + b"\r\n"  # 100 octets
    t = data(body + b".\r\n", config=settings(max_message_size=100))
    assert final(t) == QUEUED + BYE
    t = data(body + b"z\r\n.\r\n", config=settings(max_message_size=100))
    assert final(t) == b"552 5.3.4 Error: message file too big\r\n" + BYE
    assert DataAborted(codes.MESSAGE_TOO_BIG) in t.events
    assert not any(isinstance(e, ProtocolViolation) for e in t.events)


def test_unlimited_size() -> None:
    t = data(b"x" * 5000 + b"\r\n.\r\n", config=settings(max_message_size=0))
    assert final(t) == QUEUED + BYE


def test_size_counts_crlf_for_normalised_bare_lf() -> None:
    t = data(b"a\nb\r\n.\r\n")
    assert t.messages == [b"a\r\nb\r\n"]
    assert EndOfData(6) in t.events


# -- chunking and the decoder ---------------------------------------------------------------------
def test_one_data_chunk_per_receive_and_only_whole_lines() -> None:
    conn = ServerConnection(settings())
    conn.receive_data(TXN)
    while (event := conn.next_event()) is not None:
        if not isinstance(event, DataStart):
            conn.respond(DefaultPolicy()(event))  # type: ignore[arg-type]
    conn.receive_data(b"line 1\r\nline 2\r\nhalf")
    assert conn.next_event() == DataChunk(b"line 1\r\nline 2\r\n")
    assert conn.next_event() is None
    conn.receive_data(b" line\r\n..dots\r\n")
    assert conn.next_event() == DataChunk(b"half line\r\n.dots\r\n")
    conn.receive_data(b".\r\nNOOP\r\n")
    assert conn.next_event() == EndOfData(len(b"line 1\r\nline 2\r\nhalf line\r\n.dots\r\n"))
    conn.respond(codes.ok_queued("Q"))
    assert conn.next_event() is None
    assert conn.data_to_send().endswith(b"250 2.0.0 Ok: queued as Q\r\n250 2.0.0 Ok\r\n")


def test_decoder_end_marker_split_everywhere() -> None:
    message = b"a\r\n.b\r\n\r\n" + b"x" * 50 + b"\r\n"
    wire = b"a\r\n..b\r\n\r\n" + b"x" * 50 + b"\r\n.\r\nREST"
    for cut in range(len(wire) + 1):
        for cut2 in range(cut, len(wire) + 1, 5):
            decoder = DataDecoder(max_size=0, max_line_length=1000, reject_bare_lf=False)
            out = b""
            rest = None
            for piece in (wire[:cut], wire[cut:cut2], wire[cut2:]):
                if rest is not None:
                    rest += piece
                    continue
                content, rest = decoder.feed(piece)
                out += content
            assert out == message and rest == b"REST", (cut, cut2)
            assert decoder.error is None and decoder.size == len(message)
