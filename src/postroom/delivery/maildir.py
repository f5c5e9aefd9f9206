"""Maildir delivery, as cr.yp.to/proto/maildir.html describes it, with Dovecot's file name fields.

A message is created in ``tmp/`` under a name no other delivery can pick and written; the
caller's group commit then fsyncs it, renames it into ``new/`` and fsyncs ``new/`` (see
:mod:`postroom.queue.committer`). A reader never sees a partial message. Only ``new/`` is synced:
the rename out of ``tmp/`` is one atomic directory operation, so after a crash ``tmp/`` can at most
hold a leftover, which Maildir readers ignore.

Names look like ``1732900000.M123456P4321Q17.host,S=4096,W=4180``: seconds, then microseconds (M),
process id (P) and this process's delivery counter (Q) from the Maildir spec; the host name with
``/``, ``:`` and ``,`` written as ``\\057``, ``\\072`` and ``\\054`` (the spec escapes the first
two; the comma would end the name's host part for Dovecot); ``S=`` the size of the file and ``W=``
its size with CRLF line ends, which Dovecot takes instead of reading the file.

Content is stored with LF line ends, the Unix convention that mutt, Dovecot and Python's
``mailbox.Maildir`` read: :func:`write_message` takes SMTP-form (CRLF) chunks and converts them.

:class:`MaildirUsage` answers "how many octets does this mailbox hold" for quotas, from the
Maildir++ ``maildirsize`` file that every process (and Dovecot, Courier, Exim) keeps up to date;
see :mod:`postroom.store.quota`.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from postroom.errors import StorageError
from postroom.queue.committer import DEFAULT_DISK, DirSync, Disk, DurableFile, storage_error

MAILDIR_SUBDIRS = ("tmp", "new", "cur")

_counter = itertools.count(1)
_pid = os.getpid()  # getpid() is a system call; one fewer per delivery


def _forked() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_forked)
_SIZE_FIELD = re.compile(r",S=(\d+)")


def _escaped_hostname(name: str) -> str:
    return name.replace("/", "\\057").replace(":", "\\072").replace(",", "\\054")


_HOSTNAME = _escaped_hostname(socket.gethostname() or "localhost")


def ensure_maildir(root: Path, dirsync: DirSync | None = None) -> None:
    """Create ``root`` and its ``tmp``, ``new`` and ``cur`` (mode 0700) where missing.

    Each directory that gained an entry is registered with *dirsync* so that the new
    directories themselves survive a crash; without a *dirsync* they are fsynced at once.
    """
    changed: list[Path] = []
    missing: list[Path] = []
    probe = root
    while not probe.is_dir():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    try:
        for path in reversed(missing):
            path.mkdir(mode=0o700, exist_ok=True)
            changed.append(path.parent)
        for sub in MAILDIR_SUBDIRS:
            path = root / sub
            if not path.is_dir():
                path.mkdir(mode=0o700, exist_ok=True)
                changed.append(root)
    except OSError as exc:
        raise storage_error(exc, f"creating Maildir {root}") from exc
    for parent in dict.fromkeys(changed):
        if dirsync is not None:
            dirsync.add(parent)
        else:
            try:
                DEFAULT_DISK.fsync_dir(str(parent))
            except OSError as exc:
                raise storage_error(exc, f"fsync of directory {parent}") from exc


def unique_base(host: str | None = None, now: float | None = None) -> str:
    """``1732900000.M123456P4321Q17.host``: the part of a name that makes it unique."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    micros = int((stamp - seconds) * 1_000_000)
    hostname = _HOSTNAME if host is None else _escaped_hostname(host)
    return f"{seconds}.M{micros}P{_pid}Q{next(_counter)}.{hostname}"


def unique_name(size_octets: int, crlf_size: int, host: str | None = None) -> str:
    """A new message's name in ``new/``: unique base, then ``,S=`` (file size), ``,W=`` (CRLF)."""
    return f"{unique_base(host)},S={size_octets},W={crlf_size}"


