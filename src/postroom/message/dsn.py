"""Delivery status notifications: who gets one, and the message itself (RFC 3461, 3464, 6522, 6533).

Two pure parts, no I/O and no clock (the caller passes ``now``):

- :func:`recipients_to_report` decides who a notice of one :class:`DsnKind` covers and whom it goes
  to. NOTIFY (RFC 3461 4.1) is honoured per recipient: ``NEVER`` gets nothing; without NOTIFY a
  recipient gets failures, and delays only when the operator turned delay warnings on (RFC 3461
  4.1 leaves the default to the MTA; Postfix's ``delay_warning_time`` is off by default); success
  only when asked for. A message with the null reverse path is itself a notification and is never
  answered (RFC 5321 4.5.5, 6.1; RFC 3461 6.1): its failures become a double bounce for the
  postmaster instead, and its delays and successes are reported to nobody.

- :func:`build_dsn` writes the notice as ``multipart/report; report-type=delivery-status``
  (RFC 6522 3): a text/plain part saying in plain words what happened and what the sender can do;
  the machine-readable ``message/delivery-status`` part (RFC 3464 2); and the original message or
  its header section. Output is bytes with CRLF line ends and no line over 998 octets
  (RFC 5322 2.1.1), to be spooled with ``MAIL FROM:<>`` to :attr:`Dsn.recipient`.

What is returned of the original (RFC 3461 4.3, RFC 3464 5): only a failure notice may carry the
whole message, and only when RET is not HDRS and the message fits in ``size_limit`` octets
(Postfix's ``bounce_size_limit``, 50000 by default, applied to RET=FULL as well). Every other case
returns the header section, cut at ``size_limit`` too. The original is read from bytes or a binary
file object, at most ``size_limit + 1`` octets (the one extra tells "exactly the limit" from
"more"); its line ends are made CRLF and lines over 998 octets are broken (header lines folded).

Internationalised mail (RFC 6533, RFC 6532): an address that is not ASCII is written with the
``utf-8`` address type in ``message/global-delivery-status`` (``utf-8-addr-unitext`` form, 3);
an original whose header section has 8-bit octets is returned as ``message/global`` or
``message/global-headers``. These need only 8BITMIME to travel; :attr:`Dsn.smtputf8` says when
the notice itself needs SMTPUTF8 (its recipient address is not ASCII).

Envelope values follow the spool's decoded form: ENVID and ORCPT xtext-decoded (RFC 3461 4,
6.3: Original-Envelope-Id and Original-Recipient carry the values, not their SMTP encoding);
an ORCPT of type ``utf-8`` has its ``\\x{HEX}`` escapes undone and written again for the part.
"""

from __future__ import annotations

import email.utils
import random
import re
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Final, Generic, Protocol, TypeVar

#: Postfix's ``bounce_size_limit``: octets of the original a notice may return.
BOUNCE_SIZE_LIMIT: Final = 50_000
LINE_MAX: Final = 998  # RFC 5322 2.1.1: octets of a line, CRLF excluded
_SOFT_MAX: Final = 78  # RFC 5322 2.1.1: SHOULD not exceed 78 characters
_PIECE_MAX: Final = 900  # a header token longer than this is broken so folded lines stay < 998
_TEXT_WIDTH: Final = 76
_CHUNK: Final = 64 * 1024

_STATUS = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})")  # RFC 3463 2: class.subject.detail
#: Characters no header value or text line of ours may carry: controls (C0, DEL, C1), line and
#: paragraph separators, surrogates. Each becomes "?".
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NEWLINES = re.compile(r"\r\n|\r|\n")
_EOL = re.compile(rb"\r\n|\r|\n")
_TOKEN = re.compile(r"[ \t]*[^ \t]+")
_UXTEXT_ESCAPE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


class DsnKind(StrEnum):
    """Which notice: the values are the RFC 3461 4.1 NOTIFY keywords that ask for it."""

    FAILURE = "FAILURE"  # a bounce: delivery given up
    DELAY = "DELAY"  # a warning: still being retried
    SUCCESS = "SUCCESS"  # delivered, relayed to a non-DSN system, or expanded


