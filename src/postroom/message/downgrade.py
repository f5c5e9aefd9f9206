"""8BITMIME downgrade: 8-bit MIME content made 7-bit for a server without 8BITMIME (RFC 6152 3).

A client must not send octets above 127 to a server that does not offer 8BITMIME; it may
convert the message to 7-bit MIME, or fail it (5.6.3). Like Postfix's SMTP client, this module
converts at the header level and leaves the rest alone, octet for octet:

- a leaf part whose body holds 8-bit octets and is labelled ``7bit``, ``8bit`` or ``binary``
  (or not labelled: ``7bit`` is the default, RFC 2045 6.1) is quoted-printable encoded
  (RFC 2045 6.7) and its Content-Transfer-Encoding field says so; the top-level message (and
  an attached message) that had no MIME-Version field gets one, so readers decode it;
- ``multipart/*`` and ``message/rfc822`` are walked into (boundaries, RFC 2046 5.1.1; the
  attached message's own header and body) and their ``8bit``/``binary`` label, which may only
  name a domain (RFC 2045 6.4), becomes ``7bit``; so does the label of a leaf without 8-bit
  octets;
- ``message/global`` (RFC 6532 3.7) may be encoded, so it is a leaf here.

What cannot be converted raises :class:`DowngradeError`, and the caller fails the message with
5.6.3: 8-bit octets in a header field (unless the transaction uses SMTPUTF8, where they are
legal, RFC 6532), in a part already encoded (quoted-printable or base64 with raw 8-bit inside is
broken, not fixable), in a ``message/*`` type that must stay 7-bit (partial, external-body,
delivery-status ...), or between parts (preamble, epilogue); nesting deeper than
:data:`MAX_DEPTH`; a header section longer than :data:`MAX_HEADER`.

Messages can be large, so nothing holds the message: both passes read it as a stream of
chunks, and only the header section of each open MIME entity, one line (at most
:data:`LONG_LINE`; longer ones go in pieces with soft line breaks) and the part of a chunk
after its last line end are kept. Two passes, because a header field precedes the body that
decides it: :func:`plan` reads the message once, finds what must be encoded (or why nothing can
be) and the exact size of the result (for SIZE=, RFC 1870); :class:`Downgrader` then converts a
second reading of the same octets, chunk by chunk, as they are sent.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

#: MIME entities open at once, at most (Postfix's mime_nesting_limit).
MAX_DEPTH: Final = 100
#: Octets in one entity's header section, at most: the header is held until it is complete.
MAX_HEADER: Final = 1024 * 1024
#: A body line longer than this is handled in pieces (joined by soft line breaks when encoded).
LONG_LINE: Final = 64 * 1024

_FIELD: Final = re.compile(rb"[!-9;-~]+[ \t]*:")  # a header field's name (RFC 5322 2.2), then ":"
_TOKEN: Final = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"  # RFC 2045 5.1 token
_TYPE: Final = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})")
#: ``; name = value``: a quoted string, or (leniently, as mail readers do) anything up to ``;``
_PARAM: Final = re.compile(rf';\s*({_TOKEN})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s"]+))', re.S)
_DOMAINS: Final = frozenset({None, "7bit", "8bit", "binary"})  # identity encodings (RFC 2045 6.2)
QP: Final = b"quoted-printable"


class DowngradeError(ValueError):
    """The message cannot be made 7-bit; ``reason`` says why, for the bounce."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Plan:
    """What :func:`plan` found: the entities (numbered in the order their header sections
    begin) whose bodies are encoded, and the size of the converted message."""

    encode: frozenset[int]
    size: int
    utf8_headers: bool = False  # 8-bit header fields were allowed (the transaction uses SMTPUTF8)
    dkim_signed: bool = False  # the message has a DKIM-Signature field: conversion breaks it


def has_8bit(chunks: Iterable[bytes]) -> bool:
    """Any octet above 127? (Stops at the first.)"""
    return any(not chunk.isascii() for chunk in chunks)


def plan(chunks: Iterable[bytes], *, utf8_headers: bool = False) -> Plan:
    """Read the message once: what to encode and the size after it, or :class:`DowngradeError`."""
    scanner = _Scanner(utf8_headers)
    for chunk in chunks:
        scanner._feed(chunk)
    scanner._finish()
    return Plan(frozenset(scanner.encoded), scanner.size, utf8_headers, scanner.dkim)


