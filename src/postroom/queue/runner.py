"""The queue manager: delivers what the spool could not deliver at once, with backoff, expiry,
per-destination limits and delivery status notifications.

It scans the queue on start, on :meth:`QueueRunner.wake` and at least every
``queue.scan_interval``, and starts work on each message with recipients due (a message already
being worked on is skipped; scanning never waits for a slow destination). For the due recipients
of a message:

1. the attempt is recorded first (``attempts`` + 1, ``next_attempt`` = now + backoff) and made
   durable, so a crash during the delivery cannot lose count of it or retry in a tight loop;
2. local recipients are written into their Maildirs through the committer (one copy per
   Maildir); remote recipients are grouped by domain, at most
   ``outbound.max_recipients_per_transaction`` per SMTP transaction, and handed to the
   :class:`~postroom.delivery.remote.RemoteDeliverer` (MX lookup, SMTP, TLS), at most
   ``outbound.max_per_destination`` deliveries at once per domain. A domain none of whose hosts
   could be reached is skipped by other messages for ``outbound.dead_destination_time``, so a
   dead destination does not hold up the rest of the queue;
3. the outcome is recorded per recipient: DELIVERED; BOUNCED on a permanent failure (5xx, or a
   DNS verdict such as NXDOMAIN or a null MX); DEFERRED on a temporary one, until the message has
   been queued longer than ``queue.max_lifetime``: then BOUNCED (the last status, as 5.x.x);
4. notices (RFC 3464, :mod:`postroom.queue.bounce`): a bounce for the failed recipients, a
   "delivered/relayed" notice for NOTIFY=SUCCESS, and with ``queue.delay_warning`` a delay
   notice once. The notice is spooled before the recipients are marked notified.

The backoff is Postfix's: ``min_backoff`` doubling per attempt up to ``max_backoff``, with +-10 %
jitter so that retries of one burst spread out. A message whose recipients are all done and owe
no notice is removed (``QUEUEID: removed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postroom import log
from postroom.config import Config
from postroom.delivery.maildir import delivery_headers, size_from_name, write_message
from postroom.delivery.remote import AttemptResult, RecipientResult, RemoteDeliverer
from postroom.errors import StorageError
from postroom.message.dsn import Action, DsnKind, wants
from postroom.policy.routes import LocalDelivery, RemoteDelivery
from postroom.queue.bounce import Notifier
from postroom.queue.committer import Committer, DirSync, storage_error
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.spool import MAX_ENVELOPE_LINE, Spool, log_outcome, log_removed, read_envelope
from postroom.smtp.client_events import OutboundEnvelope, OutboundRecipient, Stage, Verdict

logger = logging.getLogger("postroom.queue")

#: What a recipient's ``last_error`` says while an attempt is under way; seen only after a crash.
ATTEMPT_UNDER_WAY = "delivery attempt under way (interrupted if this stays)"
NO_RELAY = "outbound delivery is not configured in this process"
#: Messages worked on at once; local commits share rounds, remote ones wait on the network.
CONCURRENCY = 100
#: Shortest sleep between two scans, so that a message which keeps failing cannot spin.
MIN_SLEEP = 1.0


def backoff_delay(
    attempts: int, min_backoff: float, max_backoff: float, rng: random.Random
) -> float:
    """Seconds to wait after the *attempts*-th failed attempt."""
    base = min(min_backoff * 2.0 ** max(0, attempts - 1), max_backoff)
    return min(max(base * rng.uniform(0.9, 1.1), min_backoff), max_backoff)


def owes_failure_notice(recipient: Recipient) -> bool:
    """Bounced, and the bounce (or the decision that none is due) not yet made."""
    return recipient.state is RecipientState.BOUNCED and "failure" not in recipient.notified


def owes_success_notice(recipient: Recipient) -> bool:
    """Delivered with NOTIFY=SUCCESS, and the notice ours to send and not yet sent."""
    return (recipient.state is RecipientState.DELIVERED and recipient.success is not None
            and "success" not in recipient.notified)


def owes_notice(recipient: Recipient) -> bool:
    return owes_failure_notice(recipient) or owes_success_notice(recipient)


def finished(envelope: Envelope) -> bool:
    """Nothing left to do for the message: every recipient done, no notification owed."""
    return envelope.done and not any(map(owes_notice, envelope.recipients))


@dataclass(frozen=True, slots=True)
class _Attempt:
    """The outcome of delivering to one recipient."""

    ok: bool
    detail: str  # "delivered to maildir", or the error
    dsn: str
    permanent: bool = False  # a failure that no retry can cure
    relay: str = "local"
    remote_mta: str | None = None  # the host that answered, for a DSN's Remote-MTA
    diagnostic: str | None = None  # its reply, lines as received
    stage: str | None = None
    success_action: Action | None = Action.DELIVERED  # what a NOTIFY=SUCCESS notice says
    setup: float = 0.0  # seconds of DNS, connection, greeting, EHLO, TLS (delays= "c")
    transmission: float = 0.0  # seconds of the transaction or the Maildir write ("d")


def _remote_attempt(result: RecipientResult, attempt: AttemptResult) -> _Attempt:
    reply = result.reply
    diagnostic = None
    if not result.local:
        diagnostic = "\n".join(
            line.rstrip("\r") for line in reply.to_bytes().decode("utf-8", "replace").split("\n")
            if line)
    verdict = result.verdict
    return _Attempt(
        ok=verdict is Verdict.DELIVERED,
        detail=result.detail,
        dsn=result.dsn,
        permanent=verdict is Verdict.PERMANENT,
        relay=result.relay,
        remote_mta=result.target.host if result.target is not None and not result.local else None,
        diagnostic=diagnostic,
        stage=None if result.local else result.stage.value,
        # A next hop that took NOTIFY reports success itself (RFC 3461 4.1): no notice from us.
        success_action=None if result.dsn_passed else Action.RELAYED,
        setup=attempt.setup,
        transmission=attempt.transmission,
    )


@dataclass(slots=True)
class _Work:
    """One message's turn in the queue manager."""

    envelope: Envelope
    path: Path
    now: float
    expires: float
    saving: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    held: str | None = None  # the destination whose slot the message's turn already holds
    #: Journal segments holding this turn's attempt records, released once outcomes are saved.
    segments: list[str] = dataclasses.field(default_factory=list)
    #: Domains whose every slot was taken: tried in a later turn that waits for a slot first.
    postponed: list[str] = dataclasses.field(default_factory=list)


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
        deliverer: RemoteDeliverer | None = None,
        notifier: Notifier | None = None,
        quota_of: Callable[[str], int | None] | None = None,
    ) -> None:
        self._spool = spool
        self._committer = committer
        self.deliverer = deliverer
        self.notifier = notifier
        #: The current quota of a local mailbox (None: no such account any more): a queued
        #: recipient's route keeps the quota of when it was routed, which an operator may
        #: have raised since.
        self.quota_of = quota_of
        self._inflight: set[str] = set()  # queue ids being worked on
        self._tasks: set[asyncio.Task[None]] = set()
        self._gate = asyncio.Semaphore(CONCURRENCY)
        self._destinations: dict[str, asyncio.Semaphore] = {}
        self._dead: dict[str, tuple[float, str]] = {}  # domain -> (until, why)
        self._locks: dict[str, list[Any]] = {}  # queue id -> [its lock, users], while in use
        self._next_due: float | None = None  # the soonest retry known since the last scan
        #: Read afresh on every use: assign a new Config to reload (SIGHUP).
        self.config = config
        self._clock = clock
        self._rng = rng or random.Random()
        self._wake = asyncio.Event()
        self._resched = asyncio.Event()  # the soonest retry moved earlier: sleep less
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        spool.on_queued = self.queued  # the spool queued a message: work on it now

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
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self._spool.journal.close)

    def wake(self) -> None:
        """Scan now (the spool queued something). Safe to call often."""
        self._wake.set()

    async def _main(self) -> None:
        try:  # leftovers of a crash: temporary files nobody will finish
            await asyncio.to_thread(self._spool.clean_incoming)
        except OSError as exc:
            logger.warning("cannot clean %s: %s", self._spool.incoming, exc)
        # Attempts a crash interrupted are counted before anything is retried; and only one
        # queue manager works on a queue: while another holds the journal, wait for it.
        waited = False
        while not self._stopping:
            try:
                if await asyncio.to_thread(self._spool.journal.open) is not None:
                    break
            except (OSError, StorageError) as exc:
                logger.error("cannot recover the attempt journal: %s", exc)
                break
            if not waited:
                logger.warning("another process runs this queue (%s is locked): waiting",
                               self._spool.journal.directory)
                waited = True
            await asyncio.sleep(0.2)
        if waited and not self._stopping:
            logger.info("the queue is ours now")
        while not self._stopping:
            self._wake.clear()
            earliest: float | None = None
            self._next_due = None
            try:
                earliest, _ = await self._scan()
            except Exception:
                logger.exception("queue run failed")
            if self._stopping:
                return
            if self._next_due is not None and (earliest is None or self._next_due < earliest):
                earliest = self._next_due
            self._next_due = earliest
            await self._sleep(self._clock() + self.config.queue.scan_interval)

    async def _sleep(self, scan_by: float) -> None:
        """Until the next scan: *scan_by*, the soonest retry known (which finishing messages
        may move earlier without a rescan), or a wake-up (an operator's flush, a stop)."""
        while not self._wake.is_set() and not self._stopping:
            target = scan_by if self._next_due is None else min(scan_by, self._next_due)
            delay = max(MIN_SLEEP, target - self._clock())
            self._resched.clear()
            waits = [asyncio.ensure_future(self._wake.wait()),
                     asyncio.ensure_future(self._resched.wait())]
            try:
                done, _ = await asyncio.wait(waits, timeout=delay,
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waits:
                    waiter.cancel()
            if not done:
                return  # the time has come: scan

    # ---- one scan -----------------------------------------------------------------------------

    async def run_once(self) -> float | None:
        """Work on every message with recipients due now, and wait for that work to end;
        return the next due time, if any."""
        earliest, work = await self._scan()
        if work:
            await asyncio.gather(*work)
        return earliest

    async def _scan(self) -> tuple[float | None, list[asyncio.Task[None]]]:
        """Start work on every message with recipients due now (unless already under way);
        return the next due time and the tasks started."""
        now = self._clock()
        entries, earliest = await asyncio.to_thread(self._spool.load_due, now,
                                                    2 * self.config.queue.max_backoff)
        gate = self._gate
        work: list[asyncio.Task[None]] = []
        for envelope, path in entries:
            if envelope.hold or envelope.queue_id in self._inflight:
                continue
            waiting = [r for r in envelope.recipients if _waiting(r)]
            due = [r for r in waiting if r.next_attempt <= now]
            for recipient in waiting:
                if recipient.next_attempt > now and (
                    earliest is None or recipient.next_attempt < earliest
                ):
                    earliest = recipient.next_attempt
            if due or finished(envelope) or any(map(owes_notice, envelope.recipients)):
                work.append(self._launch(gate, envelope.queue_id, path, now,
                                         _only_domain(due)))
        return earliest, work

    def queued(self, envelope: Envelope, path: Path) -> None:
        """The spool just queued this message: work on it without reading the whole queue
        (a rescan per accepted message would cost O(queue) each under load)."""
        self._take(envelope.queue_id, path, only_domain(envelope))

    def handed(self, queue_id: str, domain: str | None) -> None:
        """Another process queued this message (:mod:`postroom.queue.bell`): the same."""
        self._take(queue_id, self._spool.queue_path(queue_id), domain)

    def _take(self, queue_id: str, path: Path, domain: str | None) -> None:
        if self._task is None or self._stopping or queue_id in self._inflight:
            return
        self._launch(self._gate, queue_id, path, self._clock(), domain)

    def _launch(self, gate: asyncio.Semaphore, queue_id: str, path: Path, now: float,
                domain: str | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._guarded(gate, queue_id, path, now, domain))
        self._inflight.add(queue_id)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, queue_id))
        return task

    @contextlib.asynccontextmanager
    async def message_lock(self, queue_id: str) -> AsyncIterator[None]:
        """Held around all work on one queue file: the runner's attempts and the operator's
        queue commands (``net.control``) never interleave on the same message."""
        entry = self._locks.get(queue_id)
        if entry is None:
            entry = self._locks[queue_id] = [asyncio.Lock(), 0]
        entry[1] += 1  # holders and waiters: the lock is forgotten when none is left
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if not entry[1]:
                del self._locks[queue_id]

    def _done(self, task: asyncio.Task[None], queue_id: str) -> None:
        self._tasks.discard(task)
        self._inflight.discard(queue_id)

    def _due_at(self, when: float) -> None:
        """A recipient is next due at *when*: make sure the main loop wakes by then (without a
        rescan now: a message that finishes must not make the whole queue be read again)."""
        if self._next_due is None or when < self._next_due:
            self._next_due = when
            self._resched.set()

    async def _guarded(self, gate: asyncio.Semaphore, queue_id: str, path: Path, now: float,
                       domain: str | None = None) -> None:
        """One message's turn. A message for a single remote domain first waits for a slot of
        that destination, holding nothing else: a slow destination never fills the global
        limit, and an operator's hold or delete never waits behind a queue of its mail.

        A message for several domains does not wait for a busy destination inside its turn
        (holding the global limit and its lock): that domain is postponed, and a later turn
        of the same task waits for its slot first, the same way."""
        if domain is None:
            later = await self._turn(gate, queue_id, path, now, None)
        else:
            async with self._destination(domain):
                later = await self._turn(gate, queue_id, path, now, domain)
        while later and not self._stopping:
            held = later.pop(0)
            async with self._destination(held):
                more = await self._turn(gate, queue_id, path, now, held)
            later.extend(d for d in more if d not in later)

    def _destination(self, domain: str) -> asyncio.Semaphore:
        return self._destinations.setdefault(
            domain, asyncio.Semaphore(self.config.outbound.max_per_destination))

    async def _turn(self, gate: asyncio.Semaphore, queue_id: str, path: Path, now: float,
                    held: str | None) -> list[str]:
        """Work on the message's due recipients; return the domains it postponed."""
        async with gate:
            if self._stopping:
                return []  # not started: the next run takes it
            now = max(now, self._clock())  # the turn may come long after the scan
            try:
                async with self.message_lock(queue_id):
                    # The scan's copy may be stale: an operator may have held, deleted or
                    # flushed the message meanwhile (queue tools take this lock too).
                    try:
                        envelope = await asyncio.to_thread(read_envelope, path)
                    except FileNotFoundError:
                        return []
                    if envelope.hold:
                        return []
                    due = [r for r in envelope.recipients
                           if _waiting(r) and r.next_attempt <= now]
                    postponed: list[str] = []
                    if due or finished(envelope) or any(
                            map(owes_notice, envelope.recipients)):
                        postponed = await self._process(envelope, path, due, now, held)
                    # (recipients still due now are the postponed ones: this task comes back)
                    waiting = [r.next_attempt for r in envelope.recipients
                               if _waiting(r) and r.next_attempt > now]
                    if waiting:
                        self._due_at(min(waiting))
                    return postponed
            except StorageError as exc:
                log.event(queue_id, logging.WARNING, status="queue error", status_detail=str(exc))
            except Exception:
                logger.exception("%s: queue run failed for this message", queue_id)
            return []

    async def _process(
        self, envelope: Envelope, path: Path, due: list[Recipient], now: float,
        held: str | None = None,
    ) -> list[str]:
        expires = envelope.arrival + self.config.queue.max_lifetime
        work = _Work(envelope, path, now, expires, held=held)
        local = [r for r in due if isinstance(r.destination, LocalDelivery)]
        if local:
            self._current_quotas(local)
            await self._begin(work, local)
            begun = time.monotonic()
            try:
                results = await self._committer.submit(
                    lambda ds: self._deliver(envelope, path, local, ds)
                )
            except StorageError as exc:
                failure = _Attempt(False, str(exc), "4.3.1" if exc.disk_full else "4.3.0")
                results = [failure] * len(local)
            spent = time.monotonic() - begun
            results = [dataclasses.replace(r, transmission=spent) for r in results]
            for recipient, result in zip(local, results, strict=True):
                self._settle(envelope, recipient, result, now, expires)
            await self._save(work)
        remote = [r for r in due if isinstance(r.destination, RemoteDelivery)]
        if remote:
            # Every transaction ends before the message lock is let go, whatever happens to
            # the others; a failure of one is settled as a deferral by _relay itself.
            await asyncio.gather(*(
                self._relay(work, domain, group) for domain, group in self._transactions(remote)
            ), return_exceptions=True)
        await self._notices(envelope, path, now, expires)
        async with work.saving:
            await self._record(envelope, path)
        self._spool.journal.release(work.segments)  # kept after a failure: the records count
        return work.postponed

    async def _begin(self, work: _Work, recipients: list[Recipient]) -> None:
        """Record an attempt for *recipients* durably before it is made: a crash during it
        cannot lose count of it, and the retry waits its backoff. The record is appended to
        the attempt journal (no new file); the outcome, saved later, supersedes it."""
        for recipient in recipients:
            recipient.attempts += 1
            recipient.state = RecipientState.DEFERRED
            recipient.next_attempt = self._next_attempt(recipient.attempts, work.now, work.expires)
            recipient.last_error = ATTEMPT_UNDER_WAY
            recipient.last_attempt = work.now
        envelope = work.envelope
        envelope.rev += 1
        line = envelope.to_json()
        journal = self._spool.journal
        work.segments.append(await self._committer.submit(lambda ds: journal.append(line, ds)))

    async def _save(self, work: _Work) -> None:
        """Rewrite the message's envelope with every state settled so far. Each outcome is
        saved as soon as it is known (as Postfix does after each delivery), so a crash never
        repeats a delivery that is already done; one save at a time per file."""
        if finished(work.envelope):
            return  # nothing left to do: the removal that follows records it (one round less)
        async with work.saving:
            await self._write_envelope(work.envelope, work.path)

    async def _write_envelope(self, envelope: Envelope, path: Path) -> None:
        """The queue file rewritten with *envelope* (encoded here, off the committer thread)."""
        envelope.rev += 1
        line = envelope.to_json()
        queue_id = envelope.queue_id
        waiting = [r.next_attempt for r in envelope.recipients if _waiting(r)]
        # the file's mtime says when to look at it again (Spool.load_due); a notice still owed
        # or a recipient due now: at once
        due = min(waiting) if waiting and not any(map(owes_notice, envelope.recipients)) \
            else None
        await self._committer.submit(
            lambda ds: self._spool.replace_envelope(path, queue_id, line, ds, due))

    def _transactions(self, recipients: list[Recipient]) -> list[tuple[str, list[Recipient]]]:
        """Recipients grouped by domain, at most the per-transaction limit in a group."""
        by_domain: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            domain = recipient.address.rpartition("@")[2].lower()
            by_domain.setdefault(domain, []).append(recipient)
        limit = self.config.outbound.max_recipients_per_transaction
        return [(domain, group[i:i + limit]) for domain, group in by_domain.items()
                for i in range(0, len(group), limit)]

    async def _relay(self, work: _Work, domain: str, recipients: list[Recipient]) -> None:
        """One SMTP transaction for *recipients* of *domain*, then their outcomes. Never
        raises: an unexpected failure defers the recipients (and the backoff applies)."""
        try:
            await self._relay_once(work, domain, recipients)
        except Exception as exc:
            logger.exception("%s: delivery to %s failed", work.envelope.queue_id, domain)
            detail = f"local error in delivery: {exc.__class__.__name__}"
            for recipient in recipients:
                if recipient.state.done:
                    continue
                if recipient.last_error != ATTEMPT_UNDER_WAY:  # failed before it began
                    recipient.attempts += 1
                    recipient.state = RecipientState.DEFERRED
                    recipient.next_attempt = self._next_attempt(recipient.attempts, work.now,
                                                                work.expires)
                self._settle(work.envelope, recipient,
                             _Attempt(False, detail, "4.3.0", relay="none"),
                             work.now, work.expires)
            with contextlib.suppress(Exception):
                await self._save(work)

    async def _relay_once(self, work: _Work, domain: str, recipients: list[Recipient]) -> None:
        envelope, path, now, expires = work.envelope, work.path, work.now, work.expires
        deliverer = self.deliverer
        why = NO_RELAY if deliverer is None else self._suspended(domain)
        if why is not None or deliverer is None:
            await self._skip(work, recipients, why or NO_RELAY)
            return
        slot: contextlib.AbstractAsyncContextManager[object] = contextlib.nullcontext()
        if work.held != domain:
            semaphore = self._destination(domain)
            if semaphore.locked():  # every slot busy: not while holding the global limit
                work.postponed.append(domain)
                return
            slot = semaphore
        async with slot:
            if self._stopping:
                return  # stopping: nothing new starts; the recipients stay due
            why = self._suspended(domain)  # found dead while this message waited for a slot
            if why is not None:
                await self._skip(work, recipients, why)
                return
            source = await asyncio.to_thread(QueuedMessage, path)
            try:
                outbound = OutboundEnvelope(
                    sender=envelope.sender,
                    recipients=tuple(OutboundRecipient(r.address, r.notify, r.orcpt)
                                     for r in recipients),
                    body=envelope.body_type,
                    smtputf8=envelope.smtputf8,
                    utf8_headers=envelope.smtputf8 and not source.head.isascii(),
                    ret=envelope.ret,
                    envid=envelope.envid,
                )
                await self._begin(work, recipients)
                attempt = await deliverer.deliver(domain, outbound, source,
                                                  queue_id=envelope.queue_id)
            finally:
                # the last descriptor of a replaced file frees it: not on the event loop
                await asyncio.to_thread(source.close)
        results = attempt.recipients
        unreachable = all(r.local and r.stage is Stage.CONNECT and r.verdict is Verdict.TEMPORARY
                          for r in results)
        if unreachable and results and self.config.outbound.dead_destination_time > 0:
            self._dead[domain] = (time.monotonic() + self.config.outbound.dead_destination_time,
                                  results[0].detail)
        elif domain in self._dead and not unreachable:
            del self._dead[domain]
        for recipient, result in zip(recipients, results, strict=True):
            self._settle(envelope, recipient, _remote_attempt(result, attempt), now, expires)
        await self._save(work)

    def _suspended(self, domain: str) -> str | None:
        """Why *domain* is not tried now (none of its hosts answered a moment ago), or None."""
        dead = self._dead.get(domain)
        if dead is not None and dead[0] > time.monotonic():
            return f"delivery temporarily suspended: {dead[1]}"
        return None

    async def _skip(self, work: _Work, recipients: list[Recipient], why: str) -> None:
        """Defer *recipients* without trying: counted as an attempt, so the backoff applies."""
        await self._begin(work, recipients)
        for recipient in recipients:
            self._settle(work.envelope, recipient, _Attempt(False, why, "4.4.1", relay="none"),
                         work.now, work.expires)
        await self._save(work)

    async def _notices(self, envelope: Envelope, path: Path, now: float, expires: float) -> None:
        """The notices this run made due; each marks its recipients notified once spooled."""
        notifier = self.notifier
        failed = [(r, Action.FAILED) for r in envelope.recipients if owes_failure_notice(r)]
        if notifier is None:  # nobody to tell in this process (tests, tools)
            for recipient in envelope.recipients:
                if owes_failure_notice(recipient):
                    recipient.notified.append("failure")
                elif owes_success_notice(recipient):
                    recipient.notified.append("success")
            return
        if failed:
            await notifier.notify(envelope, path, DsnKind.FAILURE, failed)
        wanted = [(r, Action(r.success)) for r in envelope.recipients
                  if owes_success_notice(r) and r.success is not None]
        if wanted:
            await notifier.notify(envelope, path, DsnKind.SUCCESS, wanted)
        warning = self.config.queue.delay_warning
        if warning > 0 and now - envelope.arrival >= warning:
            delayed = [(r, Action.DELAYED) for r in envelope.recipients
                       if r.state is RecipientState.DEFERRED and "delay" not in r.notified]
            if delayed:
                await notifier.notify(envelope, path, DsnKind.DELAY, delayed, retry_until=expires)

    def _next_attempt(self, attempts: int, now: float, expires: float) -> float:
        delay = backoff_delay(
            attempts, self.config.queue.min_backoff, self.config.queue.max_backoff, self._rng
        )
        # The last try falls at the expiry time, so a bounce is not late by a whole backoff.
        return min(now + delay, expires) if now < expires else now + delay

    def _current_quotas(self, recipients: list[Recipient]) -> None:
        quota_of = self.quota_of
        if quota_of is None:
            return
        for recipient in recipients:
            dest = recipient.destination
            assert isinstance(dest, LocalDelivery)
            try:
                quota = quota_of(dest.mailbox)
            except Exception as exc:  # the accounts store failed: the routed value stands
                logger.warning("cannot read the quota of %s: %s", dest.mailbox, exc)
                continue
            if quota is not None and quota != dest.quota:
                recipient.destination = dataclasses.replace(dest, quota=quota)

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
            if dest.quota and usage.usage(dest.maildir, dest.quota, size) + size > dest.quota:
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

    def _settle(self, envelope: Envelope, recipient: Recipient, result: _Attempt, now: float,
                expires: float) -> None:
        """Set the recipient's state from *result*, record and log it."""
        recipient.status = result.dsn
        recipient.remote_mta = result.remote_mta
        recipient.diagnostic = result.diagnostic
        recipient.stage = result.stage
        if result.ok:
            recipient.state = RecipientState.DELIVERED
            recipient.last_error = None
            recipient.record(now, "delivered", result.detail)
            self._log(envelope, recipient, result, "sent", result.detail, result.dsn)
            if result.success_action is not None and wants(recipient.notify, DsnKind.SUCCESS):
                recipient.success = result.success_action.value
            return
        if not result.permanent and now < expires:
            recipient.last_error = result.detail
            recipient.record(now, "deferred", result.detail)
            self._log(envelope, recipient, result, "deferred", result.detail, result.dsn)
            return
        detail = result.detail
        dsn = result.dsn
        if not result.permanent:  # it never worked: give up (RFC 3463 X.4.7 delivery time expired)
            days = self.config.queue.max_lifetime / 86400
            detail = f"message expired after {days:g} days in queue: {result.detail}"
            dsn = "5.4.7" if result.dsn in ("4.0.0", "4.3.0", "4.4.1") else "5" + result.dsn[1:]
            recipient.status = dsn
        recipient.state = RecipientState.BOUNCED
        recipient.last_error = detail
        recipient.record(now, "bounced", detail)
        self._log(envelope, recipient, result, "bounced", detail, dsn)

    def _log(self, envelope: Envelope, recipient: Recipient, result: _Attempt, status: str,
             detail: str, dsn: str) -> None:
        # Postfix's delays=a/b/c/d: before the queue (receiving), waiting in the queue,
        # connection setup, transmission.
        queued = envelope.queued or envelope.arrival
        parts = (max(0.0, queued - envelope.arrival), max(0.0, recipient.last_attempt - queued),
                 result.setup, result.transmission)
        delays = "/".join(f"{p:.2f}".rstrip("0").rstrip(".") or "0" for p in parts)
        log_outcome(envelope, recipient, self._clock(), relay=result.relay, dsn=dsn,
                    status=status, detail=detail, delays=delays)

    async def _record(self, envelope: Envelope, path: Path) -> None:
        """Make the recipients' new states durable, or remove a finished message."""
        if finished(envelope):
            await self._committer.submit(lambda ds: self._spool.remove(envelope.queue_id, ds))
            log_removed(envelope.queue_id)
            return
        await self._write_envelope(envelope, path)


