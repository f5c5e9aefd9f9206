"""The default mail store: Maildir files on disk, the SQLite index beside them.

The Maildir written by local delivery (:mod:`postroom.delivery.maildir`) stays the truth: delivery
never touches the index, other programs (mutt, Dovecot, ``mailbox.Maildir``, procmail) may add,
re-flag or remove files at any time, and :meth:`MaildirMailbox.sync` brings the index in line:

1. list ``new/``, then ``cur/`` (in that order: a file only ever moves from ``new/`` to ``cur/``,
   so a move during the listing shows it twice, never not at all; the later ``cur/`` name wins);
2. index rows whose file is in neither listing are listed once more before they count as
   vanished, since a rename by another program during ``readdir`` may hide one name;
3. with ``move_new``, files in ``new/`` move to ``cur/`` with a ``:2,`` info (a client has seen
   them; Dovecot does the same), and both directories are fsynced once;
4. new files get UIDs from UIDNEXT in delivery order (the time in the name, then the name);
   their sizes come from the ``,S=``/``,W=`` fields of the name when present, else from
   ``stat()``, and only a name without ``W=`` costs a read of the file;
5. a changed name means another program changed the flags: the row takes the name's letters and
   a new modseq;

all in one write transaction. A crash anywhere leaves at worst files the index does not know yet,
which the next sync picks up: no message is lost, and none appears twice (the index's UNIQUE key
on the unique name).

Between sessions each process keeps the state of the mailboxes it synced last (:class:`_Snapshot`,
at most :data:`SNAPSHOT_ROWS` rows in all): a sync whose mailbox provably has not changed since
takes that state instead of listing both directories and loading every index row again, which is
most of a POP3 login on a large mailbox. Provably: the index's change counter and the folder's
row (:mod:`.index`) are the same, and so are the mtimes of ``new/`` and ``cur/``, taken before
the listing the state came from. Every way a message comes, goes or changes flags touches one of
them: delivery creates a name in ``new/``; moving to ``cur/``, re-flagging (a rename) and
removing change a directory; keywords and UIDs live in the index. An mtime only shows changes
made after the clock tick it records, so a listing taken less than :data:`_RACY_NS` after its
directory's mtime is never trusted later (the "racy" case: a change in the same tick as the one
before it leaves the mtime as it was). The state is copied into each mailbox, never shared:
rows are replaced, not changed in place, once they may be in a snapshot.

Flag changes rename the file (the letters are the truth for other programs) and update the row,
in one transaction; keywords live in the index only. Expunge unlinks the files, fsyncs their
directories, then drops the rows and records the UIDs in ``expunged``. Every call is serialised
by the store's lock; calls do blocking I/O and belong off the event loop.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Final

from postroom.delivery.maildir import ensure_maildir, unique_base
from postroom.errors import StorageError
from postroom.store.base import (
    FolderError,
    FolderInfo,
    MailboxInUse,
    MessageGone,
    MessageInfo,
    SyncResult,
    Usage,
)
from postroom.store.folders import (
    INBOX,
    SPECIAL_USES,
    check_folder_name,
    default_role,
    folder_name,
    folder_path,
    make_folder,
)
from postroom.store.index import Index, IndexCorrupt, next_uidvalidity
from postroom.store.names import (
    FLAG_LETTERS,
    apply_flags,
    crlf_size_of,
    cur_name,
    flags_of,
    letters_of,
    parse_name,
)

#: Reads of a message whose name has no W= field go in pieces of this size.
_READ_CHUNK: Final = 256 * 1024
#: Message rows kept between sessions in one process, over every mailbox (a row and its listed
#: MessageInfo take some hundreds of octets); the mailbox used longest ago goes first.
SNAPSHOT_ROWS: Final = 100_000
#: A directory listing is trusted later only when taken this long after the directory's mtime:
#: more than the mtime granularity of the file systems a Maildir lives on (a clock tick on ext4
#: and XFS, 1 s on ext3 and many NFS servers, 2 s on FAT).
_RACY_NS: Final = 2_000_000_000
_LOCK_PURPOSE = re.compile(r"[a-z0-9]{1,16}")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _storage(exc: OSError, doing: str) -> StorageError:
    error = StorageError(f"{doing}: {exc.strerror or exc}")
    error.__cause__ = exc
    return error


def _usable(name: str) -> bool:
    """A directory entry we can index: not hidden, and text SQLite can store (no surrogates)."""
    if not name or name[0] == ".":
        return False
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Row:
    """One message row, mutable while a sync or flag change works on it."""

    __slots__ = ("crlf_size", "internaldate", "key", "keywords", "letters", "modseq", "path", "size",
                 "uid")

    def __init__(self, uid: int, key: str, path: str, letters: str, keywords: str, modseq: int,
                 internaldate: int, size: int, crlf_size: int) -> None:
        self.uid = uid
        self.key = key
        self.path = path
        self.letters = letters
        self.keywords = keywords
        self.modseq = modseq
        self.internaldate = internaldate
        self.size = size
        self.crlf_size = crlf_size

    def info(self) -> MessageInfo:
        flags = flags_of(self.letters)
        if self.keywords:
            flags |= frozenset(self.keywords.split())
        return MessageInfo(self.uid, self.key, flags, self.modseq, self.internaldate, self.size,
                           self.crlf_size)

    def at(self, path: str) -> _Row:
        """A copy of this row found at *path* (rows may be shared with a snapshot: never
        changed in place once a sync has finished with them)."""
        return _Row(self.uid, self.key, path, self.letters, self.keywords, self.modseq,
                    self.internaldate, self.size, self.crlf_size)


_ROW_COLUMNS = "uid, key, path, letters, keywords, modseq, internaldate, size, crlf_size"


class _Snapshot:
    """A mailbox as a completed sync left it, for the next session of this process."""

    __slots__ = ("changes", "counters", "cur_mtime", "has_new", "infos", "new_mtime", "rows")

    def __init__(self, changes: int, counters: tuple[int, int, int, int], new_mtime: int,
                 cur_mtime: int, rows: dict[int, _Row]) -> None:
        self.changes = changes  # the index's change counter
        self.counters = counters  # (id, uidvalidity, uidnext, highestmodseq) of the folder
        self.new_mtime = new_mtime  # ns, before the listing
        self.cur_mtime = cur_mtime
        self.rows = rows  # uid -> row, in UID order; read only
        self.has_new = any(row.path.startswith("new/") for row in rows.values())
        self.infos: tuple[MessageInfo, ...] | None = None  # messages(), made once when asked


class _Snapshots:
    """Per-process :class:`_Snapshot` s by (folder path, name), least recently used first."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._entries: collections.OrderedDict[tuple[str, str], _Snapshot] = (
            collections.OrderedDict())
        self._rows = 0

    def get(self, key: tuple[str, str]) -> _Snapshot | None:
        with self._lock:
            snapshot = self._entries.get(key)
            if snapshot is not None:
                self._entries.move_to_end(key)
            return snapshot

    def put(self, key: tuple[str, str], snapshot: _Snapshot | None) -> None:
        """Keep *snapshot* for *key*; None forgets what was kept."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._rows -= len(old.rows)
            if snapshot is None or len(snapshot.rows) > self.limit:
                return
            self._entries[key] = snapshot
            self._rows += len(snapshot.rows)
            while self._rows > self.limit:
                _key, dropped = self._entries.popitem(last=False)
                self._rows -= len(dropped.rows)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._rows = 0


#: Every mailbox state this process keeps (see the module docstring).
SNAPSHOTS: Final = _Snapshots(SNAPSHOT_ROWS)


class FlockLock:
    """An exclusive ``flock`` on a lock file, held until :meth:`release` (or process death:
    the kernel drops it, so a crashed session never leaves a mailbox locked)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # closing the only descriptor drops the lock

    def __del__(self) -> None:
        self.release()