def downgrade(chunks: Iterable[bytes], the_plan: Plan) -> Iterator[bytes]:
    """The converted message, a piece for each chunk read (empty pieces left out)."""
    converter = Downgrader(the_plan)
    for chunk in chunks:
        out = converter.feed(chunk)
        if out:
            yield out
    out = converter.finish()
    if out:
        yield out


# -- quoted-printable ------------------------------------------------------------------------------
def _qp(data: bytes, complete: bool) -> bytes:
    """``data`` (whole lines, or with ``complete`` False a piece of one line) quoted-printable
    encoded: CRLF stays a hard line break, output lines end at 76 octets (RFC 2045 6.7)."""
    if b"\n" in data and data.count(b"\n") != data.count(b"\r\n"):
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    open_end = not data.endswith(b"\n")
    if open_end:  # b2a_qp takes its line break from the first line end: give it CRLF
        data += b"\r\n"
    if data.count(b"\r") == data.count(b"\r\n"):
        out = binascii.b2a_qp(data, istext=True)
    else:  # a bare CR, which b2a_qp would pass through raw
        out = b"".join(_qp_line(line) for line in data.split(b"\r\n")[:-1])
    if open_end:
        out = out[:-2]
        if not complete:
            out += b"=\r\n"  # the line goes on in the next piece
    return out


def _qp_line(line: bytes) -> bytes:
    """One line (without its CRLF) encoded, then CRLF; every octet but printable ASCII (and
    blanks before the end) as ``=XX``."""
    out = bytearray()
    column = 0
    last = len(line) - 1
    for i, octet in enumerate(line):
        if (33 <= octet <= 126 and octet != 61) or (octet in (9, 32) and i != last):
            token = bytes((octet,))
        else:
            token = b"=%02X" % octet
        if column + len(token) > 75:
            out += b"=\r\n"
            column = 0
        out += token
        column += len(token)
    return bytes(out) + b"\r\n"


# -- header fields -------------------------------------------------------------------------------
def _name(field: list[bytes]) -> bytes:
    return field[0].split(b":", 1)[0].strip().lower()


def _value(field: list[bytes]) -> str:
    raw = b"".join(field).split(b":", 1)[1]
    return raw.replace(b"\r", b"").replace(b"\n", b"").decode("latin-1")


def _uncomment(text: str) -> str:
    """RFC 822 comments removed (outside quoted strings), as in ``text/plain (note)``."""
    if "(" not in text:
        return text
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
            if depth == 0:
                out.append(char)
            continue
        if char == "\\":
            escaped = True
            if depth == 0:
                out.append(char)
        elif quoted:
            out.append(char)
            quoted = char != '"'
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(char)
            quoted = char == '"'
    return "".join(out)


def content_type(value: str) -> tuple[str, dict[str, str]] | None:
    """``type/subtype`` in lower case and the parameters (names in lower case, first of each
    name wins); None when the value does not parse (RFC 2045 5.2: then text/plain)."""
    value = _uncomment(value)
    match = _TYPE.match(value)
    if match is None:
        return None
    params: dict[str, str] = {}
    for param in _PARAM.finditer(value, match.end()):
        text = re.sub(r"\\(.)", r"\1", param[2]) if param[2] is not None else param[3]
        params.setdefault(param[1].lower(), text)
    return f"{match[1]}/{match[2]}".lower(), params


def _encoding(value: str) -> str | None:
    words = _uncomment(value).split()
    return words[0].lower() if words else None


def _rewrite(fields: list[list[bytes]], end: bytes, cte: bytes | None, version: bool) -> bytes:
    """The header section with its Content-Transfer-Encoding set to ``cte`` (the first such
    field replaced in place, others dropped, or one added at the end) and, with ``version``, a
    MIME-Version field added; unchanged when there is nothing to do."""
    if cte is None and not version:
        return b"".join(line for field in fields for line in field) + end
    out: list[bytes] = []
    wanted = b"Content-Transfer-Encoding: " + cte + b"\r\n" if cte is not None else None
    for field in fields:
        if cte is not None and _name(field) == b"content-transfer-encoding":
            if wanted is not None:
                out.append(wanted)
                wanted = None
            continue
        out.extend(field)
    if out and not out[-1].endswith(b"\n"):  # a last field cut short by the end of the message
        out[-1] += b"\r\n"
    if wanted is not None:
        out.append(wanted)
    if version:
        out.append(b"MIME-Version: 1.0\r\n")
    return b"".join(out) + end