class Action(StrEnum):
    """RFC 3464 2.3.3 action-value: what became of one recipient."""

    FAILED = "failed"
    DELAYED = "delayed"
    DELIVERED = "delivered"
    RELAYED = "relayed"  # passed to a system that will not send DSNs (RFC 3461 6.2.1)
    EXPANDED = "expanded"  # delivered to a list or alias and passed on (RFC 3461 6.2.1)


_ACTIONS: Final = {
    DsnKind.FAILURE: frozenset({Action.FAILED}),
    DsnKind.DELAY: frozenset({Action.DELAYED}),
    DsnKind.SUCCESS: frozenset({Action.DELIVERED, Action.RELAYED, Action.EXPANDED}),
}
#: Status classes each action may carry (RFC 3463 3.1). A failure after retries ran out may keep
#: the last temporary status, as Postfix does (4.4.1 with "failed").
_CLASSES: Final = {
    Action.FAILED: "45",
    Action.DELAYED: "4",
    Action.DELIVERED: "2",
    Action.RELAYED: "2",
    Action.EXPANDED: "2",
}


class Target(StrEnum):
    """Where a notice goes."""

    SENDER = "sender"
    POSTMASTER = "postmaster"  # a double bounce: the failed message had the null sender
    NOBODY = "nobody"


class Returned(StrEnum):
    """What of the original a notice carries."""

    FULL = "full"
    HEADERS = "headers"


# ---- who is notified ----------------------------------------------------------------------------


class HasNotify(Protocol):
    """A recipient as :func:`recipients_to_report` sees it (``queue.envelope.Recipient`` fits)."""

    @property
    def notify(self) -> frozenset[str] | None: ...


R = TypeVar("R", bound=HasNotify)


@dataclass(frozen=True, slots=True)
class Decision(Generic[R]):
    """The answer of :func:`recipients_to_report`: whom to tell, about which recipients, and why
    (the reason is for the log line)."""

    target: Target
    recipients: tuple[R, ...]
    reason: str


def wants(notify: frozenset[str] | None, kind: DsnKind, *, delay_warnings: bool = False) -> bool:
    """Whether a recipient's NOTIFY asks for a notice of this kind (RFC 3461 4.1)."""
    if notify is None:
        return kind is DsnKind.FAILURE or (kind is DsnKind.DELAY and delay_warnings)
    words = {word.upper() for word in notify}
    return "NEVER" not in words and kind.value in words


def recipients_to_report(
    sender: str,
    recipients: Iterable[tuple[R, Action | None]],
    kind: DsnKind,
    *,
    delay_warnings: bool = False,
    double_bounces: bool = True,
) -> Decision[R]:
    """Which recipients a notice of ``kind`` covers, and whether it goes to the sender.

    ``recipients`` pairs each envelope recipient with what became of it (``None``: nothing yet).
    A recipient is covered when its action belongs to ``kind`` and :func:`wants` says yes.
    ``sender`` is the envelope sender, ``""`` for the null reverse path.
    """
    allowed = _ACTIONS[kind]
    chosen = tuple(
        r
        for r, action in recipients
        if action in allowed and wants(r.notify, kind, delay_warnings=delay_warnings)
    )
    if not chosen:
        return Decision(Target.NOBODY, (), f"no recipient is due a {kind.value.lower()} notice")
    if sender:
        return Decision(Target.SENDER, chosen, f"{kind.value.lower()} notice to the sender")
    if kind is not DsnKind.FAILURE:
        return Decision(Target.NOBODY, (), "null sender: notifications are never answered (RFC 3461 6.1)")
    if not double_bounces:
        return Decision(Target.NOBODY, (), "null sender: double bounce discarded by configuration")
    return Decision(
        Target.POSTMASTER,
        chosen,
        "double bounce: a message with the null sender failed; it cannot be returned (RFC 5321 6.1),"
        " so the postmaster is told",
    )


# ---- what the builder is given -------------------------------------------------------------------


