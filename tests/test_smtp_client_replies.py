"""The client's reply parser: multi-line replies, enhanced codes, bounds, and a fuzz."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.smtp.client import REPLY_LINE, REPLY_LINES, RemoteProtocolError, ReplyParser
from postroom.smtp.codes import Reply


def parse(data: bytes, step: int = 0) -> list[Reply]:
    parser = ReplyParser()
    pieces = [data] if not step else [data[i : i + step] for i in range(0, len(data), step)]
    out = []
    for piece in pieces:
        parser.feed(piece)
        while (reply := parser.next_reply()) is not None:
            out.append(reply)
    return out


@pytest.mark.parametrize("step", [0, 1, 7])
def test_replies_whole_chunked_and_byte_by_byte(step: int) -> None:
    data = (b"220 mx.example.org ESMTP\r\n"
            b"250-mx.example.org\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
            b"550-5.1.1 The email account that you tried to reach does not exist.\r\n"
            b"550 5.1.1 Please try again.\r\n"
            b"354\r\n"
            b"250 2.0.0\r\n"
            b"451 4.3.0 bare LF\n")
    assert parse(data, step) == [
        Reply(220, None, "mx.example.org ESMTP"),
        Reply(250, None, ("mx.example.org", "PIPELINING", "SIZE 1000")),
        Reply(550, "5.1.1", ("The email account that you tried to reach does not exist.",
                             "Please try again.")),
        Reply(354, None, ""),
        Reply(250, "2.0.0", ""),
        Reply(451, "4.3.0", "bare LF"),
    ]


def test_enhanced_code_must_match_the_class() -> None:
    (reply,) = parse(b"550 4.1.1 odd\r\n")
    assert reply.enhanced is None and reply.text == "4.1.1 odd"
    (reply,) = parse(b"250 2.1.5.7 not one\r\n")
    assert reply.enhanced is None


def test_controls_in_text_are_shown_not_kept() -> None:
    (reply,) = parse(b"550 bad\x1b[31m red\x00\r\n")
    assert reply.text == "bad?[31m red?"


@pytest.mark.parametrize("line", [b"HTTP/1.1 200 OK\r\n", b"25 short\r\n", b"250x\r\n",
                                  b"650 no such class\r\n", b"\r\n"])
def test_malformed_lines(line: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        parse(line)


def test_line_length_bound_without_and_with_newline() -> None:
    with pytest.raises(RemoteProtocolError, match="longer than"):
        parse(b"250 " + b"x" * REPLY_LINE)  # no LF yet: refused without waiting for it
    with pytest.raises(RemoteProtocolError, match="longer than"):
        parse(b"250 " + b"x" * REPLY_LINE + b"\r\n")
    (reply,) = parse(b"250 " + b"x" * (REPLY_LINE - 6) + b"\r\n")
    assert reply.code == 250


def test_line_count_bound() -> None:
    with pytest.raises(RemoteProtocolError, match="lines"):
        parse(b"250-x\r\n" * (REPLY_LINES + 1))
    assert len(parse(b"250-x\r\n" * (REPLY_LINES - 1) + b"250 x\r\n")[0].lines) == REPLY_LINES


@given(st.binary(max_size=600), st.integers(min_value=1, max_value=50))
def test_fuzz_only_remote_protocol_errors(data: bytes, step: int) -> None:
    try:
        replies = parse(data, step)
    except RemoteProtocolError:
        return
    for reply in replies:
        assert 200 <= reply.code < 600


_ENHANCED_LIKE = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)


@given(
    st.integers(min_value=200, max_value=599),
    st.one_of(st.none(), st.tuples(st.integers(0, 999), st.integers(0, 999))),
    st.lists(_TEXT, min_size=1, max_size=5),
    st.integers(min_value=1, max_value=30),
)
def test_fuzz_server_replies_round_trip(code: int, detail: tuple[int, int] | None,
                                        lines: list[str], step: int) -> None:
    """What the server core writes (Reply.to_bytes), the client reads back as the same Reply."""
    enhanced = None if detail is None or code // 100 == 3 else f"{code // 100}.{detail[0]}.{detail[1]}"
    reply = Reply(code, enhanced, lines[0] if len(lines) == 1 else tuple(lines))
    (parsed,) = parse(reply.to_bytes(), step)
    assert parsed.code == code
    if enhanced is None and _ENHANCED_LIKE.match(lines[0]):
        return  # text that starts like an enhanced code is read as one; nothing more to say
    assert parsed == reply
    assert parsed.to_bytes() == reply.to_bytes()