class MaildirStore:
    """One user's Maildir (INBOX) and its Maildir++ folders, with their index.

    Safe to share between threads (one lock serialises every call); each process, or each
    session, may open its own: the index is shared through SQLite's locking.
    """

    def __init__(self, root: Path, *, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.owner = owner
        self._lock = threading.RLock()
        if not (root / "cur").is_dir():
            ensure_maildir(root)
            if owner is not None:
                for path in (root, root / "tmp", root / "new", root / "cur"):
                    with contextlib.suppress(OSError):
                        os.chown(path, *owner)
        self._index = Index(root, owner)

    # -- folders ------------------------------------------------------------------------------
    def _roles(self) -> dict[str, str | None]:
        with self._lock, self._index.read() as db:
            return dict(db.execute("SELECT name, special_use FROM mailboxes").fetchall())

    def _folder_names(self) -> list[str]:
        try:
            entries = os.listdir(self.root)
        except OSError as exc:
            raise _storage(exc, f"listing {self.root}") from exc
        names = []
        for entry in entries:
            name = folder_name(entry)
            if name is not None and (self.root / entry / "cur").is_dir():
                names.append(name)
        return sorted(names)

    def folders(self) -> list[FolderInfo]:
        roles = self._roles()
        result = [FolderInfo(INBOX, None)]
        for name in self._folder_names():
            role = roles.get(name) or default_role(name)
            result.append(FolderInfo(name, role))
        return result

    def create_folder(self, name: str, special_use: str | None = None) -> FolderInfo:
        check_folder_name(name)
        if special_use is not None and special_use not in SPECIAL_USES:
            raise FolderError(f"{special_use!r}: not a special-use role (RFC 6154 2)")
        with self._lock:
            if not make_folder(self.root, name, self.owner):
                raise FolderError(f"{name!r}: folder exists")
            with self._index.write() as db:
                # A row left from a folder removed behind our back would carry old UIDs.
                db.execute("DELETE FROM mailboxes WHERE name = ?", (name,))
                self._new_mailbox_row(db, name, special_use)
        return FolderInfo(name, special_use or default_role(name))

    def delete_folder(self, name: str) -> None:
        """Remove folder *name* and its messages (not its subfolders, which are separate
        directories in Maildir++). Renamed out of sight first, so no reader sees it half-gone."""
        path = folder_path(self.root, check_folder_name(name))
        with self._lock:
            if not (path / "cur").is_dir():
                raise FolderError(f"{name!r}: no such folder")
            doomed = self.root / f"postroom-deleted-{time.time_ns()}"
            try:
                os.rename(path, doomed)
                _fsync_dir(self.root)
            except OSError as exc:
                raise _storage(exc, f"removing folder {path}") from exc
            with self._index.write() as db:
                db.execute("DELETE FROM mailboxes WHERE name = ?", (name,))
            shutil.rmtree(doomed, ignore_errors=True)

    def mailbox(self, name: str = INBOX) -> MaildirMailbox:
        if name.upper() == INBOX:
            name, path = INBOX, self.root
        else:
            path = folder_path(self.root, name)
            if not (path / "cur").is_dir():
                raise FolderError(f"{name!r}: no such folder")
        return MaildirMailbox(self, name, path)

    def usage(self) -> Usage:
        """Messages and stored octets in every folder, after syncing each (new mail counts)."""
        messages = octets = 0
        for folder in self.folders():
            box = self.mailbox(folder.name)
            box.sync(move_new=False)
            for info in box.messages():
                messages += 1
                octets += info.size
        return Usage(messages, octets)

    def close(self) -> None:
        with self._lock:
            self._index.close()

    def __enter__(self) -> MaildirStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- for mailboxes ------------------------------------------------------------------------
    def _new_mailbox_row(self, db: sqlite3.Connection, name: str,
                         special_use: str | None = None) -> tuple[int, int, int, int]:
        uidvalidity = next_uidvalidity(self.root, self.owner)
        cursor = db.execute(
            "INSERT INTO mailboxes (name, uidvalidity, uidnext, highestmodseq, special_use)"
            " VALUES (?, ?, 1, 1, ?)", (name, uidvalidity, special_use))
        assert cursor.lastrowid is not None
        return cursor.lastrowid, uidvalidity, 1, 1

    def _mailbox_row(self, db: sqlite3.Connection, name: str) -> tuple[int, int, int, int]:
        """(id, uidvalidity, uidnext, highestmodseq) of folder *name*, created when missing."""
        row = db.execute(
            "SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes WHERE name = ?", (name,)
        ).fetchone()
        if row is not None:
            return (int(row[0]), int(row[1]), int(row[2]), int(row[3]))
        return self._new_mailbox_row(db, name)


class MaildirMailbox:
    """One folder of a :class:`MaildirStore`; see the module docstring for the sync."""

    def __init__(self, store: MaildirStore, name: str, path: Path, *, owns_store: bool = False) -> None:
        self._store = store
        self._owns_store = owns_store  # close() closes the store too (see open_inbox)
        self._name = name
        self._path = path
        self._dir = str(path)  # string paths: pathlib costs more than the system calls here
        self._rows: dict[int, _Row] = {}
        self._infos: tuple[MessageInfo, ...] | None = None  # messages() of _rows, once made
        #: The snapshot _rows came from (or went to) unchanged since: messages() fills it in.
        self._snapshot: _Snapshot | None = None
        self._rebuilt = store._index.rebuilt  # reported by the first sync
        with store._lock, store._index.write() as db:
            self._id, self._uidvalidity, self._uidnext, self._highest = store._mailbox_row(db, name)

    # -- properties ---------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> Path:
        return self._path

    @property
    def uidvalidity(self) -> int:
        return self._uidvalidity

    @property
    def uidnext(self) -> int:
        return self._uidnext

    @property
    def highest_modseq(self) -> int:
        return self._highest

    # -- reading ------------------------------------------------------------------------------
    def messages(self) -> list[MessageInfo]:
        infos = self._infos
        if infos is None:
            infos = self._infos = tuple(row.info() for row in self._rows.values())
            if self._snapshot is not None:
                self._snapshot.infos = infos
        return list(infos)

    def _changed_rows(self) -> None:
        """_rows is about to change: what was made from it no longer holds."""
        self._infos = None
        self._snapshot = None

    def open_message(self, uid: int) -> BinaryIO:
        row = self._rows.get(uid)
        if row is None:
            raise MessageGone(f"UID {uid}: no such message")
        try:
            return open(f"{self._dir}/{row.path}", "rb")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage(exc, f"opening {self._path / row.path}") from exc
        found = self._locate(row.key)  # renamed by another program (flags), or gone
        if found is None:
            raise MessageGone(f"UID {uid}: the message was removed")
        self._rows[uid] = row = row.at(found)
        try:
            return open(self._path / found, "rb")
        except FileNotFoundError:
            raise MessageGone(f"UID {uid}: the message was removed") from None
        except OSError as exc:
            raise _storage(exc, f"opening {self._path / found}") from exc

    def read_message(self, uid: int, limit: int) -> bytes:
        row = self._rows.get(uid)
        if row is None:
            raise MessageGone(f"UID {uid}: no such message")
        for _attempt in range(3):
            try:
                fd = os.open(f"{self._dir}/{row.path}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                found = self._locate(row.key)  # renamed by another program, or gone
                if found is None:
                    break
                self._rows[uid] = row = row.at(found)
                continue
            except OSError as exc:
                raise _storage(exc, f"opening {self._path / row.path}") from exc
            try:
                parts = []
                left = limit
                while left > 0:
                    piece = os.read(fd, left)
                    if not piece:
                        break
                    parts.append(piece)
                    left -= len(piece)
                return parts[0] if len(parts) == 1 else b"".join(parts)
            except OSError as exc:
                raise _storage(exc, f"reading {self._path / row.path}") from exc
            finally:
                os.close(fd)
        raise MessageGone(f"UID {uid}: the message was removed")

    def message_path(self, uid: int) -> Path:
        """Where message *uid* was last seen (it may have been renamed since)."""
        row = self._rows.get(uid)
        if row is None:
            raise MessageGone(f"UID {uid}: no such message")
        return self._path / row.path

    # -- sync ---------------------------------------------------------------------------------
    def sync(self, *, move_new: bool = True) -> SyncResult:
        store = self._store
        with store._lock:
            try:
                result = self._unchanged(move_new)
                if result is None:
                    result = self._sync(move_new)
            except IndexCorrupt:
                SNAPSHOTS.put(self._snapshot_key, None)
                store._index.rebuild()
                with store._index.write() as db:
                    self._id, self._uidvalidity, self._uidnext, self._highest = store._mailbox_row(
                        db, self._name)
                self._rows = {}
                self._changed_rows()
                self._rebuilt = True
                result = self._sync(move_new)
            if self._rebuilt:
                self._rebuilt = False
                result = SyncResult(result.added, result.vanished, result.changed, rebuilt=True)
            return result

    @property
    def _snapshot_key(self) -> tuple[str, str]:
        return (self._dir, self._name)

    def _mtimes(self) -> tuple[int, int, int]:
        """(now, mtime of new/, mtime of cur/) in ns; -1 for a directory that is missing."""
        now = time.time_ns()
        marks = []
        for sub in ("/new", "/cur"):
            try:
                marks.append(os.stat(self._dir + sub).st_mtime_ns)
            except FileNotFoundError:
                marks.append(-1)
            except OSError as exc:
                raise _storage(exc, f"examining {self._dir}{sub}") from exc
        return now, marks[0], marks[1]

    def _unchanged(self, move_new: bool) -> SyncResult | None:
        """The sync, when the kept snapshot provably still holds (see the module docstring);
        None when a full sync is needed. The directories are examined before the index: a
        change made meanwhile shows in one of them, or is simply later than this sync."""
        snapshot = SNAPSHOTS.get(self._snapshot_key)
        if snapshot is None or (move_new and snapshot.has_new):
            return None
        _now, new_mtime, cur_mtime = self._mtimes()
        if (new_mtime, cur_mtime) != (snapshot.new_mtime, snapshot.cur_mtime):
            return None
        index = self._store._index
        with index.read() as db:
            changes = index.changes(db)
            row = db.execute(
                "SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes WHERE name = ?",
                (self._name,)).fetchone()
        if changes != snapshot.changes or row is None or tuple(row) != snapshot.counters:
            return None
        self._id, self._uidvalidity, self._uidnext, self._highest = snapshot.counters
        before = self._rows
        self._rows = dict(snapshot.rows)
        self._infos, self._snapshot = snapshot.infos, snapshot
        return self._result(before, self._rows)

    @staticmethod
    def _result(before: dict[int, _Row], after: dict[int, _Row]) -> SyncResult:
        # Reported against what this object showed before: other sessions' work counts too.
        return SyncResult(
            added=tuple(uid for uid in after if uid not in before),
            vanished=tuple(uid for uid in before if uid not in after),
            changed=tuple(uid for uid, row in after.items()
                          if uid in before and before[uid].modseq != row.modseq),
        )

    def _scan(self) -> dict[str, str]:
        """key -> "new/<name>" or "cur/<name>"; ``new/`` first, so ``cur/`` wins (see above)."""
        listing: dict[str, str] = {}
        for sub in ("new", "cur"):
            try:
                names = os.listdir(self._path / sub)
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _storage(exc, f"listing {self._path / sub}") from exc
            prefix = sub + "/"
            for name in names:
                if _usable(name):
                    listing[name.partition(":")[0]] = prefix + name
        return listing

    def _locate(self, key: str) -> str | None:
        return self._scan().get(key)

    def _load(self, db: sqlite3.Connection) -> dict[str, _Row]:
        row = db.execute("SELECT uidvalidity, uidnext, highestmodseq FROM mailboxes WHERE id = ?",
                         (self._id,)).fetchone()
        if row is None:  # the folder was deleted and its row with it: start it again
            self._id, self._uidvalidity, self._uidnext, self._highest = self._store._mailbox_row(
                db, self._name)
        else:
            self._uidvalidity, self._uidnext, self._highest = int(row[0]), int(row[1]), int(row[2])
        rows = db.execute(f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? ORDER BY uid",
                          (self._id,)).fetchall()
        return {r[1]: _Row(*r) for r in rows}

    def _measure(self, path: str, key: str) -> tuple[int, int, int, float]:
        """(size, crlf_size, internaldate, order) of a new file, from its name where it can.
        FileNotFoundError when it went away meanwhile."""
        parsed = parse_name(key)
        size, crlf, seconds = parsed.size, parsed.crlf_size, parsed.seconds
        if crlf is not None and size is not None and seconds is not None:
            return size, crlf, seconds, seconds + parsed.micros / 1_000_000  # no I/O at all
        full = f"{self._dir}/{path}"
        if crlf is None:
            with open(full, "rb") as fh:
                size, crlf = 0, 0
                carry_cr = False
                while chunk := fh.read(_READ_CHUNK):
                    size += len(chunk)
                    crlf += crlf_size_of(chunk)
                    if carry_cr and chunk.startswith(b"\n"):
                        crlf -= 1  # a CRLF split between two reads was counted as a bare LF
                    carry_cr = chunk.endswith(b"\r")
                if seconds is None:
                    seconds = int(os.fstat(fh.fileno()).st_mtime)
        else:
            st = os.stat(full)
            size = st.st_size if size is None else size
            seconds = int(st.st_mtime) if seconds is None else seconds
        assert size is not None and seconds is not None
        return size, crlf, seconds, seconds + parsed.micros / 1_000_000

    def _sync(self, move_new: bool) -> SyncResult:
        store = self._store
        now, new_mtime, cur_mtime = self._mtimes()  # before the listing (see _unchanged)
        with store._index.write() as db:
            rows = self._load(db)
            listing = self._scan()
            if not rows.keys() <= listing.keys():
                listing.update(self._scan())  # a second look before anything counts as gone
            moved = False
            if move_new:
                moved = self._move_new(listing, rows)
            # New files, in delivery order.
            fresh: list[tuple[float, str, str, int, int, int]] = []
            for key, path in listing.items():
                if key in rows:
                    continue
                try:
                    size, crlf, date, order = self._measure(path, key)
                except FileNotFoundError:
                    continue  # gone already: it never existed for us
                except OSError as exc:
                    raise _storage(exc, f"reading {self._path / path}") from exc
                fresh.append((order, key, path, size, crlf, date))
            fresh.sort()
            inserts = []
            for _order, key, path, size, crlf, date in fresh:
                uid = self._uidnext
                self._uidnext += 1
                self._highest += 1
                letters = letters_of(path)
                rows[key] = _Row(uid, key, path, letters, "", self._highest, date, size, crlf)
                inserts.append((self._id, uid, key, path, letters, "", self._highest, date, size, crlf))
            # Renamed files: moved to cur/ here or elsewhere, or flags changed by another program.
            updates = []
            for key, row in rows.items():
                seen_at = listing.get(key)
                if seen_at is None or seen_at == row.path:
                    continue
                letters = letters_of(seen_at)
                if letters != row.letters:
                    self._highest += 1
                    row.modseq = self._highest
                    row.letters = letters
                row.path = seen_at
                updates.append((seen_at, letters, row.modseq, self._id, row.uid))
            vanished = sorted(row.uid for key, row in rows.items() if key not in listing)
            if vanished:
                self._highest += 1
                db.executemany("DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                               [(self._id, uid) for uid in vanished])
                db.executemany("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)",
                               [(self._id, uid, self._highest) for uid in vanished])
                for key in [k for k in rows if k not in listing]:
                    del rows[key]
            if inserts:
                db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inserts)
            if updates:
                db.executemany("UPDATE messages SET path = ?, letters = ?, modseq = ?"
                               " WHERE mailbox = ? AND uid = ?", updates)
            if inserts or updates or vanished or moved:
                db.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                           (self._uidnext, self._highest, self._id))
        before = self._rows
        self._rows = after = {row.uid: row for row in sorted(rows.values(), key=lambda r: r.uid)}
        self._changed_rows()
        changes = store._index.committed_changes
        if (moved or changes is None or new_mtime < 0 or cur_mtime < 0
                or now - max(new_mtime, cur_mtime) <= _RACY_NS):
            # Moving new mail changed both directories after the listing: the next sync lists
            # them again anyway. A listing too close to an mtime can never be trusted.
            SNAPSHOTS.put(self._snapshot_key, None)
        else:
            self._snapshot = _Snapshot(changes, (self._id, self._uidvalidity, self._uidnext,
                                                 self._highest), new_mtime, cur_mtime, dict(after))
            SNAPSHOTS.put(self._snapshot_key, self._snapshot)
        return self._result(before, after)

    def _move_new(self, listing: dict[str, str], rows: dict[str, _Row]) -> bool:
        """Move every file of ``new/`` to ``cur/`` (updating *listing*); fsync both once."""
        moved = False
        waiting = [(key, path) for key, path in listing.items() if path.startswith("new/")]
        base = self._dir
        for key, path in waiting:
            row = rows.get(key)
            letters = row.letters if row is not None else letters_of(path)
            target = "cur/" + cur_name(key, letters)
            try:
                os.rename(f"{base}/{path}", f"{base}/{target}")
            except FileNotFoundError:
                found = self._locate(key)  # another session moved it, or it was removed
                if found is None:
                    del listing[key]
                else:
                    listing[key] = found
                continue
            except OSError as exc:
                raise _storage(exc, f"moving {self._path / path} to cur/") from exc
            listing[key] = target
            moved = True
        if moved:
            try:
                _fsync_dir(self._path / "cur")
                _fsync_dir(self._path / "new")
            except OSError as exc:
                raise _storage(exc, f"fsync of {self._path}") from exc
        return moved

    # -- changes ------------------------------------------------------------------------------
    def _fresh_row(self, db: sqlite3.Connection, uid: int) -> _Row | None:
        r = db.execute(f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                       (self._id, uid)).fetchone()
        return None if r is None else _Row(*r)

    def _counters(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ?",
                         (self._id,)).fetchone()
        if row is None:
            raise StorageError(f"folder {self._name!r} was deleted")
        self._uidnext, self._highest = int(row[0]), int(row[1])

    def store_flags(
        self, uids: Iterable[int], add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> list[MessageInfo]:
        add, remove = frozenset(add), frozenset(remove)
        add_kw = {f for f in add if f not in FLAG_LETTERS and not f.startswith("\\")}
        remove_kw = {f for f in remove if f not in FLAG_LETTERS and not f.startswith("\\")}
        store = self._store
        changed: list[MessageInfo] = []
        with store._lock, store._index.write() as db:
            self._counters(db)
            renamed = False
            for uid in sorted(set(uids)):
                row = self._fresh_row(db, uid)  # another session may have changed it
                if row is None:
                    continue
                current = row.path
                letters = apply_flags(parse_name(current[4:]).letters, add, remove)
                keywords = " ".join(sorted((set(row.keywords.split()) | add_kw) - remove_kw))
                target = "cur/" + cur_name(row.key, letters)
                if target != current:
                    moved = self._rename(row.key, current, add, remove)
                    if moved is None:
                        continue  # gone: the next sync forgets it
                    target, letters = moved
                    renamed = True
                if letters == row.letters and keywords == row.keywords and target == row.path:
                    continue
                if letters != row.letters or keywords != row.keywords:
                    self._highest += 1
                    row.modseq = self._highest
                row.path, row.letters, row.keywords = target, letters, keywords
                db.execute("UPDATE messages SET path = ?, letters = ?, keywords = ?, modseq = ?"
                           " WHERE mailbox = ? AND uid = ?",
                           (target, letters, keywords, row.modseq, self._id, uid))
                self._rows[uid] = row
                self._changed_rows()
                changed.append(row.info())
            if renamed:
                try:
                    _fsync_dir(self._path / "cur")
                except OSError as exc:
                    raise _storage(exc, f"fsync of {self._path / 'cur'}") from exc
            if changed:  # an UPDATE that changes nothing still counts as a change of the index
                db.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?",
                           (self._highest, self._id))
        return changed

    def _rename(self, key: str, current: str, add: frozenset[str],
                remove: frozenset[str]) -> tuple[str, str] | None:
        """Rename the file of *key* to carry the new flags, starting from its name on disk
        (which another program may have changed); (new path, letters), or None if it is gone."""
        for _attempt in range(3):
            letters = apply_flags(parse_name(current[4:]).letters, add, remove)
            target = "cur/" + cur_name(key, letters)
            if target == current:
                return target, letters
            try:
                os.rename(f"{self._dir}/{current}", f"{self._dir}/{target}")
                return target, letters
            except FileNotFoundError:
                found = self._locate(key)
                if found is None:
                    return None
                current = found
            except OSError as exc:
                raise _storage(exc, f"renaming {self._path / current}") from exc
        raise StorageError(f"{self._path}: {key} keeps being renamed by another program")

    def expunge(self, uids: Iterable[int]) -> list[int]:
        store = self._store
        removed: list[int] = []
        with store._lock, store._index.write() as db:
            self._counters(db)
            dirs: set[str] = set()
            for uid in sorted(set(uids)):
                row = self._fresh_row(db, uid)
                if row is None:
                    continue
                path: str | None = row.path
                for _attempt in range(3):
                    if path is None:
                        break
                    try:
                        os.unlink(f"{self._dir}/{path}")
                        dirs.add(path[:3])
                        break
                    except FileNotFoundError:
                        path = self._locate(row.key)
                    except OSError as exc:
                        raise _storage(exc, f"removing {self._path / path}") from exc
                removed.append(uid)
            try:
                for sub in sorted(dirs):
                    _fsync_dir(self._path / sub)
            except OSError as exc:
                raise _storage(exc, f"fsync of {self._path}") from exc
            if removed:
                self._highest += 1
                db.executemany("DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                               [(self._id, uid) for uid in removed])
                db.executemany("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)",
                               [(self._id, uid, self._highest) for uid in removed])
                db.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?",
                           (self._highest, self._id))
        for uid in removed:
            self._rows.pop(uid, None)
        if removed:
            self._changed_rows()
        return removed

    def append(
        self, content: bytes, flags: Iterable[str] = (), internal_date: int | None = None
    ) -> MessageInfo:
        data = content.replace(b"\r\n", b"\n")
        key = f"{unique_base()},S={len(data)},W={crlf_size_of(data)}"
        tmp = self._path / "tmp" / key
        flags = frozenset(flags)
        letters = apply_flags("", flags)
        keywords = " ".join(sorted(f for f in flags if f not in FLAG_LETTERS and not f.startswith("\\")))
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            if internal_date is not None:
                os.utime(tmp, (internal_date, internal_date))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise _storage(exc, f"writing {tmp}") from exc
        date = internal_date if internal_date is not None else int(time.time())
        path = "cur/" + cur_name(key, letters)
        store = self._store
        with store._lock, store._index.write() as db:
            self._counters(db)
            try:
                os.rename(tmp, self._path / path)
                _fsync_dir(self._path / "cur")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _storage(exc, f"placing {self._path / path}") from exc
            uid = self._uidnext
            self._uidnext += 1
            self._highest += 1
            row = _Row(uid, key, path, letters, keywords, self._highest, date, len(data),
                       crlf_size_of(data))
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self._id, uid, key, path, letters, keywords, row.modseq, date, row.size,
                        row.crlf_size))
            db.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                       (self._uidnext, self._highest, self._id))
        self._rows[uid] = row
        self._changed_rows()
        return row.info()

    # -- sessions -----------------------------------------------------------------------------
    def lock_exclusive(self, purpose: str = "pop3") -> FlockLock:
        if not _LOCK_PURPOSE.fullmatch(purpose):
            raise ValueError(f"lock purpose {purpose!r}: lowercase letters and digits")
        path = self._path / f"postroom-{purpose}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise _storage(exc, f"opening {path}") from exc
        try:
            if self._store.owner is not None:
                os.fchown(fd, *self._store.owner)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxInUse(f"{self._path}: held by another {purpose} session") from None
        except OSError as exc:
            os.close(fd)
            raise _storage(exc, f"locking {path}") from exc
        return FlockLock(fd)

    def close(self) -> None:
        self._rows = {}
        self._changed_rows()
        if self._owns_store:
            self._store.close()


def open_store(root: Path, *, owner: tuple[int, int] | None = None) -> MaildirStore:
    """The store of the Maildir at *root* (made when missing)."""
    return MaildirStore(root, owner=owner)


def open_inbox(root: Path, *, owner: tuple[int, int] | None = None) -> MaildirMailbox:
    """The INBOX of the Maildir at *root*, on a store of its own that its close() closes:
    what a POP3 session needs."""
    store = MaildirStore(root, owner=owner)
    try:
        return MaildirMailbox(store, INBOX, root, owns_store=True)
    except BaseException:
        store.close()
        raise


