"""The per-user mailbox index: one SQLite database (WAL) beside the Maildir it describes.

The Maildir stays the truth about which messages exist and their flags (another program may add,
remove or re-flag files at any time); the index keeps what Maildir cannot: each folder's
UIDVALIDITY, UIDNEXT and HIGHESTMODSEQ, each message's UID, modseq and sizes (and the rare
keywords its name has no letter for, :mod:`.keywords`), and the expunged UIDs with their modseqs
(for IMAP QRESYNC's VANISHED, RFC 7162 3.2.10). It lives in the Maildir's root as
``postroom-index.sqlite``: Dovecot keeps its ``dovecot.index*`` there too, and Maildir readers
ignore plain files in the root (Python's ``mailbox.Maildir`` lists only directories as folders;
Dovecot 2.3 checks the entry type; mutt reads ``cur/`` and ``new/``).

Schema (version 1)::

    meta(key, value)                         schema_version
    mailboxes(id, name UNIQUE, uidvalidity, uidnext, highestmodseq, special_use)
    messages(mailbox, uid, key, path, letters, keywords, modseq, internaldate, size, crlf_size)
        PRIMARY KEY (mailbox, uid); UNIQUE (mailbox, key)
        key      the file name's unique part (before ":"), the message's identity
        path     "new/<name>" or "cur/<name>", relative to the folder, as last seen
        letters  the Maildir flag letters of that name (keywords among them as a..z, see
                 :mod:`.keywords`); keywords: space-separated, those without a letter (past 26)
    expunged(mailbox, uid, modseq)           PRIMARY KEY (mailbox, uid)

Change counter: ``meta('changes')`` goes up by one in every write transaction that changed a
row (:meth:`Index.write`), whichever process made it. Together with the directories' mtimes it
tells a process that the index is as it last saw it (:mod:`postroom.store.maildir` keeps each
mailbox's state between sessions on that basis). It is a row of the schema-1 ``meta`` table, so
no migration: a database without it counts from 0. (``PRAGMA data_version`` would not do: it
only compares within one connection, and a session opens its own.)

Durability: ``synchronous = FULL``, so a UID handed to a client is on disk before the client can
see it; a write happens only when something changed, so a sync that finds nothing new costs no
fsync. Concurrency: writers take the database lock with ``BEGIN IMMEDIATE`` and wait for each
other (busy timeout); readers in WAL mode never wait.

Losing the index (deleted, or unreadable: "file is not a database", "malformed") loses the UIDs:
the database is moved aside and rebuilt from the Maildir, and every folder gets a new, larger
UIDVALIDITY (RFC 9051 2.3.1.1), taken from ``postroom-uidvalidity``: a counter file kept apart
from the index (Dovecot's ``dovecot-uidvalidity`` does the same job) so that a rebuilt index can
never repeat a UIDVALIDITY a client has cached.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from postroom.errors import StorageError
from postroom.fsync import fsync_dir

INDEX_FILE: Final = "postroom-index.sqlite"
UIDVALIDITY_FILE: Final = "postroom-uidvalidity"
SCHEMA_VERSION: Final = 1
#: How long a writer waits for another process's transaction before failing (milliseconds).
BUSY_TIMEOUT_MS: Final = 10_000
#: UIDVALIDITY is an nz-number (RFC 9051 9): 1 .. 2**32 - 1.
MAX_UIDVALIDITY: Final = 2**32 - 1

_SCHEMA = """
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE mailboxes (
    id             INTEGER PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    uidvalidity    INTEGER NOT NULL,
    uidnext        INTEGER NOT NULL,
    highestmodseq  INTEGER NOT NULL,
    special_use    TEXT
);
CREATE TABLE messages (
    mailbox       INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL,
    key           TEXT NOT NULL,
    path          TEXT NOT NULL,
    letters       TEXT NOT NULL,
    keywords      TEXT NOT NULL,
    modseq        INTEGER NOT NULL,
    internaldate  INTEGER NOT NULL,
    size          INTEGER NOT NULL,
    crlf_size     INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
CREATE UNIQUE INDEX messages_key ON messages(mailbox, key);
CREATE TABLE expunged (
    mailbox  INTEGER NOT NULL REFERENCES mailboxes(id) ON DELETE CASCADE,
    uid      INTEGER NOT NULL,
    modseq   INTEGER NOT NULL,
    PRIMARY KEY (mailbox, uid)
) WITHOUT ROWID;
"""


class IndexCorrupt(StorageError):
    """SQLite says the index is not a database, or a damaged one: rebuild it."""


def is_corruption(exc: sqlite3.Error) -> bool:
    """True for damage (SQLITE_CORRUPT, SQLITE_NOTADB), not for a busy or failing disk."""
    return isinstance(exc, sqlite3.DatabaseError) and not isinstance(exc, sqlite3.OperationalError)



def next_uidvalidity(
    root: Path, owner: tuple[int, int] | None = None, clock: Callable[[], float] = time.time
) -> int:
    """A UIDVALIDITY larger than every one this Maildir has handed out: the clock's seconds, or
    one more than the last when the clock has not moved on. The counter file is replaced
    atomically and durably before the value is used."""
    counter = root / UIDVALIDITY_FILE
    try:
        last = int(counter.read_text(encoding="ascii").strip() or 0)
    except FileNotFoundError:
        last = 0
    except (OSError, ValueError):
        last = 0  # unreadable: the clock alone still moves forward
    value = max(int(clock()), last + 1)
    if value > MAX_UIDVALIDITY:
        value = 1 if last >= MAX_UIDVALIDITY else last + 1
    tmp = root / f"{UIDVALIDITY_FILE}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{value}\n".encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, counter)
        fsync_dir(root)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"writing {counter}: {exc.strerror or exc}") from exc
    return value


class Index:
    """The open index of one Maildir. Not thread-safe by itself: the store serialises calls."""

    def __init__(self, root: Path, owner: tuple[int, int] | None = None) -> None:
        self.root = root
        self.path = root / INDEX_FILE
        self.owner = owner
        #: The index was lost or unreadable and is being rebuilt: UIDVALIDITYs are new.
        self.rebuilt = False
        #: The change counter as of the last write transaction this object committed (None
        #: after a failed one): the state its caller just wrote, as other processes will see it.
        self.committed_changes: int | None = None
        self._db = self._open()

    # -- opening ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            if self.owner is not None:
                os.chown(self.path, *self.owner)  # SQLite gives -wal and -shm the file's owner
            if (self.root / UIDVALIDITY_FILE).exists():
                self.rebuilt = True  # an index existed before: its UIDs are gone
        db = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA foreign_keys = ON")
            self._migrate(db)
        except BaseException:
            db.close()
            raise
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise StorageError(f"{self.path}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"{self.path}: {exc.strerror or exc}") from exc
        self._move_aside()
        try:
            return self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{self.path}: cannot rebuild the index: {exc}") from exc

    def _move_aside(self) -> None:
        """Keep a damaged index for a post-mortem, out of SQLite's way."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        try:
            os.replace(self.path, self.path.with_name(f"{INDEX_FILE}.corrupt-{stamp}"))
            for suffix in ("-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot move the damaged index aside: {exc}") from exc
        self.rebuilt = True

    def _migrate(self, db: sqlite3.Connection) -> None:
        tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "meta" not in tables:
            db.execute("BEGIN IMMEDIATE")
            try:
                if not db.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone():
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None or row[0] != str(SCHEMA_VERSION):
            raise StorageError(f"{self.path}: unknown index schema version {row[0] if row else None}")

    def rebuild(self) -> None:
        """Throw the damaged index away and start an empty one (the caller re-syncs)."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._move_aside()
        try:
            self._db = self._connect()
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{self.path}: cannot rebuild the index: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    # -- transactions -------------------------------------------------------------------------
    def _error(self, exc: sqlite3.Error) -> StorageError:
        if is_corruption(exc):
            return IndexCorrupt(f"{self.path}: {exc}")
        return StorageError(f"{self.path}: {exc}")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed when the block ends normally,
        rolled back when it raises. SQLite errors become StorageError (IndexCorrupt for damage)."""
        db = self._db
        self.committed_changes = None
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        before = db.total_changes
        try:
            yield db
            if db.total_changes != before:
                db.execute("INSERT INTO meta VALUES ('changes', '1') ON CONFLICT (key)"
                           " DO UPDATE SET value = CAST(value AS INTEGER) + 1")
            changes = self._changes(db)
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._error(exc) from exc
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise self._error(exc) from exc
        self.committed_changes = changes

    @staticmethod
    def _changes(db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'changes'").fetchone()
        return 0 if row is None else int(row[0])

    def changes(self, db: sqlite3.Connection) -> int:
        """The change counter (see the module docstring), read in a transaction of *db*."""
        return self._changes(db)

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot for several reads."""
        db = self._db
        try:
            db.execute("BEGIN")
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            yield db
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
