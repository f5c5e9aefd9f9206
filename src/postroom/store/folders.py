"""Maildir++ folders: names on disk, special-use roles, and the default folders of a new account.

Maildir++ (Courier's layout, which Dovecot, mutt and Python's ``mailbox.Maildir`` read) keeps
INBOX in the Maildir itself and every other folder as a Maildir in a directory directly below it,
named ``.`` + the folder name, levels separated by ``.``: ``Archive.2024`` lives in
``.Archive.2024/``. A folder directory holds an empty ``maildirfolder`` file (Maildir++ marks
folders with it; Courier's and Dovecot's quota code look for it).

Names with characters outside printable ASCII are stored in IMAP's modified UTF-7 (RFC 3501
5.1.3), as Dovecot does by default, so that a folder made by one of us shows the same in the other.

Special-use roles (RFC 6154): the default folders get theirs by name; a role given when a folder
is created is kept in the index (:mod:`postroom.store.index`).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Final

from postroom.errors import StorageError
from postroom.fsync import fsync_dir
from postroom.store.base import FolderError

INBOX: Final = "INBOX"
#: The folders every new account gets, with their RFC 6154 roles.
DEFAULT_FOLDERS: Final[dict[str, str]] = {
    "Drafts": "\\Drafts",
    "Sent": "\\Sent",
    "Trash": "\\Trash",
    "Junk": "\\Junk",
}
#: Every role RFC 6154 2 defines (\All and \Flagged are virtual; we accept them as given).
SPECIAL_USES: Final = frozenset(
    {"\\All", "\\Archive", "\\Drafts", "\\Flagged", "\\Junk", "\\Sent", "\\Trash"}
)
#: The file that marks a Maildir++ folder.
FOLDER_MARK: Final = "maildirfolder"
#: A folder name's longest form on disk: NAME_MAX (255) minus the leading dot.
MAX_NAME_OCTETS: Final = 254


def _mutf7_b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-16-be")).decode("ascii").rstrip("=").replace("/", ",")


def encode_mutf7(name: str) -> str:
    """*name* in modified UTF-7 (RFC 3501 5.1.3): printable ASCII as is, "&" as "&-", every
    other run as "&" + modified base64 of its UTF-16 + "-"."""
    out: list[str] = []
    run: list[str] = []
    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            if run:
                out.append("&" + _mutf7_b64("".join(run)) + "-")
                run.clear()
            out.append("&-" if ch == "&" else ch)
        else:
            run.append(ch)
    if run:
        out.append("&" + _mutf7_b64("".join(run)) + "-")
    return "".join(out)


def decode_mutf7(text: str) -> str:
    """The inverse of :func:`encode_mutf7`; ValueError when *text* is not valid modified UTF-7."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch != "&":
            out.append(ch)
            i += 1
            continue
        end = text.find("-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified base64")
        chunk = text[i + 1 : end]
        if not chunk:
            out.append("&")
        else:
            padded = chunk.replace(",", "/") + "=" * (-len(chunk) % 4)
            try:
                out.append(base64.b64decode(padded, validate=True).decode("utf-16-be"))
            except (ValueError, UnicodeDecodeError):
                raise ValueError("bad modified base64") from None
        i = end + 1
    return "".join(out)


def check_folder_name(name: str) -> str:
    """*name* if it may name a folder other than INBOX, else :class:`FolderError`.

    Levels are separated by "."; each level is non-empty and free of "/" and control characters.
    """
    if not name or name.upper() == INBOX or name.upper().startswith(INBOX + "."):
        raise FolderError(f"{name!r}: not a name for a new folder")
    if any(not level for level in name.split(".")):
        raise FolderError(f"{name!r}: empty level in folder name")
    if "/" in name or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in name):
        raise FolderError(f"{name!r}: '/' and control characters are not allowed in folder names")
    if len(encode_mutf7(name).encode("ascii")) > MAX_NAME_OCTETS:
        raise FolderError(f"{name!r}: folder name too long")
    return name


def folder_path(root: Path, name: str) -> Path:
    """Where folder *name* of the Maildir at *root* lives (INBOX is *root* itself)."""
    if name.upper() == INBOX:
        return root
    return root / ("." + encode_mutf7(check_folder_name(name)))


def folder_name(entry: str) -> str | None:
    """The folder a directory entry of the Maildir root names, or None (not a folder)."""
    if len(entry) < 2 or not entry.startswith(".") or entry in ("..",):
        return None
    try:
        name = decode_mutf7(entry[1:])
    except ValueError:
        return None
    try:
        return check_folder_name(name)
    except FolderError:
        return None


def default_role(name: str) -> str | None:
    """The special-use role a folder has by its name alone (the default folders)."""
    return DEFAULT_FOLDERS.get(name)



def make_folder(root: Path, name: str, owner: tuple[int, int] | None = None) -> bool:
    """Create folder *name* (its directory, ``tmp new cur`` and ``maildirfolder``) below the
    Maildir at *root*, durably; False when it exists already. Parent levels are not created
    (Maildir++ folders are flat directories; "a.b" does not need "a")."""
    path = folder_path(root, name)
    try:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            if (path / "cur").is_dir():
                return False
        for sub in ("tmp", "new", "cur"):
            os.makedirs(path / sub, 0o700, exist_ok=True)
        mark = path / FOLDER_MARK
        fd = os.open(mark, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        if owner is not None:
            for item in (path, path / "tmp", path / "new", path / "cur", mark):
                os.chown(item, *owner)
        fsync_dir(path)
        fsync_dir(root)
    except OSError as exc:
        raise StorageError(f"creating folder {path}: {exc.strerror or exc}") from exc
    return True


def create_default_folders(maildir: Path, owner: tuple[int, int] | None = None) -> list[str]:
    """Give the account whose Maildir is *maildir* its Drafts, Sent, Trash and Junk folders
    (RFC 6154 roles by name); returns the folders made, [] when all existed. The accounts layer
    calls it when a user is added; *owner* is the ``(uid, gid)`` new files get (when run as root).
    Needs only the Maildir itself; the index picks the folders up when it is next opened."""
    if not (maildir / "cur").is_dir():
        raise StorageError(f"{maildir}: not a Maildir (no cur/)")
    return [name for name in DEFAULT_FOLDERS if make_folder(maildir, name, owner)]