# -- the walk ------------------------------------------------------------------------------------
class _Kind(Enum):
    LEAF = auto()  # content: encoded when it holds 8-bit octets and its label allows it
    OPAQUE = auto()  # content that must already be 7-bit (encoded, or a message/* that cannot be)
    MULTIPART = auto()  # parts between boundaries
    MESSAGE = auto()  # message/rfc822: another message (header section and body) inside


class _Part(Enum):
    PREAMBLE = auto()
    PARTS = auto()
    EPILOGUE = auto()


class _Entity:
    __slots__ = ("boundary", "cte", "digest", "encode", "has8", "head_encoded", "head_plain",
                 "kind", "message_top", "number", "qp", "raw", "state", "version")

    def __init__(self, number: int, kind: _Kind, cte: str | None, *, boundary: bytes = b"",
                 digest: bool = False, message_top: bool = False, version: bool = False) -> None:
        self.number = number
        self.kind = kind
        self.cte = cte
        self.boundary = boundary
        self.digest = digest
        self.message_top = message_top  # the top of a message: MIME-Version belongs here
        self.version = version  # it has a MIME-Version field
        self.state = _Part.PREAMBLE
        self.encode = False
        self.has8 = False  # the body held 8-bit octets
        self.raw = self.qp = 0  # body octets as they are, and quoted-printable encoded
        self.head_plain = self.head_encoded = 0  # header section octets either way

    @property
    def encodable(self) -> bool:
        return self.kind is _Kind.LEAF and self.cte in _DOMAINS

    def label(self, encode: bool) -> bytes | None:
        """The Content-Transfer-Encoding to write, or None to leave the field alone."""
        if encode:
            return QP
        return b"7bit" if self.cte in ("8bit", "binary") else None

    def add_version(self, encode: bool) -> bool:
        return encode and self.message_top and not self.version


