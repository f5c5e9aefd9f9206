"""Property tests: the core never raises, its memory stays bounded, and segmentation never matters.

Inputs are built from random octets mixed with fragments that steer the machine into every state
(DATA, BDAT, overlong lines, bare CR/LF, NUL), cut at random points, answered by a policy that
randomly accepts or refuses.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import EndOfData, Request
from postroom.smtp.server import COMMAND_LINE_WITH_PARAMS, ServerConnection, ServerSettings
from postroom.testing import DefaultPolicy
from postroom.testing import settings as server_settings

MAX_LINE = 200
CONFIG = server_settings(max_line_length=MAX_LINE, max_message_size=5000, max_recipients=3)
BOUND = max(COMMAND_LINE_WITH_PARAMS, MAX_LINE + 3)

FRAGMENTS = [
    b"EHLO c.example\r\n", b"HELO c\r\n", b"MAIL FROM:<a@b.example>\r\n", b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<a@b.example> SIZE=10 BODY=8BITMIME\r\n", b"RCPT TO:<c@d.example>\r\n",
    b"RCPT TO:<Postmaster> NOTIFY=NEVER\r\n", b"DATA\r\n", b"BDAT 5\r\n", b"BDAT 3 LAST\r\n",
    b"BDAT 0 LAST\r\n", b"\r\n.\r\n", b".\r\n", b"..\r\n", b"\n.\n", b"\r", b"\n", b"\x00",
    b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"QUIT\r\n", b"x" * 300, b"y" * 3000, b"\r\n",
    b"\xff\xfe", "MAIL FROM:<é@ü.example> SMTPUTF8\r\n".encode(),
]
_input = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.binary(max_size=40)), max_size=40
).map(b"".join)
_cuts = st.lists(st.integers(min_value=1, max_value=300), max_size=60)
_answers = st.lists(st.booleans(), min_size=1, max_size=10)

_REPLY_LINE = re.compile(rb"\d{3}([ -][^\r\n]*)?\r\n")


def _pieces(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    out, pos = [], 0
    for size in cuts:
        if pos >= len(data):
            break
        out.append(data[pos : pos + size])
        pos += size
    if pos < len(data):
        out.append(data[pos:])
    return out


def _run(
    data: bytes, cuts: Sequence[int], answers: Sequence[bool], config: ServerSettings = CONFIG
) -> bytes:
    """Feed ``data`` cut by ``cuts``; check invariants after every piece; return the output."""
    conn = ServerConnection(config)
    conn.start()
    out = bytearray(conn.data_to_send())
    default = DefaultPolicy()
    turn = 0

    def answer(request: Request) -> Reply:
        nonlocal turn
        turn += 1
        if answers[turn % len(answers)]:
            return default(request)
        return codes.LOCAL_ERROR if isinstance(request, EndOfData) else codes.USER_UNKNOWN

    for piece in _pieces(data, cuts):
        was_closed = conn.closed
        conn.receive_data(piece)
        while (event := conn.next_event()) is not None:
            if isinstance(event, Request):
                conn.respond(answer(event))
        sent = conn.data_to_send()
        assert not (was_closed and sent), "output after close"
        out += sent
        assert conn.buffered <= BOUND
    conn.receive_eof()
    while conn.next_event() is not None:
        pass
    assert conn.closed
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(_input, _cuts, _answers)
def test_never_raises_and_stays_bounded(data: bytes, cuts: list[int], answers: list[bool]) -> None:
    out = _run(data, cuts, answers)
    pos = 0
    while pos < len(out):  # the output is a sequence of well-formed reply lines
        match = _REPLY_LINE.match(out, pos)
        assert match is not None, out[pos : pos + 80]
        pos = match.end()


@settings(max_examples=200, deadline=None)
@given(_input, _cuts, _answers)
def test_segmentation_never_changes_the_output(
    data: bytes, cuts: list[int], answers: list[bool]
) -> None:
    assert _run(data, cuts, answers) == _run(data, [], answers)


_ONE_REPLY = [
    b"NOOP\r\n", b"RSET\r\n", b"HELP\r\n", b"VRFY someone\r\n", b"EHLO c\r\n", b"HELO c\r\n",
    b"MAIL FROM:<a@b.example>\r\n", b"RCPT TO:<c@d.example>\r\n", b"FOO\r\n", b"MAIL x\r\n",
    b"RCPT TO:<>\r\n", b"BDAT 3\r\nabc", b"BDAT 4 LAST\r\nab\r\n", b"BDAT 2\r\na\r",
    b"STARTTLS\r\n", b"NOOP " + b"n" * 3000 + b"\r\n", b"MAIL FROM:<a@b.example> X=1\r\n",
]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(_ONE_REPLY), max_size=30), _cuts, _answers)
def test_one_reply_per_command_whatever_the_pipelining(
    commands: list[bytes], cuts: list[int], answers: list[bool]
) -> None:
    config = server_settings(max_line_length=MAX_LINE, max_errors=0)
    out = _run(b"".join(commands), cuts, answers, config)
    final_lines = [line for line in out.split(b"\r\n")[:-1] if line[3:4] != b"-"]
    assert len(final_lines) == 1 + len(commands)  # the banner, then one per command


def test_megabytes_without_a_newline_stay_bounded() -> None:
    junk = bytes(range(11, 256)) * 4096  # no LF anywhere: about 1 MB
    for prefix in (b"", b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n"):
        out = _run(prefix + junk + b"\r\n.\r\nNOOP\r\n", [65536] * 40, [True])
        assert out.endswith(b"250 2.0.0 Ok\r\n")