class EnvelopeFacts(Protocol):
    """The per-message facts a notice reports (``queue.envelope.Envelope`` fits)."""

    @property
    def queue_id(self) -> str: ...
    @property
    def sender(self) -> str: ...
    @property
    def arrival(self) -> float: ...
    @property
    def envid(self) -> str | None: ...
    @property
    def ret(self) -> str | None: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class RecipientStatus:
    """What became of one recipient, as the notice reports it (RFC 3464 2.3).

    ``final_recipient`` is the address delivery worked on (after alias expansion), ``rcpt_to`` the
    address as given in RCPT TO when it differs (shown in the text only). ``orcpt`` is the
    decoded ORCPT ``type;address``: Original-Recipient appears only with it (RFC 3461 6.3 d).
    ``reply`` is the remote server's reply, lines as received (``"550-5.1.1 No such user\\n550
    5.1.1 ..."``); ``reason`` our own words when there is no reply ("mailbox full").
    ``stage`` names what the reply answered ("RCPT TO", "end of DATA").
    """

    final_recipient: str
    action: Action
    status: str  # RFC 3463 enhanced code, "5.1.1"
    rcpt_to: str | None = None
    orcpt: str | None = None
    remote_mta: str | None = None  # host name of the server that answered
    reply: str | None = None
    stage: str | None = None
    reason: str | None = None
    last_attempt: float | None = None
    will_retry_until: float | None = None  # delayed only (RFC 3464 2.3.8)

    def __post_init__(self) -> None:
        match = _STATUS.fullmatch(self.status)
        if match is None:
            raise ValueError(f"not an RFC 3463 status code: {self.status!r}")
        if match.group(1) not in _CLASSES[self.action]:
            raise ValueError(f"status {self.status} does not fit action {self.action.value}")
        if self.will_retry_until is not None and self.action is not Action.DELAYED:
            raise ValueError("Will-Retry-Until belongs to delayed recipients only (RFC 3464 2.3.8)")


@dataclass(frozen=True, slots=True)
class Dsn:
    """A notice ready to spool: ``MAIL FROM:<>``, ``RCPT TO:<recipient>``, then ``data``."""

    data: bytes
    recipient: str  # the envelope recipient: the original sender, or the postmaster
    message_id: str
    returned: Returned
    eight_bit: bool  # 8-bit octets inside: relay with BODY=8BITMIME
    smtputf8: bool  # a UTF-8 header field (the recipient address): relay with SMTPUTF8


# ---- xtext forms of RFC 6533 ---------------------------------------------------------------------


def _qchar(char: str) -> bool:
    """RFC 6533 3 QCHAR: printable ASCII except SP, "\\", "+" and "="."""
    return "!" <= char <= "~" and char not in "\\+="


def encode_utf8_addr(address: str, *, unitext: bool) -> str:
    """``utf-8-addr-unitext`` (non-ASCII kept, for message/global-delivery-status) or, with
    ``unitext=False``, ``utf-8-addr-xtext`` (7-bit) of an address (RFC 6533 3)."""
    out = []
    for char in address:
        if _qchar(char) or (unitext and ord(char) > 0x7F):
            out.append(char)
        else:
            out.append(f"\\x{{{ord(char):02X}}}")
    return "".join(out)


def decode_utf8_addr(text: str) -> str:
    """Undo the ``\\x{HEX}`` escapes of ``utf-8-addr-xtext``/``-unitext`` (RFC 6533 3). Escapes
    of surrogates or beyond U+10FFFF are left as written."""

    def one(match: re.Match[str]) -> str:
        point = int(match.group(1), 16)
        if point > 0x10FFFF or 0xD800 <= point <= 0xDFFF:
            return match.group(0)
        return chr(point)

    return _UXTEXT_ESCAPE.sub(one, text)


# ---- small text helpers --------------------------------------------------------------------------


def _clean(text: str, *, ascii_only: bool) -> str:
    """A value safe for a header field or a text line: no controls, no line breaks."""
    text = _UNSAFE.sub("?", text)
    if ascii_only and not text.isascii():
        text = "".join(c if c.isascii() else "?" for c in text)
    return text.strip()


def _host(name: str) -> str:
    """A host name for ``dns;`` fields (RFC 3464 2.1.2): a non-ASCII name as its A-labels."""
    name = _clean(name, ascii_only=False).replace(" ", "")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            name = _clean(name, ascii_only=True)
    return name


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _pieces(token: str) -> Iterable[str]:
    """A token of a header value, split if longer than :data:`_PIECE_MAX` octets. Only a value
    with nearly a thousand octets and no space gets split, and the split adds a space: RFC 5322
    2.2.3 can fold only at whitespace."""
    if _octets(token) <= _PIECE_MAX:
        yield token
        return
    piece = ""
    for char in token:
        if _octets(piece) + _octets(char) > _PIECE_MAX:
            yield piece
            piece = " "
        piece += char
    if piece.strip():
        yield piece


