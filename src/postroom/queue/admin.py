"""Queue administration: list, show, hold, release, delete, flush and retry queue files.

What Postfix splits over ``mailq``/``postqueue -p`` (list), ``postcat -q`` (show), ``postqueue
-f/-i/-s`` (flush) and ``postsuper -h/-H/-d`` (hold, release, delete), as plain file operations on
``data_dir/queue``::

    active/<ID>   a message the queue runner works on
    hold/<ID>     a message an operator put on hold: the runner never reads hold/
    incoming/     temporary files of a rewrite (``<ID>.<hex>.tmp``), cleaned after a crash

Every function here is synchronous, small and durable before it returns (file fsync, rename,
directory fsync), so that both callers get the same guarantees:

* the CLI with the server stopped (``postroom queue ...`` falls back to these);
* the running server, through the control socket (:mod:`postroom.net.control`): its handler calls
  :func:`apply` for one message at a time while holding that message's lock in the queue runner,
  so an operation never interleaves with a delivery attempt on the same file. Run them off the
  event loop (``asyncio.to_thread``, or as a committer job: they do their own fsyncs and ignore
  the job's ``DirSync``).

Without that lock (the CLI while a server runs but does not answer on its socket) two writers of
one queue file could undo each other's change, which is why the CLI prefers the socket.

Changing a recipient's ``next_attempt`` means a new envelope line, and the envelope is the first
line of the queue file, so the file is written anew: envelope, then the same message bytes, in
``incoming/``, fsynced, renamed over the old one, directory fsynced. After a crash the file holds
the old or the new envelope, never a mix. Moving between ``active/`` and ``hold/`` is one
``rename(2)``, fsynced in both directories (the destination first: a crash between the two fsyncs
can leave the old name on disk, never lose the message).

The runner records each attempt in the attempt journal (:mod:`postroom.queue.journal`) before
it makes it, and the queue file only gets the outcome. After a crash the journal may hold records
newer than the queue files: every entry point here applies them first (:func:`journal.recover`),
which is a no-op while a server runs, since the server owns the journal and applies it itself.

The ``retry`` operation, decided here: like flush (every waiting recipient due now), and its
attempt count set back to 0 so the backoff starts again from ``queue.min_backoff``. It does not
revive a BOUNCED recipient and does not extend the message's lifetime: a message older than
``queue.max_lifetime`` still bounces at its next failure.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from postroom import log
from postroom.errors import PostroomError, StorageError
from postroom.ids import is_queue_id
from postroom.policy.routes import RemoteDelivery
from postroom.queue import journal
from postroom.queue.committer import DEFAULT_DISK, Disk, DurableFile, storage_error, sync_dirs
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.incoming import READ_SIZE
from postroom.queue.spool import MAX_ENVELOPE_LINE, log_removed

logger = logging.getLogger("postroom.queue")

ACTIVE = "active"
HOLD = "hold"
#: The directories the tools look in, in listing order.
LISTED = (ACTIVE, HOLD)
#: ``postsuper``'s word for every message.
ALL = "ALL"
#: Most of the header section :func:`show` returns; the rest is cut (``headers_truncated``).
MAX_HEADER_BYTES = 256 * 1024

#: Operations that change the queue (the control handler wakes the runner after them).
CHANGING_OPS = frozenset({"hold", "release", "delete", "flush", "retry"})
OPS = frozenset({"list", "show"}) | CHANGING_OPS

# Per-message results of the changing operations.
HELD = "held"
RELEASED = "released"
DELETED = "deleted"
FLUSHED = "flushed"
RETRIED = "retried"
UNCHANGED = "unchanged"  # nothing to do (already held, not held, nothing waiting ...)
MISSING = "missing"  # no such message
ERROR = "error"  # a storage error; the detail says which


class AdminError(PostroomError):
    """A request the queue tools refuse: a malformed queue id, an unknown operation."""


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """One queue file as the listing sees it."""

    queue: str  # "active" or "hold"
    path: Path
    size: int  # octets of the message in the file (our Received header + the message)
    envelope: Envelope

    @property
    def queue_id(self) -> str:
        return self.path.name

    @property
    def held(self) -> bool:
        return self.queue == HOLD or self.envelope.hold

    def to_dict(self) -> dict[str, Any]:
        env = self.envelope
        return {
            "queue_id": self.queue_id,
            "queue": self.queue,
            "held": self.held,
            "size": self.size,
            "arrival": env.arrival,
            "sender": env.sender,
            "client_address": env.client_address,
            "client_name": env.client_name,
            "recipients": [_recipient_dict(r) for r in env.recipients],
        }


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a changing operation did to one message."""

    queue_id: str
    result: str  # HELD, RELEASED, DELETED, FLUSHED, RETRIED, UNCHANGED or MISSING
    detail: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"queue_id": self.queue_id, "result": self.result, "detail": self.detail}


