"""Delivery status notifications (message/dsn.py): every notice is parsed back with ``email``."""

from __future__ import annotations

import email
import email.utils
import io
import random
import re
from email import policy
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from postroom.message import dsn
from postroom.message.dsn import (
    Action,
    DsnKind,
    RecipientStatus,
    Returned,
    Target,
    build_dsn,
    recipients_to_report,
    wants,
)
from postroom.policy.routes import RemoteDelivery
from postroom.queue.envelope import Envelope, Recipient
from postroom.smtp.params import parse_mail_params, parse_rcpt_params

HOST = "mail.example.com"
ARRIVAL = 1_700_000_000.0
NOW = ARRIVAL + 3600
ORIGINAL = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.org\r\n"
    b"Subject: lunch\r\n"
    b"Message-ID: <lunch.1@example.com>\r\n"
    b"\r\n"
    b"See you at noon.\r\n"
)
REPLY = (
    "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    "550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    "550 5.1.1 unnecessary spaces."
)


def envelope(**kw: Any) -> Envelope:
    base: dict[str, Any] = dict(queue_id="4QZ3B1HXK0F2", sender="alice@example.com", arrival=ARRIVAL)
    base.update(kw)
    return Envelope(**base)


def failed(address: str = "bob@example.org", **kw: Any) -> RecipientStatus:
    base: dict[str, Any] = dict(
        action=Action.FAILED,
        status="5.1.1",
        remote_mta="mx.example.org",
        reply=REPLY,
        stage="RCPT TO",
        last_attempt=NOW - 60,
    )
    base.update(kw)
    return RecipientStatus(address, **base)


def build(
    recipients: list[RecipientStatus] | None = None,
    original: Any = ORIGINAL,
    *,
    env: Envelope | None = None,
    kind: DsnKind = DsnKind.FAILURE,
    **kw: Any,
) -> dsn.Dsn:
    return build_dsn(
        env or envelope(),
        recipients or [failed()],
        original,
        kind=kind,
        hostname=HOST,
        now=NOW,
        rng=random.Random(7),
        **kw,
    )


def wire_ok(data: bytes) -> None:
    """CRLF only, no line over 998 octets, and the boundary only where it belongs."""
    assert re.search(rb"(?<!\r)\n", data) is None, "bare LF"
    assert re.search(rb"\r(?!\n)", data) is None, "bare CR"
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    boundary = re.search(rb'boundary="([^"]+)"', data)
    assert boundary is not None
    marker = boundary.group(1)
    # the parameter, then the two delimiters between and around three parts
    assert data.count(marker) == 1 + 3 + 1
    assert data.count(b"\r\n--" + marker + b"\r\n") == 3
    assert data.endswith(b"\r\n--" + marker + b"--\r\n")


