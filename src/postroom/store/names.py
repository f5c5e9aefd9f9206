"""Maildir file names: the unique part, Dovecot's size fields, and the flags in the info.

A Maildir file name is ``<unique>[:<info>]`` (cr.yp.to/proto/maildir.html). The unique part is
chosen once, at delivery, and never changes; the info (``2,`` then flag letters in ASCII order)
is rewritten whenever the flags change, and is absent while the file sits in ``new/``. The unique
part is therefore a message's identity on disk: the index keys its rows by it, and POP3's UIDL is
derived from it, so both survive a rebuilt index and another program's flag changes.

Inside the unique part, Dovecot's extension fields ``,S=<size>`` (the file's size) and
``,W=<size>`` (the size with CRLF line ends, RFC 822 size) save a ``stat()`` and a read; our own
delivery writes both (:mod:`postroom.delivery.maildir`). The leading ``<seconds>.M<micros>``
(Maildir's and Python's ``mailbox.Maildir``'s form) is the delivery time, used to order new
messages and as the internal date.

Flag letters (the Maildir spec, with the IMAP flag each stands for, as Dovecot maps them)::

    D \\Draft   F \\Flagged   P $Forwarded   R \\Answered   S \\Seen   T \\Deleted

Keywords are lowercase letters ``a``-``z`` after the system flags, with the folder's
``dovecot-keywords`` file saying which letter is which (:mod:`.keywords`). Letters we do not know
are kept as they are when we rewrite the info, never dropped.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: Maildir flag letter -> IMAP flag (RFC 9051 2.3.2 system flags; $Forwarded is RFC 5788's keyword).
LETTER_FLAGS: Final[dict[str, str]] = {
    "D": "\\Draft",
    "F": "\\Flagged",
    "P": "$Forwarded",
    "R": "\\Answered",
    "S": "\\Seen",
    "T": "\\Deleted",
}
#: IMAP flag -> Maildir letter.
FLAG_LETTERS: Final[dict[str, str]] = {flag: letter for letter, flag in LETTER_FLAGS.items()}

SEEN: Final = "\\Seen"
ANSWERED: Final = "\\Answered"
FLAGGED: Final = "\\Flagged"
DELETED: Final = "\\Deleted"
DRAFT: Final = "\\Draft"
FORWARDED: Final = "$Forwarded"


@dataclass(frozen=True, slots=True)
class ParsedName:
    """What a Maildir file name tells without opening the file."""

    key: str  # the unique part, before ":"
    letters: str  # the flag letters after ":2," ("" when there is no "2," info)
    size: int | None  # ,S= field
    crlf_size: int | None  # ,W= field
    seconds: int | None  # leading delivery time
    micros: int  # the M field of "<seconds>.M<micros>...", else 0


_HEAD = re.compile(r"(\d{1,12})\.(?:M(\d{1,7}))?")


def key_fields(key: str) -> tuple[int | None, int | None, int | None, int]:
    """(size, crlf_size, seconds, micros) of the unique part *key*: what :func:`parse_name`
    reports, without building it (a sync asks this of every new file, 10,000 times on the first
    access to a large Maildir)."""
    size = crlf_size = None
    if "," in key:
        for part in key.split(",")[1:]:
            if size is None and part.startswith("S=") and part[2:].isdecimal():
                size = int(part[2:])
            elif crlf_size is None and part.startswith("W=") and part[2:].isdecimal():
                crlf_size = int(part[2:])
    head = _HEAD.match(key)
    if head is None:
        return size, crlf_size, None, 0
    seconds, micros = head.groups()
    return size, crlf_size, int(seconds), int(micros) if micros else 0


def parse_name(name: str) -> ParsedName:
    """Split *name* into its parts; never raises (a foreign name just tells less)."""
    key, colon, info = name.partition(":")
    letters = info[2:] if colon and info.startswith("2,") else ""
    size, crlf_size, seconds, micros = key_fields(key)
    return ParsedName(key, letters, size, crlf_size, seconds, micros)


def letters_of(name: str) -> str:
    """Just the flag letters of *name* (the common case, cheaply)."""
    if ":" not in name:
        return ""
    info = name.partition(":")[2]
    return info[2:] if info.startswith("2,") else ""


def cur_name(key: str, letters: str) -> str:
    """The name in ``cur/`` for *key* with flag *letters* (sorted, as the spec asks)."""
    if len(letters) < 2:
        return f"{key}:2,{letters}"
    return f"{key}:2,{''.join(sorted(set(letters)))}"


@functools.lru_cache(maxsize=1024)
def flags_of(letters: str) -> frozenset[str]:
    """The IMAP flags that the flag letters stand for (unknown letters are skipped). Cached:
    a mailbox has few distinct combinations, and its every message asks."""
    return frozenset(LETTER_FLAGS[ch] for ch in letters if ch in LETTER_FLAGS)


def edit_letters(letters: str, add: str, remove: str) -> str:
    """*letters* with those in *add* set and those in *remove* cleared, in ASCII order."""
    current = set(letters)
    current.difference_update(remove)
    current.update(add)
    return "".join(sorted(current))


def apply_flags(letters: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> str:
    """*letters* with the letters of the flags in *add* set and those in *remove* cleared.

    Flags without a letter of their own are ignored here (keywords: their letters depend on the
    folder, :mod:`.keywords`); letters we do not know stay as they are.
    """
    current = set(letters)
    current.difference_update(FLAG_LETTERS[f] for f in remove if f in FLAG_LETTERS)
    current.update(FLAG_LETTERS[f] for f in add if f in FLAG_LETTERS)
    return "".join(sorted(current))


def crlf_size_of(data: bytes) -> int:
    """The size *data* has with every line ending as CRLF (RFC 822 size, Dovecot's W=).

    An LF not preceded by CR becomes CRLF; CRLF stays; a bare CR is one octet as it is.
    """
    return len(data) + data.count(b"\n") - data.count(b"\r\n")
