"""What POP3's advertised policies (RFC 2449 6.5 LOGIN-DELAY, 6.7 EXPIRE) must remember about a
mailbox between sessions, kept in two small files beside the Maildir's own::

    postroom-pop3-login       empty; its mtime is the last successful POP3 login
    postroom-pop3-retrieved   "<unix seconds> <key>" per line: when POP3 first sent the message
                              whole (RETR), for messages that are still there

Files in the Maildir, not process memory, so that every worker, a restarted server and a second
host on the same Maildir all see the same record; not the SQLite index, which is rebuilt from the
Maildir and so may only hold what the Maildir can give back.

Why a retrieval log and not the message file's ctime (which the rename to ``:2,S`` sets): ctime
also moves on every later rename (a flag set by IMAP or mutt), chmod or restore, and the
``S`` flag does not say who set it. EXPIRE counts from the first POP3 retrieval; a message read
in mutt or, later, over IMAP is not POP3's to expire. The log costs an append and an fsync at the
end of a session that retrieved something, and only while EXPIRE is a number of days.

Callers hold the mailbox's POP3 lock (:meth:`~postroom.store.base.Mailbox.lock_exclusive`), so one
session at a time reads and writes these files. Keys are the store's message keys (Maildir: the
unique part of the name, which survives flag changes); a key with a line break is never logged, so
such a message never expires.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import Final, Protocol

from postroom.errors import StorageError
from postroom.fsync import fsync_dir

LOGIN_FILE: Final = "postroom-pop3-login"
RETRIEVED_FILE: Final = "postroom-pop3-retrieved"
DAY: Final = 86_400


class Pop3Records(Protocol):
    """The per-mailbox memory of the POP3 policies; blocking I/O, off the event loop. Methods
    raise :class:`StorageError` when the record cannot be read or written."""

    def last_login(self) -> float | None:
        """When the last successful POP3 login happened (seconds since the epoch), or None."""
        ...

    def record_login(self, when: float) -> None: ...

    def retrieved(self) -> dict[str, float]:
        """Key -> when POP3 first retrieved the message."""
        ...

    def record_retrieved(self, keys: Iterable[str], when: float) -> None:
        """Log *keys* as retrieved at *when*, unless logged already (the first time counts)."""
        ...

    def keep_only(self, keys: Collection[str]) -> None:
        """Forget the entries of messages not in *keys* (they are gone)."""
        ...


def expired(retrieved: Mapping[str, float], now: float, days: int) -> set[str]:
    """The keys retrieved more than *days* days before *now* (RFC 2449 6.7: the retention period
    is a minimum, so a message goes only once it is over)."""
    cutoff = now - days * DAY
    return {key for key, when in retrieved.items() if when < cutoff}


def _storage(exc: OSError, doing: str) -> StorageError:
    error = StorageError(f"{doing}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error



def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _line(key: str, when: float) -> bytes | None:
    if "\n" in key or "\r" in key:
        return None
    return f"{int(when)} {key}\n".encode("utf-8", "surrogateescape")


class MaildirPop3Records:
    """:class:`Pop3Records` as files in the Maildir at *root* (see the module docstring)."""

    def __init__(self, root: Path, *, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.owner = owner
        self.login_path = root / LOGIN_FILE
        self.retrieved_path = root / RETRIEVED_FILE

    def _create(self, path: Path, flags: int) -> int:
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if self.owner is not None:
            try:
                os.fchown(fd, *self.owner)
            except BaseException:
                os.close(fd)
                raise
        return fd

    # -- LOGIN-DELAY --------------------------------------------------------------------------
    def last_login(self) -> float | None:
        try:
            return os.stat(self.login_path).st_mtime_ns / 1e9
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _storage(exc, f"reading {self.login_path}") from exc

    def record_login(self, when: float) -> None:
        """The time goes into the file's mtime, without an fsync: a crash that loses it lets one
        login in early, which costs less than a disk flush on every login."""
        stamp = int(when * 1e9)
        try:
            fd = self._create(self.login_path, os.O_WRONLY)
            try:
                os.utime(fd, ns=(stamp, stamp))
            finally:
                os.close(fd)
        except OSError as exc:
            raise _storage(exc, f"writing {self.login_path}") from exc

    # -- EXPIRE -------------------------------------------------------------------------------
    def _read(self) -> bytes:
        try:
            with open(self.retrieved_path, "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return b""
        except OSError as exc:
            raise _storage(exc, f"reading {self.retrieved_path}") from exc

    def retrieved(self) -> dict[str, float]:
        """Lines that do not parse (a torn last line after a crash) are skipped; a key logged
        twice keeps its first time."""
        found: dict[str, float] = {}
        for raw in self._read().split(b"\n"):
            stamp, _, key = raw.partition(b" ")
            if not key or not stamp.isdigit():
                continue
            name = key.decode("utf-8", "surrogateescape")
            if name not in found:
                found[name] = float(int(stamp))
        return found

    def record_retrieved(self, keys: Iterable[str], when: float) -> None:
        known = self.retrieved()
        lines = [line for key in dict.fromkeys(keys) if key not in known
                 and (line := _line(key, when)) is not None]
        if not lines:
            return
        path = self.retrieved_path
        try:
            created = not path.exists()
            fd = self._create(path, os.O_RDWR | os.O_APPEND)
            try:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    lines.insert(0, b"\n")  # end a line torn by a crash before adding to it
                _write_all(fd, b"".join(lines))
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.root)
        except OSError as exc:
            raise _storage(exc, f"writing {path}") from exc

    def keep_only(self, keys: Collection[str]) -> None:
        """Rewrites the log (a new file, fsynced, renamed over the old one) when it has entries
        to drop."""
        known = self.retrieved()
        keep = {key: when for key, when in known.items() if key in keys}
        if len(keep) == len(known):
            return
        path = self.retrieved_path
        tmp = path.with_name(path.name + ".tmp")
        data = b"".join(line for key, when in keep.items() if (line := _line(key, when)))
        try:
            fd = self._create(tmp, os.O_WRONLY | os.O_TRUNC)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            fsync_dir(self.root)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage(exc, f"rewriting {path}") from exc
