"""One transaction's message content while it arrives: memory first, a file past a threshold.

Memory per connection stays bounded whatever the message size: past :data:`MEMORY_LIMIT` the
content goes to a file in the spool's ``incoming/`` directory (plain writes: the page cache does
the rest; nothing in ``incoming/`` is ever relied upon). The header section is kept apart (up to
:data:`HEADER_LIMIT`) for the loop and Message-ID checks.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from postroom.errors import StorageError
from postroom.queue.committer import storage_error

logger = logging.getLogger("postroom.queue")

#: Message data kept in memory per transaction before it goes to a file in incoming/.
MEMORY_LIMIT = 256 * 1024
#: How much of the header section :meth:`IncomingMessage.header_section` keeps.
HEADER_LIMIT = 64 * 1024
#: Write buffer of a spilled message (the page cache does the rest).
SPILL_BUFFER = 64 * 1024
#: Read size when copying a message from a file.
READ_SIZE = 1024 * 1024


class IncomingMessage:
    """One transaction's message data: in memory up to a threshold, then in a file.

    :meth:`write` runs on the event loop for every chunk the SMTP core hands over (decoded content:
    CRLF line ends, dot-unstuffed), so it is cheap: a list append, or a buffered write to the page
    cache once spilled. A write error while spilling is kept (see :attr:`error`) and the rest of
    the data dropped, so the session can drain DATA and then answer 451/452.
    """

    def __init__(
        self,
        incoming_dir: Path,
        *,
        memory_limit: int = MEMORY_LIMIT,
        header_limit: int = HEADER_LIMIT,
    ) -> None:
        self._dir = incoming_dir
        self._memory_limit = memory_limit
        self._header_limit = header_limit
        self._parts: list[bytes] = []
        self._buffered = 0
        self._size = 0
        self._header = bytearray()
        self._header_end: int | None = None
        #: The header section is longer than the limit: header_section() is only its start.
        self.header_cut = False
        self._file: BinaryIO | None = None
        self.spill_path: Path | None = None
        self.error: StorageError | None = None
        self._discarded = False

    @property
    def size(self) -> int:
        """Octets received (CRLF form, without our headers)."""
        return self._size

    def write(self, data: bytes) -> None:
        if not data or self._discarded:
            return
        self._size += len(data)
        if self._header_end is None:
            self._track_header(data)
        if self.error is not None:
            return
        if self._file is not None:
            self._write_file(data)
            return
        self._parts.append(data)
        self._buffered += len(data)
        if self._buffered > self._memory_limit:
            self._spill()

    def _track_header(self, data: bytes) -> None:
        start = max(0, len(self._header) - 3)
        self._header += data[: self._header_limit - len(self._header)]
        if self._header.startswith(b"\r\n"):
            self._header_end = 0  # no header fields at all
            return
        end = self._header.find(b"\r\n\r\n", start)
        if end >= 0:
            self._header_end = end + 2
        elif len(self._header) >= self._header_limit:
            self._header_end = len(self._header)
            self.header_cut = True
        if self._header_end is not None:
            del self._header[self._header_end :]

    def header_section(self) -> bytes:
        """The header fields up to the empty line (at most the first ``header_limit`` octets)."""
        end = self._header_end if self._header_end is not None else len(self._header)
        return bytes(self._header[:end])

    def _spill(self) -> None:
        try:
            fd, name = tempfile.mkstemp(prefix="spill-", dir=self._dir)
            self.spill_path = Path(name)
            self._file = open(fd, "wb", buffering=SPILL_BUFFER)  # noqa: SIM115 kept open
        except OSError as exc:
            self._fail(exc)
            return
        parts, self._parts, self._buffered = self._parts, [], 0
        for part in parts:
            self._write_file(part)

    def _write_file(self, data: bytes) -> None:
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = storage_error(exc, f"spooling message data in {self._dir}")
        self._parts, self._buffered = [], 0
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError as exc:
                if self.error is None:
                    self.error = storage_error(exc, f"spooling message data in {self._dir}")

    def seal(self) -> None:
        """The data is complete: flush it. Raises the :class:`StorageError` of a failed spill."""
        if self._file is not None:
            try:
                self._file.flush()
            except OSError as exc:
                self._fail(exc)
        elif len(self._parts) > 1:
            self._parts = [b"".join(self._parts)]
        if self.error is not None:
            raise self.error

    def chunks(self) -> Iterator[bytes]:
        """The data, in order (call :meth:`seal` first). Safe to run in another thread."""
        if self.spill_path is None:
            yield from self._parts
            return
        with open(self.spill_path, "rb") as fh:
            while block := fh.read(READ_SIZE):
                yield block

    def discard(self) -> None:
        """Drop the data and remove the spill file. Idempotent."""
        self._discarded = True
        self._parts, self._buffered = [], 0
        self._close_file()
        if self.spill_path is not None:
            try:
                os.unlink(self.spill_path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot remove %s: %s", self.spill_path, exc)
            self.spill_path = None
