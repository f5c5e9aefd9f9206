"""The attempt journal: an attempt is recorded durably before it is made, by an append.

The queue runner must record each attempt (``attempts`` + 1, the next retry time, "attempt under
way") before it connects or writes a Maildir copy, so that a crash during the attempt neither loses
count of it nor retries at once in a tight loop. The envelope is the first line of the queue file,
so recording it there means writing a whole new file (envelope, then the message copied), and on
a busy relay that file create was most of the committer's time: one extra inode per message and
attempt, for a record that is outdated seconds later.

So the record goes here instead: one line per attempt, appended to a segment file and fsynced
with the rest of the committer's round (one fsync per round, however many attempts began in it).
Each line is a whole envelope as it stands when the attempt begins, with a higher ``rev`` than
the queue file's. The attempt's outcome is saved the usual way (the queue file rewritten with a
still higher ``rev``, or removed once the message is done), which supersedes the record.

Layout, under ``data_dir/queue/journal/``::

    lock                   flock()ed for as long as a queue runner owns the journal
    <ns>-<pid>.log         segments; a line is ``<crc32 hex> <envelope json>\\n``

A segment is removed once it is no longer being written and every attempt recorded in it has its
outcome saved. After a crash, :func:`recover` (run by the next queue runner before its first
scan, or by an offline ``postroom queue`` command) applies each newest record whose queue file is
older, rewriting that file, then removes the segments. A torn last line (no newline, or a wrong
checksum) was never fsynced, so no attempt was begun on it: it is skipped.

Only the process that holds the lock recovers; a running server holds it, so a command run beside
it never rewrites what the server is writing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import threading
import time
import zlib
from pathlib import Path

from postroom.errors import StorageError
from postroom.queue.committer import DEFAULT_DISK, DirSync, Disk, storage_error, sync_dirs
from postroom.queue.envelope import Envelope

logger = logging.getLogger("postroom.queue")

#: A new segment is begun once the current one is this big.
SEGMENT_SIZE = 4 * 1024 * 1024
SUFFIX = ".log"
LOCK = "lock"


def journal_dir(queue_root: Path) -> Path:
    return queue_root / "journal"


def encode(line: str) -> bytes:
    data = line.encode()
    return b"%08x %s\n" % (zlib.crc32(data), data)


def decode(raw: bytes) -> Envelope | None:
    """The envelope of one journal line, or None for a torn or damaged one."""
    if not raw.endswith(b"\n") or len(raw) < 10 or raw[8:9] != b" ":
        return None
    data = raw[9:-1]
    try:
        if int(raw[:8], 16) != zlib.crc32(data):
            return None
        return Envelope.from_json(data)
    except (ValueError, KeyError, TypeError):
        return None


class Journal:
    """The writer's side: appends records in committer jobs, knows which segments are done.

    :meth:`append` runs on the committer thread (inside a job); :meth:`release` on the event
    loop. A lock guards the counts they share.
    """

    def __init__(self, queue_root: Path, disk: Disk = DEFAULT_DISK) -> None:
        self.directory = journal_dir(queue_root)
        self._queue_root = queue_root
        self._disk = disk
        self._lock_fd: int | None = None
        self._fd: int | None = None
        self._segment: str | None = None
        self._size = 0
        self._broken = False  # an fsync of the segment failed: its state is unknown
        self._live: dict[str, int] = {}  # segment -> records not yet superseded
        self._guard = threading.Lock()

    # ---- owning the journal -------------------------------------------------------------------

    def open(self) -> int | None:
        """Take the journal (flock), recover what a crash left, and get ready to append.
        Returns the number of queue files recovery rewrote, or None while another process
        holds the lock: one queue manager per queue (a second would deliver twice), and a
        killed one lets go of it only when its last descriptor closes. Try again then.
        Blocking: run it off the loop."""
        _ensure_dir(self.directory, self._disk)
        fd = os.open(self.directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._lock_fd = fd
        return _replay(self._queue_root, self._disk)

    def close(self) -> None:
        """Stop appending; remove the segments whose attempts are all settled; let the lock go."""
        with self._guard:
            if self._fd is not None:
                self._close_segment()
            for segment in [s for s, n in self._live.items() if n == 0]:
                self._remove(segment)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- writing ------------------------------------------------------------------------------

    def append(self, line: str, dirsync: DirSync) -> str:
        """Committer job: append one record; the round fsyncs it. Returns the segment it went
        to, for :meth:`release` once the attempt's outcome is saved."""
        record = encode(line)
        with self._guard:
            if self._fd is None or self._broken or self._size >= SEGMENT_SIZE:
                self._begin_segment(dirsync)
            assert self._fd is not None and self._segment is not None
            fd, segment = self._fd, self._segment
            self._live[segment] += 1
        try:
            self._disk.write(fd, record)
        except OSError as exc:
            self._broken = True
            self.release([segment])
            raise storage_error(exc, f"writing {self.directory / segment}") from exc
        self._size += len(record)
        dirsync.sync_later(self)
        return segment

    def sync(self) -> None:
        """Phase 2 of the round: make the appends durable (one fsync for all of them)."""
        fd = self._fd
        if fd is None:
            return
        try:
            self._disk.fsync(fd)
        except OSError:
            self._broken = True  # the next append starts a new segment
            raise

    def release(self, segments: list[str]) -> None:
        """The attempts recorded in *segments* have their outcomes saved."""
        with self._guard:
            for segment in segments:
                left = self._live.get(segment)
                if left is None:
                    continue
                self._live[segment] = left - 1
                if left == 1 and segment != self._segment:
                    self._remove(segment)

    def _begin_segment(self, dirsync: DirSync) -> None:
        if self._fd is not None:
            self._close_segment()
        _ensure_dir(self.directory, self._disk)
        name = f"{time.time_ns():020d}-{os.getpid()}{SUFFIX}"
        path = self.directory / name
        try:
            self._fd = self._disk.create(str(path))  # one writer: no O_APPEND needed
        except OSError as exc:
            raise storage_error(exc, f"creating {path}") from exc
        self._segment, self._size, self._broken = name, 0, False
        self._live[name] = 0
        dirsync.add(self.directory)  # the new name must last too

    def _close_segment(self) -> None:
        """Make what was appended durable (a later round may not fsync this segment), close it,
        and remove it if nothing in it is still awaited."""
        fd, segment = self._fd, self._segment
        self._fd = self._segment = None
        assert fd is not None and segment is not None
        try:
            self._disk.fsync(fd)
        except OSError as exc:
            logger.error("fsync of journal segment %s failed: %s", segment, exc)
        finally:
            self._disk.close(fd)
        if self._live.get(segment) == 0:
            self._remove(segment)

    def _remove(self, segment: str) -> None:
        """Not synced: a segment that comes back after a crash only holds superseded records."""
        self._live.pop(segment, None)
        try:
            os.unlink(self.directory / segment)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove journal segment %s: %s", segment, exc)