def parse(notice: dsn.Dsn) -> EmailMessage:
    wire_ok(notice.data)
    msg = email.message_from_bytes(notice.data, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert len(list(msg.iter_parts())) == 3
    return msg


def parts(msg: EmailMessage) -> list[Message]:
    return list(msg.iter_parts())


def status_blocks(notice: dsn.Dsn) -> list[EmailMessage]:
    """The per-message block and the per-recipient blocks. ``email`` splits message/delivery-status
    itself; message/global-delivery-status it does not know, so that one is cut out of the raw
    bytes and each block parsed alone."""
    msg = parse(notice)
    part = parts(msg)[1]
    if part.get_content_type() == "message/delivery-status":
        blocks = part.get_payload()
        assert isinstance(blocks, list)
        return blocks
    assert part.get_content_type() == "message/global-delivery-status"
    marker = msg.get_boundary()
    assert marker is not None
    raw = notice.data.split(b"\r\n--" + marker.encode())[2]
    body = raw.split(b"\r\n\r\n", 1)[1]
    return [
        email.message_from_bytes(block + b"\r\n", policy=policy.SMTPUTF8)
        for block in body.strip(b"\r\n").split(b"\r\n\r\n")
    ]


def text_of(msg: EmailMessage) -> str:
    part = parts(msg)[0]
    assert part.get_content_type() == "text/plain"
    content = part.get_content()
    assert isinstance(content, str)
    return content


def unfolded(block: Message, name: str) -> str:
    """A field's value exactly as written, folding undone (RFC 5322 2.2.3)."""
    values = [v for k, v in block.raw_items() if k.lower() == name.lower()]  # type: ignore[attr-defined]
    assert len(values) == 1, (name, values)
    return re.sub(r"\r?\n(?=[ \t])", "", str(values[0])).strip()


def timestamp(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


# ---- the failure notice --------------------------------------------------------------------------


def test_bounce_headers() -> None:
    notice = build()
    msg = parse(notice)
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{HOST}>"
    assert msg["To"] == "alice@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert timestamp(msg["Date"]) == NOW
    assert msg["Message-ID"] == notice.message_id
    assert re.fullmatch(r"<20231114231320\.4QZ3B1HXK0F2\.[0-9a-f]{16}@mail\.example\.com>", notice.message_id)
    assert notice.recipient == "alice@example.com"
    assert not notice.eight_bit and not notice.smtputf8
    assert notice.data.isascii()
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "message/rfc822",
    ]


def test_bounce_delivery_status_fields() -> None:
    blocks = status_blocks(build(env=envelope(envid="QQ314159")))
    assert len(blocks) == 2
    per_message, per_rcpt = blocks
    assert per_message["Original-Envelope-Id"] == "QQ314159"
    assert per_message["Reporting-MTA"] == f"dns; {HOST}"
    assert per_message["X-Postroom-Queue-ID"] == "4QZ3B1HXK0F2"
    assert per_message["X-Postroom-Sender"] == "rfc822; alice@example.com"
    assert timestamp(per_message["Arrival-Date"]) == ARRIVAL
    assert per_rcpt["Original-Recipient"] is None  # no ORCPT: RFC 3461 6.3 d
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.org"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.org"
    assert timestamp(per_rcpt["Last-Attempt-Date"]) == NOW - 60
    assert per_rcpt["Will-Retry-Until"] is None


def test_multiline_reply_is_joined_and_quoted() -> None:
    notice = build()
    per_rcpt = status_blocks(notice)[1]
    lines = REPLY.split("\r\n")
    assert unfolded(per_rcpt, "Diagnostic-Code") == "smtp; " + " ".join(lines)
    raw = notice.data.decode()
    assert "Diagnostic-Code: smtp; 550-5.1.1 The email account" in raw
    field = raw.split("Diagnostic-Code:")[1].split("\r\nLast-Attempt-Date")[0]
    assert "\r\n " in field, "a long field is folded"
    assert all(len(line) <= 78 for line in ("Diagnostic-Code:" + field).split("\r\n"))
    text = text_of(parse(notice))
    assert "The mail server mx.example.org answered our RCPT TO command with:" in text
    for line in lines:  # each reply line starts a line of its own, words kept
        start = line.split(" ")[0]
        assert re.search(rf"^      {re.escape(start)} ", text, re.MULTILINE)
    assert " ".join(text.split()).count("double-checking the recipient's email address for typos or") == 1


def test_bounce_text_explains() -> None:
    notice = build([failed(), failed("carol@example.net", status="5.2.2", reply=None, reason="mailbox full")])
    raw_text = text_of(parse(notice))
    assert all(len(line) <= 76 for line in raw_text.splitlines())
    text = " ".join(raw_text.split())
    assert f"mail system at {HOST}" in text
    assert "could not be delivered to the recipients below" in text
    assert "<bob@example.org>" in text and "<carol@example.net>" in text
    assert "the mailbox does not exist (status 5.1.1)" in text
    assert "the mailbox is full (status 5.2.2)" in text
    assert "Reason: mailbox full" in text
    assert "What you can do:" in text
    assert "Check the address for typing mistakes" in text
    assert "4QZ3B1HXK0F2" in text
    assert "The message is attached below." in text
    carol = status_blocks(notice)[2]
    assert carol["Diagnostic-Code"] == "X-Postroom; mailbox full"
    assert carol["Remote-MTA"] == "dns; mx.example.org"


def test_alias_expansion_shows_what_was_addressed() -> None:
    text = text_of(parse(build([failed("bob@example.org", rcpt_to="team@example.org")])))
    assert "<bob@example.org> (you addressed <team@example.org>)" in text


def test_expired_failure_keeps_a_temporary_status() -> None:
    r = failed(status="4.4.7", reply=None, reason="delivery time expired")
    per_rcpt = status_blocks(build([r]))[1]
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "4.4.7"


# ---- what is returned of the original ------------------------------------------------------------


def test_default_returns_the_full_message() -> None:
    notice = build()
    returned = parts(parse(notice))[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    inner = returned.get_payload()
    assert isinstance(inner, list)
    assert inner[0]["Message-ID"] == "<lunch.1@example.com>"
    assert inner[0].get_payload() == "See you at noon.\r\n"
    assert notice.returned is Returned.FULL
    assert ORIGINAL in notice.data


def test_ret_full_returns_the_full_message() -> None:
    notice = build(env=envelope(ret="FULL"))
    assert notice.returned is Returned.FULL
    assert parts(parse(notice))[2].get_content_type() == "message/rfc822"


def test_ret_hdrs_returns_the_headers_only() -> None:
    notice = build(env=envelope(ret="HDRS"))
    returned = parts(parse(notice))[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    content = returned.get_payload(decode=True)
    assert content == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"See you at noon" not in notice.data
    assert notice.returned is Returned.HEADERS
    assert "header section of the message is attached" in text_of(parse(notice))


class CountingReader(io.BytesIO):
    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.total = 0

    def read(self, size: int | None = -1, /) -> bytes:
        chunk = super().read(size)
        self.total += len(chunk)
        return chunk


def big_message(body_octets: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    return ORIGINAL + line * (body_octets // len(line))


def test_size_cap_turns_full_into_headers_and_reads_no_more() -> None:
    reader = CountingReader(big_message(5_000_000))
    notice = build(original=reader, env=envelope(ret="FULL"), size_limit=10_000)
    assert reader.total <= 10_001
    assert notice.returned is Returned.HEADERS
    msg = parse(notice)
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert "larger than 10000 bytes" in " ".join(text_of(msg).split())
    assert len(notice.data) < 10_000


def test_size_cap_boundary_exactly() -> None:
    message = big_message(2_000)
    assert build(original=message, size_limit=len(message)).returned is Returned.FULL
    assert build(original=io.BytesIO(message), size_limit=len(message)).returned is Returned.FULL
    assert build(original=message, size_limit=len(message) - 1).returned is Returned.HEADERS
    assert build(original=io.BytesIO(message), size_limit=len(message) - 1).returned is Returned.HEADERS


def test_default_size_limit_is_postfix_bounce_size_limit() -> None:
    assert dsn.BOUNCE_SIZE_LIMIT == 50_000
    assert build(original=big_message(49_000)).returned is Returned.FULL
    assert build(original=big_message(60_000)).returned is Returned.HEADERS


def test_header_section_over_the_cap_keeps_whole_lines() -> None:
    headers = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"y" * 60) for i in range(2000))
    reader = CountingReader(headers + b"\r\nbody\r\n")
    notice = build(original=reader, size_limit=5_000)
    assert reader.total <= 5_001
    content = parts(parse(notice))[2].get_payload(decode=True)
    assert isinstance(content, bytes)
    assert 4_900 < len(content) <= 5_000
    assert content.endswith(b"y" * 60 + b"\r\n")
    assert all(re.fullmatch(rb"X-Filler-\d{5}: y{60}", line) for line in content.split(b"\r\n")[:-1])


def test_original_from_a_queue_file(tmp_path: Path) -> None:
    path = tmp_path / "queue-file"
    path.write_bytes(b'{"queue_id":"4QZ3B1HXK0F2"}\n' + ORIGINAL)
    with path.open("rb") as handle:
        handle.readline()  # the envelope line: the message starts after it
        notice = build(original=handle)
    assert ORIGINAL in notice.data


def test_bare_lf_and_long_lines_in_the_original_are_repaired() -> None:
    long_subject = b"Subject: " + b"word " * 400  # 2009 octets, one header line
    original = b"From: a@example.com\n" + long_subject.rstrip() + b"\nX: 1\r\rbody\n" + b"z" * 3000 + b"\n"
    notice = build(original=original)
    inner = parts(parse(notice))[2].get_payload()
    assert isinstance(inner, list)
    assert inner[0]["X"] == "1"
    assert inner[0]["Subject"] == " ".join(["word"] * 400)  # folded, not broken
    body = inner[0].get_payload()
    assert body.replace("\r\n", "") == "body" + "z" * 3000


def test_utf8_line_break_does_not_split_a_character() -> None:
    original = b"From: a@example.com\r\n\r\n" + "é".encode() * 1500 + b"\r\n"
    notice = build(original=original)
    returned = notice.data.split(b"\r\n\r\n")[-1]
    for line in returned.split(b"\r\n"):
        line.decode("utf-8")  # each piece is whole UTF-8


def test_boundary_avoids_the_content() -> None:
    tag = "4QZ3B1HXK0F2"
    first = f"=_postroom_{tag}_{random.Random(3).getrandbits(96):024x}"
    original = ORIGINAL + f"--{first}\r\n".encode() + first.encode() + b"\r\n"
    notice = build_dsn(
        envelope(),
        [failed()],
        original,
        kind=DsnKind.FAILURE,
        hostname=HOST,
        now=NOW,
        rng=random.Random(3),
    )
    msg = parse(notice)
    assert msg.get_boundary() != first
    assert original in notice.data


# ---- delay and success ---------------------------------------------------------------------------


def delayed(address: str = "bob@example.org", **kw: Any) -> RecipientStatus:
    base: dict[str, Any] = dict(
        action=Action.DELAYED,
        status="4.4.1",
        remote_mta="mx.example.org",
        reply="421 4.4.1 Try again later",
        stage="MAIL FROM",
        last_attempt=NOW - 30,
        will_retry_until=ARRIVAL + 5 * 86400,
    )
    base.update(kw)
    return RecipientStatus(address, **base)


def test_delay_warning() -> None:
    notice = build([delayed()], env=envelope(ret="FULL"), kind=DsnKind.DELAY)
    msg = parse(notice)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    per_rcpt = status_blocks(notice)[1]
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.4.1"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 421 4.4.1 Try again later"
    assert timestamp(per_rcpt["Will-Retry-Until"]) == ARRIVAL + 5 * 86400
    text = " ".join(text_of(msg).split())
    assert "no action is required" in text
    assert "keep trying until " + email.utils.formatdate(ARRIVAL + 5 * 86400, localtime=True) in text
    assert "What you can do" not in text
    # a warning never returns the body, whatever RET says (RFC 3461 4.3)
    assert notice.returned is Returned.HEADERS
    assert parts(msg)[2].get_content_type() == "text/rfc822-headers"
    assert parts(msg)[2]["Content-Description"] == "Delayed Message Headers"


@pytest.mark.parametrize("action", [Action.DELIVERED, Action.RELAYED, Action.EXPANDED])
def test_success_report(action: Action) -> None:
    r = RecipientStatus("bob@example.org", action, "2.0.0", remote_mta="mx.example.org")
    notice = build([r], kind=DsnKind.SUCCESS)
    msg = parse(notice)
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_rcpt = status_blocks(notice)[1]
    assert per_rcpt["Action"] == action.value
    assert per_rcpt["Status"] == "2.0.0"
    assert per_rcpt["Last-Attempt-Date"] is None
    text = " ".join(text_of(msg).split())
    assert "You asked to be told" in text
    expected = {
        Action.DELIVERED: "Delivered.",
        Action.RELAYED: "does not send delivery reports",
        Action.EXPANDED: "mailing list or alias",
    }[action]
    assert expected in text
    assert notice.returned is Returned.HEADERS


def test_double_bounce_goes_to_the_postmaster() -> None:
    notice = build(env=envelope(sender=""), postmaster=f"postmaster@{HOST}")
    msg = parse(notice)
    assert msg["To"] == f"postmaster@{HOST}"
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert notice.recipient == f"postmaster@{HOST}"
    assert status_blocks(notice)[0]["X-Postroom-Sender"] == "rfc822;"
    text = " ".join(text_of(msg).split())
    assert "empty sender address" in text and "postmaster" in text


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build(env=envelope(sender="")), "null reverse path"),
        (lambda: build([delayed()]), "does not belong"),
        (lambda: build([failed()], kind=DsnKind.SUCCESS), "does not belong"),
        (
            lambda: build_dsn(envelope(), [], ORIGINAL, kind=DsnKind.FAILURE, hostname=HOST, now=NOW),
            "at least",
        ),
        (lambda: failed(status="2.0.0"), "does not fit"),
        (lambda: delayed(status="5.1.1"), "does not fit"),
        (lambda: failed(status="5.1"), "RFC 3463"),
        (lambda: failed(will_retry_until=NOW), "Will-Retry-Until"),
    ],
)
def test_misuse_is_refused(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


# ---- ORCPT and ENVID -----------------------------------------------------------------------------


def test_orcpt_and_envid_round_trip_from_smtp_parameters() -> None:
    mail = parse_mail_params("RET=HDRS ENVID=QQ+2B314159+3Dx")
    rcpt = parse_rcpt_params("NOTIFY=FAILURE,DELAY ORCPT=rfc822;Bob+2Btag@Example.org")
    queued = Recipient(
        original="bob+tag@example.org",
        destination=RemoteDelivery("bob+tag@example.org"),
        orcpt=rcpt.orcpt,
        notify=rcpt.notify,
    )
    env = envelope(envid=mail.envid, ret=mail.ret, recipients=[queued])
    env = Envelope.from_json(env.to_json())  # as the queue manager would read it back
    r = env.recipients[0]
    notice = build([failed(r.address, orcpt=r.orcpt)], env=env)
    per_message, per_rcpt = status_blocks(notice)
    assert per_message["Original-Envelope-Id"] == "QQ+314159=x"  # xtext decoded (RFC 3461 6.3 a)
    assert per_rcpt["Original-Recipient"] == "rfc822; Bob+tag@Example.org"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob+tag@example.org"
    assert notice.returned is Returned.HEADERS


def test_orcpt_of_another_type_is_kept() -> None:
    per_rcpt = status_blocks(build([failed(orcpt="x400;/G=Bob/S=Smith/O=Example/")]))[1]
    assert per_rcpt["Original-Recipient"] == "x400; /G=Bob/S=Smith/O=Example/"


def test_orcpt_utf8_xtext_becomes_unitext_in_a_global_report() -> None:
    rcpt = parse_rcpt_params("ORCPT=utf-8;b\\x{FC}cher@example.org")
    notice = build([failed("bob@example.org", orcpt=rcpt.orcpt)])
    per_rcpt = status_blocks(notice)[1]
    assert per_rcpt["Original-Recipient"] == "utf-8; bücher@example.org"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.org"


# ---- internationalised addresses (RFC 6533) ------------------------------------------------------


def test_smtputf8_recipient() -> None:
    notice = build([failed("jöran+x@bücher.example")], env=envelope(smtputf8=True))
    msg = parse(notice)
    assert parts(msg)[1].get_content_type() == "message/global-delivery-status"
    per_message, per_rcpt = status_blocks(notice)
    assert per_message["X-Postroom-Sender"] == "rfc822; alice@example.com"
    assert per_rcpt["Final-Recipient"] == "utf-8; jöran\\x{2B}x@bücher.example"
    assert dsn.decode_utf8_addr("jöran\\x{2B}x@bücher.example") == "jöran+x@bücher.example"
    assert per_rcpt["Action"] == "failed"
    text_part = parts(msg)[0]
    assert text_part.get_content_charset() == "utf-8"
    assert "<jöran+x@bücher.example>" in text_of(msg)
    assert notice.eight_bit and not notice.smtputf8  # 8BITMIME carries it; the To: is ASCII


def test_utf8_sender_needs_smtputf8() -> None:
    notice = build(env=envelope(sender="josé@exämple.com", smtputf8=True))
    msg = parse(notice)
    assert msg["To"] == "josé@exämple.com"
    assert notice.smtputf8 and notice.eight_bit
    assert status_blocks(notice)[0]["X-Postroom-Sender"] == "utf-8; josé@exämple.com"


def test_idn_host_names_are_written_as_a_labels() -> None:
    notice = build([failed(remote_mta="mx.bücher.example")])
    per_rcpt = status_blocks(notice)[1]
    assert per_rcpt["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"
    assert notice.data.isascii()


def test_ascii_report_stays_seven_bit_with_a_non_ascii_reply() -> None:
    notice = build([failed(reply="550 5.1.1 Empfänger unbekannt")])
    assert notice.data.isascii()
    assert status_blocks(notice)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Empf?nger unbekannt"


def test_utf8_headers_are_returned_as_message_global() -> None:
    original = "From: José <josé@exämple.com>\r\nSubject: Grüße\r\n\r\nHallo\r\n".encode()
    notice = build(original=original, env=envelope(smtputf8=True))
    returned = parts(parse(notice))[2]
    assert returned.get_content_type() == "message/global"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert original in notice.data
    headers_only = build(original=original, env=envelope(smtputf8=True, ret="HDRS"))
    returned = parts(parse(headers_only))[2]
    assert returned.get_content_type() == "message/global-headers"
    inner = returned.get_payload()
    assert isinstance(inner, list) and inner[0]["Subject"] == "Grüße"


def test_eight_bit_body_is_message_rfc822_8bit() -> None:
    original = b"From: a@example.com\r\nSubject: x\r\n\r\ncaf\xc3\xa9\r\n"
    notice = build(original=original)
    msg = parse(notice)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    returned = parts(msg)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"
    assert notice.eight_bit and not notice.smtputf8


def test_hostile_values_cannot_add_fields() -> None:
    r = failed(
        "bob@example.org\r\nAction: delivered",
        remote_mta="mx\r\nX-Evil: 1",
        reply="550 no\r\n\r\nAction: delivered",
    )
    notice = build([r], env=envelope(envid="id\r\nX-Evil: 2"))
    blocks = status_blocks(notice)
    assert len(blocks) == 2
    assert blocks[1].get_all("Action") == ["failed"]
    assert b"\r\nX-Evil" not in notice.data


@given(st.text(max_size=200))
def test_utf8_addr_round_trip(address: str) -> None:
    for unitext in (True, False):
        encoded = dsn.encode_utf8_addr(address, unitext=unitext)
        assert dsn.decode_utf8_addr(encoded) == address  # a literal "\\x{41}" too: "\\" is escaped
        if not unitext:
            assert encoded.isascii()
        assert not set(encoded) & set(" +=\r\n")


# ---- who is notified -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("notify", "delay_warnings", "expected"),
    [
        (None, False, {DsnKind.FAILURE}),
        (None, True, {DsnKind.FAILURE, DsnKind.DELAY}),
        (frozenset({"NEVER"}), True, set()),
        (frozenset({"SUCCESS"}), True, {DsnKind.SUCCESS}),
        (frozenset({"FAILURE", "DELAY"}), False, {DsnKind.FAILURE, DsnKind.DELAY}),
        (frozenset({"success", "failure"}), False, {DsnKind.SUCCESS, DsnKind.FAILURE}),
    ],
)
def test_wants(notify: frozenset[str] | None, delay_warnings: bool, expected: set[DsnKind]) -> None:
    assert {k for k in DsnKind if wants(notify, k, delay_warnings=delay_warnings)} == expected


def rcpt(address: str, notify: str | None) -> Recipient:
    params = parse_rcpt_params(f"NOTIFY={notify}" if notify else "")
    return Recipient(original=address, destination=RemoteDelivery(address), notify=params.notify)


def test_recipients_to_report() -> None:
    default = rcpt("a@example.org", None)
    never = rcpt("b@example.org", "NEVER")
    success = rcpt("c@example.org", "SUCCESS,FAILURE")
    delay = rcpt("d@example.org", "DELAY")
    outcomes: list[tuple[Recipient, Action | None]] = [
        (default, Action.FAILED),
        (never, Action.FAILED),
        (success, Action.DELIVERED),
        (delay, Action.DELAYED),
    ]
    bounce = recipients_to_report("s@example.com", outcomes, DsnKind.FAILURE)
    assert bounce.target is Target.SENDER and bounce.recipients == (default,)
    warn = recipients_to_report("s@example.com", outcomes, DsnKind.DELAY)
    assert warn.recipients == (delay,)
    ok = recipients_to_report("s@example.com", outcomes, DsnKind.SUCCESS)
    assert ok.recipients == (success,)
    # without NOTIFY, delays only when delay warnings are on
    quiet = [(default, Action.DELAYED)]
    assert recipients_to_report("s@example.com", quiet, DsnKind.DELAY).target is Target.NOBODY
    loud = recipients_to_report("s@example.com", quiet, DsnKind.DELAY, delay_warnings=True)
    assert loud.target is Target.SENDER
    # NEVER only, or nothing done yet: nobody
    assert (
        recipients_to_report("s@example.com", [(never, Action.FAILED)], DsnKind.FAILURE).target
        is Target.NOBODY
    )
    assert recipients_to_report("s@example.com", [(default, None)], DsnKind.FAILURE).recipients == ()


def test_null_sender_is_never_notified() -> None:
    default = rcpt("a@example.org", None)
    double = recipients_to_report("", [(default, Action.FAILED)], DsnKind.FAILURE)
    assert double.target is Target.POSTMASTER
    assert double.recipients == (default,)
    assert "double bounce" in double.reason
    off = recipients_to_report("", [(default, Action.FAILED)], DsnKind.FAILURE, double_bounces=False)
    assert off.target is Target.NOBODY and "discarded" in off.reason
    warn = recipients_to_report("", [(default, Action.DELAYED)], DsnKind.DELAY, delay_warnings=True)
    assert warn.target is Target.NOBODY and "null sender" in warn.reason


# ---- properties ----------------------------------------------------------------------------------

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
anything = st.text(max_size=300)
ascii_address = st.text(printable, min_size=1, max_size=300).filter(lambda s: s.strip() != "")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    addresses=st.lists(ascii_address, min_size=1, max_size=3),
    replies=st.lists(st.lists(st.text(printable, max_size=300), max_size=4), min_size=3, max_size=3),
)
def test_printable_values_round_trip(addresses: list[str], replies: list[list[str]]) -> None:
    recipients = [
        failed(address, reply="\r\n".join(reply) or None, reason="x" if not "".join(reply).strip() else None)
        for address, reply in zip(addresses, replies, strict=False)
    ]
    notice = build(recipients)
    blocks = status_blocks(notice)
    assert len(blocks) == len(recipients) + 1
    for block, r, reply in zip(blocks[1:], recipients, replies, strict=False):
        assert unfolded(block, "Final-Recipient") == f"rfc822; {r.final_recipient.strip()}"
        words = [line.strip() for line in reply if line.strip()]
        if words:
            assert unfolded(block, "Diagnostic-Code") == "smtp; " + " ".join(words)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    address=anything,
    orcpt=st.none() | anything,
    sender=st.text(printable, min_size=1, max_size=100),
    reply=anything,
    envid=st.none() | st.text(printable, max_size=100),
    original=st.binary(max_size=3000),
    ret=st.sampled_from([None, "FULL", "HDRS"]),
    kind=st.sampled_from(list(DsnKind)),
    limit=st.integers(0, 4000),
)
def test_anything_parses_and_stays_crlf(
    address: str,
    orcpt: str | None,
    sender: str,
    reply: str,
    envid: str | None,
    original: bytes,
    ret: str | None,
    kind: DsnKind,
    limit: int,
) -> None:
    action, status = {
        DsnKind.FAILURE: (Action.FAILED, "5.0.0"),
        DsnKind.DELAY: (Action.DELAYED, "4.0.0"),
        DsnKind.SUCCESS: (Action.DELIVERED, "2.0.0"),
    }[kind]
    r = RecipientStatus(address, action, status, orcpt=orcpt, reply=reply, remote_mta=reply[:50])
    notice = build(
        [r], original, env=envelope(sender=sender, envid=envid, ret=ret), kind=kind, size_limit=limit
    )
    msg = parse(notice)  # CRLF only, lines within 998, the boundary only where it belongs
    blocks = status_blocks(notice)
    assert len(blocks) == 2
    assert blocks[1]["Action"] == action.value
    assert blocks[1]["Status"] == status
    assert len(parts(msg)[2].as_bytes()) <= limit + 2000
