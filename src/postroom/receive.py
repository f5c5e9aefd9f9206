"""Receiving: the policy answers to the SMTP core's requests, and the hand-off to the spool.

The SMTP core (``postroom.smtp``) knows the grammar and the states; this module knows what the
answers mean for this server: which recipients are ours (the router), who may relay, how big a
message may be, when a message is a loop, and that 250 comes only after the spool has made the
message durable. It does no socket I/O; ``net.session`` feeds it events and writes its replies.

Log lines follow Postfix's smtpd/cleanup: ``ID: client=``, ``ID: message-id=``,
``ID: from=<>, size=, nrcpt=``, and ``NOQUEUE: reject: RCPT from ...`` for refusals.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from postroom import log
from postroom.delivery.maildir import UsageUnknown, delivery_headers
from postroom.errors import StorageError
from postroom.ids import new_queue_id
from postroom.message.address import Address, parse_path
from postroom.message.headers import (
    TraceInfo,
    count_received,
    from_addresses,
    message_id,
    protocol_name,
    received_header,
    submission_fixes,
)
from postroom.policy.router import Router
from postroom.policy.routes import Destination, LocalDelivery, Rejected
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.incoming import IncomingMessage
from postroom.queue.spool import Spool
from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import EndOfData, MailFrom, RcptTo, Vrfy


@dataclass(slots=True)
class Client:
    """What we know about the peer of one SMTP session."""

    address: str
    port: int
    name: str = "unknown"  # reverse DNS; "unknown" until a resolver is wired in
    helo: str = ""
    esmtp: bool = False
    may_relay: bool = False
    tls: str | None = None
    auth_user: str | None = None  # the SASL authentication identity after AUTH
    auth_method: str | None = None  # its mechanism

    def describe(self) -> str:
        return f"{self.name}[{self.address}]"


@dataclass(slots=True)
class Transaction:
    """One MAIL..end-of-data transaction: the envelope under construction and its content."""

    envelope: Envelope
    mail: MailFrom
    message: IncomingMessage | None = None
    destinations: set[Destination] = field(default_factory=set)

    def discard(self) -> None:
        if self.message is not None:
            self.message.discard()
            self.message = None


@dataclass(frozen=True, slots=True)
class ReceiveSettings:
    hostname: str
    max_message_size: int
    max_received_headers: int
    vrfy: bool
    #: An authenticated user may only use sender addresses that are theirs (553 5.7.1).
    enforce_sender: bool = True
    #: Name the authenticated user in the Received header.
    received_auth_user: bool = False


def _reply(rejected: Rejected) -> Reply:
    return Reply(rejected.code, rejected.enhanced, rejected.text)


class Receiver:
    """Policy and spool hand-off shared by every session of one server."""

    def __init__(self, settings: ReceiveSettings, router: Router, spool: Spool) -> None:
        self.settings = settings
        self.router = router
        self.spool = spool

    # -- MAIL ---------------------------------------------------------------------------------
    def mail(self, client: Client, event: MailFrom) -> tuple[Reply, Transaction | None]:
        if client.auth_user is not None and self.settings.enforce_sender:
            refused = self._check_sender(client, str(event.address), "Sender address")
            if refused is not None:
                return refused, None
        queue_id = new_queue_id()
        envelope = Envelope(
            queue_id=queue_id,
            sender=str(event.address),
            arrival=time.time(),
            client_address=client.address,
            client_name=client.name,
            helo=client.helo,
            body_type=event.body,
            smtputf8=event.smtputf8,
            ret=event.ret,
            envid=event.envid,
        )
        log.event(queue_id, client=f"{client.describe()}:{client.port}",
                  sasl_method=client.auth_method, sasl_username=client.auth_user)
        return codes.OK_MAIL, Transaction(envelope=envelope, mail=event)

    def _check_sender(self, client: Client, sender: str, what: str) -> Reply | None:
        """Sender authorisation (like Postfix's reject_sender_login_mismatch): None when the
        authenticated user owns *sender*, else the 553 (or 451 when the store failed)."""
        login = client.auth_user
        assert login is not None
        header = what != "Sender address"
        try:
            # An empty envelope sender is the null reverse-path, which the store allows; an
            # empty header address is a From: that would not parse: refused.
            owned = bool(sender or not header) and self.router.may_send_as(login, sender)
        except StorageError as exc:
            log.logger.error("accounts lookup failed for sender <%s>: %s", sender, exc)
            return Reply(451, "4.3.0", f"<{sender}>: Temporary lookup failure")
        if owned:
            return None
        reply = Reply(553, "5.7.1", f"<{sender}>: {what} rejected: not owned by user {login}")
        log.logger.info("NOQUEUE: reject: %s from %s: %d %s %s; sasl_username=%s",
                        "END-OF-MESSAGE" if header else "MAIL",
                        client.describe(), reply.code, reply.enhanced, reply.text, login)
        return reply

    # -- RCPT ---------------------------------------------------------------------------------
    def rcpt(self, client: Client, txn: Transaction, event: RcptTo) -> Reply:
        """The answer to RCPT. Raises :class:`UsageUnknown` when a quota needs a mailbox count
        first: the caller counts it in a thread (a big Maildir takes a while) and asks again."""
        address = event.address
        try:
            outcome = self._route(address, client, txn)
        except StorageError as exc:  # the accounts database failed: try again later
            log.logger.error("%s: accounts lookup failed: %s", txn.envelope.queue_id, exc)
            outcome = Rejected(451, "4.3.0", f"<{address}>: Temporary lookup failure")
        except OSError as exc:  # the mailbox could not be read for its quota
            log.logger.error("%s: mailbox of <%s> unreadable: %s", txn.envelope.queue_id,
                             address, exc)
            outcome = Rejected(450, "4.2.0", f"<{address}>: Mailbox temporarily unavailable")
        if isinstance(outcome, Rejected):
            self._log_reject(client, txn, "RCPT", outcome, str(address))
            return _reply(outcome)
        original = str(address)
        for dest in outcome:
            if dest in txn.destinations:
                continue  # two RCPTs (or aliases) reaching one mailbox: deliver once
            txn.destinations.add(dest)
            txn.envelope.recipients.append(
                Recipient(original=original, destination=dest, orcpt=event.orcpt,
                          notify=event.notify)
            )
        return codes.OK_RCPT

    def _route(self, address: Address, client: Client, txn: Transaction
               ) -> list[Destination] | Rejected:
        outcome = self.router.resolve(address, may_relay=client.may_relay)
        if not isinstance(outcome, Rejected) and txn.mail.size:
            for dest in outcome:
                too_big = self.router.check_size(dest, txn.mail.size)
                if too_big is not None:
                    return too_big
        return outcome

    def vrfy(self, client: Client, event: Vrfy) -> Reply:
        if not self.settings.vrfy:
            return codes.CANNOT_VRFY
        try:
            address = parse_path(f"<{event.argument.strip('<>')}>", utf8=True)
        except ValueError:
            return codes.CANNOT_VRFY
        try:
            outcome = self.router.resolve(address, may_relay=False)
        except UsageUnknown:  # not worth a mailbox count: VRFY's "cannot verify now"
            return codes.CANNOT_VRFY
        if isinstance(outcome, Rejected):
            # RFC 5321 4.3.2 lists 550/551/553 for VRFY, not 554 (which RCPT uses for relay)
            code = 550 if outcome.code == 554 else outcome.code
            return Reply(code, outcome.enhanced, outcome.text)
        return Reply(250, "2.1.5", f"<{address}>")

    # -- DATA ---------------------------------------------------------------------------------
    def start_data(self, txn: Transaction) -> None:
        txn.discard()
        txn.message = self.spool.open_message()

    async def end_of_data(self, client: Client, txn: Transaction, event: EndOfData) -> Reply:
        message = txn.message
        envelope = txn.envelope
        if message is None:  # the core never lets this happen; refuse rather than lose
            return codes.LOCAL_ERROR
        headers = message.header_section()
        hops = count_received(headers)
        if hops > self.settings.max_received_headers:
            txn.discard()
            loop = Rejected(554, "5.4.6", f"Too many hops ({hops} Received headers): mail loop?")
            self._log_reject(client, txn, "END-OF-MESSAGE", loop, "")
            return _reply(loop)
        if client.auth_user is not None and message.header_cut:
            # The From: check and the Date/Message-ID fixes need the whole header section.
            txn.discard()
            too_big = Rejected(552, "5.3.4", "Message header section too large for submission")
            self._log_reject(client, txn, "END-OF-MESSAGE", too_big, "")
            return _reply(too_big)
        if client.auth_user is not None and self.settings.enforce_sender:
            for author in from_addresses(headers):
                refused = self._check_sender(client, author, "From: header address")
                if refused is not None:
                    txn.discard()
                    return refused
        envelope.size = event.size
        recipients = envelope.recipients
        trace = TraceInfo(
            helo=client.helo,
            client_address=client.address,
            client_name=client.name,
            hostname=self.settings.hostname,
            protocol=protocol_name(esmtp=client.esmtp, tls=client.tls is not None,
                                   auth=client.auth_user is not None, utf8=envelope.smtputf8),
            queue_id=envelope.queue_id,
            recipient=recipients[0].original if len({r.original for r in recipients}) == 1
            else None,
            timestamp=time.time(),
            tls=client.tls,
            auth_user=client.auth_user if self.settings.received_auth_user else None,
        )
        received = received_header(trace)
        if client.auth_user is not None:  # a submission (RFC 6409 8): complete what is missing
            fixes = submission_fixes(headers, hostname=self.settings.hostname,
                                     queue_id=envelope.queue_id, timestamp=trace.timestamp)
            received += fixes
            headers = fixes + headers
        refused = await self._check_quota_at_end(envelope, event.size + len(received))
        if refused is not None:
            txn.discard()
            return refused
        msgid = message_id(headers)
        if msgid:
            log.event(envelope.queue_id, **{"message-id": msgid})
        log.event(envelope.queue_id, **{"from": envelope.sender}, size=event.size,
                  nrcpt=len(recipients))
        envelope.queued = time.time()
        try:
            await self.spool.accept(envelope, message, received)
        except StorageError as exc:
            log.event(envelope.queue_id, logging.WARNING,
                      status="not accepted", status_detail=str(exc))
            return codes.INSUFFICIENT_STORAGE if exc.disk_full else codes.LOCAL_ERROR
        finally:
            txn.message = None
        # A NOTIFY=SUCCESS notice for mail delivered here is the queue's to send: the spool
        # recorded it in a queue file (a crash after the 250 cannot lose it).
        return codes.ok_queued(envelope.queue_id)

    async def _check_quota_at_end(self, envelope: Envelope, size: int) -> Reply | None:
        """Refuse at end of data only when *every* recipient is a local mailbox too full for
        the message as it will be stored (with Return-Path and Delivered-To added).

        With several recipients one full mailbox must not refuse the others' copies; that
        recipient stays queued and deferred instead (the spool decides).
        """
        refusals: list[Rejected] = []
        for recipient in envelope.recipients:
            dest = recipient.destination
            if not isinstance(dest, LocalDelivery):
                return None
            stored = size + len(delivery_headers(envelope.sender, dest.mailbox))
            try:
                refused = self.router.check_size(dest, stored)
            except UsageUnknown as unknown:  # its maildirsize must be counted: off the loop
                await asyncio.to_thread(self.spool.usage.usage, unknown.root, dest.quota, stored)
                refused = self.router.check_size(dest, stored)
            if refused is None:
                return None
            refusals.append(refused)
        return _reply(refusals[0]) if refusals else None

    # -- logging ------------------------------------------------------------------------------
    def _log_reject(
        self, client: Client, txn: Transaction | None, stage: str, rejected: Rejected,
        recipient: str,
    ) -> None:
        queue_id = txn.envelope.queue_id if txn else "NOQUEUE"
        sender = txn.envelope.sender if txn else ""
        log.logger.info(
            "%s: reject: %s from %s: %d %s %s; from=<%s> to=<%s> proto=%s helo=<%s>",
            queue_id, stage, client.describe(), rejected.code, rejected.enhanced,
            rejected.text, sender, recipient, "ESMTP" if client.esmtp else "SMTP", client.helo,
        )

