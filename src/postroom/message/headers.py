"""Headers postroom adds or reads: the trace header ``Received:`` (RFC 5321 4.4, RFC 5322 3.6.7)
and the few looks at the header section that policy needs (loop count, Message-ID).

Pure functions: the caller passes the time. Lines end in CRLF, the wire form the spool stores;
Maildir delivery converts them.
"""

from __future__ import annotations

import email.utils
import re
from dataclasses import dataclass

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


def received_header(info: TraceInfo) -> bytes:
    """``Received:`` as RFC 5321 4.4 lays it out, folded, ending in CRLF."""
    address = info.client_address
    literal = f"IPv6:{address}" if ":" in address else address
    lines = [
        f"Received: from {_clean(info.helo)} ({_clean(info.client_name)} [{literal}])",
    ]
    if info.tls:
        lines.append(f"\t{info.tls}")
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
