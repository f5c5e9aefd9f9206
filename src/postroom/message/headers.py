"""Headers postroom adds or reads: the trace header ``Received:`` (RFC 5321 4.4, RFC 5322 3.6.7),
the ``Message-ID:`` and ``Date:`` a submission server adds when a client left them out (RFC 6409
8.2, 8.3), and the few looks at the header section that policy needs (loop count, Message-ID,
the ``From:`` addresses).

Pure functions: the caller passes the time. Lines end in CRLF, the wire form the spool stores;
Maildir delivery converts them.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass
from datetime import UTC, datetime

#: RFC 3848 / RFC 6531 "with" keywords, by (esmtp, tls, authenticated, utf8).
_PROTOCOLS = {
    (False, False, False, False): "SMTP",
    (True, False, False, False): "ESMTP",
    (True, True, False, False): "ESMTPS",
    (True, False, True, False): "ESMTPA",
    (True, True, True, False): "ESMTPSA",
    (True, False, False, True): "UTF8SMTP",
    (True, True, False, True): "UTF8SMTPS",
    (True, False, True, True): "UTF8SMTPA",
    (True, True, True, True): "UTF8SMTPSA",
}

#: A header value we write: printable, no CR/LF, so a hostile HELO cannot add header lines.
_UNSAFE = re.compile(r"[^\x21-\x7e\u00a0-\u2027\u202a-\U0010ffff]")  # no C1, no U+2028/9


def protocol_name(*, esmtp: bool, tls: bool = False, auth: bool = False, utf8: bool = False) -> str:
    if not esmtp:
        return "SMTP"
    return _PROTOCOLS[(True, tls, auth, utf8)]


def _clean(text: str, limit: int = 255) -> str:
    return _UNSAFE.sub("?", text)[:limit] or "unknown"


@dataclass(frozen=True, slots=True)
class TraceInfo:
    """What a Received header says about one hop."""

    helo: str
    client_address: str
    client_name: str  # reverse DNS name, or "unknown"
    hostname: str  # our name
    protocol: str  # from protocol_name()
    queue_id: str
    recipient: str | None  # the "for" clause: only when there is exactly one recipient
    timestamp: float
    tls: str | None = None  # e.g. "(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)"
    auth_user: str | None = None  # recorded only when the operator asks for it


def received_header(info: TraceInfo) -> bytes:
    """``Received:`` as RFC 5321 4.4 lays it out, folded, ending in CRLF."""
    address = info.client_address
    literal = f"IPv6:{address}" if ":" in address else address
    lines = [
        f"Received: from {_clean(info.helo)} ({_clean(info.client_name)} [{literal}])",
    ]
    if info.tls:
        lines.append(f"\t{info.tls}")
    if info.auth_user:
        lines.append(f"\t(Authenticated sender: {_clean(info.auth_user, 320)})")
    by = f"\tby {info.hostname} (postroom) with {info.protocol} id {info.queue_id}"
    date = email.utils.formatdate(info.timestamp, localtime=True)
    if info.recipient:
        lines.append(by)
        lines.append(f"\tfor <{_clean(info.recipient, 320)}>; {date}")
    else:
        lines.append(f"{by}; {date}")
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE
)


def count_received(header_section: bytes) -> int:
    """How many Received headers the message already carries (for loop detection)."""
    return len(_RECEIVED.findall(header_section))


def message_id(header_section: bytes) -> str | None:
    """The Message-ID header's value, unfolded, or None."""
    match = _MESSAGE_ID.search(header_section)
    if not match:
        return None
    value = re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip()
    return value.decode("utf-8", "replace") or None


def _field_pattern(name: str) -> re.Pattern[bytes]:
    return re.compile(rb"^" + re.escape(name.encode("ascii")) +
                      rb"[ \t]*:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)", re.IGNORECASE | re.MULTILINE)


_FROM = _field_pattern("from")
_DATE = _field_pattern("date")


def _values(pattern: re.Pattern[bytes], header_section: bytes) -> list[str]:
    """Every value of one field, unfolded, as text (RFC 6532 allows UTF-8 in headers)."""
    return [
        re.sub(rb"\r?\n[ \t]+", b" ", match.group(1)).strip().decode("utf-8", "replace")
        for match in pattern.finditer(header_section)
    ]


def from_addresses(header_section: bytes) -> list[str]:
    """The addresses of every ``From:`` field (RFC 5322 3.6.2: one or more mailboxes), without
    display names; an unparsable field gives ``""`` so a caller checking ownership refuses it."""
    found: list[str] = []
    for value in _values(_FROM, header_section):
        pairs = email.utils.getaddresses([value])
        addresses = [address for _, address in pairs]
        found.extend(addresses if addresses and all(addresses) else [""])
    return found


def submission_fixes(header_section: bytes, *, hostname: str, queue_id: str,
                     timestamp: float) -> bytes:
    """The header lines a submission server adds (RFC 6409 8.2 Date, 8.3 Message-ID) when the
    client sent none, ending in CRLF; ``b""`` when nothing is missing."""
    lines = []
    if not _DATE.search(header_section):
        lines.append(f"Date: {email.utils.formatdate(timestamp, localtime=True)}")
    if not _MESSAGE_ID.search(header_section):
        stamp = time_stamp(timestamp)
        lines.append(f"Message-ID: <{stamp}.{queue_id}@{hostname}>")
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def time_stamp(timestamp: float) -> str:
    """``YYYYmmddHHMMSS`` in UTC: the time part of the Message-IDs we make."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y%m%d%H%M%S")
