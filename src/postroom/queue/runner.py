"""The queue runner: retries what the spool could not deliver at once, with backoff and expiry.

On start, on :meth:`QueueRunner.wake` and at least every ``queue.scan_interval`` it reads the
queue and works on each message with recipients due. For a local recipient:

1. the attempt is recorded first (``attempts`` + 1, ``next_attempt`` = now + backoff) and made
   durable, so a crash during the delivery cannot lose count of it or retry in a tight loop;
2. the message is written into the Maildir through the committer (one copy per Maildir). A copy
   that cannot be created or written fails its own recipients only; one that the round then
   cannot fsync or rename fails the whole attempt, and its other copies are dropped too unless
   already renamed into place (a retry may then duplicate one, which RFC 5321 6.1 prefers);
3. the outcome is recorded: DELIVERED, or DEFERRED with the reason; and once the message has been
   in the queue longer than ``queue.max_lifetime``, a failure is final: BOUNCED (RFC 3463 5.4.7).

The backoff is Postfix's: ``min_backoff`` doubling per attempt up to ``max_backoff``, with +-10 %
jitter so that retries of one burst spread out. Remote recipients wait for the relay issue: they
are DEFERRED ("relay not implemented yet") until ``max_backoff`` from now, then bounce at expiry.

The non-delivery notification (RFC 3464) for a bounced recipient comes with a later issue; until
then the recipient's ``last_error`` starts with :data:`DSN_PENDING` and the queue file stays, so
that issue finds what it must send. No notification is due when the sender is the null path
(RFC 5321 6.1) or NOTIFY (RFC 3461 4.1) leaves out FAILURE. A message whose recipients are all
done and owe no notification is removed (``QUEUEID: removed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from postroom import log
from postroom.config import Config
from postroom.delivery.maildir import delivery_headers, size_from_name, write_message
from postroom.errors import StorageError
from postroom.policy.routes import LocalDelivery
from postroom.queue.committer import Committer, DirSync, storage_error
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.spool import Spool, log_outcome, log_removed

logger = logging.getLogger("postroom.queue")

#: Start of ``last_error`` for a bounced recipient whose notification is still to be sent.
DSN_PENDING = "[dsn pending] "
#: What a recipient's ``last_error`` says while an attempt is under way; seen only after a crash.
ATTEMPT_UNDER_WAY = "delivery attempt under way (interrupted if this stays)"
RELAY_NOT_IMPLEMENTED = "relay not implemented yet"
#: Messages worked on at once; their commits share rounds.
CONCURRENCY = 16
#: Shortest sleep between two scans, so that a message which keeps failing cannot spin.
MIN_SLEEP = 1.0


def backoff_delay(
    attempts: int, min_backoff: float, max_backoff: float, rng: random.Random
) -> float:
    """Seconds to wait after the *attempts*-th failed attempt."""
    base = min(min_backoff * 2.0 ** max(0, attempts - 1), max_backoff)
    return min(max(base * rng.uniform(0.9, 1.1), min_backoff), max_backoff)


def dsn_pending(recipient: Recipient) -> bool:
    return recipient.last_error is not None and recipient.last_error.startswith(DSN_PENDING)


def wants_failure_dsn(envelope: Envelope, recipient: Recipient) -> bool:
    if not envelope.sender:
        return False  # never notify the null reverse path
    return recipient.notify is None or "FAILURE" in {n.upper() for n in recipient.notify}


def finished(envelope: Envelope) -> bool:
    """Nothing left to do for the message: every recipient done, no notification owed."""
    return envelope.done and not any(dsn_pending(r) for r in envelope.recipients)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The outcome of delivering to one recipient."""

    ok: bool
    detail: str  # "delivered to maildir", or the error
    dsn: str


