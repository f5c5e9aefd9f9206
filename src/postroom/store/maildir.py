"""The default mail store: Maildir files on disk, the SQLite index beside them.

The Maildir written by local delivery (:mod:`postroom.delivery.maildir`) stays the truth: delivery
never touches the index, other programs (mutt, Dovecot, ``mailbox.Maildir``, procmail) may add,
re-flag or remove files at any time, and :meth:`MaildirMailbox.sync` brings the index in line:

1. list ``new/``, then ``cur/`` (in that order: a file only ever moves from ``new/`` to ``cur/``,
   so a move during the listing shows it twice, never not at all; the later ``cur/`` name wins);
2. index rows whose file is in neither listing are listed once more before they count as
   vanished, since a rename by another program during ``readdir`` may hide one name;
3. new files get UIDs from UIDNEXT in delivery order (the time in the name, then the name);
   their sizes come from the ``,S=``/``,W=`` fields of the name when present, else from
   ``stat()``, and only a name without ``W=`` costs a read of the file (one ``read`` into a
   reused buffer, a ``memchr`` for CR, one count of LF);
4. with ``move_new``, files in ``new/`` move to ``cur/`` with a ``:2,`` info (a client has seen
   them; Dovecot does the same), and both directories are fsynced once;
5. a changed name means another program changed the flags: the row takes the name's letters and
   a new modseq;

all in one write transaction. A crash anywhere leaves at worst files the index does not know yet,
which the next sync picks up: no message is lost, and none appears twice (the index's UNIQUE key
on the unique name). On the first access to a large Maildir that another program delivered (no
``W=`` in the names), steps 3 and 4 are nearly all of the time: reading every file, and renaming
those in ``new/``.

Between sessions each process keeps the state of the mailboxes it synced or changed last
(:class:`_Snapshot`, at most :data:`SNAPSHOT_ROWS` rows in all), so that a sync of a mailbox that
has not changed costs a few system calls instead of a listing and a load of every index row. The
kept state holds when the index's change counter and the folder's row (:mod:`.index`) are as
they were and ``new/`` and ``cur/`` hold the same names; every way a message comes, goes or
changes flags changes one of them (delivery creates a name in ``new/``; moving to ``cur/``,
re-flagging and removing rename or unlink; UIDs and index-only keywords live in the index). The
names are compared by listing both directories again, unless a listing already found them the
same at least :data:`_RACY_NS` after both directories' mtimes: then the mtimes alone tell (a
change shows in the mtime once the clock has moved past it; one in the same clock tick as the
mtime would not, which is why a listing taken sooner is never trusted this way). When only the
directories changed (new mail, another program's renames), the sync starts from the kept rows
instead of loading them from the index. The state is copied into each mailbox, never shared: rows
are replaced, not changed in place, once they may be in a snapshot.

Flag changes rename the file (the letters are the truth for other programs) and update the row,
in one transaction. Keywords get lowercase letters in the name as Dovecot gives them, with the
folder's ``dovecot-keywords`` file saying which is which (:mod:`.keywords`), so a rebuilt index
finds them again; only keywords past the 26 letters live in the index alone. Expunge unlinks the
files, fsyncs their directories, then drops the rows and records the UIDs in ``expunged``. Every
call is serialised by the store's lock; calls do blocking I/O and belong off the event loop.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import fcntl
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Final, TypeAlias, TypeVar, cast

from postroom.delivery.maildir import ensure_maildir, unique_base
from postroom.errors import StorageError
from postroom.fsync import fsync_dir
from postroom.store import keywords, quota
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
from postroom.store.keywords import KeywordMap
from postroom.store.names import (
    FLAG_LETTERS,
    crlf_size_of,
    cur_name,
    edit_letters,
    flags_of,
    key_fields,
    letters_of,
)

#: Reads of a message whose name has no W= field go in pieces of this size, into one buffer reused
#: for every file (a fresh 256 KiB bytes object per read would cost an mmap and page faults).
_READ_CHUNK: Final = 256 * 1024
#: Message rows kept between sessions in one process, over every mailbox (a row and its listed
#: MessageInfo take some hundreds of octets); the mailbox used longest ago goes first.
SNAPSHOT_ROWS: Final = 100_000
#: A directory listing lets later syncs trust the directory's mtime only when taken this long
#: after it: more than the mtime granularity of the file systems a Maildir lives on (a clock tick
#: on ext4 and XFS, 1 s on ext3 and many NFS servers, 2 s on FAT). Sooner, the next sync lists
#: again and compares names.
_RACY_NS: Final = 2_000_000_000
#: Fresh index rows are read per UID below this many, all of the folder's at once above it.
_FETCH_ALL_MIN: Final = 256
_LOCK_PURPOSE = re.compile(r"[a-z0-9]{1,16}")



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


#: Reads of message files do not update their access time: the first read after a rename or a new
#: hard link would otherwise write the inode (relatime), a journal write per message on ext4.
#: Allowed to the files' owner (the mail user, or root); dropped for good at the first EPERM.
_noatime = getattr(os, "O_NOATIME", 0)


def _open_ro(path: str, dir_fd: int | None = None) -> int:
    global _noatime
    if _noatime:
        try:
            return os.open(path, os.O_RDONLY | os.O_CLOEXEC | _noatime, dir_fd=dir_fd)
        except PermissionError as exc:
            if exc.errno != errno.EPERM:
                raise
            _noatime = 0  # not the owner: plain opens from now on
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)


def _is_keyword(flag: str) -> bool:
    """A flag that is neither a system flag nor one with a Maildir letter of its own."""
    return flag not in FLAG_LETTERS and not flag.startswith("\\")


def _may_have_keywords(letters: str) -> bool:
    """False when *letters* surely has no keyword letter (none, or only uppercase ones)."""
    return bool(letters) and not letters.isupper()


#: What a file name tells of a file: (size, crlf_size, seconds, micros), None where it does not.
_Hints: TypeAlias = tuple[int | None, int | None, int | None, int]
#: A new file's (size, crlf_size, internal date, delivery order).
_Measured: TypeAlias = tuple[int, int, int, float]


def _measure_file(name: str, dir_fd: int, buf: bytearray, hints: _Hints) -> _Measured:
    """(size, crlf_size, seconds, order) of file *name* in the directory *dir_fd*, given what
    its name told. FileNotFoundError when it went away meanwhile.

    Without a ``W=`` the file is read, once: a read shorter than the buffer is the end of a regular
    file, and a piece with no CR (the usual Maildir file) needs one LF count."""
    size_hint, crlf, seconds, micros = hints
    if crlf is not None:
        st = os.stat(name, dir_fd=dir_fd)
        if seconds is None:
            seconds = int(st.st_mtime)
        return (st.st_size if size_hint is None else size_hint), crlf, seconds, seconds + micros / 1e6
    fd = _open_ro(name, dir_fd)
    try:
        chunk = len(buf)
        size = extra = 0
        carry_cr = False
        while True:
            n = os.readv(fd, [buf])
            if n:
                lf = buf.count(b"\n", 0, n)
                if buf.find(b"\r", 0, n) >= 0:
                    lf -= buf.count(b"\r\n", 0, n)
                if carry_cr and buf[0] == 10:
                    lf -= 1  # a CRLF split between two reads was counted as a bare LF
                carry_cr = buf[n - 1] == 13
                size += n
                extra += lf
            if n < chunk:
                break
        if seconds is None:
            seconds = int(os.fstat(fd).st_mtime)
    finally:
        os.close(fd)
    return size, size + extra, seconds, seconds + micros / 1e6


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
        self.keywords = keywords  # the keywords without a letter (index only), space-separated
        self.modseq = modseq
        self.internaldate = internaldate
        self.size = size
        self.crlf_size = crlf_size

    def at(self, path: str) -> _Row:
        """A copy of this row found at *path* (rows may be shared with a snapshot: never
        changed in place once a sync has finished with them)."""
        return _Row(self.uid, self.key, path, self.letters, self.keywords, self.modseq,
                    self.internaldate, self.size, self.crlf_size)

    def changed(self, path: str, letters: str, keywords: str, modseq: int) -> _Row:
        return _Row(self.uid, self.key, path, letters, keywords, modseq, self.internaldate,
                    self.size, self.crlf_size)


_ROW_COLUMNS = "uid, key, path, letters, keywords, modseq, internaldate, size, crlf_size"


class _Snapshot:
    """A mailbox as a completed sync or change left it, for the next session of this process."""

    __slots__ = ("changes", "counters", "cur_names", "has_new", "infos", "keymap", "mtimes",
                 "new_names", "rows", "uses_keymap", "views")

    def __init__(self, changes: int, counters: tuple[int, int, int, int], rows: dict[int, _Row],
                 new_names: frozenset[str], cur_names: frozenset[str],
                 mtimes: tuple[int, int] | None, keymap: KeywordMap | None) -> None:
        self.changes = changes  # the index's change counter
        self.counters = counters  # (id, uidvalidity, uidnext, highestmodseq) of the folder
        self.rows = rows  # uid -> row, in UID order; read only
        self.new_names = new_names  # what new/ and cur/ hold (the rows' names, and nothing else)
        self.cur_names = cur_names
        #: (new/, cur/) mtimes in ns from before a listing that found exactly these names at
        #: least _RACY_NS later; None: compare the names by listing again.
        self.mtimes = mtimes
        self.keymap = keymap  # the keyword letters the rows were read with
        self.has_new = bool(new_names)
        #: Whether any row has a keyword letter: then a changed dovecot-keywords matters too.
        self.uses_keymap = any(_may_have_keywords(row.letters) for row in rows.values())
        self.infos: tuple[MessageInfo, ...] | None = None  # messages(), made once when asked
        self.views: dict[str, object] | None = None  # list_view()s of the same messages

    def with_infos(self, infos: tuple[MessageInfo, ...] | None,
                   views: dict[str, object] | None) -> _Snapshot:
        self.infos, self.views = infos, views
        return self

    def trusted(self, mtimes: tuple[int, int]) -> _Snapshot:
        """The same state, now also vouched for by these mtimes."""
        copy = _Snapshot(self.changes, self.counters, self.rows, self.new_names, self.cur_names,
                         mtimes, self.keymap)
        return copy.with_infos(self.infos, self.views)


def _names_of(rows: Iterable[_Row]) -> tuple[frozenset[str], frozenset[str]]:
    new: list[str] = []
    cur: list[str] = []
    for row in rows:
        (new if row.path.startswith("new/") else cur).append(row.path[4:])
    return frozenset(new), frozenset(cur)


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

_View = TypeVar("_View")


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
                fsync_dir(self.root)
            except OSError as exc:
                raise _storage(exc, f"removing folder {path}") from exc
            with self._index.write() as db:
                db.execute("DELETE FROM mailboxes WHERE name = ?", (name,))
            octets, messages = quota.folder_usage(doomed)
            shutil.rmtree(doomed, ignore_errors=True)
            quota.add(self.root, -octets, -messages)  # the Maildir++ maildirsize

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
        #: The index change counter of which _rows are exactly the folder's rows; None when not
        #: known, or when _rows holds what the index does not (a path open_message found).
        self._base: int | None = None
        self._infos: tuple[MessageInfo, ...] | None = None  # messages() of _rows, once made
        #: list_view()s of _infos. Only ever added to (it may be shared with a snapshot, and
        #: through it with later sessions); replaced as a whole when the messages change.
        self._views: dict[str, object] | None = None
        #: The snapshot _rows came from (or went to) unchanged since: messages() fills it in.
        self._snapshot: _Snapshot | None = None
        self._keymap: KeywordMap | None = None  # the folder's keyword letters, as last read
        self._flag_cache: dict[str, frozenset[str]] = {}  # letters -> flags, for this keymap
        self._rebuilt = store._index.rebuilt  # reported by the first sync
        with store._lock:
            with store._index.read() as db:
                row = db.execute("SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes"
                                 " WHERE name = ?", (name,)).fetchone()
            if row is not None:
                self._id, self._uidvalidity, self._uidnext, self._highest = (
                    int(row[0]), int(row[1]), int(row[2]), int(row[3]))
            else:
                with store._index.write() as db:
                    self._id, self._uidvalidity, self._uidnext, self._highest = (
                        store._mailbox_row(db, name))

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
        return list(self._all_infos())

    def _all_infos(self) -> tuple[MessageInfo, ...]:
        infos = self._infos
        if infos is None:
            info = self._info
            infos = self._infos = tuple(info(row) for row in self._rows.values())
            self._views = None
            if self._snapshot is not None:
                self._snapshot.with_infos(infos, None)
        return infos

    def list_view(self, name: str, make: Callable[[Sequence[MessageInfo]], _View]) -> _View:
        infos = self._all_infos()
        views = self._views
        if views is None:
            views = self._views = {}
            if self._snapshot is not None:
                self._snapshot.with_infos(infos, views)
        view = views.get(name)
        if view is None:
            view = views[name] = make(infos)
        return cast(_View, view)

    def _info(self, row: _Row) -> MessageInfo:
        letters = row.letters
        flags = self._flag_cache.get(letters)
        if flags is None:
            flags = self._flags_of(letters)
        if row.keywords:
            flags = flags | frozenset(row.keywords.split())
        return MessageInfo(row.uid, row.key, flags, row.modseq, row.internaldate, row.size,
                           row.crlf_size)

    def _flags_of(self, letters: str) -> frozenset[str]:
        """The flags the letters of a name stand for: system flags, and keywords by the
        folder's table (a letter it does not name stands for nothing we can report)."""
        flags = flags_of(letters)
        keymap = self._keymap
        if keymap is not None and _may_have_keywords(letters):
            names = [name for ch in letters if (name := keymap.name(ch)) is not None]
            if names:
                flags = flags | frozenset(names)
        self._flag_cache[letters] = flags
        return flags

    def _set_keymap(self, keymap: KeywordMap) -> KeywordMap:
        if keymap is not self._keymap:
            self._keymap = keymap
            self._flag_cache = {}
            self._changed_rows()
        return keymap

    def _changed_rows(self) -> None:
        """_rows is about to change: what was made from it no longer holds."""
        self._infos = None
        self._views = None
        self._snapshot = None

    def _found_at(self, uid: int, row: _Row, path: str) -> _Row:
        """*row*'s file is at *path* now (renamed by another program): read from there. The
        index does not know yet, so _rows no longer matches it (no snapshot from them)."""
        self._rows[uid] = row = row.at(path)
        self._base = None
        return row

    def open_message(self, uid: int) -> BinaryIO:
        row = self._rows.get(uid)
        if row is None:
            raise MessageGone(f"UID {uid}: no such message")
        try:
            return open(_open_ro(f"{self._dir}/{row.path}"), "rb")
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage(exc, f"opening {self._path / row.path}") from exc
        found = self._locate(row.key)  # renamed by another program (flags), or gone
        if found is None:
            raise MessageGone(f"UID {uid}: the message was removed")
        self._found_at(uid, row, found)
        try:
            return open(_open_ro(f"{self._dir}/{found}"), "rb")
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
                fd = _open_ro(f"{self._dir}/{row.path}")
            except FileNotFoundError:
                found = self._locate(row.key)  # renamed by another program, or gone
                if found is None:
                    break
                row = self._found_at(uid, row, found)
                continue
            except OSError as exc:
                raise _storage(exc, f"opening {self._path / row.path}") from exc
            try:
                parts = []
                left = limit
                # The stored size and one octet more: one read that comes back short (the end of
                # a regular file), and a buffer no larger than the message.
                want = min(left, row.size + 1)
                while left > 0:
                    piece = os.read(fd, want)
                    if piece:
                        parts.append(piece)
                        left -= len(piece)
                    if len(piece) < want:
                        break
                    want = left
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
                snapshot = SNAPSHOTS.get(self._snapshot_key)
                result = None if snapshot is None else self._unchanged(snapshot, move_new)
                if result is None:
                    result = self._sync(move_new, snapshot)
            except IndexCorrupt:
                SNAPSHOTS.put(self._snapshot_key, None)
                store._index.rebuild()
                with store._index.write() as db:
                    self._id, self._uidvalidity, self._uidnext, self._highest = store._mailbox_row(
                        db, self._name)
                self._rows = {}
                self._base = None
                self._changed_rows()
                self._rebuilt = True
                result = self._sync(move_new, None)
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

    def _holds_names(self, snapshot: _Snapshot) -> bool:
        """True when ``new/`` and ``cur/`` hold exactly the names of *snapshot*'s rows."""
        for sub, names in (("/new", snapshot.new_names), ("/cur", snapshot.cur_names)):
            try:
                listed = os.listdir(self._dir + sub)
            except FileNotFoundError:
                listed = []
            except OSError as exc:
                raise _storage(exc, f"listing {self._dir}{sub}") from exc
            if len(listed) == len(names) and names.issuperset(listed):
                continue
            usable = [name for name in listed if _usable(name)]  # a stray dot file changes nothing
            if len(usable) != len(names) or not names.issuperset(usable):
                return False
        return True

    def _unchanged(self, snapshot: _Snapshot, move_new: bool) -> SyncResult | None:
        """The sync, when the kept snapshot provably still holds (see the module docstring);
        None when the directories or the index say otherwise. The directories are examined
        before the index: a change made meanwhile shows in one of them, or is simply later than
        this sync."""
        if move_new and snapshot.has_new:
            return None
        now, new_mtime, cur_mtime = self._mtimes()
        listed = False
        if snapshot.mtimes is None or snapshot.mtimes != (new_mtime, cur_mtime):
            if not self._holds_names(snapshot):
                return None
            listed = True
        if snapshot.uses_keymap and keywords.stamp_of(self._dir) != (
                None if snapshot.keymap is None else snapshot.keymap.stamp):
            return None
        index = self._store._index
        with index.read() as db:
            changes = index.changes(db)
            row = db.execute(
                "SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes WHERE name = ?",
                (self._name,)).fetchone()
        if changes != snapshot.changes or row is None or tuple(row) != snapshot.counters:
            return None
        if listed and min(new_mtime, cur_mtime) >= 0 and now - max(new_mtime, cur_mtime) > _RACY_NS:
            snapshot = snapshot.trusted((new_mtime, cur_mtime))  # the next sync needs no listing
            SNAPSHOTS.put(self._snapshot_key, snapshot)
        self._id, self._uidvalidity, self._uidnext, self._highest = snapshot.counters
        before = self._rows
        self._rows = dict(snapshot.rows)
        self._base = snapshot.changes
        if snapshot.keymap is not None:
            self._set_keymap(snapshot.keymap)
        self._infos, self._views, self._snapshot = snapshot.infos, snapshot.views, snapshot
        return self._result(before, self._rows)

    @staticmethod
    def _result(before: dict[int, _Row], after: dict[int, _Row]) -> SyncResult:
        # Reported against what this object showed before: other sessions' work counts too.
        if not before:  # a session's first sync
            return SyncResult(added=tuple(after))
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
                names = os.listdir(f"{self._dir}/{sub}")
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _storage(exc, f"listing {self._path / sub}") from exc
            prefix = sub + "/"
            for name in names:
                if (name.isascii() and name[:1] != ".") or _usable(name):
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

    def _kept_rows(self, db: sqlite3.Connection, snapshot: _Snapshot | None) -> dict[str, _Row] | None:
        """*snapshot*'s rows by key when the index is still as it left it (then they are the
        index's rows, already loaded); None otherwise."""
        if snapshot is None or self._store._index.changes(db) != snapshot.changes:
            return None
        row = db.execute("SELECT id, uidvalidity, uidnext, highestmodseq FROM mailboxes"
                         " WHERE name = ?", (self._name,)).fetchone()
        if row is None or tuple(row) != snapshot.counters:
            return None
        self._id, self._uidvalidity, self._uidnext, self._highest = snapshot.counters
        return {row.key: row for row in snapshot.rows.values()}

    def _prepare(self, listing: dict[str, str], rows: dict[str, _Row],
                 move_new: bool) -> tuple[dict[str, _Measured], bool]:
        """Measure the files the index does not know and, with *move_new*, move ``new/`` to
        ``cur/`` (updating *listing*; both directories fsynced once). Returns key -> (size,
        crlf_size, internaldate, order) of every new file still there, and whether any moved.

        One pass in this thread, each file read before it is moved, by its name in a directory
        opened once. (Helper threads do not pay: measured on 10,000 files, the GIL hand-offs
        around every short system call cost what the overlap saves.)"""
        measured: dict[str, _Measured] = {}
        lost: list[tuple[str, _Hints | None]] = []
        moved = False
        buf = bytearray(_READ_CHUNK)
        path = ""
        dirs: dict[str, int] = {}
        try:
            for sub in ("new", "cur"):
                dirs[sub] = os.open(f"{self._dir}/{sub}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            new_fd, cur_fd = dirs["new"], dirs["cur"]
            for key, path in listing.items():  # (values change below, keys do not)
                row = rows.get(key)
                hints: _Hints | None = None
                if row is None:
                    size, crlf, seconds, micros = hints = key_fields(key)
                    if size is not None and crlf is not None and seconds is not None:
                        measured[key] = (size, crlf, seconds, seconds + micros / 1e6)  # no I/O
                        hints = None
                in_new = path[0] == "n"
                try:
                    if hints is not None:
                        measured[key] = _measure_file(path[4:], new_fd if in_new else cur_fd, buf,
                                                      hints)
                        hints = None
                    if move_new and in_new:
                        target = cur_name(key, row.letters if row is not None else letters_of(path))
                        os.rename(path[4:], target, src_dir_fd=new_fd, dst_dir_fd=cur_fd)
                        listing[key] = "cur/" + target
                        moved = True
                except FileNotFoundError:
                    lost.append((key, hints))  # moved by another session meanwhile, or removed
            if moved:
                os.fsync(cur_fd)
                os.fsync(new_fd)
        except OSError as exc:
            raise _storage(exc, f"reading or moving {self._path / path}") from exc
        finally:
            for fd in dirs.values():
                os.close(fd)
        if lost:
            scan = self._scan()
            for key, still in lost:
                found = scan.get(key)
                if found is not None and still is not None:
                    try:
                        fd = os.open(f"{self._dir}/{found[:3]}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                        try:
                            measured[key] = _measure_file(found[4:], fd, buf, still)
                        finally:
                            os.close(fd)
                    except FileNotFoundError:
                        found = None
                    except OSError as exc:
                        raise _storage(exc, f"reading {self._path / found}") from exc
                if found is None:
                    listing.pop(key, None)
                    measured.pop(key, None)
                else:
                    listing[key] = found
        return measured, moved

    def _sync(self, move_new: bool, snapshot: _Snapshot | None) -> SyncResult:
        store = self._store
        index = store._index
        now, new_mtime, cur_mtime = self._mtimes()  # before the listing (see _unchanged)
        with index.write() as db:
            rows = self._kept_rows(db, snapshot)
            if rows is None:
                rows = self._load(db)
            elif snapshot is not None and self._keymap is None:
                self._keymap = snapshot.keymap  # known: no second read of an unchanged file
            self._set_keymap(keywords.load(self._dir, self._keymap))
            listing = self._scan()
            if not rows.keys() <= listing.keys():
                listing.update(self._scan())  # a second look before anything counts as gone
            measured, moved = self._prepare(listing, rows, move_new)
            # New files, in delivery order.
            fresh = sorted((order, key, listing[key], size, crlf, date)
                           for key, (size, crlf, date, order) in measured.items())
            inserts = []
            added: list[_Row] = []
            for _order, key, path, size, crlf, date in fresh:
                uid = self._uidnext
                self._uidnext += 1
                self._highest += 1
                letters = letters_of(path)
                added.append(_Row(uid, key, path, letters, "", self._highest, date, size, crlf))
                inserts.append((self._id, uid, key, path, letters, "", self._highest, date, size, crlf))
            # Renamed files: moved to cur/ here or elsewhere, or flags changed by another program.
            # Rows may be a snapshot's: replaced, never changed in place.
            updates = []
            vanished = []
            after: dict[int, _Row] = {}
            for key, row in rows.items():
                seen_at = listing.get(key)
                if seen_at is None:
                    vanished.append(row.uid)
                    continue
                if seen_at != row.path:
                    letters = letters_of(seen_at)
                    modseq = row.modseq
                    if letters != row.letters:
                        self._highest += 1
                        modseq = self._highest
                    row = row.changed(seen_at, letters, row.keywords, modseq)
                    updates.append((seen_at, letters, modseq, self._id, row.uid))
                after[row.uid] = row
            for row in added:  # UIDs above every one before: UID order holds
                after[row.uid] = row
            if vanished:
                self._highest += 1
                db.executemany("DELETE FROM messages WHERE mailbox = ? AND uid = ?",
                               [(self._id, uid) for uid in vanished])
                db.executemany("INSERT OR REPLACE INTO expunged VALUES (?, ?, ?)",
                               [(self._id, uid, self._highest) for uid in vanished])
            if inserts:
                db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", inserts)
            if updates:
                db.executemany("UPDATE messages SET path = ?, letters = ?, modseq = ?"
                               " WHERE mailbox = ? AND uid = ?", updates)
            if inserts or updates or vanished or moved:
                db.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                           (self._uidnext, self._highest, self._id))
        before = self._rows
        self._rows = after
        self._changed_rows()
        changes = index.committed_changes
        self._base = changes
        if changes is None:
            SNAPSHOTS.put(self._snapshot_key, None)
        else:
            # Moving new mail changed both directories after the listing, and a listing too
            # close to an mtime can never vouch for it: then the next sync compares names.
            trusted = (not moved and min(new_mtime, cur_mtime) >= 0
                       and now - max(new_mtime, cur_mtime) > _RACY_NS)
            self._keep(changes, (new_mtime, cur_mtime) if trusted else None)
        return self._result(before, after)

    def _keep(self, changes: int, mtimes: tuple[int, int] | None) -> None:
        """Keep _rows, the index's rows at *changes*, for the next session of this process."""
        rows = dict(self._rows)
        new_names, cur_names = _names_of(rows.values())
        self._snapshot = _Snapshot(changes, (self._id, self._uidvalidity, self._uidnext,
                                             self._highest), rows, new_names, cur_names, mtimes,
                                   self._keymap)
        SNAPSHOTS.put(self._snapshot_key, self._snapshot)

    def _changed_by_us(self, current: bool) -> None:
        """After a write transaction of ours that changed rows: when _rows matched the index
        before it (*current*), they match it now, and are kept for the next session."""
        changes = self._store._index.committed_changes
        if not current or changes is None:
            self._base = None
            SNAPSHOTS.put(self._snapshot_key, None)
            return
        self._base = changes
        self._keep(changes, None)

    # -- changes ------------------------------------------------------------------------------
    def _fresh_row(self, db: sqlite3.Connection, uid: int) -> _Row | None:
        r = db.execute(f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ? AND uid = ?",
                       (self._id, uid)).fetchone()
        return None if r is None else _Row(*r)

    def _current(self, db: sqlite3.Connection) -> bool:
        """True when _rows are the index's rows as this write transaction finds them."""
        return self._base is not None and self._store._index.changes(db) == self._base

    def _rows_for(self, db: sqlite3.Connection, uids: list[int], current: bool) -> list[_Row]:
        """The rows of *uids* (sorted) that exist: ours when *current*, else fresh from the
        index (another session may have changed them)."""
        if current:
            rows = self._rows
            return [rows[uid] for uid in uids if uid in rows]
        if len(uids) < _FETCH_ALL_MIN:
            return [row for uid in uids if (row := self._fresh_row(db, uid)) is not None]
        found = {r[0]: r for r in db.execute(
            f"SELECT {_ROW_COLUMNS} FROM messages WHERE mailbox = ?", (self._id,))}
        return [_Row(*found[uid]) for uid in uids if uid in found]

    def _counters(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT uidnext, highestmodseq FROM mailboxes WHERE id = ?",
                         (self._id,)).fetchone()
        if row is None:
            raise StorageError(f"folder {self._name!r} was deleted")
        self._uidnext, self._highest = int(row[0]), int(row[1])

    def _letters_in_use(self, rows: Iterable[_Row]) -> set[str]:
        """Keyword letters found in names (ours and *rows*): never given to a new keyword."""
        used: set[str] = set()
        for source in (self._rows.values(), rows):
            for row in source:
                if _may_have_keywords(row.letters):
                    used.update(ch for ch in row.letters if keywords.is_keyword_letter(ch))
        return used

    def _give_letters(self, names: dict[str, str], rows: Iterable[_Row]) -> KeywordMap:
        """The folder's table (read again: the caller holds the index's write lock), with a
        letter for each of *names* (lowercase -> spelling) that can have one; written to disk
        before the caller puts a new letter in a name. Names left without a letter stay in the
        index alone."""
        keymap = self._set_keymap(keywords.load(self._dir, self._keymap))
        missing = {key: name for key, name in names.items()
                   if keymap.letter(name) is None and keywords.storable(name)}
        if not missing:
            return keymap
        table = keymap.copy()
        used = self._letters_in_use(rows)
        if not [name for name in missing.values() if table.add(name, used) is not None]:
            return keymap  # all 26 taken
        if not keywords.write(self._dir, table, self._store.owner):
            return keymap  # another writer held the file: index only, this time
        return self._set_keymap(table)

    def store_flags(
        self, uids: Iterable[int], add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> list[MessageInfo]:
        add, remove = frozenset(add), frozenset(remove)
        add_sys = "".join(FLAG_LETTERS[f] for f in add if f in FLAG_LETTERS)
        remove_sys = "".join(FLAG_LETTERS[f] for f in remove if f in FLAG_LETTERS)
        remove_kw = {f.lower() for f in remove if _is_keyword(f)}
        add_kw = {f.lower(): f for f in sorted(add) if _is_keyword(f) and f.lower() not in remove_kw}
        wanted = sorted(set(uids))
        store = self._store
        changed: list[_Row] = []
        infos, views, keymap = self._infos, self._views, self._keymap
        with store._lock, store._index.write() as db:
            self._counters(db)
            current = self._current(db)
            # Each change: (row, letters to set, letters to clear, index-only keywords).
            plans: list[tuple[_Row, str, str, str]] = []
            rows = self._rows_for(db, wanted, current)
            if add_kw or remove_kw or any(row.keywords for row in rows):
                # (keywords kept in the index alone get letters when their row changes)
                plans = self._keyword_plans(rows, add_sys, remove_sys, add_kw, remove_kw)
            else:
                for row in rows:
                    letters = row.letters
                    if (row.path.startswith("new/") or any(ch not in letters for ch in add_sys)
                            or any(ch in letters for ch in remove_sys)):
                        plans.append((row, add_sys, remove_sys, row.keywords))
            renamed: set[str] = set()
            updates = []
            for row, set_letters, clear_letters, index_only in plans:
                moved = self._rename(row.key, row.path, set_letters, clear_letters)
                if moved is None:
                    continue  # gone: the next sync forgets it
                target, letters, source = moved
                if source is not None:
                    renamed.update(("cur", source[:3]))
                if letters == row.letters and index_only == row.keywords and target == row.path:
                    continue
                modseq = row.modseq
                if letters != row.letters or index_only != row.keywords:
                    self._highest += 1
                    modseq = self._highest
                row = row.changed(target, letters, index_only, modseq)
                updates.append((target, letters, index_only, modseq, self._id, row.uid))
                changed.append(row)
            try:
                for sub in sorted(renamed):
                    fsync_dir(f"{self._dir}/{sub}")
            except OSError as exc:
                raise _storage(exc, f"fsync of {self._path}") from exc
            if updates:  # an UPDATE that changes nothing still counts as a change of the index
                db.executemany("UPDATE messages SET path = ?, letters = ?, keywords = ?, modseq = ?"
                               " WHERE mailbox = ? AND uid = ?", updates)
                db.execute("UPDATE mailboxes SET highestmodseq = ? WHERE id = ?",
                           (self._highest, self._id))
        if not changed:
            return []
        for row in changed:
            self._rows[row.uid] = row
        self._changed_rows()
        self._changed_by_us(current)
        made = {row.uid: self._info(row) for row in changed}
        if infos is not None and self._keymap is keymap and len(infos) == len(self._rows):
            # Flags changed, the messages did not: their list_view()s still hold.
            self._carry(tuple(made.get(info.uid, info) for info in infos), views)
        return list(made.values())

    def _carry(self, infos: tuple[MessageInfo, ...], views: dict[str, object] | None) -> None:
        """messages() of the changed _rows, made from what it was (QUIT's flag change of
        thousands of messages need not make the next session build every one again)."""
        self._infos, self._views = infos, views
        if self._snapshot is not None:
            self._snapshot.with_infos(infos, views)

    def _keyword_plans(self, rows: list[_Row], add_sys: str, remove_sys: str,
                       add_kw: dict[str, str], remove_kw: set[str]) -> list[tuple[_Row, str, str, str]]:
        """store_flags with keywords: what changes for each row, after giving letters to the
        keywords that will be set (see :meth:`_give_letters`)."""
        keymap = self._set_keymap(keywords.load(self._dir, self._keymap))
        wishes: list[tuple[_Row, dict[str, str]]] = []
        naming: dict[str, str] = {}
        for row in rows:
            have: dict[str, str] = {}
            for ch in row.letters:
                name = keymap.name(ch)
                if name is not None:
                    have[name.lower()] = name
            for name in row.keywords.split():
                have.setdefault(name.lower(), name)
            want = {key: name for key, name in have.items() if key not in remove_kw}
            for key, name in add_kw.items():
                want.setdefault(key, name)
            letters = row.letters
            if (want.keys() == have.keys() and not row.path.startswith("new/")
                    and all(ch in letters for ch in add_sys) and not any(ch in letters for ch in remove_sys)):
                continue
            wishes.append((row, want))
            naming.update(want)
        keymap = self._give_letters(naming, rows)
        clear = remove_sys + "".join(letter for key in remove_kw
                                     if (letter := keymap.letter(key)) is not None)
        plans = []
        for row, want in wishes:
            kw_letters = "".join(letter for name in want.values()
                                 if (letter := keymap.letter(name)) is not None)
            index_only = " ".join(sorted(name for name in want.values() if keymap.letter(name) is None))
            plans.append((row, add_sys + kw_letters, clear, index_only))
        return plans

    def _rename(self, key: str, current: str, add: str,
                remove: str) -> tuple[str, str, str | None] | None:
        """Rename the file of *key* to carry the letters *add* and not *remove*, starting from
        its name on disk (which another program may have changed); (new path, letters, the
        directory renamed from or None), or None if it is gone."""
        for _attempt in range(3):
            letters = edit_letters(letters_of(current), add, remove)
            target = "cur/" + cur_name(key, letters)
            if target == current:
                return target, letters, None
            try:
                os.rename(f"{self._dir}/{current}", f"{self._dir}/{target}")
                return target, letters, current[:3]
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
        infos, count = self._infos, len(self._rows)
        with store._lock, store._index.write() as db:
            self._counters(db)
            current = self._current(db)
            dirs: set[str] = set()
            for row in self._rows_for(db, sorted(set(uids)), current):
                path: str | None = row.path
                for _attempt in range(3):
                    if path is None:
                        break
                    try:
                        os.unlink(f"{self._dir}/{path}")
                        dirs.add(path[:3])
                        quota.add(store.root, -row.size, -1)  # the Maildir++ maildirsize
                        break
                    except FileNotFoundError:
                        path = self._locate(row.key)
                    except OSError as exc:
                        raise _storage(exc, f"removing {self._path / path}") from exc
                removed.append(row.uid)
            try:
                for sub in sorted(dirs):
                    fsync_dir(self._path / sub)
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
            self._changed_by_us(current)
            if infos is not None and count == len(infos):
                gone = set(removed)
                kept = tuple(info for info in infos if info.uid not in gone)
                if len(kept) == len(self._rows):
                    self._carry(kept, None)
        return removed

    def append(
        self, content: bytes, flags: Iterable[str] = (), internal_date: int | None = None
    ) -> MessageInfo:
        data = content.replace(b"\r\n", b"\n")
        key = f"{unique_base()},S={len(data)},W={crlf_size_of(data)}"
        tmp = self._path / "tmp" / key
        flags = frozenset(flags)
        system = "".join(FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS)
        names = {f.lower(): f for f in sorted(flags) if _is_keyword(f)}
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
        store = self._store
        with store._lock, store._index.write() as db:
            self._counters(db)
            current = self._current(db)
            keymap = self._give_letters(names, ()) if names else None
            kw_letters = index_only = ""
            if keymap is not None:
                kw_letters = "".join(letter for name in names.values()
                                     if (letter := keymap.letter(name)) is not None)
                index_only = " ".join(sorted(name for name in names.values()
                                             if keymap.letter(name) is None))
            letters = edit_letters("", system + kw_letters, "")
            path = "cur/" + cur_name(key, letters)
            try:
                os.rename(tmp, self._path / path)
                fsync_dir(self._path / "cur")
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _storage(exc, f"placing {self._path / path}") from exc
            uid = self._uidnext
            self._uidnext += 1
            self._highest += 1
            row = _Row(uid, key, path, letters, index_only, self._highest, date, len(data),
                       crlf_size_of(data))
            db.execute("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (self._id, uid, key, path, letters, index_only, row.modseq, date, row.size,
                        row.crlf_size))
            db.execute("UPDATE mailboxes SET uidnext = ?, highestmodseq = ? WHERE id = ?",
                       (self._uidnext, self._highest, self._id))
        self._rows[uid] = row
        self._changed_rows()
        self._changed_by_us(current)
        quota.add(store.root, row.size, 1)  # the Maildir++ maildirsize
        return self._info(row)

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
        self._base = None
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