def crlf_to_lf(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Turn each CRLF into LF, also when a CR ends one chunk and its LF starts the next."""
    carry = b""
    for chunk in chunks:
        data = carry + chunk if carry else chunk
        if data.endswith(b"\r"):
            carry = b"\r"
            data = data[:-1]
        else:
            carry = b""
        if data:
            yield data.replace(b"\r\n", b"\n")
    if carry:
        yield carry


def delivery_headers(sender: str, mailbox: str) -> bytes:
    """``Return-Path`` (RFC 5321 4.4: added at final delivery) and ``Delivered-To``, CRLF form.

    ``Delivered-To`` names the mailbox delivered to, as Postfix's local and Dovecot's LDA write it;
    a later forwarder can spot a loop by it.
    """
    return f"Return-Path: <{sender}>\r\nDelivered-To: {mailbox}\r\n".encode()


def write_message(
    root: Path,
    chunks: Iterable[bytes],
    dirsync: DirSync,
    *,
    disk: Disk = DEFAULT_DISK,
    host: str | None = None,
) -> Path:
    """Deliver one message into the Maildir at *root*; return its path in ``new/``.

    *chunks* is the message in SMTP form (CRLF line ends); it is stored with LF. The file is
    created and written in ``tmp/`` now and handed to *dirsync*'s round, which fsyncs it, renames
    it into ``new/`` and fsyncs ``new/``: the message is durable (and the returned path exists)
    once the job has succeeded. Raises :class:`StorageError` and leaves nothing behind when a step
    here fails; a failure in the round fails the job and removes the file too.
    """
    base = unique_base(host)
    tmp = os.path.join(root, "tmp", base)
    try:
        out = DurableFile(disk, tmp)
    except StorageError as exc:
        if not isinstance(exc.__cause__, (FileNotFoundError, NotADirectoryError)):
            raise
        ensure_maildir(root, dirsync)
        out = DurableFile(disk, tmp)
    with out:
        line_ends = 0  # LFs not preceded by CR: each one is two octets more in CRLF form
        last = b""
        for piece in crlf_to_lf(chunks):
            line_ends += piece.count(b"\n") - piece.count(b"\r\n")
            if last == b"\r" and piece.startswith(b"\n"):
                line_ends -= 1
            last = piece[-1:]
            out.write(piece)
        name = f"{base},S={out.size},W={out.size + line_ends}"
        final = os.path.join(root, "new", name)
        out.commit(final, dirsync)
    return Path(final)


def size_from_name(name: str) -> int | None:
    """The ``S=`` size in a Maildir file name (before any ``:2,`` flags), or None."""
    match = _SIZE_FIELD.search(name.partition(":")[0])
    return int(match.group(1)) if match else None


class UsageUnknown(Exception):
    """The quota figure of ``root`` has to be counted first: call :meth:`MaildirUsage.usage` off
    the event loop (it counts), then ask again."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root


class MaildirUsage:
    """Mailbox usage in octets for quota checks, from each Maildir's ``maildirsize``.

    The file is the figure shared by every worker and by other Maildir++ programs, so each check
    reads it (one small file) instead of keeping a copy that another process could make wrong.
    Counting a Maildir is the slow part: :meth:`cached`, for the event loop, never counts and
    raises :class:`UsageUnknown` instead; :meth:`usage`, for threads and the committer, counts
    when :mod:`postroom.store.quota`'s rules want it. A figure this process counted less than
    :attr:`grace` seconds ago is trusted even over quota with lines appended since, so that the
    check repeated after a count does not ask for another. Safe to share between threads.
    """

    #: Seconds a count made here answers the over-quota rule (see above).
    grace = 5.0
    #: Mailboxes remembered between a :class:`UsageUnknown` and the count it asks for.
    _REMEMBERED = 4096

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall_clock = wall_clock  # file mtimes are wall-clock times
        self._lock = threading.Lock()
        self._asked: dict[Path, tuple[int, int]] = {}  # root -> (quota, incoming) of a miss
        #: root -> when this process last counted it, and what it found (which is all there is
        #: when the Maildir does not exist yet: nothing is written then)
        self._counted: dict[Path, tuple[float, quota_file.Reading]] = {}

    def cached(self, root: Path, quota: int = 0, incoming: int = 0) -> int:
        """The octets *root* holds, read from its ``maildirsize``, for judging *incoming* more
        against *quota* (0: whatever the file says). Raises :class:`UsageUnknown` when it has to
        be counted first (never counts here), ``OSError`` when it cannot be read."""
        definition = quota_file.Definition(quota) if quota > 0 else None
        reading = self._read(root)
        if reading is None or self._must_count(root, reading, definition, incoming):
            with self._lock:
                if len(self._asked) >= self._REMEMBERED:
                    self._asked.clear()
                self._asked[root] = (quota, incoming)
            raise UsageUnknown(root)
        return reading.octets

    def usage(self, root: Path, quota: int | None = None, incoming: int = 0) -> int:
        """Like :meth:`cached`, but counts the Maildir (and rewrites its ``maildirsize``) when
        needed: blocking. Without *quota*, the one of the :class:`UsageUnknown` raised for *root*
        is taken, else the file's own."""
        with self._lock:
            asked = self._asked.pop(root, None)
        if quota is None and asked is not None:
            quota, incoming = asked
        definition = quota_file.Definition(quota) if quota else None
        reading = self._read(root)
        if reading is None or self._must_count(root, reading, definition, incoming):
            keep = definition or (reading.definition if reading is not None else None)
            if keep is None:
                return quota_file.scan(root)[0]  # nothing to write it with: only count
            reading = quota_file.recalc(root, keep)
            with self._lock:
                if len(self._counted) >= self._REMEMBERED:
                    self._counted.clear()
                self._counted[root] = (self._clock(), reading)
        return reading.octets

    def _recent(self, root: Path) -> quota_file.Reading | None:
        """What this process counted in *root* less than :attr:`grace` seconds ago, if it did."""
        with self._lock:
            counted = self._counted.get(root)
        if counted is None or self._clock() - counted[0] >= self.grace:
            return None
        return counted[1]

    def _read(self, root: Path) -> quota_file.Reading | None:
        reading = quota_file.read(root)
        if reading is None:  # a count just made that could not be written: no Maildir yet
            return self._recent(root)
        return reading

    def _must_count(self, root: Path, reading: quota_file.Reading,
                    definition: quota_file.Definition | None, incoming: int) -> bool:
        if quota_file.unusable(reading, definition):
            return True
        if not quota_file.doubtful(reading, incoming, self._wall_clock()):
            return False
        return self._recent(root) is None

    def add(self, root: Path, octets: int, count: int = 1) -> None:
        """Account *count* messages of *octets* just delivered to *root* (one appended line,
        when the Maildir has a ``maildirsize``; never raises).

        The spool and the queue runner call it in their committer job, as soon as
        :func:`write_message` has handed the file to the round, so that a check and the count
        that follows it stay in one thread and the next job sees it. A round that then fails
        leaves the line behind: an overcount, which the next over-quota check counts away.
        """
        quota_file.add(root, octets, count)

    def forget(self, root: Path) -> None:
        with self._lock:
            self._asked.pop(root, None)
            self._counted.pop(root, None)


# At the end: postroom.store's package imports this module (store.maildir), so the store's quota
# module can only be imported once everything above exists, whichever is imported first.
from postroom.store import quota as quota_file  # noqa: E402
