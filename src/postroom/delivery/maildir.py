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
``S=`` fields (stat() for names without one), cached per mailbox for a short while.
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


def scan_usage(root: Path) -> int:
    """Octets held in ``new/`` and ``cur/``: the ``S=`` of each name, else the file's size."""
    total = 0
    for sub in ("new", "cur"):
        try:
            entries = os.scandir(root / sub)
        except FileNotFoundError:
            continue  # no Maildir yet: the first delivery creates it
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                size = size_from_name(entry.name)
                if size is None:
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue  # moved or expunged while we looked
                total += size
    return total


class UsageUnknown(Exception):
    """The usage of ``root`` is not cached: count it (off the event loop) and ask again."""

    def __init__(self, root: Path) -> None:
        super().__init__(str(root))
        self.root = root


class MaildirUsage:
    """Per-mailbox usage in octets for quota checks, cached in memory.

    A cached figure older than *max_age* seconds is recounted, so the effect of an IMAP client
    expunging mail shows within that time. :meth:`add` keeps the cache right after our own
    deliveries. Safe to share between threads.
    """

    def __init__(self, max_age: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age = max_age
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[Path, tuple[int, float]] = {}

    def usage(self, root: Path) -> int:
        now = self._clock()
        with self._lock:
            cached = self._cache.get(root)
            if cached is not None and now - cached[1] < self.max_age:
                return cached[0]
        total = scan_usage(root)
        with self._lock:
            self._cache[root] = (total, now)
        return total

    def cached(self, root: Path) -> int:
        """The cached figure if it is fresh; else :class:`UsageUnknown` (never a scan), for
        callers on the event loop, which run :meth:`usage` in a thread and ask again."""
        now = self._clock()
        with self._lock:
            cached = self._cache.get(root)
            if cached is not None and now - cached[1] < self.max_age:
                return cached[0]
        raise UsageUnknown(root)

    def add(self, root: Path, octets: int) -> None:
        with self._lock:
            cached = self._cache.get(root)
            if cached is not None:
                self._cache[root] = (cached[0] + octets, cached[1])

    def forget(self, root: Path) -> None:
        with self._lock:
            self._cache.pop(root, None)
