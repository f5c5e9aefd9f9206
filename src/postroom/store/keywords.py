"""IMAP keywords in Maildir file names, the way Dovecot keeps them, so that they outlive the index.

A keyword ($Junk, $Forwarded's less common cousins, a user's own "work") has no letter of its own in
the Maildir spec. Dovecot gives each keyword of a folder one of the lowercase letters ``a``-``z``
(index 0-25) and writes the letters into the info part of the file name, after the uppercase
system flags (``...:2,RSab``: ASCII order puts them last); the file ``dovecot-keywords`` in the
folder's directory says which letter is which keyword, one ``<index> <name>`` line each::

    0 $Junk
    1 work

We read and write the same file, so Dovecot, and anything else that reads it, sees our keywords and
we see theirs; and a lost or rebuilt index gets every keyword back from the file names.

Rules we keep, as Dovecot does:

- Names are matched without regard to case (RFC 9051 2.3.2: flag names are not case-sensitive);
  the spelling in the file is the one reported.
- A letter, once given, keeps its meaning: entries are only added, never renumbered or removed, and
  a letter that appears in a file name but not in the file is never handed to a new keyword
  (whoever wrote it had a meaning for it).
- The file is replaced, never edited in place: written to ``dovecot-keywords.lock`` (created
  exclusively, the name Dovecot's own writer uses as its lock), fsynced, renamed over the file, and
  the directory fsynced, before any file name uses a new letter: a crash never leaves a letter whose
  name is lost.
- Twenty-six is the limit. Keywords past it, and names the file cannot hold (empty, or with white
  space or control characters), stay in the index alone (:mod:`.index`), like Dovecot's.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from postroom.errors import StorageError
from postroom.fsync import fsync_dir

KEYWORDS_FILE: Final = "dovecot-keywords"
LOCK_SUFFIX: Final = ".lock"
#: a..z
MAX_KEYWORDS: Final = 26
FIRST_LETTER: Final = "a"
#: Someone else's lock older than this was left by a crash (Dovecot uses the same 2 minutes).
STALE_LOCK_SECONDS: Final = 120.0
#: How long a writer waits for someone else's lock before it gives up on new letters this time.
LOCK_WAIT_SECONDS: Final = 1.0
_LETTERS: Final = frozenset("abcdefghijklmnopqrstuvwxyz")


def letter_of_index(index: int) -> str:
    return chr(ord(FIRST_LETTER) + index)


def is_keyword_letter(ch: str) -> bool:
    return ch in _LETTERS


def storable(name: str) -> bool:
    """True when *name* fits a line of the file (and the index's space-separated column)."""
    return bool(name) and name.isprintable() and not any(ch.isspace() for ch in name)


@dataclass
class KeywordMap:
    """One folder's letter <-> keyword table, as last read from (or written to) its file."""

    names: list[str | None] = field(default_factory=lambda: [None] * MAX_KEYWORDS)
    #: (st_ino, st_mtime_ns, st_size) of the file it came from; None when there was no file.
    stamp: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        self._by_name = {name.lower(): i for i, name in enumerate(self.names) if name is not None}

    def letter(self, name: str) -> str | None:
        """The letter of keyword *name* (any case), None when it has none."""
        index = self._by_name.get(name.lower())
        return None if index is None else letter_of_index(index)

    def name(self, letter: str) -> str | None:
        """The keyword that *letter* stands for, None when the file does not say."""
        index = ord(letter) - ord(FIRST_LETTER)
        if 0 <= index < MAX_KEYWORDS:
            return self.names[index]
        return None

    def add(self, name: str, avoid: Iterable[str] = ()) -> str | None:
        """Give *name* the first free letter that is not in *avoid* (letters found in file
        names); None when none is left. The caller writes the file before using the letter."""
        taken = set(avoid)
        for index, current in enumerate(self.names):
            if current is None and letter_of_index(index) not in taken:
                self.names[index] = name
                self._by_name[name.lower()] = index
                return letter_of_index(index)
        return None

    def copy(self) -> KeywordMap:
        return KeywordMap(list(self.names), self.stamp)

    def render(self) -> bytes:
        return "".join(f"{i} {name}\n" for i, name in enumerate(self.names)
                       if name is not None).encode("utf-8")


def parse(data: bytes) -> list[str | None]:
    """The table in *data*; lines that make no sense are skipped, as Dovecot skips them."""
    names: list[str | None] = [None] * MAX_KEYWORDS
    text = data.decode("utf-8", "replace")
    for line in text.split("\n"):
        number, space, name = line.partition(" ")
        if not space or not number.isdigit() or not name:
            continue
        index = int(number)
        if index < MAX_KEYWORDS:
            names[index] = name
    return names


def stamp_of(directory: str) -> tuple[int, int, int] | None:
    """What tells whether the file changed since it was read (None: there is no file)."""
    try:
        st = os.stat(f"{directory}/{KEYWORDS_FILE}")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StorageError(f"examining {directory}/{KEYWORDS_FILE}: {exc.strerror or exc}") from exc
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def load(directory: str, known: KeywordMap | None = None) -> KeywordMap:
    """The folder's table; *known* itself when the file has not changed since it was read."""
    stamp = stamp_of(directory)
    if known is not None and known.stamp == stamp:
        return known
    if stamp is None:
        return KeywordMap()
    path = f"{directory}/{KEYWORDS_FILE}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            data = os.read(fd, max(st.st_size, 0) + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        return KeywordMap()
    except OSError as exc:
        raise StorageError(f"reading {path}: {exc.strerror or exc}") from exc
    return KeywordMap(parse(data), (st.st_ino, st.st_mtime_ns, st.st_size))



def _take_lock(lock: str) -> int | None:
    """The lock file, created exclusively; None when someone else holds it past our wait."""
    deadline = time.monotonic() + LOCK_WAIT_SECONDS
    while True:
        try:
            return os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            continue  # let go just now
        if age > STALE_LOCK_SECONDS:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            continue
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def write(directory: str, table: KeywordMap, owner: tuple[int, int] | None = None) -> bool:
    """Replace the folder's file with *table*, durably (see the module docstring). False when
    another writer's lock stayed: the caller keeps its new keywords in the index this time."""
    path = f"{directory}/{KEYWORDS_FILE}"
    lock = path + LOCK_SUFFIX
    try:
        fd = _take_lock(lock)
    except OSError as exc:
        raise StorageError(f"locking {path}: {exc.strerror or exc}") from exc
    if fd is None:
        return False
    try:
        try:
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(table.render())
            while view:
                view = view[os.write(fd, view):]
            # Dovecot rereads the file only when its mtime (in seconds) moved on: make sure it
            # does, even for a second write within the same second.
            before = table.stamp[1] // 1_000_000_000 if table.stamp is not None else -1
            st = os.fstat(fd)
            if st.st_mtime_ns // 1_000_000_000 <= before:
                os.utime(fd, ns=(st.st_atime_ns, (before + 1) * 1_000_000_000))
            os.fsync(fd)
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(lock, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise StorageError(f"writing {path}: {exc.strerror or exc}") from exc
    table.stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
    return True
