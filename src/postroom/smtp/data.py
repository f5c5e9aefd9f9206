"""Message content decoders: DATA (RFC 5321 4.1.1.4, 4.5.2) and BDAT chunks (RFC 3030 2).

This is where SMTP smuggling is stopped. The rules, after Postfix 3.9's
``smtpd_forbid_bare_newline = normalize``:

- Only ``<CRLF>.<CRLF>`` ends DATA: a line holding a single "." that follows a line ended by CRLF
  (or is the first line). A "." line after a line ended by a bare LF, or ``.<LF>``, or anything
  with a bare CR, never ends it.
- A line ended by a bare LF is taken as a line and stored with CRLF; with ``reject_bare_lf`` the
  message is refused (554 5.6.0) instead.
- A bare CR or a NUL anywhere refuses the message (554 5.6.0).
- A refused message is still read to its real end, so nothing inside it is taken as a command.
- Text lines longer than ``max_line_length`` refuse the message with 500 5.5.2 (RFC 5321 4.5.3.1.6
  sets the floor, :data:`TEXT_LINE`); a message over ``max_size`` with 552 5.3.4 (RFC 1870 6.1).
  Content stops flowing at the first problem; the first problem found is the one answered.
- DATA lines that start with "." lose that dot (RFC 5321 4.5.2). BDAT content has no dot handling.

Speed matters here, so content is handled in blocks of whole lines with ``bytes.find``, ``count``
and ``replace``, never byte by byte or line by line in Python. Line lengths are checked by
hopping ``rfind`` windows of ``max_line_length``, which costs a few calls per block.
"""

from __future__ import annotations

from typing import Final

from postroom.smtp.codes import BAD_CONTENT, BARE_LF, LINE_TOO_LONG, MESSAGE_TOO_BIG, Reply

TEXT_LINE: Final = 1000  # RFC 5321 4.5.3.1.6: a text line, CRLF included, may be this long
_END: Final = b"\r\n.\r\n"


def _long_line(block: bytes, carried: int, limit: int) -> int:
    """Octets in the unfinished last line of ``block``, or -1 if any line passes ``limit``.

    ``carried`` octets of the first line came before ``block``. A finished line may hold
    ``limit`` octets with its LF; an unfinished one is too long once it holds ``limit``.
    """
    first = block.find(b"\n")
    if first < 0:
        carried += len(block)
        return carried if carried < limit else -1
    if carried + first + 1 > limit:
        return -1
    pos = first + 1
    end = block.rfind(b"\n") + 1
    while end - pos > limit:
        newline = block.rfind(b"\n", pos, pos + limit)
        if newline < 0:
            return -1
        pos = newline + 1
    unfinished = len(block) - end
    return unfinished if unfinished < limit else -1


class _Content:
    """The checks DATA and BDAT share: line ends, NUL, line length and total size."""

    __slots__ = ("_limit", "_max_size", "_reject_bare_lf", "error", "size")

    def __init__(self, *, max_size: int, max_line_length: int, reject_bare_lf: bool) -> None:
        self._max_size = max_size if max_size > 0 else -1  # RFC 1870: 0 is "no fixed limit"
        self._limit = max_line_length + 2  # the text plus CRLF
        self._reject_bare_lf = reject_bare_lf
        self.size = 0  # octets of decoded content so far
        self.error: Reply | None = None  # the first reason to refuse the message

    def _fail(self, reply: Reply) -> bytes:
        if self.error is None:
            self.error = reply
        return b""

    def _clean(self, block: bytes) -> bytes:
        """``block`` with bare LFs made CRLF, or ``b""`` with ``error`` set."""
        crlf = block.count(b"\r\n")
        if block.count(b"\r") != crlf or b"\0" in block:
            return self._fail(BAD_CONTENT)
        if block.count(b"\n") != crlf:
            if self._reject_bare_lf:
                return self._fail(BARE_LF)
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return block

    def _count(self, block: bytes) -> bytes:
        self.size += len(block)
        if self.size > self._max_size >= 0:
            return self._fail(MESSAGE_TOO_BIG)
        return block


