"""Quota accounting in Maildir++'s ``maildirsize`` file, in the root of a user's Maildir.

The format is the one Courier defined (README.maildirquota) and Dovecot's ``maildir`` quota backend,
Exim's ``maildir_use_size_file`` and maildrop read and write too, so the figure stays shared with
any of them that deliver to or expunge from the same Maildir, and with our other processes:

* the first line is the quota definition, comma-separated members ``<n>S`` (octets) and ``<n>C``
  (messages), e.g. ``1000000S,1000C``; 0 or an absent member means no limit of that kind;
* every further line holds two integers separated by white space, octets and messages, negative
  for removals (Courier pads them); the usage is their sum.

A change is one appended line: one ``write()`` on a descriptor opened with ``O_APPEND``, so lines
of concurrent writers never interleave, and the file is never created by an append (a missing file
is counted from scratch by the next reader, which sees every message then). Reading costs one small
file; counting the Maildir is left to :func:`recalc`, which scans ``new/`` and ``cur/`` of the
INBOX and of every Maildir++ folder (``.Trash`` included, as Dovecot and Exim count it), writes the
new file in ``tmp/`` and renames it into place. Following the spec, the reader recalculates when
the file is missing, unparseable or 5120 octets long or longer, or defines another quota than the
account's; and when its figure says the mailbox is over quota, if it holds more than one usage line
or is older than 15 minutes: a mailbox is never called full on a figure that was not counted
recently, while a full one is counted at most once per 15 minutes.

Nothing here is fsynced or locked: the file is advisory, a recalculation repairs what a crash or a
race lost (an append that lands between a recalculation's scan and its rename), and a delivery
never waits for it.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

#: The file's name, in the Maildir's root (Maildir readers ignore plain files there).
FILENAME: Final = "maildirsize"
#: A file this long or longer is rewritten (Courier's limit: the appended lines have piled up).
MAX_LENGTH: Final = 5120
#: An over-quota figure in a file older than this (seconds) is counted again before it refuses.
STALE_AFTER: Final = 15 * 60
#: Scans repeated at most this often when a directory changed while it was being counted.
_SCAN_TRIES: Final = 3

_MEMBER = re.compile(rb"(\d+)([A-Za-z])")
_USAGE_LINE = re.compile(rb"[ \t]*(-?\d+)[ \t]+(-?\d+)[ \t\r]*")
_SIZE_FIELD = re.compile(r",S=(\d+)")

logger = logging.getLogger("postroom.quota")


@dataclass(frozen=True, slots=True)
class Definition:
    """The quota on the first line: octet and message limits, 0 for none."""

    octets: int = 0
    messages: int = 0

    def __str__(self) -> str:
        # Dovecot's form: "0S" rather than an empty line when there is no limit at all.
        members = [f"{self.octets}S"] if self.octets or not self.messages else []
        if self.messages:
            members.append(f"{self.messages}C")
        return ",".join(members)

    @classmethod
    def parse(cls, line: bytes) -> Definition | None:
        """The definition in *line*, or None when it is not one. Members of a kind other than S
        and C are passed over (Exim does the same), so a future kind does not break us."""
        text = line.strip(b" \t\r")
        octets = messages = 0
        if not text:
            return cls()
        for member in text.split(b","):
            match = _MEMBER.fullmatch(member.strip(b" \t"))
            if match is None:
                return None
            value, kind = int(match[1]), match[2].upper()
            if kind == b"S":
                octets = value
            elif kind == b"C":
                messages = value
        return cls(octets, messages)


@dataclass(frozen=True, slots=True)
class Reading:
    """What one ``maildirsize`` says."""

    definition: Definition
    octets: int
    messages: int
    lines: int  # usage lines after the definition
    mtime: float  # when the file was last written (seconds since the epoch)
    length: int = 0  # of the file, in octets; from MAX_LENGTH on only the definition is read

    def over(self, octets: int, messages: int = 1) -> bool:
        """Would *octets* in *messages* more take the mailbox past its definition?"""
        limits = self.definition
        return bool(
            (limits.octets and self.octets + octets > limits.octets)
            or (limits.messages and self.messages + messages > limits.messages)
        )


def parse(data: bytes, mtime: float = 0.0) -> Reading | None:
    """The content of a ``maildirsize``; None when it is not one (then it is recalculated).

    Text after the last LF is a line still being appended, or torn by a crash: it is not counted
    yet (Dovecot does the same). Negative totals mean the file lost lines: not trusted either.
    """
    if b"\0" in data:
        return None
    lines = data.split(b"\n")
    lines.pop()  # b"" after a final LF, else the unfinished last line
    if not lines:
        return None
    definition = Definition.parse(lines[0])
    if definition is None:
        return None
    octets = messages = 0
    for line in lines[1:]:
        match = _USAGE_LINE.fullmatch(line)
        if match is None:
            return None
        octets += int(match[1])
        messages += int(match[2])
    if octets < 0 or messages < 0:
        return None
    return Reading(definition, octets, messages, len(lines) - 1, mtime, len(data))


def read(root: Path) -> Reading | None:
    """The ``maildirsize`` of the Maildir at *root* as it is now; None when it is missing or
    unparseable. Of a file of :data:`MAX_LENGTH` octets or more only the definition is read (it
    is recalculated anyway, keeping that). Other ``OSError`` s propagate."""
    try:
        fd = os.open(root / FILENAME, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        data = os.read(fd, MAX_LENGTH)  # a regular file gives all it has (a torn end is dropped)
    finally:
        os.close(fd)
    length = max(len(data), st.st_size)
    if length >= MAX_LENGTH:
        first, newline, _ = data.partition(b"\n")
        definition = Definition.parse(first) if newline else None
        if definition is None:
            return None
        return Reading(definition, 0, 0, 0, st.st_mtime, length)
    return parse(data, st.st_mtime)


def unusable(reading: Reading | None, definition: Definition | None) -> bool:
    """The file cannot be used as it is: missing, unparseable, too long, or defining another quota
    than *definition* (None: any). It is recalculated whatever the figure."""
    if reading is None or reading.length >= MAX_LENGTH:
        return True
    return definition is not None and reading.definition != definition


def doubtful(reading: Reading, incoming: int, now: float) -> bool:
    """The figure would refuse *incoming* more octets but was not counted recently: more than one
    usage line, or older than :data:`STALE_AFTER`. The spec wants it counted before it refuses."""
    if not reading.over(incoming, 1 if incoming else 0):
        return False
    return reading.lines > 1 or now - reading.mtime > STALE_AFTER


def needs_recalc(reading: Reading | None, definition: Definition | None, incoming: int,
                 now: float) -> bool:
    """Whether *reading* must be counted again before a delivery of *incoming* octets is judged
    against *definition* (None: whatever the file defines). The spec's rules; see the module."""
    return unusable(reading, definition) or (reading is not None and doubtful(reading, incoming, now))