def _field(name: str, value: str) -> list[str]:
    """``Name: value`` folded at spaces (RFC 5322 2.2.3): within 78 characters where the value
    allows, within 998 octets always."""
    line = f"{name}:"
    lines: list[str] = []
    for i, token in enumerate(_TOKEN.findall(value)):
        if i == 0:
            token = " " + token.lstrip(" \t")
        for piece in _pieces(token):
            if line != f"{name}:" and _octets(line) + _octets(piece) > _SOFT_MAX:
                lines.append(line)
                line = piece if piece[0] in " \t" else " " + piece
            else:
                line += piece
    lines.append(line)
    return lines


def _wrap(text: str, indent: str = "", more: str | None = None) -> list[str]:
    """``text`` in lines of at most 76 characters (so at most 304 octets), ``more`` indenting
    the lines after the first."""
    return textwrap.wrap(
        text,
        _TEXT_WIDTH,
        initial_indent=indent,
        subsequent_indent=indent if more is None else more,
        break_on_hyphens=False,
        break_long_words=True,
    ) or [indent.rstrip()]


def _bullet(text: str) -> list[str]:
    return _wrap(text, "  - ", "    ")


def _date(timestamp: float) -> str:
    """RFC 5322 3.3 date-time, as RFC 3464 2.1.5 wants it."""
    return email.utils.formatdate(timestamp, localtime=True)


def _split_orcpt(orcpt: str) -> tuple[str, str]:
    addr_type, semi, address = orcpt.partition(";")
    if not semi:
        return "rfc822", orcpt.strip()
    return addr_type.strip() or "rfc822", address.strip()


# ---- the original message ------------------------------------------------------------------------


def _read_capped(original: bytes | Readable, cap: int) -> tuple[bytes, bool]:
    """At most ``cap`` octets of the original, and whether that is all of it."""
    if isinstance(original, bytes | bytearray | memoryview):
        view = memoryview(original)
        return bytes(view[:cap]), len(view) <= cap
    chunks: list[bytes] = []
    remaining = cap
    while remaining > 0:
        chunk = original.read(min(remaining, _CHUNK))
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks), not original.read(1)


def _header_end(data: bytes) -> int | None:
    """Offset just after the blank line that ends the header section (data has CRLF ends)."""
    if data.startswith(b"\r\n"):
        return 2
    end = data.find(b"\r\n\r\n")
    return None if end < 0 else end + 4


def _break_line(line: bytes, header: bool) -> list[bytes]:
    """A line cut into pieces of at most 998 octets. A header line is folded (RFC 5322 2.2.3)
    before its last whitespace that fits, or, with none, cut and continued with an added space;
    a body line simply breaks. No cut falls inside a UTF-8 sequence."""
    out: list[bytes] = []
    while len(line) > LINE_MAX:
        cut = LINE_MAX
        if header:
            space = max(line.rfind(b" ", 1, LINE_MAX + 1), line.rfind(b"\t", 1, LINE_MAX + 1))
            if space > 0 and line[:space].strip() and line[space:].strip():
                out.append(line[:space])
                line = line[space:]
                continue
        for _ in range(3):  # a UTF-8 continuation octet is 10xxxxxx
            if 0x80 <= line[cut] <= 0xBF:
                cut -= 1
        out.append(line[:cut])
        line = (b" " if header else b"") + line[cut:]
    out.append(line)
    return out


def _returned(original: bytes | Readable, cap: int, want_full: bool) -> tuple[bytes, Returned, bool]:
    """The part to return: (content with CRLF ends, what it is, whether the message was cut)."""
    data, complete = _read_capped(original, cap)
    data = _EOL.sub(b"\r\n", data)
    end = _header_end(data)
    if want_full and complete:
        content, kind = data, Returned.FULL
    elif end is not None:
        content, kind = data[: end - 2], Returned.HEADERS  # the blank line is not a header
    elif complete:
        content, kind = data, Returned.HEADERS  # a message without a body
    else:  # the header section alone is over the limit: keep whole lines
        last = data.rfind(b"\r\n")
        content, kind = (data[: last + 2] if last >= 0 else b""), Returned.HEADERS
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    body_at = _header_end(content)
    lines = content.split(b"\r\n")
    out: list[bytes] = []
    offset = 0
    for line in lines[:-1]:
        in_header = body_at is None or offset < body_at
        out.extend(_break_line(line, in_header) if len(line) > LINE_MAX else [line])
        offset += len(line) + 2
    fixed = b"".join(piece + b"\r\n" for piece in out)
    return fixed, kind, not complete


