"""Reading SMTP replies (RFC 5321 4.2) and the EHLO keywords they carry (RFC 5321 4.1.1.1).

The client's half of the reply grammar the server core writes with
:meth:`postroom.smtp.codes.Reply.to_bytes`: :class:`ReplyParser` turns octets back into
:class:`~postroom.smtp.codes.Reply` values (multi-line replies, RFC 2034 enhanced codes taken off
each line), bounded by :data:`REPLY_LINE` and :data:`REPLY_LINES`; :func:`parse_ehlo` reads the
keywords of a 250 reply to EHLO into :class:`Extensions`. No I/O.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from postroom.errors import PostroomError
from postroom.smtp.codes import Reply

#: RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers send longer (and the
#: text is only read), so four times that is taken and anything longer is a protocol error.
REPLY_LINE: Final = 2048
#: Lines in one reply: EHLO lists run to a few dozen; more than this is a broken peer.
REPLY_LINES: Final = 200


class RemoteProtocolError(PostroomError):
    """The server broke the reply grammar (RFC 5321 4.2); the session cannot go on."""


# -- replies --------------------------------------------------------------------------------------
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]?)(.*)", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?: |$)")
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _text(raw: bytes) -> str:
    """Reply text for logs and bounces: UTF-8 (lenient), controls shown as ``?``."""
    text = raw.decode("utf-8", "replace")
    return _UNPRINTABLE.sub("?", text)


def _make_reply(code: int, texts: list[str]) -> Reply:
    """Take an RFC 2034 enhanced code off the lines that carry it (its class must match)."""
    enhanced = None
    match = _ENHANCED.match(texts[0])
    if match is not None and int(match.group(1)) == code // 100:
        enhanced = match.group(0).rstrip(" ")
        prefix = enhanced + " "
        texts = [t[len(prefix):] if t.startswith(prefix) else "" if t == enhanced else t
                 for t in texts]
    return Reply(code, enhanced, texts[0] if len(texts) == 1 else tuple(texts))


class ReplyParser:
    """Cuts replies out of the server's octets: ``feed``, then ``next_reply`` until None.

    Lines end with CRLF (a bare LF is taken). ``ddd-text`` continues a reply, ``ddd text`` or
    ``ddd`` ends it (RFC 5321 4.2.1); the last line's code is the reply's. Raises
    :class:`RemoteProtocolError` for a line that is not a reply line, a line over
    :data:`REPLY_LINE` octets or a reply over :data:`REPLY_LINES` lines; the parser is useless
    after that.
    """

    __slots__ = ("_buf", "_lines", "_replies")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._lines: list[str] = []
        self._replies: deque[Reply] = deque()

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start:end])
            start = end + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            self._line(line)
        del buf[:start]
        if len(buf) > REPLY_LINE:
            raise RemoteProtocolError(f"reply line longer than {REPLY_LINE} octets")

    def _line(self, line: bytes) -> None:
        if len(line) + 2 > REPLY_LINE:
            raise RemoteProtocolError(f"reply line longer than {REPLY_LINE} octets")
        match = _REPLY_LINE.fullmatch(line)
        if match is None or (match.group(2) == b"" and match.group(3)):
            raise RemoteProtocolError(f"malformed reply line: {_text(line[:80])!r}")
        self._lines.append(_text(match.group(3)))
        if len(self._lines) > REPLY_LINES:
            raise RemoteProtocolError(f"reply longer than {REPLY_LINES} lines")
        if match.group(2) != b"-":
            lines, self._lines = self._lines, []
            self._replies.append(_make_reply(int(match.group(1)), lines))

    def next_reply(self) -> Reply | None:
        return self._replies.popleft() if self._replies else None


# -- EHLO keywords --------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Extensions:
    """What the server's EHLO reply offers: keyword (upper case) -> its parameters (RFC 5321
    4.1.1.1: ``ehlo-line = ehlo-keyword *( SP ehlo-param )``). Empty after HELO."""

    keywords: Mapping[str, str] = field(default_factory=dict)

    def offers(self, keyword: str) -> bool:
        return keyword.upper() in self.keywords

    @property
    def size(self) -> int | None:
        """RFC 1870: the fixed limit, 0 for none stated; None when SIZE is not offered."""
        if "SIZE" not in self.keywords:
            return None
        value = self.keywords["SIZE"].strip()
        return int(value) if value.isascii() and value.isdigit() else 0

    @property
    def pipelining(self) -> bool:
        return "PIPELINING" in self.keywords

    @property
    def eightbitmime(self) -> bool:
        return "8BITMIME" in self.keywords

    @property
    def smtputf8(self) -> bool:
        return "SMTPUTF8" in self.keywords

    @property
    def chunking(self) -> bool:
        return "CHUNKING" in self.keywords

    @property
    def starttls(self) -> bool:
        return "STARTTLS" in self.keywords

    @property
    def dsn(self) -> bool:
        return "DSN" in self.keywords

    @property
    def auth(self) -> frozenset[str]:
        """SASL mechanisms, upper case (RFC 4954 3; also the old ``AUTH=`` form)."""
        return frozenset(self.keywords.get("AUTH", "").upper().split())


def parse_ehlo(reply: Reply) -> Extensions:
    """The keywords of a 250 reply to EHLO; the first line (the server's name) is skipped."""
    keywords: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword.startswith("AUTH="):  # pre-RFC 2554 servers: "AUTH=LOGIN PLAIN"
            params = f"{keyword[5:]} {params}".strip()
            keyword = "AUTH"
            params = f"{keywords.get('AUTH', '')} {params}".strip()
        if keyword:
            keywords[keyword] = params
    return Extensions(keywords)