def usage(root: Path, definition: Definition | None = None, incoming: int = 0, *,
          now: float | None = None) -> tuple[int, int]:
    """(octets, messages) held by the Maildir at *root*, from its ``maildirsize``, recalculated
    first when the rules say so (blocking: a recalculation lists every folder). With no
    *definition* the file's own is kept; when there is none to keep, the Maildir is only counted."""
    reading = read(root)
    when = time.time() if now is None else now
    if needs_recalc(reading, definition, incoming, when):
        keep = definition if definition is not None else reading.definition if reading else None
        if keep is None:
            return scan(root)
        reading = recalc(root, keep)
    assert reading is not None
    return reading.octets, reading.messages


def add(root: Path, octets: int, messages: int) -> bool:
    """Append ``<octets> <messages>`` (negative for removals) to the ``maildirsize`` of *root*;
    False when there is none (the next reader counts from scratch). Never raises: a mailbox
    must not lose a delivery or an expunge over its accounting, which a recalculation repairs."""
    if not octets and not messages:
        return False
    try:
        fd = os.open(root / FILENAME, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        logger.warning("quota: cannot open %s: %s", root / FILENAME, exc)
        return False
    try:
        os.write(fd, b"%d %d\n" % (octets, messages))
    except OSError as exc:
        logger.warning("quota: cannot append to %s: %s", root / FILENAME, exc)
        return False
    finally:
        os.close(fd)
    return True


def recalc(root: Path, definition: Definition) -> Reading:
    """Count the Maildir at *root* and replace its ``maildirsize`` with *definition* and one
    usage line (a new file in ``tmp/``, renamed into place). Nothing is written when the Maildir
    has no ``tmp/`` yet (no delivery has made it). Run as root, the file gets the owner of the
    Maildir, so the server that dropped its privileges can still replace it."""
    octets, messages = scan(root)
    now = time.time()
    content = f"{definition}\n{octets} {messages}\n".encode()
    reading = Reading(definition, octets, messages, 1, now, len(content))
    tmp = root / "tmp" / f"{time.time_ns()}.P{os.getpid()}T{threading.get_ident()}.{FILENAME}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except (FileNotFoundError, NotADirectoryError):
        return reading
    try:
        try:
            if os.geteuid() == 0:
                st = os.stat(root)
                os.fchown(fd, st.st_uid, st.st_gid)
            os.write(fd, content)
        finally:
            os.close(fd)
        os.rename(tmp, root / FILENAME)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return reading


def remove(root: Path) -> bool:
    """Remove the ``maildirsize`` of *root* (its mailbox has no quota any more); False if none."""
    try:
        os.unlink(root / FILENAME)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def folders(root: Path) -> list[Path]:
    """The INBOX (*root*) and each Maildir++ folder below it: what a quota counts."""
    found = [root]
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name not in (".", "..") and entry.is_dir():
                    found.append(Path(entry.path))
    except FileNotFoundError:
        return []
    return found


def scan(root: Path) -> tuple[int, int]:
    """(octets, messages) in ``new/`` and ``cur/`` of every folder: the ``S=`` of each name,
    else the file's size. A directory that changed while it was listed (a delivery or expunge
    meanwhile) is listed again, a few times at most, as Dovecot and Exim do."""
    dirs = [folder / sub for folder in folders(root) for sub in ("new", "cur")]
    totals = (0, 0)
    for _try in range(_SCAN_TRIES):
        before = _stamps(dirs)
        totals = _count(dirs)
        if _stamps(dirs) == before:
            break
    return totals


def folder_usage(folder: Path) -> tuple[int, int]:
    """(octets, messages) in ``new/`` and ``cur/`` of one folder (counted as :func:`scan`
    counts), for taking a removed folder out of the figure."""
    return _count([folder / "new", folder / "cur"])


def _stamps(dirs: list[Path]) -> list[int | None]:
    stamps: list[int | None] = []
    for path in dirs:
        try:
            stamps.append(os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            stamps.append(None)
    return stamps


def _count(dirs: list[Path]) -> tuple[int, int]:
    octets = messages = 0
    for path in dirs:
        try:
            entries = os.scandir(path)
        except FileNotFoundError:
            continue  # a folder removed meanwhile, or a Maildir not made yet
        with entries:
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                match = _SIZE_FIELD.search(name.partition(":")[0])
                if match is not None:
                    size = int(match[1])
                else:
                    try:
                        size = entry.stat().st_size
                    except FileNotFoundError:
                        continue  # moved or expunged while we looked
                octets += size
                messages += 1
    return octets, messages