# ---- the human-readable part ---------------------------------------------------------------------

#: Plain words for RFC 3463 codes, by "subject.detail" then by subject.
_DETAILS: Final = {
    "1.1": "the mailbox does not exist",
    "1.2": "the recipient's domain does not exist or does not accept mail",
    "1.3": "the address is not valid",
    "1.6": "the recipient has moved and left no forwarding address",
    "2.1": "the mailbox is disabled and does not accept messages",
    "2.2": "the mailbox is full",
    "2.3": "the message is larger than the recipient accepts",
    "3.4": "the message is larger than the receiving system accepts",
    "4.1": "the receiving mail server did not answer",
    "4.2": "the connection to the receiving mail server broke",
    "4.4": "no mail server could be found for the recipient's domain",
    "4.7": "delivery took too long, so the mail system gave up",
    "5.3": "the message had too many recipients",
    "7.1": "the receiving system refused the message by its rules",
}
_SUBJECTS: Final = {
    "1": "there is a problem with the address",
    "2": "there is a problem with the recipient's mailbox",
    "3": "the receiving mail system has a problem",
    "4": "there is a network or routing problem",
    "5": "the mail servers did not understand each other",
    "6": "there is a problem with the message's content",
    "7": "the message was refused for security or policy reasons",
}
_ADVICE: Final = {
    "1": "Check the address for typing mistakes. If it is right, the recipient may have changed "
    "address or left: ask them by other means for the current one.",
    "2": "The recipient cannot receive mail at the moment. Let them know by other means, or try again later.",
    "size": "Send a smaller message, for example with large attachments shared as a link instead.",
    "3": "The problem is on the receiving side. Try again later; if it persists, tell the "
    "recipient by other means.",
    "4": "The recipient's mail system could not be reached. If this persists, tell the recipient by "
    "other means: their mail setup may be broken.",
    "5": "This is usually a fault of one of the mail systems, not of your message. If it happens "
    "again, send this report to your mail administrator.",
    "6": "Try sending the message in a simpler form, for example without unusual attachments.",
    "7": "The receiving system refused the message by its own rules (for example spam filtering or "
    "sender checks). Contact the recipient by other means, or ask your mail administrator to "
    "look at the reply quoted above.",
}


def _explain(status: str) -> str:
    _, subject, detail = status.split(".")
    return _DETAILS.get(f"{subject}.{detail}") or _SUBJECTS.get(subject, "the reason is not known")


def _advice_key(status: str) -> str:
    _, subject, detail = status.split(".")
    return "size" if f"{subject}.{detail}" in ("2.3", "3.4") else subject


def _recipient_text(r: RecipientStatus, ascii_only: bool) -> list[str]:
    address = _clean(r.final_recipient, ascii_only=ascii_only)
    head = f"<{address}>"
    if r.rcpt_to and r.rcpt_to != r.final_recipient:
        head += f" (you addressed <{_clean(r.rcpt_to, ascii_only=ascii_only)}>)"
    lines = _wrap(head, "  ")
    words = {
        Action.FAILED: f"Not delivered: {_explain(r.status)} (status {r.status}).",
        Action.DELAYED: f"Not delivered yet: {_explain(r.status)} (status {r.status}).",
        Action.DELIVERED: "Delivered.",
        Action.RELAYED: "Passed on to a mail system that does not send delivery reports; you may "
        "get no further news about this recipient.",
        Action.EXPANDED: "Delivered to a mailing list or alias, which passed the message on to its "
        "members; no further reports will follow for them.",
    }[r.action]
    lines.extend(_wrap(words, "    "))
    remote = _host(r.remote_mta) if r.remote_mta else None
    reply = [_clean(x, ascii_only=ascii_only) for x in _NEWLINES.split(r.reply)] if r.reply else []
    reply = [x for x in reply if x]
    if reply:
        who = f"The mail server {remote}" if remote else "The receiving mail server"
        what = f"our {_clean(r.stage, ascii_only=True)} command" if r.stage else "us"
        lines.extend(_wrap(f"{who} answered {what} with:", "    "))
        for line in reply:
            lines.extend(_wrap(line, "      ", "        "))
    elif r.reason:
        lines.extend(_wrap(f"Reason: {_clean(r.reason, ascii_only=ascii_only)}", "    "))
    if r.last_attempt is not None and r.action in (Action.FAILED, Action.DELAYED):
        lines.extend(_wrap(f"Last attempt: {_date(r.last_attempt)}", "    "))
    return lines


