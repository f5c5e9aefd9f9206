"""The 8BITMIME downgrade (RFC 6152 3): 8-bit MIME parts to quoted-printable, everything else
octet for octet; what cannot be converted; and the client core's 5.6.3 refusals."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import Iterator
from email.message import Message

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.message.downgrade import (
    LONG_LINE,
    MAX_DEPTH,
    MAX_HEADER,
    DowngradeError,
    Downgrader,
    Plan,
    content_type,
    downgrade,
    has_8bit,
    plan,
)
from postroom.smtp.client import (
    ClientConnection,
    ClientSettings,
    OutboundEnvelope,
    OutboundRecipient,
    Stage,
    TransactionDone,
    Verdict,
)
from postroom.smtp.codes import Reply

CAFE = "café ünïcödé".encode()


def convert(message: bytes, *, chunk: int = 64 * 1024, utf8: bool = False) -> tuple[bytes, Plan]:
    pieces = [message[i:i + chunk] for i in range(0, len(message), chunk)] or [b""]
    the_plan = plan(pieces, utf8_headers=utf8)
    out = b"".join(downgrade(pieces, the_plan))
    assert len(out) == the_plan.size  # SIZE= is declared from the plan
    return out, the_plan


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def leaves(message: Message) -> list[tuple[str, bytes]]:
    """(content type, decoded body) of every leaf, attached messages walked into."""
    found = []
    for part in message.walk():
        if not part.is_multipart():
            payload = part.get_payload(decode=True)
            found.append((part.get_content_type(), payload if isinstance(payload, bytes) else b""))
    return found


def assert_equivalent(original: bytes, converted: bytes) -> None:
    assert converted.isascii()
    assert all(len(line) <= 998 for line in converted.split(b"\r\n"))
    assert leaves(parse(converted)) == leaves(parse(original))


# -- what is converted ---------------------------------------------------------------------------
def test_a_plain_8bit_message_becomes_quoted_printable() -> None:
    original = (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
                b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
                b"Subject: hi\r\n\r\n" + CAFE + b" = x \r\n.\r\n" + b"\xc3\xa9" * 100 + b"\r\n")
    out, the_plan = convert(original)
    head, _, body = out.partition(b"\r\n\r\n")
    assert head == (b"From: a@example.com\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: text/plain; charset=utf-8\r\n"
                    b"Content-Transfer-Encoding: quoted-printable\r\nSubject: hi")  # in place
    assert body.startswith(b"caf=C3=A9 =C3=BCn=C3=AFc=C3=B6d=C3=A9 =3D x=20\r\n")
    assert max(len(line) for line in body.split(b"\r\n")) <= 76
    assert the_plan.encode == frozenset({0}) and not the_plan.dkim_signed
    assert_equivalent(original, out)


def test_a_message_without_mime_gets_its_labels() -> None:
    original = b"From: a@example.com\r\nSubject: old style\r\n\r\nGr\xfc\xdfe\r\n"
    out, _ = convert(original)
    assert out == (b"From: a@example.com\r\nSubject: old style\r\n"
                   b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n"
                   b"Gr=FC=DFe\r\n")
    assert_equivalent(original, out)


MIXED = (
    b"Received: from x by y; today\r\nDKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n"
    b"\tbh=abc; b=def\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed;\r\n boundary=\"outer (b)\"\r\nContent-Transfer-Encoding: 8BIT\r\n"
    b"\r\nThis is a preamble.\r\n"
    b"--outer (b)\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + CAFE + b"\r\n"
    b"--not the boundary\r\n"
    b"--outer (b)\r\nContent-Type: multipart/alternative; boundary=inner\r\n\r\n"
    b"--inner\r\nContent-Type: text/plain; charset=us-ascii\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nplain ascii under an 8bit label\r\n"
    b"--inner\r\nContent-Type: text/html; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\n<p>\xe9t\xe9</p>\r\n"
    b"--inner--\r\n"
    b"--outer (b)\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"From: b@example.org\r\nSubject: attached\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"\r\nattached " + CAFE + b"\r\n"
    b"--outer (b)\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"JVBERi0xLjQK\r\n--  leading dashes in base64? never, but harmless\r\n"
    b"--outer (b)--\r\nepilogue\r\n"
)


def test_multipart_message_rfc822_and_untouched_parts() -> None:
    out, the_plan = convert(MIXED, chunk=7)
    assert the_plan.dkim_signed
    assert the_plan.encode == frozenset({1, 4, 6})  # the 8-bit leaves, the attached one too
    # the composite labels name the 7bit domain now; the 7-bit leaf's 8bit label too
    assert out.count(b"Content-Transfer-Encoding: 7bit\r\n") == 3
    assert out.count(b"Content-Transfer-Encoding: quoted-printable\r\n") == 3
    # everything else is kept as it was: headers, preamble, boundaries, base64, epilogue
    for kept in (b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com;\r\n\tbh=abc; b=def\r\n",
                 b"boundary=\"outer (b)\"\r\n", b"This is a preamble.\r\n",
                 b"--not the boundary\r\n", b"JVBERi0xLjQK\r\n--  leading dashes",
                 b"--outer (b)--\r\nepilogue\r\n", b"\r\nplain ascii under an 8bit label\r\n"):
        assert kept in out, kept
    # the attached message's own header section: labelled, with MIME-Version for its readers
    assert (b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\nMIME-Version: 1.0\r\n\r\n"
            b"attached caf=C3=A9") in out
    assert_equivalent(MIXED, out)


def test_the_same_output_whatever_the_chunks() -> None:
    whole, _ = convert(MIXED)
    for size in (1, 2, 3, 5, 64, 1000):
        assert convert(MIXED, chunk=size)[0] == whole


def test_digest_parts_default_to_message_rfc822() -> None:
    original = (b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\n"
                b"Subject: one\r\n\r\nna\xefve\r\n--d--\r\n")
    out, _ = convert(original)
    assert (b"--d\r\n\r\nSubject: one\r\nContent-Transfer-Encoding: quoted-printable\r\n"
            b"MIME-Version: 1.0\r\n\r\nna=EFve\r\n--d--\r\n") in out
    assert_equivalent(original, out)


def test_message_global_is_encodable() -> None:
    original = (b"Content-Type: message/global\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
                b"Subject: " + CAFE + b"\r\n\r\nbody\r\n")
    out, _ = convert(original)
    assert out.isascii() and b"Content-Transfer-Encoding: quoted-printable" in out


def test_long_8bit_line_goes_in_pieces_with_soft_breaks() -> None:
    line = (b"x\xe9 " * (LONG_LINE // 2))[: LONG_LINE * 2 + 5]
    original = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + line + b"\r\n"
    for chunk in (4096, 65536, 100_000):
        out, _ = convert(original, chunk=chunk)
        assert max(len(x) for x in out.split(b"\r\n")) <= 76
        assert_equivalent(original, out)


def test_bare_cr_and_lines_without_cr() -> None:
    original = (b"Content-Transfer-Encoding: 8bit\r\n\r\na\rb\xe9\r\n"
                b"unix line \xe9\nlast line without end \xe9")
    out, _ = convert(original, chunk=3)
    body = out.split(b"\r\n\r\n", 1)[1]
    assert body == (b"a=0Db=E9\r\nunix line =E9\r\nlast line without end =E9")
    assert out.isascii()


def test_seven_bit_messages_need_nothing() -> None:
    assert not has_8bit([MIXED.replace(b"\xc3", b"c").replace(b"\xa9", b"e")[:10], b"abc"])
    assert has_8bit([b"abc", b"\xff"])


# -- what cannot be converted --------------------------------------------------------------------
@pytest.mark.parametrize(("message", "reason"), [
    (b"Subject: caf\xc3\xa9\r\n\r\nbody\r\n", "header field"),
    (b"Content-Type: text/plain\r\n\r\nok\r\n--b\r\n", None),  # no multipart: just a body line
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\npre \xe9\r\n--b\r\n\r\nx\r\n--b--\r\n",
     "outside the MIME parts"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nx\r\n--b--\r\npost \xe9\r\n",
     "outside the MIME parts"),
    (b"Content-Transfer-Encoding: base64\r\n\r\n\xe9\r\n", "encoded as base64"),
    (b"Content-Transfer-Encoding: quoted-printable\r\n\r\n\xe9\r\n", "encoded as quoted-printable"),
    (b"Content-Type: message/partial; id=1; number=1\r\n\r\nSubject: x\r\n\r\n\xe9\r\n",
     "must be 7-bit"),
    (b"Content-Type: message/delivery-status\r\n\r\nDiagnostic-Code: smtp; \xe9\r\n",
     "must be 7-bit"),
    (b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\n"
     b"Subject: \xe9\r\n\r\nx\r\n--b--\r\n", "header field"),
])
def test_what_cannot_be_converted(message: bytes, reason: str | None) -> None:
    if reason is None:
        convert(message)
        return
    with pytest.raises(DowngradeError, match=reason):
        plan([message])


def test_8bit_headers_are_allowed_under_smtputf8() -> None:
    original = b"Subject: caf\xc3\xa9\r\nContent-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve\r\n"
    out, _ = convert(original, utf8=True)
    assert out.startswith(b"Subject: caf\xc3\xa9\r\n")  # left for the SMTPUTF8 transaction
    assert out.endswith(b"\r\n\r\nna=C3=AFve\r\n")


def test_limits() -> None:
    deep = b"".join(b"Content-Type: message/rfc822\r\n\r\n" for _ in range(MAX_DEPTH + 1))
    with pytest.raises(DowngradeError, match="nested"):
        plan([deep + b"x\xe9\r\n"])
    huge = b"X-Filler: " + b"a" * MAX_HEADER + b"\r\n\r\n\xe9\r\n"
    with pytest.raises(DowngradeError, match="too long"):
        plan([huge[i:i + 65536] for i in range(0, len(huge), 65536)])


def test_content_type_parsing() -> None:
    assert content_type('Multipart/Mixed (a comment); BOUNDARY="a \\"b\\" (c)"; x=1') == (
        "multipart/mixed", {"boundary": 'a "b" (c)', "x": "1"})
    assert content_type("multipart/mixed; boundary=----=_Part_1_2.3") == (
        "multipart/mixed", {"boundary": "----=_Part_1_2.3"})  # unquoted, as seen in the wild
    assert content_type("garbage") is None


# -- property: any MIME tree, any chunking --------------------------------------------------------
_TEXT = st.lists(st.sampled_from([b"plain words", b"caf\xc3\xa9", b"\xe9\xe8", b"=", b" ", b"\t",
                                  b".", b"--", b"x" * 90, b"From ", b"\xff" * 40]),
                 max_size=6).map(b"".join)
_LINES = st.lists(_TEXT, min_size=0, max_size=5).map(lambda ls: b"".join(x + b"\r\n" for x in ls))


@st.composite
def _leaf(draw: st.DrawFn) -> bytes:
    ctype = draw(st.sampled_from([b"text/plain; charset=utf-8", b"text/html", None]))
    cte = draw(st.sampled_from([b"8bit", b"7bit", b"binary", None, b"base64"]))
    head = b""
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    if cte is not None:
        head += b"Content-Transfer-Encoding: " + cte + b"\r\n"
    if cte == b"base64":
        body = b"aGVsbG8gd29ybGQ=\r\n"
    else:
        body = draw(_LINES)
    return head + b"\r\n" + body


def _entity(depth: int) -> st.SearchStrategy[bytes]:
    if depth == 0:
        return _leaf()
    return st.one_of(_leaf(), _multipart(depth), _attached(depth))


@st.composite
def _multipart(draw: st.DrawFn, depth: int) -> bytes:
    boundary = b"b%d_%d" % (depth, draw(st.integers(0, 99)))
    parts = draw(st.lists(_entity(depth - 1), min_size=1, max_size=3))
    label = draw(st.sampled_from([b"", b"Content-Transfer-Encoding: 8bit\r\n"]))
    out = b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n' + label + b"\r\npre\r\n"
    for part in parts:
        out += b"--" + boundary + b"\r\n" + part
    return out + b"--" + boundary + b"--\r\nepi\r\n"


@st.composite
def _attached(draw: st.DrawFn, depth: int) -> bytes:
    inner = draw(_entity(depth - 1))
    return b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n" + inner


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=_entity(3), cuts=st.lists(st.integers(1, 4000), max_size=8))
def test_any_tree_any_chunking(body: bytes, cuts: list[int]) -> None:
    original = b"From: a@example.com\r\nMIME-Version: 1.0\r\n" + body
    pieces, start = [], 0
    for cut in sorted(set(cuts)):
        pieces.append(original[start:cut])
        start = max(start, cut)
    pieces.append(original[start:])
    the_plan = plan(pieces)
    out = b"".join(downgrade(pieces, the_plan))
    assert out == b"".join(downgrade([original], plan([original])))
    assert len(out) == the_plan.size
    assert_equivalent(original, out)
    if original.isascii():  # nothing to encode: at most a label says 7bit instead of 8bit/binary
        assert the_plan.encode == frozenset()
        assert out == re.sub(rb"Content-Transfer-Encoding: (8bit|binary)",
                             b"Content-Transfer-Encoding: 7bit", original)


def test_downgrader_feed_and_finish() -> None:
    the_plan = plan([MIXED])
    converter = Downgrader(the_plan)
    out = b"".join(converter.feed(MIXED[i:i + 100]) for i in range(0, len(MIXED), 100))
    out += converter.finish()
    assert out == convert(MIXED)[0]


# -- the client core ----------------------------------------------------------------------------
def ready(ehlo: bytes) -> ClientConnection:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    conn.receive_data(b"220 mx.example.org ESMTP\r\n")
    conn.data_to_send()
    conn.receive_data(ehlo)
    while conn.next_event() is not None:
        pass
    return conn


def test_core_fails_a_transaction_with_the_transports_refusal() -> None:
    conn = ready(b"250-mx.example.org\r\n250 PIPELINING\r\n")
    env = OutboundEnvelope("a@example.com", (OutboundRecipient("b@example.org"),
                                            OutboundRecipient("c@example.org")), body="8BITMIME")
    refusal = Reply(554, "5.6.3", "Conversion required but not supported: 8-bit header")
    conn.send_mail(env, refusal)
    assert conn.data_to_send() == b""  # not offered at all
    event = conn.next_event()
    assert isinstance(event, TransactionDone)
    outcomes = event.result.outcomes
    assert [(o.reply, o.stage, o.local, o.verdict) for o in outcomes] == [
        (refusal, Stage.MAIL, True, Verdict.PERMANENT)] * 2
    conn.reset()  # the connection stays usable
    assert conn.data_to_send() == b"RSET\r\n"


@pytest.mark.parametrize(("ehlo", "refused"), [
    (b"250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n", True),
    (b"250-mx.example.org\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME\r\n", True),
    (b"250-mx.example.org\r\n250-PIPELINING\r\n250-CHUNKING\r\n250-8BITMIME\r\n250 BINARYMIME\r\n",
     False),
])
def test_core_sends_binarymime_only_where_it_can_go(ehlo: bytes, refused: bool) -> None:
    conn = ready(ehlo)
    conn.send_mail(OutboundEnvelope("a@example.com", (OutboundRecipient("b@example.org"),),
                                    body="BINARYMIME"))
    sent = conn.data_to_send()
    if refused:
        assert sent == b""
        event = conn.next_event()
        assert isinstance(event, TransactionDone)
        assert event.result.outcomes[0].reply.enhanced == "5.6.3"
    else:
        assert sent.startswith(b"MAIL FROM:<a@example.com> BODY=BINARYMIME\r\n")


def test_memory_stays_bounded_for_a_large_message() -> None:
    """20 MB of 8-bit text in 64 KB chunks: the converter keeps a line and a header section,
    never the message (the plan pass and the conversion pass alike)."""
    import tracemalloc

    line = "Grüße aus Köln, naïve café = ".encode() * 3 + b"\r\n"
    count = 20_000_000 // len(line)
    head = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=zz\r\n\r\n"
            b"--zz\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n")

    def chunks() -> Iterator[bytes]:
        yield head
        block = line * (65536 // len(line))
        for _ in range(count * len(line) // len(block)):
            yield block
        yield b"--zz--\r\n"

    tracemalloc.start()
    try:
        the_plan = plan(chunks())
        total = 0
        for piece in downgrade(chunks(), the_plan):
            total += len(piece)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == the_plan.size > 20_000_000
    assert peak < 2_000_000, peak