class QueueRunner:
    """An asyncio task that works through the queue. ``clock`` can be injected for tests."""

    def __init__(
        self,
        spool: Spool,
        committer: Committer,
        config: Config,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._spool = spool
        self._committer = committer
        #: Read afresh on every use: assign a new Config to reload (SIGHUP).
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        spool.on_queued = self.wake  # the spool queued something: scan now

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the runner task on the running loop; it scans at once."""
        if self._task is not None:
            raise RuntimeError("queue runner already started")
        self._task = asyncio.get_running_loop().create_task(self._main(), name="queue-runner")

    async def stop(self) -> None:
        """Stop after the deliveries in flight: cancelling one between its Maildir write and
        the record of it would deliver the message again after the restart. Messages not
        started yet wait for the next start."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def wake(self) -> None:
        """Scan now (the spool queued something). Safe to call often."""
        self._wake.set()

    async def _main(self) -> None:
        try:  # leftovers of a crash: temporary files nobody will finish
            await asyncio.to_thread(self._spool.clean_incoming)
        except OSError as exc:
            logger.warning("cannot clean %s: %s", self._spool.incoming, exc)
        while not self._stopping:
            self._wake.clear()
            earliest: float | None = None
            try:
                earliest = await self.run_once()
            except Exception:
                logger.exception("queue run failed")
            if self._stopping:
                return
            delay = self.config.queue.scan_interval
            if earliest is not None:
                delay = min(delay, max(MIN_SLEEP, earliest - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # ---- one scan -----------------------------------------------------------------------------

    async def run_once(self) -> float | None:
        """Work on every message with recipients due now; return the next due time, if any."""
        now = self._clock()
        entries = await asyncio.to_thread(self._spool.load_queue)
        gate = asyncio.Semaphore(CONCURRENCY)
        work: list[asyncio.Task[None]] = []
        earliest: float | None = None
        for envelope, path in entries:
            if envelope.hold:
                continue
            waiting = [r for r in envelope.recipients if _waiting(r)]
            due = [r for r in waiting if r.next_attempt <= now]
            for recipient in waiting:
                if recipient.next_attempt > now and (
                    earliest is None or recipient.next_attempt < earliest
                ):
                    earliest = recipient.next_attempt
            if due or finished(envelope):
                work.append(asyncio.create_task(self._guarded(gate, envelope, path, due, now)))
        if work:
            await asyncio.gather(*work)
        return earliest

    async def _guarded(
        self,
        gate: asyncio.Semaphore,
        envelope: Envelope,
        path: Path,
        due: list[Recipient],
        now: float,
    ) -> None:
        async with gate:
            if self._stopping:
                return  # not started: the next run takes it
            try:
                await self._process(envelope, path, due, now)
            except StorageError as exc:
                log.event(
                    envelope.queue_id, logging.WARNING, status="queue error", status_detail=str(exc)
                )
            except Exception:
                logger.exception("%s: queue run failed for this message", envelope.queue_id)

    async def _process(
        self, envelope: Envelope, path: Path, due: list[Recipient], now: float
    ) -> None:
        expires = envelope.arrival + self.config.queue.max_lifetime
        bounced = 0  # recipients bounced now that are owed a notification
        local = [r for r in due if isinstance(r.destination, LocalDelivery)]
        if local:
            for recipient in local:
                recipient.attempts += 1
                recipient.state = RecipientState.DEFERRED
                recipient.next_attempt = self._next_attempt(recipient.attempts, now, expires)
                recipient.last_error = ATTEMPT_UNDER_WAY
            await self._committer.submit(lambda ds: self._spool.update_envelope(path, envelope, ds))
            try:
                results = await self._committer.submit(
                    lambda ds: self._deliver(envelope, path, local, ds)
                )
            except StorageError as exc:
                failure = _Attempt(False, str(exc), "4.3.1" if exc.disk_full else "4.3.0")
                results = [failure] * len(local)
            for recipient, result in zip(local, results, strict=True):
                bounced += self._settle(envelope, recipient, result, now, expires, relay="local")
        for recipient in due:
            if not isinstance(recipient.destination, LocalDelivery):
                recipient.state = RecipientState.DEFERRED
                recipient.next_attempt = now + self.config.queue.max_backoff
                if now < expires:
                    recipient.next_attempt = min(recipient.next_attempt, expires)
                result = _Attempt(False, RELAY_NOT_IMPLEMENTED, "4.3.0")
                bounced += self._settle(envelope, recipient, result, now, expires, relay="none")
        await self._record(envelope, path, bounced)

    def _next_attempt(self, attempts: int, now: float, expires: float) -> float:
        delay = backoff_delay(
            attempts, self.config.queue.min_backoff, self.config.queue.max_backoff, self._rng
        )
        # The last try falls at the expiry time, so a bounce is not late by a whole backoff.
        return min(now + delay, expires) if now < expires else now + delay

    def _deliver(
        self, envelope: Envelope, path: Path, recipients: list[Recipient], dirsync: DirSync
    ) -> list[_Attempt]:
        """Committer job: one Maildir copy per distinct Maildir, each error kept per recipient."""
        done: dict[Path, _Attempt] = {}
        results: list[_Attempt] = []
        for recipient in recipients:
            dest = recipient.destination
            assert isinstance(dest, LocalDelivery)
            result = done.get(dest.maildir)
            if result is None:
                result = self._deliver_one(envelope, path, dest, dirsync)
                done[dest.maildir] = result
            results.append(result)
        return results

    def _deliver_one(
        self, envelope: Envelope, path: Path, dest: LocalDelivery, dirsync: DirSync
    ) -> _Attempt:
        headers = delivery_headers(envelope.sender, dest.mailbox)
        usage = self._spool.usage
        try:
            size = len(headers) + self._spool.body_size(path)
            if dest.quota and usage.usage(dest.maildir) + size > dest.quota:
                return _Attempt(False, "mailbox full (over quota)", "4.2.2")
            copy = write_message(
                dest.maildir,
                itertools.chain([headers], self._spool.read_body(path)),
                dirsync,
                disk=self._spool.disk,
                host=self._spool.hostname,
            )
        except StorageError as exc:
            return _Attempt(False, str(exc), "4.3.1" if exc.disk_full else "4.3.0")
        except OSError as exc:  # reading the queue file, or counting the mailbox's usage
            return _Attempt(False, str(storage_error(exc, "reading")), "4.3.0")
        usage.add(dest.maildir, size_from_name(copy.name) or 0)
        return _Attempt(True, "delivered to maildir", "2.0.0")

    def _settle(
        self,
        envelope: Envelope,
        recipient: Recipient,
        result: _Attempt,
        now: float,
        expires: float,
        *,
        relay: str,
    ) -> int:
        """Set the recipient's state from *result* and log it; 1 if a notification is now owed."""
        if result.ok:
            recipient.state = RecipientState.DELIVERED
            recipient.last_error = None
            log_outcome(
                envelope,
                recipient,
                self._clock(),
                relay=relay,
                dsn=result.dsn,
                status="sent",
                detail=result.detail,
            )
            return 0
        if now < expires:
            recipient.last_error = result.detail
            log_outcome(
                envelope,
                recipient,
                self._clock(),
                relay=relay,
                dsn=result.dsn,
                status="deferred",
                detail=result.detail,
            )
            return 0
        days = self.config.queue.max_lifetime / 86400
        reason = f"message expired after {days:g} days in queue: {result.detail}"
        recipient.state = RecipientState.BOUNCED
        recipient.last_error = reason
        owed = wants_failure_dsn(envelope, recipient)
        if owed:
            recipient.last_error = DSN_PENDING + reason
        log_outcome(
            envelope,
            recipient,
            self._clock(),
            relay=relay,
            dsn="5.4.7",
            status="bounced",
            detail=reason,
        )
        return int(owed)

    async def _record(self, envelope: Envelope, path: Path, bounced: int) -> None:
        """Make the recipients' new states durable, or remove a finished message."""
        if finished(envelope):
            await self._committer.submit(lambda ds: self._spool.remove(envelope.queue_id, ds))
            log_removed(envelope.queue_id)
            return
        await self._committer.submit(lambda ds: self._spool.update_envelope(path, envelope, ds))
        if bounced:
            # The queue file stays: the bounce issue will find these and send the notification.
            log.event(
                envelope.queue_id,
                sender_notification="pending",
                nrcpt=bounced,
                status_detail="bounce messages are not implemented yet",
            )


def _waiting(recipient: Recipient) -> bool:
    return recipient.state in (RecipientState.PENDING, RecipientState.DEFERRED)