def _waiting(recipient: Recipient) -> bool:
    return recipient.state in (RecipientState.PENDING, RecipientState.DEFERRED)


class QueuedMessage:
    """The message of a queue file as the SMTP client reads it (``delivery.remote``'s
    MessageSource), from one open file descriptor: the runner rewrites the queue file (a new
    file renamed over the old) while a delivery reads it, and the descriptor keeps the version
    whose envelope line it skipped. Read with ``pread``, so every attempt starts over."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            line = os.pread(self._fd, MAX_ENVELOPE_LINE, 0).split(b"\n", 1)[0]
            if len(line) >= MAX_ENVELOPE_LINE:
                raise StorageError(f"{path}: no envelope line")
            self._start = len(line) + 1
            self._end = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 256 * 1024, self._start)
            end = head.find(b"\r\n\r\n")
            #: The header section (at most its first 256 KB): does it need SMTPUTF8?
            self.head = head[: end if end >= 0 else len(head)]
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def size(self) -> int:
        return self._end - self._start

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        offset = self._start
        while offset < self._end:
            block = os.pread(self._fd, min(chunk_size, self._end - offset), offset)
            if not block:
                return
            offset += len(block)
            yield block

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def only_domain(envelope: Envelope) -> str | None:
    """The one remote domain of the message's waiting recipients, or None."""
    return _only_domain([r for r in envelope.recipients if _waiting(r)])


def _only_domain(recipients: list[Recipient]) -> str | None:
    """The one remote domain among *recipients*, or None (none, or several)."""
    domains = {r.address.rpartition("@")[2].lower() for r in recipients
               if isinstance(r.destination, RemoteDelivery)}
    return domains.pop() if len(domains) == 1 else None