def _recipient_dict(recipient: Recipient, raw: dict[str, Any] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "address": recipient.address,
        "original": recipient.original,
        "remote": isinstance(recipient.destination, RemoteDelivery),
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "next_attempt": recipient.next_attempt,
        "last_error": recipient.last_error,
    }
    if raw is not None:
        # Attempt history, when the envelope has one (a list of {time, result, detail}); read
        # from the JSON itself so it shows whether or not this Recipient class knows the field.
        history = raw.get("history", getattr(recipient, "history", None))
        entries = history if isinstance(history, list) else []
        data["history"] = [h for h in entries if isinstance(h, dict)]
    return data


# ---- paths and ids ------------------------------------------------------------------------------


def queue_root(data_dir: Path) -> Path:
    return data_dir / "queue"


def check_id(queue_id: object) -> str:
    """*queue_id* if it is a queue id (12 characters of the id alphabet), else AdminError.

    Nothing else ever reaches a path: no ``/``, no ``..``, no NUL, no other queue's names.
    """
    if not isinstance(queue_id, str) or not is_queue_id(queue_id):
        shown = queue_id if isinstance(queue_id, str) else type(queue_id).__name__
        raise AdminError(f"{shown[:40]!r} is not a queue id")
    return queue_id


def _names(directory: Path) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return [e.name for e in entries if not e.name.startswith(".") and e.is_file()]
    except FileNotFoundError:
        return []


def _find(data_dir: Path, queue_id: str) -> tuple[str, Path] | None:
    """Where message *queue_id* is: ("active", path), ("hold", path), or None."""
    root = queue_root(data_dir)
    for queue in LISTED:
        path = root / queue / queue_id
        if path.is_file():
            return queue, path
    return None


# ---- reading -----------------------------------------------------------------------------------


def _read_head(path: Path) -> tuple[bytes, int]:
    """The envelope line and the message size, from one open file (so from one version of it,
    whatever renames happen meanwhile). FileNotFoundError when it went away."""
    with open(path, "rb") as fh:
        line = fh.readline(MAX_ENVELOPE_LINE)
        size = os.fstat(fh.fileno()).st_size - len(line)
    if not line.endswith(b"\n"):
        raise ValueError("no complete envelope line")
    return line, size


def _entry(queue: str, path: Path) -> QueueEntry:
    line, size = _read_head(path)
    return QueueEntry(queue, path, size, Envelope.from_json(line))


def list_queue(data_dir: Path) -> list[QueueEntry]:
    """Every readable message in ``active/`` and ``hold/``, oldest first.

    Reads only each file's envelope line and size. A file removed between the directory listing
    and the read (delivered, deleted) is left out; one replaced meanwhile (the runner rewrote its
    envelope) is read whole in one version or the other, since it is opened once. An unreadable
    file is left out with a warning; the queue runner moves it to ``corrupt/``.
    """
    root = queue_root(data_dir)
    _recover(root)
    found: list[QueueEntry] = []
    for queue in LISTED:
        for name in _names(root / queue):
            path = root / queue / name
            try:
                found.append(_entry(queue, path))
            except FileNotFoundError:
                continue
            except (OSError, ValueError, KeyError, TypeError) as exc:
                logger.warning("unreadable queue file %s: %s", path, exc)
    found.sort(key=lambda e: (e.envelope.arrival, e.queue_id))
    return found


