"""Delivery status notifications (RFC 3464) sent by the queue: bounces, delay and success notices.

The queue runner decides *when* (a recipient bounced, expired, was delayed past
``queue.delay_warning``, or was delivered with ``NOTIFY=SUCCESS``); this module decides *to whom*
(:func:`~postroom.message.dsn.recipients_to_report`: the sender, the postmaster for a double
bounce, or nobody), builds the notice (:func:`~postroom.message.dsn.build_dsn`) and puts it into
the spool as a new message from ``<>``, routed like any other mail: into a local Maildir at once,
or into the queue for the relay. Log lines are Postfix's::

    4QZ3B1HXK0F2: sender non-delivery notification: 4QZ3B1HY2A7C
    4QZ3B1HXK0F2: sender delay notification: 4QZ3B1HY2A7C
    4QZ3B1HXK0F2: sender delivery status notification: 4QZ3B1HY2A7C
    4QZ3B1HXK0F2: postmaster non-delivery notification: 4QZ3B1HY2A7C

A notice is made durable before the original's recipients are marked as notified, so a crash
between the two may send one twice, never lose it (RFC 5321 6.1 prefers the duplicate).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

from postroom import log
from postroom.errors import StorageError
from postroom.ids import new_queue_id
from postroom.message.address import parse_path
from postroom.message.dsn import (
    Action,
    Dsn,
    DsnKind,
    RecipientStatus,
    Target,
    build_dsn,
    recipients_to_report,
)
from postroom.policy.router import Router
from postroom.policy.routes import Rejected
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.spool import MAX_ENVELOPE_LINE, Spool

logger = logging.getLogger("postroom.queue")

_WHO = {Target.SENDER: "sender", Target.POSTMASTER: "postmaster"}
_WHAT = {DsnKind.FAILURE: "non-delivery notification", DsnKind.DELAY: "delay notification",
         DsnKind.SUCCESS: "delivery status notification"}
#: What :meth:`Notifier._spool_notice` says when the notice has nowhere to go.
_UNROUTABLE = "-"
_NOTIFIED = {DsnKind.FAILURE: "failure", DsnKind.DELAY: "delay", DsnKind.SUCCESS: "success"}


class Notifier:
    """Builds and spools notices about queued messages."""

    def __init__(self, spool: Spool, router: Router, hostname: str, *, size_limit: int,
                 double_bounces: bool, delay_warnings: bool) -> None:
        self.spool = spool
        self.router = router
        self.hostname = hostname
        self.size_limit = size_limit
        self.double_bounces = double_bounces
        self.delay_warnings = delay_warnings

    async def notify(self, envelope: Envelope, path: Path | bytes, kind: DsnKind,
                     recipients: Sequence[tuple[Recipient, Action]],
                     retry_until: float | None = None) -> bool:
        """Send one notice of *kind* covering those of *recipients* that want it; mark them
        notified (in memory: the caller records the envelope). True when something was sent
        or nothing was due; False when the notice could not be made (try again later).
        *path* is the queue file, or the message's header section when it has none (mail
        delivered at once: a success notice returns the headers only)."""
        decision = recipients_to_report(
            envelope.sender, recipients, kind, delay_warnings=self.delay_warnings,
            double_bounces=self.double_bounces)
        covered = set(map(id, decision.recipients))
        if decision.target is Target.NOBODY:
            for recipient, _ in recipients:
                _mark(recipient, kind)
            return True
        statuses = [_status(r, action, retry_until) for r, action in recipients
                    if id(r) in covered]
        postmaster = self._postmaster() if decision.target is Target.POSTMASTER else None
        if decision.target is Target.POSTMASTER and postmaster is None:
            logger.error("%s: no postmaster address for a double bounce", envelope.queue_id)
            return True
        try:
            dsn = await asyncio.to_thread(self._build, envelope, path, statuses, kind, postmaster)
        except (OSError, StorageError) as exc:
            log.event(envelope.queue_id, logging.WARNING, status="notification failed",
                      status_detail=str(exc))
            return False
        try:
            queue_id = await self._spool_notice(dsn.recipient, dsn.data, dsn.eight_bit,
                                                dsn.smtputf8)
        except Exception:  # never lose the duty to notify: the next run tries again
            logger.exception("%s: spooling a %s failed", envelope.queue_id, _WHAT[kind])
            return False
        if queue_id is None:
            return False
        for recipient, _ in recipients:
            _mark(recipient, kind)
        if queue_id == _UNROUTABLE:
            return True
        logger.info("%s: %s %s: %s", envelope.queue_id, _WHO[decision.target], _WHAT[kind],
                    queue_id, extra={"pr_queue_id": envelope.queue_id, "pr_fields": {
                        "notification": _WHAT[kind], "to": _WHO[decision.target],
                        "notice_id": queue_id}})
        return True

    def _build(self, envelope: Envelope, path: Path | bytes, statuses: list[RecipientStatus],
               kind: DsnKind, postmaster: str | None) -> Dsn:
        """Read the queued message (at most the size limit of it) and make the notice."""
        if isinstance(path, bytes):
            return build_dsn(envelope, statuses, path, kind=kind, hostname=self.hostname,
                             now=time.time(), postmaster=postmaster, size_limit=self.size_limit)
        with open(path, "rb") as original:
            if not original.readline(MAX_ENVELOPE_LINE).endswith(b"\n"):
                raise StorageError(f"{path}: no envelope line")
            return build_dsn(envelope, statuses, original, kind=kind, hostname=self.hostname,
                             now=time.time(), postmaster=postmaster, size_limit=self.size_limit)

    def _postmaster(self) -> str | None:
        """The address double bounces go to: ``<Postmaster>`` as the router resolves it."""
        return "postmaster"

    async def _spool_notice(self, to: str, data: bytes, eight_bit: bool, smtputf8: bool
                            ) -> str | None:
        address = parse_path(f"<{to}>", utf8=True)
        # A full mailbox still gets its notice: the spool queues that copy (4.2.2) until there
        # is room or it expires, rather than the notice being lost.
        outcome = self.router.resolve(address, may_relay=True, full_mailbox_ok=True)
        if isinstance(outcome, Rejected) and outcome.code // 100 == 4:
            return None  # temporary (a lookup failed): try the notice again later
        if isinstance(outcome, Rejected):  # e.g. the sender's local mailbox is gone
            logger.warning("notice to <%s> not sent: %d %s %s", to, outcome.code,
                           outcome.enhanced, outcome.text)
            return _UNROUTABLE
        envelope = Envelope(queue_id=new_queue_id(), sender="", arrival=time.time(),
                            client_address="127.0.0.1", client_name="localhost",
                            helo=self.hostname, body_type="8BITMIME" if eight_bit else None,
                            smtputf8=smtputf8)
        for dest in dict.fromkeys(outcome):
            envelope.recipients.append(Recipient(original=to, destination=dest,
                                                 notify=frozenset({"NEVER"})))
        message = self.spool.open_message()
        message.write(data)
        log.event(envelope.queue_id, **{"from": "", "size": len(data),
                                        "nrcpt": len(envelope.recipients)})
        try:
            await self.spool.accept(envelope, message, b"")
        except StorageError as exc:
            log.event(envelope.queue_id, logging.WARNING, status="not accepted",
                      status_detail=str(exc))
            return None
        return envelope.queue_id


def _mark(recipient: Recipient, kind: DsnKind) -> None:
    if _NOTIFIED[kind] not in recipient.notified:
        recipient.notified.append(_NOTIFIED[kind])


def _status(recipient: Recipient, action: Action, retry_until: float | None) -> RecipientStatus:
    default = {Action.FAILED: "5.0.0", Action.DELAYED: "4.0.0"}.get(action, "2.0.0")
    status = recipient.status or default
    if status[0] != default[0]:  # an expired temporary failure is reported as permanent
        status = default[0] + status[1:]
    return RecipientStatus(
        final_recipient=recipient.address,
        action=action,
        status=status,
        rcpt_to=recipient.original if recipient.original != recipient.address else None,
        orcpt=recipient.orcpt,
        remote_mta=recipient.remote_mta,
        reply=recipient.diagnostic,
        stage=recipient.stage,
        reason=None if recipient.diagnostic else recipient.last_error,
        last_attempt=recipient.last_attempt or None,
        will_retry_until=retry_until if action is Action.DELAYED else None,
    )
