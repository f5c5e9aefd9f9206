"""The spool: durable acceptance of a message before the 250 (RFC 5321 section 6.1).

Layout under ``data_dir/queue``::

    incoming/   message data being received (spilled past a memory threshold) and temporary
                files; nothing here is ever relied upon
    active/     queue files: ``<queue id>`` = envelope JSON on the first line, "\\n", then our
                Received header and the message in SMTP form (CRLF line ends)
    hold/       messages an operator put on hold (used by a later issue)
    corrupt/    queue files that could not be read, kept for a human

:meth:`Spool.accept` does all of one message's durable work in ONE committer job, so concurrent
sessions share fsyncs (group commit, see :mod:`postroom.queue.committer`):

* fast path: each local recipient whose quota allows it gets the message written straight into
  its Maildir (``Return-Path``, ``Delivered-To``, our Received header, the message). That file is
  the durable copy; the recipient is DELIVERED. Recipients sharing a Maildir share one copy.
* every other recipient (remote, over quota, a Maildir copy that could not be created or written)
  goes into one queue file, written in ``incoming/`` and renamed into ``active/``.

The job only creates and writes the files; the committer's round fsyncs them, renames them into
place and fsyncs their directories. So a failure there cannot fall back to the queue file any more:
it fails the whole job, and no file of it is committed where that can still be helped.

When the job fails, :class:`AcceptError` (a :class:`StorageError`: 451 4.3.0, or 452 4.3.1 when
the disk is full) is raised and no queue file is left; the client retries (RFC 5321 6.1 prefers
the duplicate that may bring to a lost message). The error's result lists only the Maildir copies
that are durable all the same. Every ``status=sent`` line is logged once its file is durable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from postroom import log
from postroom.delivery.maildir import MaildirUsage, delivery_headers, size_from_name, write_message
from postroom.errors import StorageError
from postroom.message.dsn import DsnKind, wants
from postroom.policy.routes import LocalDelivery
from postroom.queue.committer import (
    DEFAULT_DISK,
    Committer,
    DirSync,
    Disk,
    DurableFile,
    storage_error,
    sync_dirs,
)
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.incoming import READ_SIZE, IncomingMessage
from postroom.queue.journal import Journal

QUEUE_DIRS = ("incoming", "active", "hold", "corrupt")

#: Longest envelope line read from a queue file (1000 recipients take about 300 KB).
MAX_ENVELOPE_LINE = 16 * 1024 * 1024

logger = logging.getLogger("postroom.queue")


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    """What :meth:`Spool.accept` did for one recipient."""

    recipient: Recipient
    delivered: Path | None = None  # the Maildir file, when delivered
    queued: bool = False  # in the queue file (remote, or the fast path failed)
    error: str | None = None  # why the fast path failed
    dsn: str = ""  # "2.0.0" delivered; "4.2.2" over quota; "4.3.0"/"4.3.1" write failed


@dataclass(frozen=True, slots=True)
class AcceptResult:
    queue_id: str
    outcomes: tuple[RecipientOutcome, ...]
    queue_file: Path | None  # None: every recipient was delivered, nothing is queued

    @property
    def delivered(self) -> list[RecipientOutcome]:
        return [o for o in self.outcomes if o.delivered is not None]

    @property
    def queued(self) -> list[RecipientOutcome]:
        return [o for o in self.outcomes if o.queued]


class AcceptError(StorageError):
    """Acceptance failed (answer 451 4.3.0, or 452 4.3.1 when ``disk_full``).

    :attr:`result` lists the recipients delivered anyway: Maildir copies that were made durable
    before another step of the job failed (rare: a rename or a directory fsync failing).
    """

    def __init__(self, cause: StorageError, result: AcceptResult) -> None:
        super().__init__(str(cause), disk_full=cause.disk_full)
        self.result = result


@dataclass(slots=True)
class _AcceptState:
    """What one accept job did, kept outside the job so a failed round can be cleaned up."""

    outcomes: list[RecipientOutcome] = field(default_factory=list)
    queue_file: Path | None = None
    dirsync: DirSync | None = None  # the job's: which of its files made it

    def result(self, queue_id: str, *, ok: bool) -> AcceptResult:
        """What is true once the round is over: everything if the job succeeded, else only the
        Maildir copies that are durable anyway (the queue file is dropped on failure)."""
        if ok:
            return AcceptResult(queue_id, tuple(self.outcomes), self.queue_file)
        dirsync = self.dirsync
        kept = tuple(
            o
            for o in self.outcomes
            if o.delivered is not None and dirsync is not None and dirsync.durable(o.delivered)
        )
        return AcceptResult(queue_id, kept, None)


def log_removed(queue_id: str) -> None:
    """``QUEUEID: removed``: nothing of the message is left in the queue."""
    log.logger.info(
        "%s: removed", queue_id, extra={"pr_fields": {"status": "removed"}, "pr_queue_id": queue_id}
    )


def log_outcome(
    envelope: Envelope,
    recipient: Recipient,
    now: float,
    *,
    relay: str,
    dsn: str,
    status: str,
    detail: str,
    delays: str | None = None,
) -> None:
    """One ``to=<..>, orig_to=<..>, relay=.., delay=.., delays=a/b/c/d, dsn=.., status=..
    (detail)`` line."""
    orig = recipient.original if recipient.original != recipient.address else None
    log.event(
        envelope.queue_id,
        to=recipient.address,
        orig_to=orig,
        relay=relay,
        delay=max(0.0, now - envelope.arrival),
        delays=delays,
        dsn=dsn,
        status=status,
        status_detail=detail,
    )


class Spool:
    """Durable acceptance and the queue files under ``data_dir/queue``."""

    def __init__(
        self,
        data_dir: Path,
        committer: Committer,
        usage: MaildirUsage,
        hostname: str,
        *,
        disk: Disk = DEFAULT_DISK,
        clock: Callable[[], float] = time.time,
        first_retry: float = 300.0,
    ) -> None:
        self.root = data_dir / "queue"
        self.incoming = self.root / "incoming"
        self.active = self.root / "active"
        self.hold = self.root / "hold"
        self.corrupt = self.root / "corrupt"
        #: Where the queue runner records attempts (opened by the runner that owns the queue).
        self.journal = Journal(self.root, disk)
        self._committer = committer
        self.usage = usage
        self.hostname = hostname
        self.disk = disk
        self._clock = clock
        #: When a local recipient whose fast-path delivery failed is tried again.
        self.first_retry = first_retry
        #: Called on the event loop after :meth:`accept` wrote a queue file (the queue runner
        #: sets it to its ``wake``).
        #: Called with (envelope, queue file) when a message was queued (the queue runner).
        self.on_queued: Callable[[Envelope, Path], None] | None = None
        self._make_dirs()

    def _make_dirs(self) -> None:
        changed: list[str] = []
        try:
            for path in (self.root.parent, self.root):
                if not path.is_dir():
                    path.mkdir(mode=0o700, parents=True)
                    changed.append(str(path.parent))
            for name in QUEUE_DIRS:
                path = self.root / name
                if not path.is_dir():
                    path.mkdir(mode=0o700)
                    changed.append(str(self.root))
        except OSError as exc:
            raise storage_error(exc, f"creating the queue in {self.root}") from exc
        sync_dirs(self.disk, dict.fromkeys(changed))

    def queue_path(self, queue_id: str) -> Path:
        return self.active / queue_id

    def open_message(self) -> IncomingMessage:
        return IncomingMessage(self.incoming)

    # ---- acceptance ---------------------------------------------------------------------------

    async def accept(
        self, envelope: Envelope, message: IncomingMessage, prepend: bytes
    ) -> AcceptResult:
        """Make the message durable for every recipient, then return what happened to each.

        Consumes *message* (discarded afterwards, whatever happens). Sets ``envelope.size`` and
        the recipients' states. Logs a line per recipient delivered or deferred, and ``removed``
        when nothing was queued. Raises :class:`AcceptError` on a storage failure; no queue
        file is left then.
        """
        try:
            message.seal()
        except StorageError as exc:
            message.discard()
            raise AcceptError(exc, AcceptResult(envelope.queue_id, (), None)) from exc
        envelope.size = message.size
        state = _AcceptState()
        future = self._committer.submit(
            lambda dirsync: self._accept_job(envelope, message, prepend, state, dirsync)
        )
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            # The job still runs; the message data must live until it has.
            future.add_done_callback(lambda f: self._after_cancel(f, envelope, message, state))
            raise
        except BaseException as exc:
            message.discard()
            self._drop_queue_file(state)
            result = state.result(envelope.queue_id, ok=False)
            self._log_outcomes(envelope, result.delivered)
            if isinstance(exc, StorageError):
                raise AcceptError(exc, result) from exc
            raise
        # The round is over: every file of the job is durable, and only now is it said so.
        message.discard()
        result = state.result(envelope.queue_id, ok=True)
        for outcome in result.outcomes:
            if outcome.delivered is not None:
                outcome.recipient.state = RecipientState.DELIVERED
        self._log_outcomes(envelope, result.outcomes)
        if result.queue_file is None:
            log_removed(envelope.queue_id)
        elif self.on_queued is not None:
            self.on_queued(envelope, result.queue_file)
        return result

    def _after_cancel(
        self,
        future: asyncio.Future[None],
        envelope: Envelope,
        message: IncomingMessage,
        state: _AcceptState,
    ) -> None:
        """The session went away during accept: no 250 was sent, so the client will retry."""
        message.discard()
        error = None if future.cancelled() else future.exception()
        self._drop_queue_file(state)
        result = state.result(envelope.queue_id, ok=error is None and not future.cancelled())
        self._log_outcomes(envelope, result.delivered)
        log.event(
            envelope.queue_id,
            logging.WARNING,
            status="not accepted",
            status_detail=f"session ended during accept{f': {error}' if error else ''}",
        )

    def _drop_queue_file(self, state: _AcceptState) -> None:
        """The client gets 451/452 and will retry: our copy would be a duplicate."""
        if state.queue_file is None:
            return
        final = str(state.queue_file)
        files = state.dirsync.files if state.dirsync is not None else []
        if not any(f.final_path == final and f.placed for f in files):
            return  # ours never got there; what is there belongs to someone else
        try:
            self.disk.unlink(final)
        except OSError as exc:
            logger.error("cannot remove %s after a failed accept: %s", state.queue_file, exc)

    def _log_outcomes(self, envelope: Envelope, outcomes: Iterable[RecipientOutcome]) -> None:
        now = self._clock()
        for outcome in outcomes:
            if outcome.delivered is not None:
                log_outcome(
                    envelope,
                    outcome.recipient,
                    now,
                    relay="local",
                    dsn="2.0.0",
                    status="sent",
                    detail="delivered to maildir",
                )
            elif outcome.error is not None:
                log_outcome(
                    envelope,
                    outcome.recipient,
                    now,
                    relay="local",
                    dsn=outcome.dsn,
                    status="deferred",
                    detail=outcome.error,
                )

    def _accept_job(
        self,
        envelope: Envelope,
        message: IncomingMessage,
        prepend: bytes,
        state: _AcceptState,
        dirsync: DirSync,
    ) -> None:
        """Runs on the committer thread: Maildir copies first, then one queue file if needed.

        Phase 1 of the round: the files are written here and committed by the round. A recipient
        is set DELIVERED by :meth:`accept` once that has happened.
        """
        state.dirsync = dirsync
        copies: dict[Path, Path] = {}
        failures: dict[Path, tuple[str, str]] = {}  # Maildir -> (error, dsn): tried once only
        copied: set[int] = set()  # id() of each recipient served by a Maildir copy
        for recipient in envelope.recipients:
            if recipient.state is not RecipientState.PENDING:
                continue
            dest = recipient.destination
            if not isinstance(dest, LocalDelivery):
                state.outcomes.append(RecipientOutcome(recipient, queued=True))
                continue
            if dest.maildir in failures:
                self._defer(recipient, state, *failures[dest.maildir])
                continue
            copy = copies.get(dest.maildir)
            if copy is None:
                try:
                    copy = self._fast_copy(envelope, dest, message, prepend, dirsync)
                except StorageError as exc:
                    failures[dest.maildir] = (str(exc), _dsn_of(exc))
                    self._defer(recipient, state, *failures[dest.maildir])
                    continue
                copies[dest.maildir] = copy
            copied.add(id(recipient))
            state.outcomes.append(RecipientOutcome(recipient, delivered=copy, dsn="2.0.0"))
        waiting = [r for r in envelope.recipients if not r.state.done and id(r) not in copied]
        # Delivered here with NOTIFY=SUCCESS (RFC 3461): the notice is owed, and it is recorded
        # in a queue file like any other duty, so a crash after the 250 cannot lose it; the
        # queue runner sends it and removes the file.
        owed = [dataclasses.replace(r, state=RecipientState.DELIVERED, success="delivered")
                for r in envelope.recipients
                if id(r) in copied and wants(r.notify, DsnKind.SUCCESS)]
        if not waiting and not owed:
            return
        queued = dataclasses.replace(envelope, recipients=waiting + owed)
        state.queue_file = self._write_queue_file(queued, prepend, message, dirsync)

    def _fast_copy(
        self,
        envelope: Envelope,
        dest: LocalDelivery,
        message: IncomingMessage,
        prepend: bytes,
        dirsync: DirSync,
    ) -> Path:
        """Write the Maildir copy for *dest*; :class:`OverQuota` or :class:`StorageError`."""
        headers = delivery_headers(envelope.sender, dest.mailbox)
        size = len(headers) + len(prepend) + message.size
        try:
            if dest.quota and self.usage.usage(dest.maildir, dest.quota, size) + size > dest.quota:
                raise OverQuota("mailbox full (over quota)")
        except OSError as exc:  # counting the mailbox's usage
            raise storage_error(exc, f"reading Maildir {dest.maildir}") from exc
        copy = write_message(
            dest.maildir,
            itertools.chain([headers + prepend], message.chunks()),
            dirsync,
            disk=self.disk,
            host=self.hostname,
        )
        self.usage.add(dest.maildir, size_from_name(copy.name) or 0)
        return copy

    def _defer(self, recipient: Recipient, state: _AcceptState, error: str, dsn: str) -> None:
        recipient.state = RecipientState.DEFERRED
        recipient.attempts += 1
        recipient.next_attempt = self._clock() + self.first_retry
        recipient.last_error = error
        state.outcomes.append(RecipientOutcome(recipient, queued=True, error=error, dsn=dsn))

    def _write_queue_file(
        self, envelope: Envelope, prepend: bytes, message: IncomingMessage, dirsync: DirSync
    ) -> Path:
        final = self.queue_path(envelope.queue_id)
        temp = self._temp_name(envelope.queue_id)
        with DurableFile(self.disk, temp, no_replace=True) as out:
            out.write(envelope.to_json().encode() + b"\n")
            out.write(prepend)
            for chunk in message.chunks():
                out.write(chunk)
            out.commit(str(final), dirsync)
        return final

    def _temp_name(self, queue_id: str) -> str:
        return str(self.incoming / f"{queue_id}.{secrets.token_hex(4)}.tmp")

    # ---- the queue ----------------------------------------------------------------------------

    def load_queue(self) -> list[tuple[Envelope, Path]]:
        """Every readable queue file in ``active/``, oldest first. Unreadable ones go to corrupt/.

        Blocking (reads each envelope line); from a coroutine use ``asyncio.to_thread``.
        """
        return self.load_due(None)[0]

    def load_due(self, now: float | None, horizon: float = 86400.0
                 ) -> tuple[list[tuple[Envelope, Path]], float | None]:
        """The queue files that may have work due at *now* (all of them when None), oldest
        first, and the soonest due time of those left unread.

        A queue file's mtime is the time its next retry is due (:meth:`replace_envelope`, the
        trick Postfix's deferred queue uses), so a file whose mtime is still ahead is not opened:
        a scan of a big queue of deferred mail costs a directory listing, not a read per file.
        An mtime more than *horizon* ahead (a clock that went back) is not trusted.
        """
        found: list[tuple[Envelope, Path]] = []
        later: float | None = None
        names: list[str] = []
        with os.scandir(self.active) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file():
                    continue
                if now is not None:
                    try:
                        due = entry.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if now < due <= now + horizon:
                        later = due if later is None else min(later, due)
                        continue
                names.append(entry.name)
        for name in names:
            path = self.active / name
            try:
                envelope = read_envelope(path)
            except FileNotFoundError:
                continue  # removed while we looked
            except (OSError, ValueError, KeyError, TypeError) as exc:
                self._quarantine(path, exc)
                continue
            found.append((envelope, path))
        found.sort(key=lambda item: (item[0].arrival, item[0].queue_id))
        return found, later

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        target = self.corrupt / path.name
        try:
            os.rename(path, target)
            sync_dirs(self.disk, [str(self.corrupt), str(self.active)])
        except (OSError, StorageError) as err:
            logger.error("cannot move unreadable queue file %s to %s: %s", path, target, err)
            return
        log.event(
            path.name, logging.WARNING, status="corrupt", status_detail=f"{exc}; moved to {target}"
        )

    def update_envelope(self, path: Path, envelope: Envelope, dirsync: DirSync) -> None:
        """Replace the envelope line of queue file *path* with *envelope* (its ``rev`` raised),
        atomically (run it in a job). See :meth:`replace_envelope`."""
        envelope.rev += 1
        self.replace_envelope(path, envelope.queue_id, envelope.to_json(), dirsync)

    def replace_envelope(self, path: Path, queue_id: str, line: str, dirsync: DirSync,
                         due: float | None = None) -> None:
        """Replace the envelope line of queue file *path* with *line* (JSON), atomically.
        *due*, the time the message's next retry is due, becomes the file's mtime (see
        :meth:`load_due`); None leaves it at now (due at the next scan).

        Writes a new file (new envelope line, then the old file's message data) in ``incoming/``;
        the round fsyncs it and renames it over *path*: after a crash the file holds either the old
        or the new envelope, never a mix. The message data is copied, so this costs its size in
        writes. Two updates of one file must not share a round (each reads the file as it was).
        """
        try:
            source = open(path, "rb")  # noqa: SIM115 closed by the with below
        except OSError as exc:
            raise storage_error(exc, f"reading {path}") from exc
        with source, DurableFile(self.disk, self._temp_name(queue_id)) as out:
            try:
                if not source.readline(MAX_ENVELOPE_LINE).endswith(b"\n"):
                    raise StorageError(f"{path}: no envelope line")
                out.write(line.encode() + b"\n")
                while block := source.read(READ_SIZE):
                    out.write(block)
            except OSError as exc:
                raise storage_error(exc, f"reading {path}") from exc
            out.commit(str(path), dirsync, mtime=due)

    def read_body(self, path: Path) -> Iterator[bytes]:
        """The Received header and message in a queue file (CRLF), in blocks."""
        with open(path, "rb") as fh:
            if not fh.readline(MAX_ENVELOPE_LINE).endswith(b"\n"):
                raise StorageError(f"{path}: no envelope line")
            while block := fh.read(READ_SIZE):
                yield block

    def body_size(self, path: Path) -> int:
        with open(path, "rb") as fh:
            line = fh.readline(MAX_ENVELOPE_LINE)
            return os.fstat(fh.fileno()).st_size - len(line)

    def remove(self, queue_id: str, dirsync: DirSync | None = None) -> bool:
        """Delete the queue file; False if there was none. Does not log (see :func:`log_removed`).

        With *dirsync* (inside a job) ``active/`` is synced at the end of the round; without, now.
        A removal must be durable, or a crash could bring the message back for a second delivery.
        """
        path = self.queue_path(queue_id)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise storage_error(exc, f"removing {path}") from exc
        if dirsync is not None:
            dirsync.add(self.active)
        else:
            sync_dirs(self.disk, [str(self.active)])
        return True

    def clean_incoming(self, older_than: float = 86400.0) -> int:
        """Remove leftovers in ``incoming/`` (from a crash) older than *older_than* seconds."""
        removed = 0
        limit = time.time() - older_than
        with os.scandir(self.incoming) as entries:
            for entry in entries:
                try:
                    if entry.is_file() and entry.stat().st_mtime < limit:
                        os.unlink(entry.path)
                        removed += 1
                except FileNotFoundError:
                    continue
        return removed


class OverQuota(StorageError):
    """The mailbox would exceed its quota (4.2.2): the recipient waits in the queue."""


def _dsn_of(exc: StorageError) -> str:
    if isinstance(exc, OverQuota):
        return "4.2.2"  # RFC 3463: mailbox full
    return "4.3.1" if exc.disk_full else "4.3.0"


def read_envelope(path: Path) -> Envelope:
    """The envelope on the first line of queue file *path*."""
    with open(path, "rb") as fh:
        line = fh.readline(MAX_ENVELOPE_LINE)
    if not line.endswith(b"\n"):
        raise ValueError(f"{path}: no complete envelope line")
    return Envelope.from_json(line)