def _text_part(
    kind: DsnKind,
    recipients: Sequence[RecipientStatus],
    *,
    hostname: str,
    queue_id: str,
    sender: str,
    double_bounce: bool,
    returned: Returned,
    cut: bool,
    size_limit: int,
    ascii_only: bool,
) -> list[str]:
    lines = _wrap(f"This report was written automatically by the mail system at {hostname}.")
    lines.append("")
    several = len(recipients) > 1
    if double_bounce:
        intro = (
            "A message with an empty sender address could not be delivered. Such messages are "
            "themselves delivery reports or other automatic notices, and are never returned to "
            "their sender, since that could make mail go round in circles. This copy goes to you, "
            f"the postmaster of {hostname}, instead."
        )
    elif kind is DsnKind.FAILURE:
        intro = (
            f"Your message could not be delivered to {'the recipients' if several else 'the recipient'} "
            "below, and the mail system has given up: it will not try again. Sending the message "
            "again unchanged will most likely fail the same way."
        )
    elif kind is DsnKind.DELAY:
        until = [r.will_retry_until for r in recipients if r.will_retry_until is not None]
        when = f"until {_date(max(until))}" if until else "for a while"
        intro = (
            "This is only a warning: no action is required, and you do not need to send the "
            f"message again. Your message has not reached {'the recipients' if several else 'the recipient'} "
            "below yet, because of a temporary problem. The mail system will keep trying "
            f"{when}; if it still cannot deliver the message by then, you will get another report."
        )
    else:
        intro = (
            "You asked to be told when your message was delivered. This is what became of it "
            f"for {'the recipients' if several else 'the recipient'} below."
        )
    lines.extend(_wrap(intro))
    lines.append("")
    for r in recipients:
        lines.extend(_recipient_text(r, ascii_only))
        lines.append("")
    if kind is DsnKind.FAILURE and not double_bounce:
        keys = list(dict.fromkeys(_advice_key(r.status) for r in recipients))
        lines.append("What you can do:")
        items = [_ADVICE[key] for key in keys if key in _ADVICE]
        items.append(
            "If you need help, send this whole report to your mail administrator; the message's "
            f"queue ID at {hostname} is {queue_id}."
        )
        for item in items:
            lines.extend(_bullet(item))
        lines.append("")
    if double_bounce:
        lines.extend(_wrap(f"Queue ID: {queue_id}. Sender: <{sender}>."))
        lines.append("")
    if returned is Returned.FULL:
        lines.extend(_wrap("The message is attached below."))
    elif cut:
        lines.extend(
            _wrap(
                f"The message is larger than {size_limit} bytes, so only its header section is "
                "attached below."
            )
        )
    else:
        lines.extend(_wrap("The header section of the message is attached below."))
    return lines


# ---- the machine-readable part -------------------------------------------------------------------


def _address_field(addr_type: str, address: str, utf8_part: bool) -> str:
    """``type; address`` for Original-Recipient and Final-Recipient (RFC 3464 2.3.1-2), with
    the ``utf-8`` type for a non-ASCII address (RFC 6533 3)."""
    lowered = addr_type.lower()
    if lowered == "utf-8":
        address = decode_utf8_addr(address)
    if lowered in ("rfc822", "utf-8"):
        address = _clean(address, ascii_only=False)
        if address.isascii() and lowered == "rfc822":
            return f"rfc822; {address}"
        return f"utf-8; {encode_utf8_addr(address, unitext=utf8_part)}"
    return f"{_clean(addr_type, ascii_only=True)}; {_clean(address, ascii_only=True)}"


def _needs_utf8(addr_type: str, address: str) -> bool:
    if addr_type.lower() == "utf-8":
        address = decode_utf8_addr(address)
    return addr_type.lower() in ("rfc822", "utf-8") and not _clean(address, ascii_only=False).isascii()


