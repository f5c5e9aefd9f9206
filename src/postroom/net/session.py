"""One inbound SMTP connection: an ``asyncio.Protocol`` that feeds the sans-I/O core.

Bytes from the socket go to :class:`~postroom.smtp.server.ServerConnection`; its events go to the
:class:`~postroom.receive.Receiver`, whose replies go back to the core; the core's output goes to
the socket. Nothing here parses SMTP. Only end-of-data waits (for the spool's fsync); while it
does, the core holds further pipelined input, and reading pauses when that grows past a bound.

Timeouts are not timers per connection: the server's sweeper compares ``last_activity`` with the
RFC 5321 4.5.3.2 limits once a second, which costs nothing per read.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from postroom import log
from postroom.delivery.maildir import UsageUnknown
from postroom.net.tls import describe
from postroom.policy.authlimit import Reservation
from postroom.receive import Client, Transaction
from postroom.sasl import Challenge, Exchange, Failure, FailureKind, Outcome, PasswordCheck, Success
from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import (
    Auth,
    AuthAborted,
    AuthResponse,
    DataAborted,
    DataChunk,
    DataStart,
    EndOfData,
    Hello,
    MailFrom,
    ProtocolViolation,
    Quit,
    RcptTo,
    Request,
    Reset,
    StartTls,
    Vrfy,
)
from postroom.smtp.server import ServerConnection

if TYPE_CHECKING:
    from postroom.config import ListenerSection
    from postroom.net.server import SmtpServer

#: Pause reading when this much input waits unparsed behind a pending reply.
_PAUSE_ABOVE = 256 * 1024
#: Hand replies to the transport once this much is queued, so its flow control can act.
_FLUSH_ABOVE = 16 * 1024

#: How long a closing TLS connection waits for the client's close_notify (RFC 8446 6.1) before
#: the socket is dropped. asyncio's default is 30 s: at shutdown every idle client that never
#: answers would hold the process for that long.
TLS_SHUTDOWN_TIMEOUT = 5.0

#: The SMTP reply to each way a SASL exchange can fail (RFC 4954 4 and 6).
_SASL_FAILURES = {
    FailureKind.REJECTED: codes.AUTH_FAILED,
    FailureKind.MALFORMED: codes.AUTH_MALFORMED,
    FailureKind.TOO_LONG: codes.AUTH_LINE_TOO_LONG,
    FailureKind.CANCELLED: codes.AUTH_CANCELLED,
    FailureKind.INITIAL_RESPONSE_REFUSED: Reply(501, "5.7.0",
                                                "Initial response not allowed for this mechanism"),
    FailureKind.UNAVAILABLE: codes.AUTH_UNAVAILABLE,
}


class SmtpSession(asyncio.Protocol):
    __slots__ = (
        "_early",
        "_paused",
        "_pending",
        "_sasl",
        "_upgrade",
        "_write_paused",
        "client",
        "conn",
        "last_activity",
        "listener",
        "server",
        "transport",
        "txn",
    )

    def __init__(self, server: SmtpServer, listener: ListenerSection) -> None:
        self.server = server
        self.listener = listener
        self.conn = ServerConnection(server.smtp_settings)
        self._sasl: Exchange | None = None  # the AUTH exchange in progress
        #: During a TLS handshake: what the client sent inside TLS before the handshake's await
        #: returned (asyncio may deliver it that early); fed to the core once it knows TLS is up.
        self._early: bytearray | None = None
        self.transport: asyncio.Transport | None = None
        self.client = Client(address="", port=0)
        self.txn: Transaction | None = None
        self._pending: asyncio.Task[None] | None = None
        self._paused = False
        self._upgrade = False  # 220 to STARTTLS queued: start TLS once it is written
        self._write_paused = False  # the peer does not read its replies: stop parsing
        self.last_activity = time.monotonic()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        peer = transport.get_extra_info("peername") or ("", 0)
        address = str(peer[0])
        if address.startswith("::ffff:"):
            address = address[7:]
        self.client.address = address
        self.client.port = int(peer[1])
        refusal = self.server.admit(self)
        if refusal is not None:
            log.logger.warning("reject: connect from %s: %s", self.client.describe(), refusal.text)
            self.conn.reject_connection(refusal)
        else:
            self.client.may_relay = self.server.may_relay(address)
            log.logger.info("connect from %s", self.client.describe())
            self._configure(address)
            if self.listener.implicit_tls:  # RFC 8314: TLS first, then the banner inside it
                self._implicit_tls()
                return
            self.conn.start()
        self._flush()

    def _implicit_tls(self) -> None:
        """An implicit-TLS listener's connection arrives with TLS up: the server has the loop
        do the handshake from the first byte (``SmtpServer.start``). Starting it here, with
        start_tls, loses a race on uvloop: reading starts after connection_made returns, whatever
        it paused, so a client's ClientHello could reach this protocol instead of TLS and the
        handshake then hung until its timeout."""
        transport = self.transport
        assert transport is not None
        if transport.get_extra_info("ssl_object") is None:  # no certificate at start-up
            log.logger.error("no TLS certificate for the %s listener", self.listener.role)
            transport.abort()
            return
        self._secured(transport)
        self.conn.start()
        self._flush()

    def _configure(self, address: str) -> None:
        """What this listener's role offers (see ``ListenerSection``)."""
        conn = self.conn
        listener = self.listener
        server = self.server
        if server.tls_context is not None and not listener.implicit_tls and (
                listener.role != "mx" or server.config.tls.starttls):
            conn.extensions.append("STARTTLS")
        auth = server.auth
        if listener.offers_auth and auth is not None:
            conn.auth_mechanisms = list(auth.mechanisms)
            conn.auth_requires_tls = auth.requires_tls(address)
        conn.require_auth = listener.requires_auth

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self._early is not None:
            self._early += data
            if len(self._early) > _PAUSE_ABOVE and self.transport is not None:
                self.transport.abort()  # nobody sends that much before seeing a greeting
            return
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        # A half-close still gets the replies to what was sent before it (the 250 of a
        # pipelined end of data above all): keep the socket open for writing; the core closes
        # the session once nothing buffered can make progress.
        self.conn.receive_eof()
        self._pump()
        return True

    def pause_writing(self) -> None:
        """The peer does not read: parse nothing more, so replies cannot pile up."""
        self._write_paused = True
        if self.transport is not None and not self._paused:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._paused and not self.transport.is_closing():
            self.transport.resume_reading()
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.release(self)
        if self.txn is not None and self._pending is None:
            self.txn.discard()
            self.txn = None
        log.logger.info("disconnect from %s", self.client.describe())

    # -- the event pump -----------------------------------------------------------------------
    def _pump(self) -> None:
        conn = self.conn
        while self._pending is None and not self._write_paused:
            if conn.output_size > _FLUSH_ABOVE:
                self._flush()  # may call pause_writing() at once
                continue
            event = conn.next_event()
            if event is None:
                break
            if isinstance(event, Request):
                try:
                    reply = self._decide(event)
                except Exception:  # a bug costs this command a 451, never the connection
                    log.logger.exception("error handling %s from %s", type(event).__name__,
                                         self.client.describe())
                    reply = codes.LOCAL_ERROR
                if reply is None:  # answered later (end of data)
                    break
                conn.respond(reply)
            else:
                self._observe(event)
        self._flush()
        if self._upgrade:
            self._upgrade = False
            self._start_tls()
            return
        if self.transport is not None and not self.transport.is_closing():
            if conn.buffered > _PAUSE_ABOVE and not self._paused:
                self._paused = True
                self.transport.pause_reading()
            elif self._paused and conn.buffered <= _PAUSE_ABOVE:
                self._paused = False
                if not self._write_paused:
                    self.transport.resume_reading()

    def _decide(self, event: Request) -> Reply | None:
        receiver = self.server.receiver
        client = self.client
        if isinstance(event, RcptTo):
            if self.txn is None:
                return codes.BAD_SEQUENCE
            try:
                return receiver.rcpt(client, self.txn, event)
            except UsageUnknown as unknown:  # count the mailbox off the loop, then decide
                self._pending = asyncio.get_running_loop().create_task(
                    self._rcpt_after_count(self.txn, event, unknown.root))
                return None
        if isinstance(event, MailFrom):
            reply, self.txn = receiver.mail(client, event)
            return reply
        if isinstance(event, EndOfData):
            if self.txn is None:
                return codes.BAD_SEQUENCE
            txn = self.txn
            self.txn = None
            self._pending = asyncio.get_running_loop().create_task(self._finish(txn, event))
            return None
        if isinstance(event, Hello):
            client.helo = event.name
            client.esmtp = event.verb == "EHLO"
            self._drop_transaction()
            return Reply(250, None, f"{self.server.hostname}")
        if isinstance(event, Vrfy):
            return receiver.vrfy(client, event)
        if isinstance(event, StartTls):
            if self.server.tls_context is None:
                return Reply(454, "4.7.0", "TLS not available due to temporary reason")
            self._upgrade = True
            return Reply(220, "2.0.0", "Ready to start TLS")
        if isinstance(event, Auth):
            return self._auth_start(event)
        if isinstance(event, AuthResponse):
            exchange = self._sasl
            if exchange is None:
                return codes.BAD_SEQUENCE
            return self._sasl_input(lambda: exchange.receive(event.line))
        return codes.NOT_IMPLEMENTED

    # -- AUTH ---------------------------------------------------------------------------------
    # The throttle is asked before every step, not once at AUTH: a client may park at the
    # password prompt, or queue behind an argon2 slot, while other connections get the address
    # blocked. A step that may judge a proof synchronously (SCRAM's client-final, CRAM-MD5's
    # response, PLAIN/LOGIN's hash lookup) runs under a reservation taken in the same callback,
    # so the block test and the count cannot be separated by another session's guess; argon2
    # checks reserve again once their slot is free (AuthService.verify).
    def _auth_start(self, event: Auth) -> Reply | None:
        auth = self.server.auth
        if auth is None:
            return codes.NOT_IMPLEMENTED
        wait = auth.blocked(self.client.address)
        if wait > 0:
            return self._refuse_blocked(wait)
        exchange = auth.open(event.mechanism)
        if exchange is None:
            return codes.AUTH_MECHANISM
        self._sasl = exchange
        return self._sasl_input(lambda: exchange.begin(event.initial_response))

    def _refuse_blocked(self, wait: float) -> Reply:
        """421 4.7.0 (the core closes the session). Logged at info level: a refusal is not a
        failure, and must feed no fail2ban jail (the block itself was logged once)."""
        self._sasl = None
        log.logger.info("%s: AUTH refused: too many failed authentications (%d s left)",
                        self.client.describe(), round(wait))
        return self._blocked_reply()

    def _sasl_input(self, step: Callable[[], Outcome]) -> Reply | None:
        """Feed the exchange one client message (*step*) under a reservation."""
        auth = self.server.auth
        assert auth is not None
        reservation = auth.reserve(self.client.address)
        if not reservation.granted:
            return self._refuse_blocked(reservation.blocked_for)
        try:
            outcome = step()
        except BaseException:
            auth.release(self.client.address, reservation)
            raise
        return self._sasl_step(outcome, reservation)

    def _sasl_step(self, outcome: Outcome, reservation: Reservation) -> Reply | None:
        """Settle *reservation* by *outcome*. A challenge or a success is answered at once, a
        failure once its delay is waited out, a password check by a task."""
        auth = self.server.auth
        exchange = self._sasl
        assert auth is not None and exchange is not None
        if isinstance(outcome, Success):
            return self._auth_succeeded(outcome, reservation)
        if isinstance(outcome, Challenge):  # nothing judged
            auth.release(self.client.address, reservation)
            return codes.challenge(outcome.text)
        if isinstance(outcome, PasswordCheck):  # reserved again when its argon2 slot is free
            auth.release(self.client.address, reservation)
            self._pending = asyncio.get_running_loop().create_task(self._password_check(outcome))
            return None
        self._sasl = None
        verdict = auth.record_failure(self.client.describe(), self.client.address,
                                      exchange.mechanism.name, outcome, reservation)
        return self._failure_reply(outcome, verdict.delay if verdict is not None else 0.0,
                                   verdict is not None and verdict.blocked)

    def _failure_reply(self, failure: Failure, delay: float, blocked: bool) -> Reply | None:
        if blocked:
            return self._blocked_reply()
        reply = _SASL_FAILURES[failure.kind]
        if delay <= 0:
            return reply
        self._pending = asyncio.get_running_loop().create_task(self._answer_after(delay, reply))
        return None

    def _blocked_reply(self) -> Reply:
        return Reply(421, "4.7.0", f"{self.server.hostname} Error: too many failed "
                     "authentications; try again later")

    async def _answer_after(self, delay: float, reply: Reply) -> None:
        """A failure reply held back by the throttle's delay (counted already)."""
        await asyncio.sleep(delay)
        self._answer_later(reply)

    def _auth_succeeded(self, success: Success, reservation: Reservation | None) -> Reply:
        auth = self.server.auth
        exchange, self._sasl = self._sasl, None
        assert auth is not None and exchange is not None
        # The account's address as stored, not as typed: the sender checks, the Received line
        # and the logs name one account one way.
        self.client.auth_user = auth.succeeded(self.client.describe(), self.client.address,
                                               exchange.mechanism.name, success, reservation)
        self.client.auth_method = exchange.mechanism.name
        self.client.may_relay = True  # an authenticated user may send anywhere (closed relay)
        return codes.AUTH_OK

    def _gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def _password_check(self, check: PasswordCheck) -> None:
        auth = self.server.auth
        exchange = self._sasl
        address = self.client.address
        reservation: Reservation | None = None
        reply: Reply
        try:
            assert auth is not None and exchange is not None
            checked = await auth.verify(check, address, self._gone)
            if checked.reservation is None:  # the client left while the check waited
                self._sasl = None
                self._pending = None
                return
            if not checked.reservation.granted:  # blocked while this guess waited for its slot
                self._answer_later(self._refuse_blocked(checked.reservation.blocked_for))
                return
            reservation = checked.reservation  # released below if anything goes wrong
            result = exchange.password_checked(checked.ok)
            if not isinstance(result, Success | Failure):  # no mechanism of ours asks twice
                raise AssertionError(f"{exchange.mechanism.name}: {type(result).__name__} "
                                     "after a password check")
            settled, reservation = reservation, None  # from here on, success or failure has it
            if isinstance(result, Success):
                self._answer_later(self._auth_succeeded(result, settled))
                return
            self._sasl = None
            refused = await auth.failed(self.client.describe(), address, exchange.mechanism.name,
                                        result, settled)
            reply = self._blocked_reply() if refused else _SASL_FAILURES[result.kind]
        except Exception:  # a bug costs this exchange a 454, never the connection
            log.logger.exception("error during AUTH from %s", self.client.describe())
            if reservation is not None and auth is not None:
                auth.release(address, reservation)
            self._sasl = None
            reply = codes.AUTH_UNAVAILABLE
        self._answer_later(reply)

    def _observe(self, event: object) -> None:
        if isinstance(event, DataChunk):
            if self.txn is not None and self.txn.message is not None:
                self.txn.message.write(event.data)
        elif isinstance(event, DataStart):
            if self.txn is not None:
                self.server.receiver.start_data(self.txn)
        elif isinstance(event, DataAborted):
            if self.txn is not None:
                log.logger.info(
                    "%s: reject: DATA from %s: %d %s %s", self.txn.envelope.queue_id,
                    self.client.describe(), event.reply.code, event.reply.enhanced,
                    event.reply.text,
                )
            self._drop_transaction()
        elif isinstance(event, Reset):
            self._drop_transaction()
        elif isinstance(event, AuthAborted):
            self._sasl = None
        elif isinstance(event, ProtocolViolation):
            log.logger.warning("%s from %s", event.reply.text, self.client.describe())
        elif isinstance(event, Quit):
            pass

    async def _rcpt_after_count(self, txn: Transaction, event: RcptTo, root: Path) -> None:
        usage = self.server.receiver.spool.usage
        try:
            await asyncio.to_thread(usage.usage, root)
            reply = self.server.receiver.rcpt(self.client, txn, event)
        except (UsageUnknown, OSError):  # unreadable, or stale again already: not now
            reply = Reply(450, "4.2.0", f"<{event.address}>: Mailbox temporarily unavailable")
        except Exception:
            log.logger.exception("error handling RCPT from %s", self.client.describe())
            reply = codes.LOCAL_ERROR
        self._answer_later(reply)

    async def _finish(self, txn: Transaction, event: EndOfData) -> None:
        try:
            reply = await self.server.receiver.end_of_data(self.client, txn, event)
        except Exception:  # a bug must cost one 451, never the connection's other work
            log.logger.exception("%s: error at end of data", txn.envelope.queue_id)
            txn.discard()
            reply = codes.LOCAL_ERROR
        self._answer_later(reply)

    def _answer_later(self, reply: Reply) -> None:
        """Answer the Request a task was deciding, then go on with the input behind it."""
        self._pending = None
        if self.transport is None or self.transport.is_closing():
            return
        self.conn.respond(reply)
        if self.server.shutting_down and not self.conn.in_transaction:
            self.conn.shutdown()
        self._pump()

    def _start_tls(self) -> None:
        """The 220 is written: hand the socket to TLS (RFC 3207). Nothing more is read in
        plaintext: reading pauses now and resumes inside TLS."""
        transport = self.transport
        context = self.server.tls_context
        if transport is None or transport.is_closing():
            return
        if context is None:  # reloaded without a certificate: nothing sensible to say
            log.logger.error("no TLS certificate for the %s listener", self.listener.role)
            transport.abort()
            return
        transport.pause_reading()
        self._early = bytearray()
        self._pending = asyncio.get_running_loop().create_task(self._handshake(transport, context))

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """STARTTLS after our 220 (implicit TLS is the listener's, see _implicit_tls)."""
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(transport, self, context, server_side=True,
                                          ssl_handshake_timeout=self.server.config.smtp.command_timeout,
                                          ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.logger.info("TLS handshake failed from %s: %s", self.client.describe(), exc)
            self._pending = self._early = None
            transport.abort()
            return
        self._pending = None
        early, self._early = self._early, None
        if secure is None:  # the connection went away during the handshake
            return
        self._secured(secure)
        if early:
            self.conn.receive_data(bytes(early))
        self.last_activity = time.monotonic()
        self._pump()

    def _secured(self, secure: asyncio.Transport) -> None:
        """TLS is up on *secure*; whatever was said before it is forgotten (RFC 3207 4.2)."""
        self.transport = secure
        self.client.tls = describe(secure.get_extra_info("ssl_object"))
        self.client.helo = ""
        self.client.auth_user = self.client.auth_method = None  # RFC 3207 4.2: start over
        self.client.may_relay = self.server.may_relay(self.client.address)
        self._sasl = None
        log.logger.info("TLS established from %s: %s", self.client.describe(), self.client.tls)
        self.conn.tls_established()

    def _drop_transaction(self) -> None:
        if self.txn is not None:
            self.txn.discard()
            self.txn = None

    def _flush(self) -> None:
        out = self.conn.data_to_send()
        transport = self.transport
        if transport is None:
            return
        if out:
            transport.write(out)
        if self.conn.closed and not transport.is_closing():
            transport.close()

    # -- called by the server -----------------------------------------------------------------
    @property
    def closing(self) -> bool:
        """The transport is closing: the session has said its last word (a TLS session may still
        wait for the client's close_notify, for up to :data:`TLS_SHUTDOWN_TIMEOUT`)."""
        return self.transport is not None and self.transport.is_closing()

    @property
    def busy(self) -> bool:
        """In a transaction or waiting for the spool: let it finish on shutdown."""
        return self._pending is not None or self.conn.in_transaction

    def check_timeout(self, now: float, command_timeout: float, data_timeout: float) -> None:
        if self._pending is not None or self.conn.closed:
            return
        limit = data_timeout if self.conn.in_data else command_timeout
        if now - self.last_activity > limit:
            log.logger.info("timeout after %s from %s", self.conn.state.name,
                            self.client.describe())
            self._drop_transaction()
            self.conn.timeout()
            self._flush()

    def shutdown(self, force: bool = False) -> None:
        if self.conn.closed or (self.busy and not force):
            return
        if self._pending is not None:
            return  # the spool is writing: the reply still comes, then the close
        self._drop_transaction()
        self.conn.shutdown()
        self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

