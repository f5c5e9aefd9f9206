"""The mailbox store as POP3 and IMAP see it: typed :class:`Protocol` s any backend can implement.

The Maildir + SQLite backend (:mod:`postroom.store.maildir`) is the default; a backend with
metadata in PostgreSQL and bodies in an object store implements the same two protocols::

    MailStore               one user's mailboxes (folders), their usage
    └── Mailbox             one folder: stable UIDs, flags, modseqs, message bodies

What a mailbox guarantees, whatever the backend:

- UIDs (RFC 9051 2.3.1.1) rise strictly in the order messages are added and are never reused
  while ``uidvalidity`` stays the same; when a backend cannot keep them (its index was lost), it
  chooses a new, larger ``uidvalidity``.
- Every change to a message's flags, and every expunge, takes a new modification sequence from
  the mailbox's counter (RFC 7162 3.1, for IMAP CONDSTORE/QRESYNC).
- ``messages()`` is the state as of the last :meth:`Mailbox.sync`; mail added by other sessions
  (or other programs) appears at the next sync, never in between. A POP3 session syncs once, at
  login, so its message list stays fixed for the session (RFC 1939 4: the maildrop is locked).
- ``key`` is a message's stable identity on the backend (for Maildir the file's unique name); it
  survives a rebuilt index, so POP3's UIDL is derived from it.

Sizes: ``size`` is what the backend stores (Maildir: the file, LF line ends), ``crlf_size`` the
RFC 822 size with CRLF line ends: what POP3 LIST reports and IMAP RFC822.SIZE.

Errors::

    PostroomError
    ├── StorageError            the backend failed (disk, database); try again later
    └── StoreError              a request the store refuses
        ├── MailboxInUse        another session holds the exclusive lock (POP3 [IN-USE])
        ├── MessageGone         the message was expunged by another session or program
        └── FolderError         bad folder name, no such folder, already exists
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO, NamedTuple, Protocol, TypeVar

from postroom.errors import PostroomError


class StoreError(PostroomError):
    """A mailbox operation the store refuses."""


class MailboxInUse(StoreError):
    """Another session holds this mailbox's exclusive lock (RFC 2449 8.1.1 [IN-USE])."""


class MessageGone(StoreError):
    """The message no longer exists: another session or program expunged it."""


class FolderError(StoreError):
    """A folder name is invalid, unknown, or already taken."""


class MessageInfo(NamedTuple):
    """One message as the index knows it. A named tuple, not a frozen dataclass: a sync of a
    large mailbox makes one per message, and a tuple is made in a third of the time."""

    uid: int
    key: str  # stable identity on the backend (Maildir: the unique part of the file name)
    flags: frozenset[str]  # IMAP system flags ("\\Seen" ...) and keywords ("$Forwarded", "work")
    modseq: int
    internal_date: int  # seconds since the epoch: when the message arrived
    size: int  # octets as stored
    crlf_size: int  # octets with CRLF line ends (RFC 822 size)


@dataclass(frozen=True, slots=True)
class SyncResult:
    """What :meth:`Mailbox.sync` found changed since the previous sync of the same
    :class:`Mailbox` object (its view), whoever made the change: this session, another
    session, or another program. The first sync of a new object reports every message added."""

    added: tuple[int, ...] = ()  # UIDs new to this view
    vanished: tuple[int, ...] = ()  # UIDs of this view whose message is gone
    changed: tuple[int, ...] = ()  # UIDs of this view with a new modseq (flags changed elsewhere)
    rebuilt: bool = False  # the index was lost and rebuilt: uidvalidity is new


@dataclass(frozen=True, slots=True)
class FolderInfo:
    """A folder (mailbox, in IMAP's words) and its special-use role (RFC 6154), if any."""

    name: str  # "INBOX", "Sent", "Archive.2024" ("." separates levels, as Maildir++ does)
    special_use: str | None  # "\\Sent", "\\Drafts", "\\Trash", "\\Junk", "\\Archive" ...


@dataclass(frozen=True, slots=True)
class Usage:
    """What one user's mailboxes hold, for quotas."""

    messages: int
    octets: int  # stored size


_View = TypeVar("_View")


class SessionLock(Protocol):
    """An exclusive hold on a mailbox for one session; :meth:`release` ends it."""

    def release(self) -> None: ...


class Mailbox(Protocol):
    """One folder of one user. Methods do blocking I/O: call them off the event loop."""

    @property
    def name(self) -> str: ...

    @property
    def uidvalidity(self) -> int: ...

    @property
    def uidnext(self) -> int: ...

    @property
    def highest_modseq(self) -> int: ...

    def sync(self, *, move_new: bool = True) -> SyncResult:
        """Bring the index in line with the stored messages: assign UIDs to new ones, forget
        vanished ones, take flag changes made by other programs. With *move_new* the messages
        are also marked as seen by a mail client (Maildir: moved from ``new/`` to ``cur/``)."""
        ...

    def messages(self) -> Sequence[MessageInfo]:
        """Every message as of the last sync, in UID order."""
        ...

    def list_view(self, name: str, make: Callable[[Sequence[MessageInfo]], _View]) -> _View:
        """``make(messages())``, made once and kept while the mailbox holds the same messages
        (flag changes through this object keep it; anything else may drop it). So *make* may use
        only what never changes for a message (uid, key, sizes, internal date), not flags or
        modseqs, and must return something immutable: the backend may hand it to later sessions
        of the same mailbox (POP3 keeps its sizes and UIDLs so, instead of making them at every
        login)."""
        ...

    def open_message(self, uid: int) -> BinaryIO:
        """The stored message (LF line ends for Maildir), open for reading.
        Raises :class:`MessageGone` when it no longer exists."""
        ...

    def read_message(self, uid: int, limit: int) -> bytes:
        """At most *limit* octets from the start of the stored message, in one call (cheaper
        than :meth:`open_message` for the many small messages); :class:`MessageGone` when it
        no longer exists."""
        ...

    def store_flags(
        self, uids: Iterable[int], add: Iterable[str] = (), remove: Iterable[str] = ()
    ) -> list[MessageInfo]:
        """Add and remove flags; returns the messages whose flags changed (new modseqs).
        UIDs that no longer exist are skipped."""
        ...

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Remove messages for good, durably; returns the UIDs removed."""
        ...

    def append(
        self, content: bytes, flags: Iterable[str] = (), internal_date: int | None = None
    ) -> MessageInfo:
        """Store a new message (IMAP APPEND, a copy to Sent); *content* in CRLF or LF form."""
        ...

    def lock_exclusive(self, purpose: str = "pop3") -> SessionLock:
        """Hold the mailbox for one session (RFC 1939 8: POP3 locks the maildrop);
        raises :class:`MailboxInUse` when another session holds it."""
        ...

    def close(self) -> None: ...


class MailStore(Protocol):
    """One user's mailboxes."""

    def folders(self) -> list[FolderInfo]:
        """INBOX first, then every folder by name."""
        ...

    def create_folder(self, name: str, special_use: str | None = None) -> FolderInfo: ...

    def delete_folder(self, name: str) -> None: ...

    def mailbox(self, name: str = "INBOX") -> Mailbox:
        """The folder *name* (FolderError when it does not exist)."""
        ...

    def usage(self) -> Usage: ...

    def close(self) -> None: ...
