"""The hand-off between processes: workers that take mail tell the queue manager what they
queued, through one pipe the supervisor made before forking.

Each queued message is one line, ``<queue id> <domain>\\n`` (the domain when all its waiting
recipients are in one remote domain, else ``-``), so the queue manager starts work on exactly that
message, as it does for its own intake, without reading the rest of the queue. A line is far
shorter than ``PIPE_BUF``, so every ``write(2)`` is atomic: lines from several workers never mix.

A full pipe (the queue manager is slow or restarting) never blocks a worker: its lines wait in
memory and go out when the pipe drains; past :data:`MAX_BACKLOG` they are dropped for one ``*``
line, which asks for a scan of the whole queue instead. The queue manager also scans when it
starts, so nothing a worker queued is ever left behind, only found later.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from postroom.ids import is_queue_id
from postroom.queue.envelope import Envelope

logger = logging.getLogger("postroom.queue")

#: Lines a worker keeps while the pipe is full before it asks for a scan instead.
MAX_BACKLOG = 10_000
_SCAN = b"*\n"
_READ = 64 * 1024


class QueueBell:
    """The two ends of the pipe; each process uses one side (after the fork)."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        os.set_blocking(self.read_end, False)
        os.set_blocking(self.write_end, False)
        self._backlog: collections.deque[bytes] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writing = False

    # ---- a worker -----------------------------------------------------------------------------

    def sender(self, only_domain: Callable[[Envelope], str | None]
               ) -> Callable[[Envelope, Path], None]:
        """The spool's ``on_queued`` for a worker: hand the message over."""
        self._loop = asyncio.get_running_loop()

        def queued(envelope: Envelope, path: Path) -> None:
            domain = only_domain(envelope) or "-"
            self._send(f"{envelope.queue_id} {domain}\n".encode())

        return queued

    def _send(self, line: bytes) -> None:
        if self._backlog:
            self._queue(line)
            return
        try:
            os.write(self.write_end, line)
        except BlockingIOError:
            self._queue(line)

    def _queue(self, line: bytes) -> None:
        if len(self._backlog) >= MAX_BACKLOG:
            self._backlog.clear()
            line = _SCAN  # one scan finds them all
        self._backlog.append(line)
        if not self._writing and self._loop is not None:
            self._writing = True
            self._loop.add_writer(self.write_end, self._drain)

    def _drain(self) -> None:
        while self._backlog:
            try:
                os.write(self.write_end, self._backlog[0])
            except BlockingIOError:
                return
            except OSError as exc:  # the queue manager's end is gone for good
                logger.error("cannot hand queued mail to the queue manager: %s", exc)
                self._backlog.clear()
                break
            self._backlog.popleft()
        assert self._loop is not None
        self._loop.remove_writer(self.write_end)
        self._writing = False

    # ---- the queue manager --------------------------------------------------------------------

    def listen(self, handed: Callable[[str, str | None], None], scan: Callable[[], None]) -> None:
        """Call ``handed(queue_id, domain)`` for each message a worker queued, ``scan()`` when
        a worker lost count."""
        loop = asyncio.get_running_loop()
        partial = bytearray()

        def readable() -> None:
            try:
                data = os.read(self.read_end, _READ)
            except BlockingIOError:
                return
            partial.extend(data)
            end = partial.rfind(b"\n")
            if end < 0:
                return
            lines = bytes(partial[:end]).split(b"\n")
            del partial[:end + 1]
            for line in lines:
                if line == _SCAN[:-1]:
                    scan()
                    continue
                queue_id, _, domain = line.decode("ascii", "replace").partition(" ")
                if not is_queue_id(queue_id):
                    logger.warning("queue hand-off: ignoring %r", line[:80])
                    continue
                handed(queue_id, None if domain in ("", "-") else domain)

        loop.add_reader(self.read_end, readable)

    def close_listener(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.read_end)