class _Walker:
    """Splits the message into header lines, boundary lines and body blocks for the hooks."""

    def __init__(self, utf8_headers: bool) -> None:
        self._utf8 = utf8_headers
        self._stack: list[_Entity] = []
        self._fields: list[list[bytes]] | None = []  # collecting a header section
        self._head_size = 0
        self._default = "text/plain"
        self._message_top = True  # the header section being collected starts a message
        self._number = 0
        self._multiparts = 0  # multipart entities open: boundaries to look for
        self._tail = b""  # after the last line end
        self._mid = False  # a long line's first pieces went out; the rest is still to come

    # hooks
    def _header_done(self, entity: _Entity, fields: list[list[bytes]], end: bytes,
                     dkim: bool) -> None:
        raise NotImplementedError

    def _body(self, entity: _Entity, data: bytes, complete: bool) -> None:
        raise NotImplementedError

    def _raw(self, data: bytes) -> None:
        raise NotImplementedError

    def _entity_end(self, entity: _Entity) -> None:
        raise NotImplementedError

    # input
    def _feed(self, chunk: bytes) -> None:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n") + 1
        if end:
            self._lines(data, end)
        rest = data[end:]
        if self._fields is not None:
            if len(rest) + self._head_size > MAX_HEADER:
                raise DowngradeError("a header section is too long to convert")
        elif len(rest) > LONG_LINE:
            keep = 1 if rest.endswith(b"\r") else 0  # its LF may come next
            self._content(rest[: len(rest) - keep], complete=False)
            self._mid = True
            rest = rest[len(rest) - keep :]
        self._tail = rest

    def _finish(self) -> None:
        tail, self._tail = self._tail, b""
        if tail:
            self._line(tail)
        if self._fields is not None:
            self._open(b"")
        while self._stack:
            self._close()

    # lines
    def _lines(self, data: bytes, end: int) -> None:
        pos = 0
        while pos < end:
            top = self._stack[-1] if self._stack else None
            if (top is not None and self._fields is None and not self._mid
                    and top.kind in (_Kind.LEAF, _Kind.OPAQUE)):
                stop = self._candidate(data, pos, end)
                if stop > pos:  # whole lines, none of which can be a boundary
                    self._content(data[pos:stop], complete=True)
                    pos = stop
                    continue
            nl = data.index(b"\n", pos) + 1
            self._line(data[pos:nl])
            pos = nl

    def _candidate(self, data: bytes, pos: int, end: int) -> int:
        """Where the next line that may be a boundary (``--...``) starts, else ``end``."""
        if not self._multiparts:
            return end
        if data.startswith(b"--", pos):
            return pos
        found = data.find(b"\n--", pos, end)
        return found + 1 if found >= 0 else end

    def _line(self, line: bytes) -> None:
        if self._mid:  # the rest of a long line
            self._mid = False
            self._content(line, complete=True)
            return
        if line.startswith(b"--") and self._multiparts and self._boundary(line):
            return
        if self._fields is not None:
            if line in (b"\r\n", b"\n"):
                self._open(line)
            elif (line[:1] in (b" ", b"\t") and self._fields) or _FIELD.match(line):
                self._header_line(line)
            else:  # no empty line: the body starts with this one (or, in a message/rfc822,
                self._open(b"")  # the attached message's header section does)
                self._line(line)
            return
        self._content(line, complete=True)

    def _content(self, data: bytes, *, complete: bool) -> None:
        top = self._stack[-1]
        if top.kind is _Kind.MULTIPART:
            self._structure(data)
            return
        if not top.encodable and not data.isascii():
            raise DowngradeError(self._why(top))
        self._body(top, data, complete)

    @staticmethod
    def _why(entity: _Entity) -> str:
        if entity.kind is _Kind.LEAF:
            return f"8-bit octets in a part encoded as {entity.cte}"
        return "8-bit octets in a MIME part that must be 7-bit"

    def _structure(self, data: bytes) -> None:
        if not data.isascii():
            raise DowngradeError("8-bit octets outside the MIME parts (preamble or epilogue)")
        self._raw(data)

    def _header_line(self, line: bytes) -> None:
        assert self._fields is not None
        self._head_size += len(line)
        if self._head_size > MAX_HEADER:
            raise DowngradeError("a header section is too long to convert")
        if not self._utf8 and not line.isascii():
            raise DowngradeError("8-bit octets in a header field")
        if line[:1] in (b" ", b"\t") and self._fields:
            self._fields[-1].append(line)
        else:
            self._fields.append([line])

    def _boundary(self, line: bytes) -> bool:
        """A delimiter of an open multipart (the innermost that matches): entities inside it
        end, and after ``--boundary`` a part's header section begins (RFC 2046 5.1.1)."""
        text = line.rstrip(b"\r\n")
        for index in range(len(self._stack) - 1, -1, -1):
            entity = self._stack[index]
            if entity.kind is not _Kind.MULTIPART or entity.state is _Part.EPILOGUE:
                continue
            delimiter = b"--" + entity.boundary
            if not text.startswith(delimiter):
                continue
            rest = text[len(delimiter):]
            close = rest.startswith(b"--")
            if (rest[2:] if close else rest).strip(b" \t"):
                continue  # a longer boundary that merely starts the same
            if self._fields is not None:
                self._open(b"")  # a part whose header section the delimiter cut short
            while len(self._stack) > index + 1:
                self._close()
            self._raw(line)
            if close:
                entity.state = _Part.EPILOGUE
            else:
                entity.state = _Part.PARTS
                self._collect("message/rfc822" if entity.digest else "text/plain", False)
            return True
        return False

    # entities
    def _collect(self, default: str, message_top: bool) -> None:
        self._fields = []
        self._head_size = 0
        self._default = default
        self._message_top = message_top

    def _open(self, end: bytes) -> None:
        """The header section is complete: what the entity is decides how its body is read."""
        fields = self._fields
        assert fields is not None
        self._fields = None
        if len(self._stack) >= MAX_DEPTH:
            raise DowngradeError(f"MIME parts nested deeper than {MAX_DEPTH}")
        ctype_value = cte_value = None
        version = dkim = False
        for field in fields:
            name = _name(field)
            if name == b"content-type" and ctype_value is None:
                ctype_value = _value(field)
            elif name == b"content-transfer-encoding" and cte_value is None:
                cte_value = _value(field)
            elif name == b"mime-version":
                version = True
            elif name == b"dkim-signature":
                dkim = True
        parsed = content_type(ctype_value) if ctype_value is not None else None
        ctype, params = parsed if parsed is not None else (self._default, {})
        cte = _encoding(cte_value) if cte_value is not None else None
        major = ctype.split("/", 1)[0]
        boundary = params.get("boundary", "")
        if major == "multipart" and boundary and cte in _DOMAINS:
            kind = _Kind.MULTIPART
        elif ctype in ("message/rfc822", "message/news") and cte in _DOMAINS:
            kind = _Kind.MESSAGE
        elif major in ("multipart", "message") and not ctype.startswith("message/global"):
            kind = _Kind.OPAQUE
        else:
            kind = _Kind.LEAF
        entity = _Entity(self._number, kind, cte, boundary=boundary.encode("latin-1"),
                         digest=ctype == "multipart/digest", message_top=self._message_top,
                         version=version)
        self._number += 1
        self._header_done(entity, fields, end, dkim)
        self._stack.append(entity)
        if kind is _Kind.MULTIPART:
            self._multiparts += 1
        elif kind is _Kind.MESSAGE:
            self._collect("text/plain", True)

    def _close(self) -> None:
        entity = self._stack.pop()
        if entity.kind is _Kind.MULTIPART:
            self._multiparts -= 1
        self._entity_end(entity)