def _status_part(
    envelope: EnvelopeFacts,
    recipients: Sequence[RecipientStatus],
    *,
    hostname: str,
    utf8_part: bool,
) -> list[str]:
    lines: list[str] = []
    if envelope.envid:  # RFC 3461 6.3 a, RFC 3464 2.2.1
        lines += _field("Original-Envelope-Id", _clean(envelope.envid, ascii_only=True))
    lines += _field("Reporting-MTA", f"dns; {hostname}")
    lines += _field("X-Postroom-Queue-ID", _clean(envelope.queue_id, ascii_only=True))
    lines += _field("X-Postroom-Sender", _address_field("rfc822", envelope.sender, utf8_part))
    lines += _field("Arrival-Date", _date(envelope.arrival))
    for r in recipients:
        lines.append("")
        if r.orcpt:
            lines += _field("Original-Recipient", _address_field(*_split_orcpt(r.orcpt), utf8_part))
        lines += _field("Final-Recipient", _address_field("rfc822", r.final_recipient, utf8_part))
        lines += _field("Action", r.action.value)
        lines += _field("Status", r.status)
        if r.remote_mta:
            lines += _field("Remote-MTA", f"dns; {_host(r.remote_mta)}")
        if r.reply:
            joined = " ".join(
                x for x in (_clean(line, ascii_only=not utf8_part) for line in _NEWLINES.split(r.reply)) if x
            )
            if joined:
                lines += _field("Diagnostic-Code", f"smtp; {joined}")  # RFC 3464 2.3.6
        elif r.reason:
            lines += _field("Diagnostic-Code", f"X-Postroom; {_clean(r.reason, ascii_only=not utf8_part)}")
        if r.last_attempt is not None:
            lines += _field("Last-Attempt-Date", _date(r.last_attempt))
        if r.will_retry_until is not None:
            lines += _field("Will-Retry-Until", _date(r.will_retry_until))
    return lines


# ---- the whole notice ----------------------------------------------------------------------------

_SUBJECT: Final = {
    DsnKind.FAILURE: "Undelivered Mail Returned to Sender",
    DsnKind.DELAY: "Delayed Mail (still being retried)",
    DsnKind.SUCCESS: "Successful Mail Delivery Report",
}
_DESCRIPTION: Final = {DsnKind.FAILURE: "Undelivered", DsnKind.DELAY: "Delayed", DsnKind.SUCCESS: "Delivered"}


def _boundary(rng: random.Random, queue_id: str, parts: Sequence[bytes]) -> str:
    """A boundary found in no part (RFC 2046 5.1.1), at most 70 characters."""
    tag = re.sub(r"[^A-Za-z0-9]", "", queue_id)[:20]
    while True:
        boundary = f"=_postroom_{tag}_{rng.getrandbits(96):024x}"
        needle = boundary.encode("ascii")
        if not any(needle in part for part in parts):
            return boundary