class DataDecoder(_Content):
    """Decodes DATA content up to ``<CRLF>.<CRLF>``.

    :meth:`feed` takes whatever arrived and returns ``(content, rest)``: the decoded content of
    the lines completed so far (dot-unstuffed, CRLF line ends), and ``None`` while the end is not
    seen, else the bytes after the end marker, which are commands again. Then ``error`` says
    whether to refuse the message and ``size`` how big it is.
    """

    __slots__ = ("_after_crlf", "_cut", "_tail")

    def __init__(self, *, max_size: int, max_line_length: int, reject_bare_lf: bool) -> None:
        super().__init__(
            max_size=max_size, max_line_length=max_line_length, reject_bare_lf=reject_bare_lf
        )
        self._tail = bytearray()  # the unfinished line; it starts a line unless ``_cut``
        self._after_crlf = True  # the line before ``_tail`` ended with CRLF (or there was none)
        self._cut = False  # ``_tail`` holds only the last octet of an overlong line

    @property
    def buffered(self) -> int:
        return len(self._tail)

    def feed(self, data: bytes) -> tuple[bytes, bytes | None]:
        tail = self._tail
        if b"\n" not in data:  # no line finishes: keep it, bounded
            tail += data
            self._bound_tail()
            return b"", None
        if tail:
            buf = bytes(tail) + data
            tail.clear()
        else:
            buf = data
        if not self._cut and self._after_crlf and buf.startswith(b".\r\n"):
            end = 0
        else:
            end = buf.find(_END)
            if end >= 0:
                end += 2  # the "." line starts after the CRLF
        if end >= 0:
            return (self._lines(buf[:end]) if end else b""), buf[end + 3 :]
        last = buf.rfind(b"\n") + 1
        content = self._lines(buf[:last])
        self._after_crlf = last >= 2 and buf[last - 2] == 0x0D
        self._cut = False
        if last < len(buf):
            tail += buf[last:]
            self._bound_tail()
        return content, None

    def _bound_tail(self) -> None:
        tail = self._tail
        if len(tail) > self._limit:  # one more than a line may hold: a stuffing dot
            self._fail(LINE_TOO_LONG)
            del tail[:-1]  # the last octet tells whether a CR waits for its LF
            self._cut = True

    def _lines(self, block: bytes) -> bytes:
        """Decode whole lines; ``block`` starts a line (unless after a cut) and ends with LF."""
        if self.error is not None:
            return b""
        block = self._clean(block)
        if not block:
            return block
        if block[0] == 0x2E:  # "." starting the first line
            block = block[1:]
        if b"\n." in block:
            block = block.replace(b"\n.", b"\n")
        # after unstuffing: RFC 5321 4.5.3.1.6 does not count the transparency dot
        if len(block) >= self._limit and _long_line(block, 0, self._limit) < 0:
            return self._fail(LINE_TOO_LONG)
        return self._count(block)


class ChunkDecoder(_Content):
    """Checks the content of the BDAT chunks of one message (RFC 3030): no dot handling.

    A CR at the end of a piece is held back until the next octet shows whether an LF follows,
    across chunks too. :meth:`expect` announces a chunk's size so an oversize message is refused
    before its octets arrive; :meth:`finish` closes the message after the LAST chunk.
    """

    __slots__ = ("_cr", "_line")

    def __init__(self, *, max_size: int, max_line_length: int, reject_bare_lf: bool) -> None:
        super().__init__(
            max_size=max_size, max_line_length=max_line_length, reject_bare_lf=reject_bare_lf
        )
        self._cr = False  # a CR was held back
        self._line = 0  # octets of the unfinished line so far

    def expect(self, count: int) -> None:
        if self.size + count > self._max_size >= 0:
            self._fail(MESSAGE_TOO_BIG)

    def decode(self, piece: bytes) -> bytes:
        if self.error is not None or not piece:
            return b""
        if self._cr:
            piece = b"\r" + piece
            self._cr = False
        if piece[-1] == 0x0D:
            piece = piece[:-1]
            self._cr = True
        piece = self._clean(piece)
        if not piece:
            return piece
        line = _long_line(piece, self._line, self._limit)
        if line < 0:
            return self._fail(LINE_TOO_LONG)
        self._line = line
        return self._count(piece)

    def finish(self) -> bytes:
        """After the LAST chunk: a held CR is bare; an unfinished last line gets its CRLF."""
        if self.error is not None:
            return b""
        if self._cr:
            return self._fail(BAD_CONTENT)
        if self._line:
            self._line = 0
            return self._count(b"\r\n")
        return b""


def encode_data(content: bytes) -> bytes:
    """The DATA form of stored *content* (CRLF line ends): dot-stuffed, ended by CRLF.CRLF.

    The sending side of RFC 5321 4.5.2, for the SMTP client: a line that starts with "." gets
    one more, a last line without CRLF gets one, and the terminator is appended. Stored content
    never holds a bare CR or LF (the decoders refuse or normalise them), so the only
    ``<CRLF>.<CRLF>`` the receiver can see is the one at the end.
    """
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    return stuffed + b".\r\n"
