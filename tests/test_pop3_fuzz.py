"""Property tests of the POP3 core: arbitrary input never raises and the output is always a
well-formed response stream; the content encoder does not care how a message is cut."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.pop3 import ContentEncoder, Pop3Connection, uidl_for, valid_uidl
from postroom.store.names import crlf_size_of
from tests.pop3_support import Driver
from tests.pop3_support import settings as pop3_settings

#: Status lines after which a multi-line block follows (RFC 1939 3).
_MULTILINE = (
    b"+OK Capability list follows.",
    b"+OK Unique-ID listing follows.",
    b"+OK Top of message follows.",
    b"+OK Supported mechanisms follow.",
)


def _opens_block(line: bytes) -> bool:
    if line in _MULTILINE:
        return True
    words = line.split(b" ")
    if len(words) == 3 and words[0] == b"+OK" and words[1].isdigit() and words[2] == b"octets":
        return True  # RETR
    return line.startswith(b"+OK ") and line.endswith(b" octets)") and b" messages (" in line


def assert_well_formed(out: bytes) -> None:
    """Every line ends in CRLF; outside multi-line blocks every line is a status line of at
    most 512 octets; inside, a line starting with "." is stuffed; every block is terminated."""
    if not out:
        return
    assert out.endswith(b"\r\n"), out[-80:]
    lines = out[:-2].split(b"\r\n")
    in_block = False
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line
        if in_block:
            if line == b".":
                in_block = False
            else:
                assert not line.startswith(b".") or line.startswith(b".."), line
            continue
        assert len(line) + 2 <= 512, line
        assert line == b"+OK" or line.startswith((b"+OK ", b"-ERR", b"+ ")), line
        in_block = _opens_block(line)
    assert not in_block, "a multi-line response was not terminated"


_COMMANDS = [
    b"USER alice@example.com\r\n", b"PASS alice-secret\r\n", b"PASS wrong\r\n", b"STAT\r\n",
    b"LIST\r\n", b"LIST 2\r\n", b"RETR 1\r\n", b"RETR 3\r\n", b"TOP 2 1\r\n", b"TOP 1 0\r\n",
    b"DELE 1\r\n", b"UIDL\r\n", b"UIDL 9\r\n", b"RSET\r\n", b"CAPA\r\n", b"AUTH PLAIN\r\n",
    b"AUTH LOGIN\r\n", b"AUTH\r\n", b"*\r\n", b"QUIT\r\n", b"STLS\r\n", b"NOOP\r\n", b"\r\n",
    b"AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAGFsaWNlLXNlY3JldA==\r\n", b".\r\n", b"\n", b"\r",
]
_input = st.lists(
    st.one_of(st.binary(max_size=60), st.sampled_from(_COMMANDS),
              st.binary(min_size=200, max_size=400)),
    max_size=25,
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=_input, tls=st.booleans(), eof=st.booleans())
def test_arbitrary_input_never_raises_and_output_is_well_formed(
    chunks: list[bytes], tls: bool, eof: bool
) -> None:
    driver = Driver(chunk=3)
    conn = Pop3Connection(pop3_settings(max_auth_failures=0, max_errors=0), tls=tls)
    conn.start()
    out = bytearray(driver.pump(conn))
    for chunk in chunks:
        conn.receive_data(chunk)
        out += driver.pump(conn)
    if eof:
        conn.receive_eof()
        out += driver.pump(conn)
        assert conn.closed
    assert_well_formed(bytes(out))


def _decode(body: bytes) -> bytes:
    """A multi-line response body back to the message: unstuff, drop the terminator."""
    assert body.endswith(b".\r\n")
    lines = body[:-3].split(b"\r\n")
    assert lines[-1] == b""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines[:-1]) + b"\r\n"


_message = st.binary(max_size=300).map(lambda b: b.replace(b"\r", b"")) | st.lists(
    st.sampled_from([b"a", b".", b"\n", b"\r\n", b"..x", b"\n\n", b"Subject: s"]), max_size=40
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(message=_message, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_content_encoding_ignores_chunking(message: bytes, cuts: list[int]) -> None:
    whole = ContentEncoder()
    expected = whole.feed(message) + whole.finish()
    pieces = ContentEncoder()
    got = bytearray()
    start = 0
    for cut in sorted(set(c for c in cuts if c < len(message))):
        got += pieces.feed(message[start:cut])
        start = cut
    got += pieces.feed(message[start:]) + pieces.finish()
    assert bytes(got) == expected
    assert whole.octets == pieces.octets == crlf_size_of(message)
    normal = message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    if message and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert _decode(expected) == normal if message else expected == b".\r\n"


@settings(max_examples=300, deadline=None)
@given(message=_message, lines=st.integers(min_value=0, max_value=6),
       step=st.integers(min_value=1, max_value=50))
def test_top_sends_the_header_and_at_most_n_body_lines(message: bytes, lines: int, step: int) -> None:
    encoder = ContentEncoder(lines)
    out = bytearray()
    for start in range(0, len(message), step):
        out += encoder.feed(message[start : start + step])
        if encoder.done:
            break
    out += encoder.finish()
    sent = _decode(bytes(out)) if message else b""
    normal = message.replace(b"\r\n", b"\n")
    header, blank, body = normal.partition(b"\n\n") if not normal.startswith(b"\n") else (
        b"", b"\n", normal[1:])
    if not blank:
        expected = normal
    else:
        kept = body.split(b"\n")[:lines]
        expected = header + (b"\n\n" if header else b"\n") + b"".join(k + b"\n" for k in kept)
        if lines >= body.count(b"\n") + 1:
            expected = normal  # every line, the last one perhaps without its LF
    expected_crlf = expected.replace(b"\n", b"\r\n")
    if expected_crlf and not expected_crlf.endswith(b"\r\n"):
        expected_crlf += b"\r\n"
    assert sent == expected_crlf


def test_content_edge_cases() -> None:
    encoder = ContentEncoder()
    out = encoder.feed(b"a\r") + encoder.feed(b"\n.b\r") + encoder.finish()
    assert out == b"a\r\n..b\r\r\n.\r\n"  # a bare CR at the end stays; the line end is added
    assert encoder.octets == 6
    top = ContentEncoder(0)
    assert top.feed(b"\nbody\n") == b"\r\n" and top.done
    assert top.finish() == b".\r\n"


@given(st.text(max_size=120))
def test_uidl_is_always_valid_and_stable(key: str) -> None:
    uidl = uidl_for(key)
    assert valid_uidl(uidl) and uidl == uidl_for(key)


def test_uidl_forms() -> None:
    short = "1732900000.M123456P4321Q17.host,S=4096,W=4180"
    assert uidl_for(short) == short
    long = "1732900000.M123456P4321Q17." + "h" * 40 + ",S=4096,W=4180"
    assert uidl_for(long) == "1732900000.M123456P4321Q17." + "h" * 40
    odd = "1732900000.M1P2Q3.h\u00f4te"
    assert len(uidl_for(odd)) == 40 and uidl_for(odd) != uidl_for(odd + "x")


def test_uidls_stay_unique_when_shortened_keys_collide() -> None:
    from postroom.net.pop3 import _uidls
    from postroom.store import MessageInfo

    prefix = "1700000000.M1P1Q1." + "h" * 50
    infos = [MessageInfo(i, f"{prefix},S={i},W={i}{'0' * 10}", frozenset(), 1, 0, 1, 1)
             for i in (1, 2)] + [MessageInfo(3, "short,S=1", frozenset(), 1, 0, 1, 1)]
    uidls = _uidls(infos)
    assert len(set(uidls)) == 3 and all(valid_uidl(u) for u in uidls)
    assert uidls[2] == "short,S=1" and prefix not in uidls