def recover(queue_root: Path, disk: Disk = DEFAULT_DISK, *, wait: float = 0.0) -> int:
    """For a process that does not run the queue (``postroom queue`` with the server stopped):
    apply what a crash left in the journal, if no running server owns it. Returns the number of
    queue files rewritten. *wait*: seconds to wait for the lock (a server just killed)."""
    directory = journal_dir(queue_root)
    if not _segments(directory):
        return 0
    try:
        fd = os.open(directory / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise storage_error(exc, f"opening {directory / LOCK}") from exc
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return 0  # a server runs and owns it
                time.sleep(0.02)
        return _replay(queue_root, disk)
    finally:
        os.close(fd)


def _segments(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(e.name for e in entries if e.name.endswith(SUFFIX))
    except FileNotFoundError:
        return []


def _replay(queue_root: Path, disk: Disk) -> int:
    """With the lock held: apply the newest record of each message to its queue file where the
    file is older, then remove every segment."""
    from postroom.queue import admin  # admin imports the spool, which the runner imports

    directory = journal_dir(queue_root)
    segments = _segments(directory)
    if not segments:
        return 0
    newest: dict[str, Envelope] = {}
    for segment in segments:
        try:
            with open(directory / segment, "rb") as fh:
                for raw in fh:
                    envelope = decode(raw)
                    if envelope is None:
                        continue
                    seen = newest.get(envelope.queue_id)
                    if seen is None or envelope.rev > seen.rev:
                        newest[envelope.queue_id] = envelope
        except OSError as exc:
            raise storage_error(exc, f"reading {directory / segment}") from exc
    rewritten = 0
    data_dir = queue_root.parent
    for queue_id, record in newest.items():
        def change(envelope: Envelope, record: Envelope = record) -> bool:
            if record.rev <= envelope.rev:
                return False
            hold = envelope.hold  # where the file is now says whether it is held
            for item in dataclasses.fields(Envelope):
                setattr(envelope, item.name, getattr(record, item.name))
            envelope.hold = hold
            return True

        for queue in (admin.ACTIVE, admin.HOLD):
            path = queue_root / queue / queue_id
            try:
                changed = admin.rewrite(data_dir, path, change, disk)
            except StorageError as exc:  # a damaged queue file: the scan quarantines it
                logger.error("cannot apply the journal's record to %s: %s", path, exc)
                break
            if changed is not None:
                rewritten += changed
                break
    for segment in segments:
        try:
            os.unlink(directory / segment)
        except FileNotFoundError:
            pass
    sync_dirs(disk, [str(directory)])
    if rewritten:
        logger.info("recovered %d attempt record(s) from %s", rewritten, directory)
    return rewritten


def _ensure_dir(directory: Path, disk: Disk) -> None:
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:
        return
    except OSError as exc:
        raise storage_error(exc, f"creating {directory}") from exc
    sync_dirs(disk, [str(directory.parent)])