def build_dsn(
    envelope: EnvelopeFacts,
    recipients: Sequence[RecipientStatus],
    original: bytes | Readable,
    *,
    kind: DsnKind,
    hostname: str,
    now: float,
    postmaster: str | None = None,
    size_limit: int = BOUNCE_SIZE_LIMIT,
    rng: random.Random | None = None,
) -> Dsn:
    """The notice of ``kind`` about ``recipients`` of the message ``envelope`` describes.

    ``original`` is the message as queued (header section and body), bytes or a binary file
    positioned at its first octet. ``postmaster`` makes the notice a double bounce addressed
    there (the decision :attr:`Target.POSTMASTER`); without it the notice goes to the envelope
    sender, which must not be the null path. Raises ``ValueError`` when no recipient is given, a
    recipient's action does not belong to ``kind``, or a notice would go to the null path.
    """
    if not recipients:
        raise ValueError("a notice needs at least one recipient (RFC 3464 2: 1*per-recipient-fields)")
    for r in recipients:
        if r.action not in _ACTIONS[kind]:
            raise ValueError(f"action {r.action.value} does not belong in a {kind.value} notice")
    to = postmaster if postmaster is not None else envelope.sender
    if not to:
        raise ValueError("never send a notice to the null reverse path (RFC 5321 6.1, RFC 3461 6.1)")
    if size_limit < 0:
        raise ValueError("size_limit must not be negative")
    rng = rng or random.SystemRandom()
    host = _host(hostname) or "localhost"
    to = _clean(to, ascii_only=False)
    queue_id = _clean(envelope.queue_id, ascii_only=True)

    want_full = kind is DsnKind.FAILURE and (envelope.ret or "").upper() != "HDRS"
    content, returned, cut = _returned(original, size_limit, want_full)
    header_part = content if returned is Returned.HEADERS else content[: _header_end(content) or len(content)]
    global_content = not header_part.isascii()

    addresses = [("rfc822", envelope.sender)] + [("rfc822", r.final_recipient) for r in recipients]
    addresses += [_split_orcpt(r.orcpt) for r in recipients if r.orcpt]
    utf8_part = any(_needs_utf8(t, a) for t, a in addresses)
    ascii_only = not utf8_part

    text = _text_part(
        kind,
        recipients,
        hostname=host,
        queue_id=queue_id,
        sender=_clean(envelope.sender, ascii_only=ascii_only),
        double_bounce=postmaster is not None,
        returned=returned,
        cut=cut,
        size_limit=size_limit,
        ascii_only=ascii_only,
    )
    text_bytes = ("\r\n".join(text) + "\r\n").encode("utf-8")
    status = _status_part(envelope, recipients, hostname=host, utf8_part=utf8_part)
    status_bytes = ("\r\n".join(status) + "\r\n").encode("utf-8")

    text_ascii = text_bytes.isascii()
    text_head = [
        "Content-Description: Notification",
        f"Content-Type: text/plain; charset={'us-ascii' if text_ascii else 'utf-8'}",
        f"Content-Transfer-Encoding: {'7bit' if text_ascii else '8bit'}",
    ]
    status_head = (
        ["Content-Description: Delivery report", "Content-Type: message/global-delivery-status"]
        + (["Content-Transfer-Encoding: 8bit"] if not status_bytes.isascii() else [])
        if utf8_part
        else ["Content-Description: Delivery report", "Content-Type: message/delivery-status"]
    )
    if returned is Returned.FULL:
        ctype = "message/global" if global_content else "message/rfc822"  # RFC 6532 3.7
        described = f"{_DESCRIPTION[kind]} Message"
    else:
        ctype = "message/global-headers" if global_content else "text/rfc822-headers"  # RFC 6533 6.3
        described = f"{_DESCRIPTION[kind]} Message Headers"
    content_head = [f"Content-Description: {described}", f"Content-Type: {ctype}"]
    if not content.isascii():
        content_head.append("Content-Transfer-Encoding: 8bit")

    parts = [(text_head, text_bytes), (status_head, status_bytes), (content_head, content)]
    boundary = _boundary(rng, queue_id, [body for _, body in parts])
    stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%d%H%M%S")
    message_id = f"<{stamp}.{queue_id or 'dsn'}.{rng.getrandbits(64):016x}@{host}>"
    eight_bit = not all(body.isascii() for _, body in parts)

    subject = _SUBJECT[kind]
    if postmaster is not None:
        subject = "Postmaster Copy: Undelivered Mail"
    head = (
        _field("From", f"Mail Delivery System <MAILER-DAEMON@{host}>")
        + _field("To", f"<{to}>")
        + _field("Subject", subject)
        + _field("Date", _date(now))
        + _field("Message-ID", message_id)
        + _field("Auto-Submitted", "auto-replied")  # RFC 3834 5
        + _field("MIME-Version", "1.0")
        + [
            "Content-Type: multipart/report; report-type=delivery-status;",  # RFC 6522 3
            f'\tboundary="{boundary}"',
            f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
            "",
            "This is a MIME-encapsulated message.",
        ]
    )
    out = [("\r\n".join(head) + "\r\n").encode("utf-8")]
    for part_head, body in parts:
        out.append(f"\r\n--{boundary}\r\n".encode("ascii"))
        out.append(("\r\n".join(part_head) + "\r\n\r\n").encode("utf-8"))
        out.append(body)
    out.append(f"\r\n--{boundary}--\r\n".encode("ascii"))
    return Dsn(
        data=b"".join(out),
        recipient=to,
        message_id=message_id,
        returned=returned,
        eight_bit=eight_bit,
        smtputf8=not to.isascii(),
    )
