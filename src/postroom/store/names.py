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

Other letters (Dovecot keeps keywords as lowercase letters, with a separate file saying which
letter is which) are kept as they are when we rewrite the info, never dropped.
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
_SIZE = re.compile(r",S=(\d+)(?=,|$)")
_CRLF_SIZE = re.compile(r",W=(\d+)(?=,|$)")


def parse_name(name: str) -> ParsedName:
    """Split *name* into its parts; never raises (a foreign name just tells less)."""
    key, colon, info = name.partition(":")
    letters = info[2:] if colon and info.startswith("2,") else ""
    size = crlf_size = None
    if "," in key:
        found = _SIZE.search(key)
        size = int(found.group(1)) if found else None
        found = _CRLF_SIZE.search(key)
        crlf_size = int(found.group(1)) if found else None
    head = _HEAD.match(key)
    if head is None:
        return ParsedName(key, letters, size, crlf_size, None, 0)
    micros = head.group(2)
    return ParsedName(key, letters, size, crlf_size, int(head.group(1)), int(micros) if micros else 0)


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


def apply_flags(letters: str, add: Iterable[str] = (), remove: Iterable[str] = ()) -> str:
    """*letters* with the letters of the flags in *add* set and those in *remove* cleared.

    Flags without a letter are ignored here (they are keywords, kept in the index only);
    letters we do not know stay as they are.
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