class _Scanner(_Walker):
    """The first pass: sizes both ways, 8-bit found per part, errors."""

    def __init__(self, utf8_headers: bool) -> None:
        super().__init__(utf8_headers)
        self.size = 0
        self.encoded: set[int] = set()
        self.dkim = False

    def _header_done(self, entity: _Entity, fields: list[list[bytes]], end: bytes,
                     dkim: bool) -> None:
        if entity.number == 0:
            self.dkim = dkim
        if entity.encodable:
            entity.head_plain = len(_rewrite(fields, end, entity.label(False),
                                             entity.add_version(False)))
            entity.head_encoded = len(_rewrite(fields, end, entity.label(True),
                                               entity.add_version(True)))
        else:
            self.size += len(_rewrite(fields, end, entity.label(False), False))

    def _body(self, entity: _Entity, data: bytes, complete: bool) -> None:
        if not entity.encodable:
            self.size += len(data)
            return
        if not entity.has8 and not data.isascii():
            entity.has8 = True
        entity.raw += len(data)
        entity.qp += len(_qp(data, complete))

    def _raw(self, data: bytes) -> None:
        self.size += len(data)

    def _entity_end(self, entity: _Entity) -> None:
        if not entity.encodable:
            return
        if entity.has8:
            self.encoded.add(entity.number)
            self.size += entity.head_encoded + entity.qp
        else:
            self.size += entity.head_plain + entity.raw


class Downgrader(_Walker):
    """The second pass: ``feed(chunk)`` returns the converted octets so far, ``finish()`` the
    rest. Use it on the same octets :func:`plan` read."""

    def __init__(self, the_plan: Plan) -> None:
        super().__init__(the_plan.utf8_headers)
        self._plan = the_plan
        self._out: list[bytes] = []

    def feed(self, chunk: bytes) -> bytes:
        self._feed(chunk)
        return self._take()

    def finish(self) -> bytes:
        self._finish()
        return self._take()

    def _take(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def _header_done(self, entity: _Entity, fields: list[list[bytes]], end: bytes,
                     dkim: bool) -> None:
        entity.encode = entity.encodable and entity.number in self._plan.encode
        self._out.append(_rewrite(fields, end, entity.label(entity.encode),
                                  entity.add_version(entity.encode)))

    def _body(self, entity: _Entity, data: bytes, complete: bool) -> None:
        self._out.append(_qp(data, complete) if entity.encode else data)

    def _raw(self, data: bytes) -> None:
        self._out.append(data)

    def _entity_end(self, entity: _Entity) -> None:
        pass
