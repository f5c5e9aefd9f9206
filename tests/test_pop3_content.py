"""The content encoder (a stored message as a RETR/TOP body) against a line-by-line reference, for
the edge cases its whole-buffer fast path could get wrong: a dot on the first line, a lone dot,
bare CRs, CRLF-stored messages, no final line end, and any cut between chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.pop3 import (
    CheckPassword,
    ContentEncoder,
    MaildropMessage,
    OpenMaildrop,
    Pop3Connection,
    Retrieve,
)
from postroom.store.names import crlf_size_of
from tests.pop3_support import settings as pop3_settings


def reference(message: bytes) -> tuple[bytes, int]:
    """RFC 1939 3 done the slow, obvious way: split at LF; a CR right before the LF is part of
    the line end, any other CR is content; every line goes out with CRLF, with one more "." in
    front when it starts with "."; a last line without LF gets a CRLF; then ".", CRLF. Also the
    octets of message sent (CRLF form, without stuffing and terminator)."""
    out = bytearray()
    octets = 0
    lines = message.split(b"\n")
    last = lines.pop()  # what follows the last LF: empty when the message ends with one
    for line in lines:
        if line.endswith(b"\r"):
            line = line[:-1]
        octets += len(line) + 2
        out += (b"." if line.startswith(b".") else b"") + line + b"\r\n"
    if last:
        octets += len(last)  # the line end added before the terminator is not the message's
        out += (b"." if last.startswith(b".") else b"") + last + b"\r\n"
    return bytes(out) + b".\r\n", octets


def encode(message: bytes, cuts: list[int] = []) -> tuple[bytes, int]:  # noqa: B006 - read only
    encoder = ContentEncoder()
    out = bytearray()
    start = 0
    for cut in sorted({c for c in cuts if 0 < c < len(message)}):
        out += encoder.feed(message[start:cut])
        start = cut
    out += encoder.feed(message[start:])
    out += encoder.finish()
    return bytes(out), encoder.octets


@pytest.mark.parametrize(("message", "wire"), [
    (b"", b".\r\n"),
    (b".", b"..\r\n.\r\n"),  # a lone dot, no line end
    (b".\n", b"..\r\n.\r\n"),
    (b".first line\nsecond\n", b"..first line\r\nsecond\r\n.\r\n"),  # stuffing on line 1
    (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),  # a lone dot line inside
    (b"a\n..\n", b"a\r\n...\r\n.\r\n"),
    (b"a\n\n.\n", b"a\r\n\r\n..\r\n.\r\n"),
    (b"no final line end", b"no final line end\r\n.\r\n"),
    (b"a\n.b", b"a\r\n..b\r\n.\r\n"),  # a dot on a last line without line end
    (b"crlf\r\n.stored\r\n", b"crlf\r\n..stored\r\n.\r\n"),  # CRLF-stored: kept, stuffed
    (b"mixed\r\nlf\n.x\r\n", b"mixed\r\nlf\r\n..x\r\n.\r\n"),
    (b"bare\rcr\r", b"bare\rcr\r\r\n.\r\n"),  # CR-only: sent as it is, line end added
    (b"\r", b"\r\r\n.\r\n"),
    (b"a\r\r\n", b"a\r\r\n.\r\n"),  # CR, CRLF: the first CR is content
    (b"\r.x\n", b"\r.x\r\n.\r\n"),  # "." after a bare CR does not start a line
    (b"\n", b"\r\n.\r\n"),
    (b"\n\n.", b"\r\n\r\n..\r\n.\r\n"),
])
def test_edge_cases(message: bytes, wire: bytes) -> None:
    assert reference(message) == (wire, crlf_size_of(message))
    for cuts in ([], list(range(len(message)))):  # whole, and one octet at a time
        assert encode(message, cuts) == (wire, crlf_size_of(message))


_pieces = st.sampled_from([b"a", b"xy", b".", b"..", b"\n", b"\r", b"\r\n", b"\n.", b"\r\n.",
                           b"\n\n", b"Subject: s"])
_messages = st.lists(_pieces, max_size=60).map(b"".join) | st.binary(max_size=400)


@settings(max_examples=600, deadline=None)
@given(message=_messages, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10))
def test_the_encoder_matches_the_reference_however_the_message_is_cut(
        message: bytes, cuts: list[int]) -> None:
    expected, octets = reference(message)
    assert encode(message, cuts) == (expected, octets)
    assert octets == crlf_size_of(message)  # what LIST and STAT announce


def _logged_in(messages: list[bytes]) -> Pop3Connection:
    conn = Pop3Connection(pop3_settings(), tls=True)
    conn.start()
    conn.receive_data(b"USER alice@example.com\r\nPASS alice-secret\r\n")
    while True:
        event = conn.next_event()
        if isinstance(event, CheckPassword):
            conn.password_checked(event.check.check())
        elif isinstance(event, OpenMaildrop):
            conn.maildrop_opened([MaildropMessage(crlf_size_of(m), f"m{i}")
                                  for i, m in enumerate(messages, 1)])
        elif event is None and not conn.data_to_send():
            return conn


@pytest.mark.parametrize("message", [b".a\nb\n", b"x" * 70000 + b"\n.y\n", b"crlf\r\n"])
def test_a_retr_response_leaves_the_core_in_one_piece(message: bytes) -> None:
    """Status line, body and terminator come out of one data_to_send(): one write per response."""
    conn = _logged_in([message])
    conn.receive_data(b"RETR 1\r\n")
    request = conn.next_event()
    assert isinstance(request, Retrieve)
    conn.message_data(message)
    conn.message_end()
    out = conn.data_to_send()
    assert out == f"+OK {crlf_size_of(message)} octets\r\n".encode() + reference(message)[0]
    assert conn.data_to_send() == b"" and conn.next_event() is None
