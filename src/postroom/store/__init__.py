"""Mailboxes for POP3 and IMAP: Maildir files on disk plus an index with UIDs, flags and modseqs.

- :mod:`.base`: the interface any backend implements (:class:`MailStore`, :class:`Mailbox`), the
  values it returns and its errors.
- :mod:`.maildir`: the default backend, :class:`MaildirStore` (Maildir + SQLite index).
- :mod:`.index`: the SQLite index: schema, rebuild, UIDVALIDITY counter.
- :mod:`.names`: Maildir file names (unique part, ``S=``/``W=`` sizes, flag letters).
- :mod:`.keywords`: keywords as letters in file names, with Dovecot's ``dovecot-keywords`` table.
- :mod:`.folders`: Maildir++ folders, modified UTF-7 names, special-use roles, and
  :func:`create_default_folders` for new accounts.
"""

from postroom.store.base import (
    FolderError,
    FolderInfo,
    Mailbox,
    MailboxInUse,
    MailStore,
    MessageGone,
    MessageInfo,
    SessionLock,
    StoreError,
    SyncResult,
    Usage,
)
from postroom.store.folders import DEFAULT_FOLDERS, INBOX, create_default_folders
from postroom.store.maildir import MaildirMailbox, MaildirStore, open_inbox, open_store

__all__ = [
    "DEFAULT_FOLDERS",
    "INBOX",
    "FolderError",
    "FolderInfo",
    "MailStore",
    "Mailbox",
    "MailboxInUse",
    "MaildirMailbox",
    "MaildirStore",
    "MessageGone",
    "MessageInfo",
    "SessionLock",
    "StoreError",
    "SyncResult",
    "Usage",
    "create_default_folders",
    "open_inbox",
    "open_store",
]