def _header_section(fh: BinaryIO) -> tuple[bytes, bool]:
    """The header section (up to the empty line) at the file position; (bytes, truncated)."""
    lines: list[bytes] = []
    total = 0
    while line := fh.readline(MAX_HEADER_BYTES - total + 1):
        if line in (b"\r\n", b"\n"):
            break
        lines.append(line)
        total += len(line)
        if total > MAX_HEADER_BYTES:
            return b"".join(lines)[:MAX_HEADER_BYTES], True
    return b"".join(lines), False


def show(data_dir: Path, queue_id: str) -> dict[str, Any] | None:
    """One message: its listing entry, the whole envelope, recipients with state, attempts,
    next attempt, last error and attempt history, and the header section. None when there is
    no such message."""
    check_id(queue_id)
    _recover(queue_root(data_dir))
    for _ in range(3):  # it may move between active/ and hold/ while we look
        where = _find(data_dir, queue_id)
        if where is None:
            return None
        queue, path = where
        try:
            with open(path, "rb") as fh:
                line = fh.readline(MAX_ENVELOPE_LINE)
                if not line.endswith(b"\n"):
                    raise StorageError(f"{path}: no complete envelope line")
                size = os.fstat(fh.fileno()).st_size - len(line)
                headers, truncated = _header_section(fh)
        except FileNotFoundError:
            continue
        try:
            raw = json.loads(line)
            envelope = Envelope.from_json(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{path}: unreadable envelope: {exc}") from exc
        entry = QueueEntry(queue, path, size, envelope)
        data = entry.to_dict()
        raw_recipients = raw.get("recipients", [])
        data["recipients"] = [
            _recipient_dict(r, raw_recipients[i] if i < len(raw_recipients) else {})
            for i, r in enumerate(envelope.recipients)
        ]
        data["envelope"] = raw
        data["headers"] = headers.decode("utf-8", "replace").replace("\r\n", "\n")
        data["headers_truncated"] = truncated
        return data
    return None


def _recover(root: Path) -> None:
    """Attempts a crashed server recorded in its journal, applied before the queue is read or
    changed; a no-op while a server runs (it owns the journal). A failure is logged: the
    listing is still worth having."""
    try:
        journal.recover(root)
    except (OSError, StorageError) as exc:
        logger.warning("cannot apply the attempt journal in %s: %s", root, exc)


# ---- durable changes -----------------------------------------------------------------------------


def _log_action(queue_id: str, text: str, status: str) -> None:
    log.logger.info(
        "%s: %s", queue_id, text, extra={"pr_fields": {"status": status}, "pr_queue_id": queue_id}
    )


def _chown_like(path: str, st: os.stat_result) -> None:
    """Give a file we (root, offline) made the owner of the file it replaces, so the server,
    running as its own user, can still read it."""
    if os.geteuid() == 0 and (st.st_uid, st.st_gid) != (os.geteuid(), os.getegid()):
        os.chown(path, st.st_uid, st.st_gid)


def rewrite(
    data_dir: Path, path: Path, change: Callable[[Envelope], bool], disk: Disk
) -> bool | None:
    """Apply *change* to the envelope of queue file *path*, durably. True: rewritten; False:
    *change* changed nothing (no write); None: no such file.

    The new file is written in ``incoming/`` from the old one's open descriptor (envelope line
    re-encoded, message bytes copied), fsynced, renamed over *path*, and *path*'s directory is
    fsynced.
    """
    try:
        source = open(path, "rb")  # noqa: SIM115 closed by the with below
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise storage_error(exc, f"reading {path}") from exc
    with source:
        try:
            line = source.readline(MAX_ENVELOPE_LINE)
            st = os.fstat(source.fileno())
        except OSError as exc:
            raise storage_error(exc, f"reading {path}") from exc
        if not line.endswith(b"\n"):
            raise StorageError(f"{path}: no complete envelope line")
        try:
            envelope = Envelope.from_json(line)
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{path}: unreadable envelope: {exc}") from exc
        if not change(envelope):
            return False
        envelope.rev += 1
        temp = queue_root(data_dir) / "incoming" / f"{path.name}.{secrets.token_hex(4)}.tmp"
        with DurableFile(disk, str(temp)) as out:
            try:
                _chown_like(str(temp), st)
                out.write(envelope.to_json().encode() + b"\n")
                while block := source.read(READ_SIZE):
                    out.write(block)
            except OSError as exc:
                raise storage_error(exc, f"rewriting {path}") from exc
            out.commit(str(path))
    sync_dirs(disk, [str(path.parent)])
    return True


def _ensure_hold_dir(data_dir: Path, disk: Disk) -> Path:
    root = queue_root(data_dir)
    hold = root / HOLD
    if not hold.is_dir():
        try:
            hold.mkdir(mode=0o700)
            _chown_like(str(hold), os.stat(root))
        except FileExistsError:
            pass
        except OSError as exc:
            raise storage_error(exc, f"creating {hold}") from exc
        sync_dirs(disk, [str(root)])
    return hold


def _move(source: Path, target: Path, disk: Disk) -> None:
    """rename(2) *source* to *target*, then fsync the target's directory and the source's."""
    try:
        disk.rename(str(source), str(target))
    except OSError as exc:
        raise storage_error(exc, f"moving {source} to {target}") from exc
    sync_dirs(disk, [str(target.parent), str(source.parent)])


def hold(data_dir: Path, queue_id: str, *, disk: Disk = DEFAULT_DISK) -> Outcome:
    """Move the message from ``active/`` to ``hold/`` (``postsuper -h``): no delivery until it is
    released. Its recipients keep their state."""
    check_id(queue_id)
    root = queue_root(data_dir)
    source = root / ACTIVE / queue_id
    target = _ensure_hold_dir(data_dir, disk) / queue_id
    if target.exists():
        return Outcome(queue_id, UNCHANGED, "already on hold")
    if not source.is_file():
        return Outcome(queue_id, MISSING, "no such message")
    try:
        _move(source, target, disk)
    except StorageError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return Outcome(queue_id, MISSING, "no such message")  # delivered meanwhile
        raise
    _log_action(queue_id, "placed on hold", "hold")
    return Outcome(queue_id, HELD)


def _is_held(envelope: Envelope) -> bool:
    return envelope.hold or any(r.state is RecipientState.HELD for r in envelope.recipients)


def _release_change(envelope: Envelope) -> bool:
    """Clear the hold marks and make every recipient not yet done due now."""
    changed = envelope.hold
    envelope.hold = False
    for recipient in envelope.recipients:
        if recipient.state.done:
            continue
        if recipient.state is RecipientState.HELD:
            recipient.state = RecipientState.DEFERRED if recipient.attempts else RecipientState.PENDING
            changed = True
        if recipient.next_attempt != 0.0:
            recipient.next_attempt = 0.0
            changed = True
    return changed


def release(data_dir: Path, queue_id: str, *, disk: Disk = DEFAULT_DISK) -> Outcome:
    """Move the message from ``hold/`` back to ``active/`` (``postsuper -H``), every recipient
    not yet done due at once (HELD recipients become waiting again).

    The envelope is rewritten in ``hold/`` first, then the file moves: a crash between the two
    leaves it held, never in both places.
    """
    check_id(queue_id)
    root = queue_root(data_dir)
    source = root / HOLD / queue_id
    target = root / ACTIVE / queue_id
    if not source.is_file():
        if not target.is_file():
            return Outcome(queue_id, MISSING, "no such message")
        # In active/ but marked held in its envelope (the flag, or HELD recipients).
        changed = rewrite(
            data_dir, target, lambda env: _is_held(env) and _release_change(env), disk
        )
        if changed is None:
            return Outcome(queue_id, MISSING, "no such message")
        if not changed:
            return Outcome(queue_id, UNCHANGED, "not on hold")
        _log_action(queue_id, "released from hold", "released")
        return Outcome(queue_id, RELEASED)
    if target.exists():
        # Never replace a queued message with another of the same name.
        raise StorageError(f"{target} exists; {source} left on hold")
    if rewrite(data_dir, source, _release_change, disk) is None:
        return Outcome(queue_id, MISSING, "no such message")
    _move(source, target, disk)
    _log_action(queue_id, "released from hold", "released")
    return Outcome(queue_id, RELEASED)


def delete(data_dir: Path, queue_id: str, *, disk: Disk = DEFAULT_DISK) -> Outcome:
    """Remove the message, from ``active/`` or ``hold/`` (``postsuper -d``). No notification is
    sent to anyone: this is the operator's decision."""
    check_id(queue_id)
    root = queue_root(data_dir)
    removed: list[str] = []
    for queue in LISTED:
        path = root / queue / queue_id
        try:
            os.unlink(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise storage_error(exc, f"removing {path}") from exc
        removed.append(str(path.parent))
    if not removed:
        return Outcome(queue_id, MISSING, "no such message")
    sync_dirs(disk, removed)
    log_removed(queue_id)
    return Outcome(queue_id, DELETED)


def _domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _flush_change(
    domain: str | None, now: float, *, reset_attempts: bool
) -> Callable[[Envelope], bool]:
    def change(envelope: Envelope) -> bool:
        changed = False
        for recipient in envelope.recipients:
            if recipient.state not in (RecipientState.PENDING, RecipientState.DEFERRED):
                continue
            if domain is not None and _domain_of(recipient.address) != domain:
                continue
            if recipient.next_attempt > now:
                recipient.next_attempt = 0.0
                changed = True
            if reset_attempts and recipient.attempts:
                recipient.attempts = 0
                changed = True
        return changed

    return change


def flush(
    data_dir: Path,
    queue_id: str,
    *,
    domain: str | None = None,
    retry: bool = False,
    disk: Disk = DEFAULT_DISK,
    clock: Callable[[], float] = time.time,
) -> Outcome:
    """Make the message's waiting (PENDING/DEFERRED) recipients due now (``postqueue -i``); with
    *domain*, only those whose address is in that domain (``postqueue -s``). With *retry*, also
    set their attempt count back to 0, so the backoff restarts (see the module docstring).

    Held messages are left alone (release them). The file is only rewritten when something
    changes; either way the runner should be woken afterwards.
    """
    check_id(queue_id)
    done = RETRIED if retry else FLUSHED
    where = _find(data_dir, queue_id)
    if where is None:
        return Outcome(queue_id, MISSING, "no such message")
    if where[0] == HOLD:
        return Outcome(queue_id, UNCHANGED, "on hold")
    wanted = domain.lower().rstrip(".") if domain is not None else None
    changed = rewrite(
        data_dir, where[1], _flush_change(wanted, clock(), reset_attempts=retry), disk
    )
    if changed is None:
        return Outcome(queue_id, MISSING, "no such message")
    if not changed:
        return Outcome(queue_id, UNCHANGED, "nothing to retry" if retry else "nothing to flush")
    return Outcome(queue_id, done)


# ---- requests (the CLI's and the control socket's) ----------------------------------------------


def _ids_arg(args: dict[str, Any]) -> list[str] | str:
    ids = args.get("ids")
    if ids == ALL:
        return ALL
    if not isinstance(ids, list) or not ids:
        raise AdminError('"ids" must be a non-empty list of queue ids, or "ALL"')
    return [check_id(i) for i in ids]


def _domain_arg(args: dict[str, Any]) -> str | None:
    domain = args.get("domain")
    if domain is None:
        return None
    if not isinstance(domain, str) or not domain.strip(".") or "@" in domain or "/" in domain:
        raise AdminError(f"{str(domain)[:80]!r} is not a domain")
    return domain


def _in_queue(data_dir: Path, queue: str) -> list[str]:
    return sorted(n for n in _names(queue_root(data_dir) / queue) if is_queue_id(n))


def targets(data_dir: Path, op: str, args: dict[str, Any]) -> list[str]:
    """The queue ids a changing operation *op* works on, validated. AdminError when the request
    is malformed. ``ALL`` is every message the operation applies to: delete, both queues; hold,
    ``active/``; release, ``hold/``; flush and retry, ``active/``. Flush with neither ``ids`` nor
    ``ALL`` (a ``domain``, or nothing) means every active message too.
    """
    if op not in CHANGING_OPS:
        raise AdminError(f"unknown queue operation {op!r}")
    if not isinstance(args, dict):
        raise AdminError("arguments must be an object")
    if op == "flush":
        _domain_arg(args)
        if args.get("ids") is None:
            return _in_queue(data_dir, ACTIVE)
        if args.get("domain") is not None:
            raise AdminError("give queue ids or a domain, not both")
    ids = _ids_arg(args)
    if ids != ALL:
        return list(dict.fromkeys(ids))
    if op == "delete":
        return sorted(set(_in_queue(data_dir, ACTIVE)) | set(_in_queue(data_dir, HOLD)))
    return _in_queue(data_dir, HOLD if op == "release" else ACTIVE)


def apply(
    data_dir: Path, op: str, queue_id: str, args: dict[str, Any], *, disk: Disk = DEFAULT_DISK
) -> Outcome:
    """Do changing operation *op* to one message (the caller holds that message's lock)."""
    check_id(queue_id)
    if op == "hold":
        return hold(data_dir, queue_id, disk=disk)
    if op == "release":
        return release(data_dir, queue_id, disk=disk)
    if op == "delete":
        return delete(data_dir, queue_id, disk=disk)
    if op in ("flush", "retry"):
        domain = _domain_arg(args) if op == "flush" else None
        return flush(data_dir, queue_id, domain=domain, retry=op == "retry", disk=disk)
    raise AdminError(f"unknown queue operation {op!r}")


def apply_safely(
    data_dir: Path, op: str, queue_id: str, args: dict[str, Any], *, disk: Disk = DEFAULT_DISK
) -> Outcome:
    """:func:`apply`, with a storage failure reported as this message's outcome (ERROR) so that
    the other messages of a request are still done and what was done is still reported."""
    try:
        return apply(data_dir, op, queue_id, args, disk=disk)
    except StorageError as exc:
        logger.error("%s: %s failed: %s", queue_id, op, exc)
        return Outcome(queue_id, ERROR, str(exc))


def outcome_response(outcomes: Iterable[Outcome]) -> dict[str, Any]:
    return {"ok": True, "results": [o.to_dict() for o in outcomes]}


def error_response(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def read_op(data_dir: Path, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """``list`` or ``show``: the response."""
    if op == "list":
        return {"ok": True, "messages": [e.to_dict() for e in list_queue(data_dir)]}
    if op == "show":
        if not isinstance(args, dict):
            raise AdminError("arguments must be an object")
        queue_id = check_id(args.get("id"))
        found = show(data_dir, queue_id)
        if found is None:
            return error_response(f"{queue_id}: no such message")
        return {"ok": True, "message": found}
    raise AdminError(f"unknown queue operation {op!r}")


def dispatch(data_dir: Path, op: str, args: dict[str, Any]) -> dict[str, Any]:
    """Carry out one request without a server (the CLI's fallback): the same responses as the
    control socket gives. A refused request is ``{"ok": false, "error": ...}``; a storage
    failure on one message is that message's ERROR outcome."""
    _recover(queue_root(data_dir))
    try:
        if op in CHANGING_OPS:
            ids = targets(data_dir, op, args)
            return outcome_response(apply_safely(data_dir, op, i, args) for i in ids)
        return read_op(data_dir, op, args)
    except AdminError as exc:
        return error_response(str(exc))
