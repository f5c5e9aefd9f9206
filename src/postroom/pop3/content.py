"""A stored message as a POP3 multi-line response body, and UIDLs from store keys.

RFC 1939 3: a multi-line response is lines ending in CRLF; a line that starts with "." gets
another "." in front (byte-stuffing), and the response ends with ".", CRLF. Messages are stored
with LF line ends (:mod:`postroom.delivery.maildir`) or, from other programs, CRLF: every LF
becomes CRLF, a CRLF stays as it is, a bare CR is sent as it is. The octets sent, stuffing and
the terminator left out, then equal the message's CRLF size (Dovecot's ``W=``), which is what
LIST and STAT announce (RFC 1939 11: the size a client can expect to receive).

A message that does not end with a line end gets one before the terminator: it is part of the
terminator, not the message.

TOP (RFC 1939 7): the header, the empty line after it, then at most *n* body lines. A message
without an empty line is all header, sent whole.

The encoder keeps a few octets of state between chunks (a CR at the end of one chunk may be
followed by its LF in the next; a "." may start the next chunk's first line), so the transport
may feed chunks of any size.
"""

from __future__ import annotations

import hashlib
import re
from typing import Final

#: RFC 1939 7 UIDL: 1 to 70 characters in the range 0x21 to 0x7E.
UIDL_MAX: Final = 70
_UIDL = re.compile(r"[\x21-\x7e]{1,70}")
#: A line that starts with a dot, after the first (which has no LF before it).
_LINE_DOT = re.compile(rb"\n\.")


def valid_uidl(uidl: str) -> bool:
    return _UIDL.fullmatch(uidl) is not None


def uidl_for(key: str) -> str:
    """A message's UIDL from its store key (for Maildir the file's unique name), stable across
    index rebuilds since the key is. The key as it is when RFC 1939 allows it; else the part
    before the first "," (a Maildir name without Dovecot's ``,S=``/``,W=`` fields); else a
    SHA-256 digest of the key (40 hex digits), for long or non-ASCII names."""
    if valid_uidl(key):
        return key
    short = key.partition(",")[0]
    if valid_uidl(short):
        return short
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class ContentEncoder:
    """Stored message octets in, response body octets out (see the module docstring)."""

    __slots__ = ("_body_left", "_carry", "_done", "_in_body", "_line_start", "_prev_lf", "octets")

    def __init__(self, body_lines: int | None = None) -> None:
        self._body_left = body_lines  # TOP: body lines still to send; None: everything (RETR)
        self._in_body = False  # TOP: the empty line after the header was passed
        self._prev_lf = True  # TOP: the last octet seen was an LF (true at the start)
        self._carry = b""  # a CR held back: its LF may start the next chunk
        self._line_start = True  # the next octet sent starts a line
        self._done = False  # TOP reached its last line: the rest is not sent
        #: Octets of message sent, in CRLF form, without stuffing and terminator.
        self.octets = 0

    @property
    def done(self) -> bool:
        """No more input is wanted (TOP has sent its lines)."""
        return self._done

    def feed(self, chunk: bytes) -> bytes:
        """Encode the next piece of the stored message."""
        if self._done or not chunk:
            return b""
        data = self._carry + chunk if self._carry else chunk
        self._carry = b""
        # A one-octet test is a memchr; a two-octet one (b"\r\n" in data) walks the data octet
        # by octet in CPython, 20 times slower. Messages written by local delivery have no CR.
        if b"\r" in data:
            if data.endswith(b"\r"):
                self._carry = b"\r"
                data = data[:-1]
            data = data.replace(b"\r\n", b"\n")
        if self._body_left is not None:
            data = self._limit(data)
        return self._encode(data)

    def finish(self) -> bytes:
        """The end of the message: what is held back, a line end if missing, and ".", CRLF."""
        tail = b""
        if self._carry and not self._done:
            tail = self._encode(self._carry)
        self._carry = b""
        self._done = True
        if not self._line_start:
            tail += b"\r\n"
        return tail + b".\r\n"

    def _limit(self, data: bytes) -> bytes:
        """For TOP: cut *data* (LF line ends) after the header and the allowed body lines."""
        pos = 0
        if not data:
            return data
        if not self._in_body:
            if self._prev_lf and data.startswith(b"\n"):
                pos = 1
            else:
                found = data.find(b"\n\n")
                if found < 0:
                    self._prev_lf = data.endswith(b"\n")
                    return data
                pos = found + 2
            self._in_body = True
        left = self._body_left
        assert left is not None
        if left and data.count(b"\n", pos) < left:
            self._body_left = left - data.count(b"\n", pos)
            return data
        while left:
            pos = data.index(b"\n", pos) + 1
            left -= 1
        self._body_left = 0
        self._done = True
        self._carry = b""
        return data[:pos]

    def _encode(self, data: bytes) -> bytes:
        """*data* has LF line ends: CRLF them and stuff the lines that start with a dot."""
        if not data:
            return b""
        # The regular expression's search for LF is a tight loop, 2.5 times faster than
        # b"\n." in data; few messages have such a line, and only those pay for the replace.
        stuff = _LINE_DOT.search(data) is not None
        data = data.replace(b"\n", b"\r\n")  # the same object back when there is no LF
        self.octets += len(data)
        if stuff:
            data = data.replace(b"\n.", b"\n..")
        if self._line_start and data.startswith(b"."):
            data = b"." + data
        self._line_start = data.endswith(b"\n")
        return data
