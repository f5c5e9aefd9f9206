"""Remote delivery: the asyncio transport around the SMTP client core (RFC 5321 5, 4.5.3.2).

:meth:`RemoteDeliverer.deliver` makes one delivery attempt of one message to the recipients of
one domain and returns an :class:`AttemptResult`: for every recipient the verdict (delivered,
temporary, permanent), the reply that decided it, the command it answered, and the host, IP and
port that said it. It never raises for anything the network or the peer does.

How an attempt goes:

1. :class:`~postroom.delivery.route.Router` gives the targets (MX hosts' addresses, or the
   configured next hop); a routing failure decides every recipient at once.
2. An idle cached connection to the same next hop (or the same address) is used first, after an
   RSET that proves it alive; otherwise the targets are connected to in order. RFC 5321 5.1: a
   connection error, a refused greeting (4xx or 5xx), a failed EHLO/HELO, required TLS that cannot
   be had, or failed AUTH moves on to the next target. A server that takes the connection but
   does not greet (or answer EHLO) in time, or hangs up first, is reported like a refused
   connection (stage CONNECT, local): the queue runner then treats the destination as dead when
   no host of it answered, as it does for refused connections.
3. One transaction carries every recipient still open. Recipients it defers before end of data
   (4xx to MAIL, RCPT or DATA, a 421) go on to the next target, like Postfix, up to
   ``max_sessions`` servers; what the last server says is final. A reply lost after the final dot
   is never retried elsewhere in the same attempt (the message may have been taken).
4. Without 8BITMIME at the server, 8-bit content is converted to quoted-printable
   (:mod:`postroom.message.downgrade`, RFC 6152 3, Postfix's default) and SIZE declares the
   converted size; a message that cannot be converted fails with 5.6.3 (a bounce). A DKIM
   signature does not stop the conversion (as in Postfix), but the log says it broke.
5. A connection still in good order is kept for ``cache_idle`` seconds for the next message to
   the same destination (:class:`ConnectionCache`); else QUIT.

TLS (RFC 3207): ``none`` never starts it; ``opportunistic`` starts it when offered, without
checking the certificate, and after a failed handshake tries the same address again in plaintext;
``required`` wants STARTTLS and a certificate valid for the host name (the MX name, or the
configured next hop), else defers with 4.7.5 (4.7.4 when STARTTLS is not offered). Credentials
go only over TLS unless ``auth_without_tls``.

The message is read from a :class:`MessageSource` in ``chunk_size`` pieces, so memory stays
bounded whatever its size; reads are plain file reads from the event loop (page-cache speed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

from postroom.delivery.route import Route, RouteError, Router, Target, TlsPolicy
from postroom.message.downgrade import DowngradeError, Plan, downgrade, has_8bit, plan
from postroom.smtp.client import (
    Authenticated,
    ClientConnection,
    ClientEvent,
    ClientSettings,
    ClientState,
    ClientTimeouts,
    ContentWanted,
    OutboundEnvelope,
    OutboundRecipient,
    Ready,
    ResetDone,
    SessionFailed,
    Stage,
    TlsReady,
    TlsRefused,
    TransactionDone,
    TransactionResult,
    Verdict,
    verdict,
)
from postroom.smtp.codes import Reply

logger = logging.getLogger("postroom.delivery")

CHUNK_SIZE: Final = 64 * 1024
#: Stages whose local failure (time-out, lost connection, garbage) means the server never got
#: going: counted with connection failures (Stage.CONNECT).
_UNANSWERED: Final = frozenset({Stage.GREETING, Stage.EHLO, Stage.HELO})
#: Seconds :meth:`ConnectionCache.close` waits for connections to finish closing.
_CLOSE_WAIT: Final = 2.0


# -- what to send -------------------------------------------------------------------------------
class MessageSource(Protocol):
    """The message, CRLF line ends, readable again from the start for every attempt."""

    @property
    def size(self) -> int: ...

    def chunks(self, chunk_size: int) -> Iterator[bytes]: ...


@dataclass(frozen=True, slots=True)
class BytesSource:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        view = memoryview(self.data)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start : start + chunk_size])


@dataclass(frozen=True, slots=True)
class FileSource:
    """``length`` octets of ``path`` from ``offset`` (a queue file: the message follows the
    envelope line); ``length`` None reads to the end."""

    path: Path
    offset: int = 0
    length: int | None = None

    @property
    def size(self) -> int:
        if self.length is not None:
            return self.length
        return self.path.stat().st_size - self.offset

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        left = self.length
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            while left is None or left > 0:
                block = fh.read(chunk_size if left is None else min(chunk_size, left))
                if not block:
                    return
                if left is not None:
                    left -= len(block)
                yield block


@dataclass(frozen=True, slots=True)
class DowngradedSource:
    """``source`` converted to 7-bit as it is read (RFC 6152 3), by a plan made from it."""

    source: MessageSource
    plan: Plan

    @property
    def size(self) -> int:
        return self.plan.size

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        inner = self.source.chunks(chunk_size)
        try:
            yield from downgrade(inner, self.plan)
        except DowngradeError as exc:  # not what the plan read: treat it as a read error
            raise OSError(f"the message changed during its conversion: {exc.reason}") from None
        finally:
            _close(inner)


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if close is not None:
        close()  # a generator's open file is closed now, not when collected


def prepare_downgrade(message: MessageSource, chunk_size: int,
                      utf8_headers: bool) -> Plan | DowngradeError | None:
    """For a server without 8BITMIME: None when the message is 7-bit already (sent as it is),
    else the conversion plan, or why there can be none. Reads the message (twice when it has
    8-bit octets): run it off the event loop."""
    chunks = message.chunks(chunk_size)
    try:
        if not has_8bit(chunks):
            return None
    finally:
        _close(chunks)
    chunks = message.chunks(chunk_size)
    try:
        return plan(chunks, utf8_headers=utf8_headers)
    except DowngradeError as exc:
        return exc
    finally:
        _close(chunks)


# -- results ------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RecipientResult:
    recipient: OutboundRecipient
    reply: Reply  # the server's, or ours when ``local``
    stage: Stage  # what ``reply`` answered (CONNECT for routing and connection failures)
    local: bool  # we made the reply: routing, connect failure, timeout, TLS policy, SIZE ...
    target: Target | None = None  # the host that said it; None when no connection was made
    tls: bool = False  # the transaction ran over TLS
    dsn_passed: bool = False  # the server offers DSN and got NOTIFY/ORCPT (RFC 3461 4.1)

    @property
    def verdict(self) -> Verdict:
        # RFC 5321 4.5.3.1.10: some servers answer 552 (not 452) to one RCPT too many; it
        # means "not in this transaction", so it is retried, as Postfix does.
        if self.stage is Stage.RCPT and self.reply.code == 552:
            return Verdict.TEMPORARY
        return verdict(self.reply.code)

    @property
    def relay(self) -> str:
        """The log's ``relay=``: ``mx.example.org[192.0.2.1]:25``, or ``none``."""
        return self.target.relay if self.target is not None else "none"

    @property
    def dsn(self) -> str:
        """The enhanced status for the log and a DSN: the reply's, else X.0.0 of its class."""
        return self.reply.enhanced or f"{min(max(self.reply.code // 100, 2), 5)}.0.0"

    @property
    def detail(self) -> str:
        """What the log puts in ``status=... (detail)``, in Postfix's words."""
        text = " ".join(line for line in self.reply.lines if line)
        said = f"{self.reply.code} {self.reply.enhanced + ' ' if self.reply.enhanced else ''}{text}"
        if self.target is None:
            return text
        if self.local:
            return f"{self.target.host}[{self.target.ip}]: {text}"
        if self.verdict is Verdict.DELIVERED:
            return said.strip()
        name = f"{self.target.host}[{self.target.ip}]"
        return f"host {name} said: {said.strip()} ({self.stage.in_reply_to})"


@dataclass(frozen=True, slots=True)
class AttemptResult:
    domain: str
    recipients: tuple[RecipientResult, ...]
    notes: tuple[str, ...] = ()  # what went wrong on the way (for the log): skipped hosts ...
    #: Seconds spent on DNS, connecting, greeting, EHLO and TLS; then on the transaction
    #: (the ``c`` and ``d`` of the log's ``delays=a/b/c/d``, as Postfix splits them).
    setup: float = 0.0
    transmission: float = 0.0

    def by_verdict(self, wanted: Verdict) -> list[RecipientResult]:
        return [r for r in self.recipients if r.verdict is wanted]


# -- settings -----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RemoteSettings:
    helo_name: str
    tls_policy: TlsPolicy = TlsPolicy.OPPORTUNISTIC
    tls_ca_file: Path | None = None  # extra trust anchors for ``required`` (a private CA)
    connect_timeout: float = 30.0  # Postfix smtp_connect_timeout
    tls_timeout: float = 60.0  # the TLS handshake
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    pipelining: bool = True
    chunking: bool = True
    max_sessions: int = 2  # servers talked to per attempt (Postfix smtp_mx_session_limit)
    chunk_size: int = CHUNK_SIZE
    auth_without_tls: bool = False  # allow AUTH in plaintext (only for a trusted network)
    cache_idle: float = 5.0  # seconds an idle connection is kept; 0 turns reuse off
    cache_max_age: float = 300.0  # no reuse of a connection older than this
    cache_max: int = 64  # idle connections kept at most, all destinations together
    mime_conversion: bool = True  # 8-bit to quoted-printable for a server without 8BITMIME

    def client(self) -> ClientSettings:
        return ClientSettings(self.helo_name, self.timeouts, self.pipelining, self.chunking)


# -- one connection -----------------------------------------------------------------------------
class _SessionOver(Exception):
    """The connection cannot be used further; ``failure`` says why."""

    def __init__(self, failure: SessionFailed) -> None:
        super().__init__(failure.reply.lines[0])
        self.failure = failure


class OutboundSession(asyncio.Protocol):
    """One SMTP connection: feeds the client core and writes what it says. No SMTP here."""

    def __init__(self, settings: ClientSettings, target: Target, tls_policy: TlsPolicy,
                 auth_user: str | None) -> None:
        self.conn = ClientConnection(settings)
        self._fallback_timeout = settings.timeouts.helo
        self.target = target
        self.key = (target.ip, target.port, tls_policy, auth_user)
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.created = loop.time()
        self.lost: asyncio.Future[None] = loop.create_future()  # done once the socket is gone
        self._wakeup = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self.flush()

    def eof_received(self) -> bool:
        return False  # close; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self.conn.connection_lost()
        self._writable.set()
        self._wakeup.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # for the deliverer
    def flush(self) -> None:
        out = self.conn.data_to_send()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if out:
                transport.write(out)
            if self.conn.closed:
                transport.close()
        self._wakeup.set()

    @property
    def usable(self) -> bool:
        return not self.conn.closed and self.transport is not None and not self.transport.is_closing()

    async def event(self) -> ClientEvent:
        """The core's next event, waiting at most the core's timeout for replies."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is not None:
                return event
            if conn.closed:
                raise _SessionOver(SessionFailed(Reply(421, "4.4.2", "connection closed"),
                                                 Stage.CONNECT, local=True))
            self._wakeup.clear()
            timeout = conn.timeout
            if timeout is None:  # nothing asked: a bug of ours; do not hang on it
                timeout = self._fallback_timeout
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout)
            except TimeoutError:
                conn.timed_out()
                self.flush()

    async def drain(self) -> None:
        """Wait until the socket takes more (the data block timeout, RFC 5321 4.5.3.2.5)."""
        if self._writable.is_set():
            return
        try:
            await asyncio.wait_for(self._writable.wait(), self.conn.timeout)
        except TimeoutError:
            self.conn.timed_out()
            self.flush()

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str | None) -> None:
        """The handshake (the caller bounds it in time), then EHLO again (RFC 3207 4.2)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context,
                                         server_hostname=server_hostname)
        if transport is None:  # pragma: no cover - only when the transport closed meanwhile
            raise ConnectionError("connection closed during the TLS handshake")
        self.transport = transport
        self.conn.tls_established()
        self.flush()

    def close(self, polite: bool = True) -> None:
        if polite and self.usable and self.conn.state is ClientState.READY:
            self.conn.quit()
            self.flush()
        if self.transport is not None:
            self.transport.close()


# -- the connection cache -----------------------------------------------------------------------
class ConnectionCache:
    """Idle connections for reuse, by address (``OutboundSession.key``) and by next hop.

    Several connections may wait per address (parallel deliveries to one destination each
    hand theirs back), up to ``max_size`` in all; the oldest idle one goes first when full. A
    connection waits at most ``idle`` seconds, and none is reused once ``max_age`` old (Postfix
    smtp_connection_cache_time_limit and smtp_connection_reuse_time_limit).
    """

    def __init__(self, idle: float = 5.0, max_age: float = 300.0, max_size: int = 64) -> None:
        self.idle = idle
        self.max_age = max_age
        self.max_size = max_size
        #: key -> idle sessions (the most recently used last), each with its expiry timer
        self._idle: dict[tuple[object, ...], list[tuple[OutboundSession, asyncio.TimerHandle]]] = {}
        self._count = 0
        self._by_hop: dict[str, tuple[object, ...]] = {}
        self.reused = 0

    def __len__(self) -> int:
        return self._count

    def put(self, hop: str, session: OutboundSession) -> None:
        loop = asyncio.get_running_loop()
        too_old = loop.time() - session.created >= self.max_age
        if self.idle <= 0 or too_old or not session.usable:
            session.close()
            return
        if self._count >= self.max_size:
            oldest = min((entries[0][0] for entries in self._idle.values() if entries),
                         key=lambda s: s.created)
            self._drop(oldest)
        handle = loop.call_later(self.idle, self._drop, session)
        self._idle.setdefault(session.key, []).append((session, handle))
        self._count += 1
        self._by_hop[hop] = session.key

    def take(self, key: tuple[object, ...]) -> OutboundSession | None:
        entries = self._idle.get(key)
        while entries:
            session, handle = entries.pop()
            self._count -= 1
            handle.cancel()
            if session.usable:
                if not entries:
                    del self._idle[key]
                return session
            session.close(polite=False)
        self._idle.pop(key, None)
        return None

    def take_for_hop(self, hop: str, policy: TlsPolicy, auth_user: str | None) -> OutboundSession | None:
        key = self._by_hop.get(hop)
        if key is None or key[2:] != (policy, auth_user):
            return None
        return self.take(key)

    def _drop(self, session: OutboundSession) -> OutboundSession | None:
        entries = self._idle.get(session.key)
        if not entries:
            return None
        for i, (idle, handle) in enumerate(entries):
            if idle is session:
                del entries[i]
                self._count -= 1
                if not entries:
                    del self._idle[session.key]
                handle.cancel()
                session.close()
                return session
        return None

    async def close(self) -> None:
        """QUIT every idle connection and wait (a little) until they are closed: a TLS
        connection needs a few round trips of the loop for its close_notify."""
        idle = [session for entries in self._idle.values() for session, _ in entries]
        sessions = [s for s in (self._drop(session) for session in idle) if s is not None]
        self._by_hop.clear()
        waiting = [s.lost for s in sessions if not s.lost.done()]
        if waiting:
            await asyncio.wait(waiting, timeout=_CLOSE_WAIT)
        for session in sessions:
            if not session.lost.done() and session.transport is not None:
                session.transport.abort()


# -- the deliverer --------------------------------------------------------------------------------
@dataclass(slots=True)
class _Attempt:
    """What one delivery attempt has decided so far."""

    envelope: OutboundEnvelope
    route: Route | None = None
    decided: dict[int, RecipientResult] = field(default_factory=dict)  # by recipient index
    open: list[int] = field(default_factory=list)  # recipient indexes still to deliver
    last: RecipientResult | None = None  # the latest failure that decided nobody (for the rest)
    notes: list[str] = field(default_factory=list)
    sessions: int = 0
    started: float = 0.0  # loop time: the attempt began (routing and connection setup follow)
    transaction: float | None = None  # loop time: the last transaction began (MAIL sent)
    queue_id: str | None = None  # for the log
    #: 8BITMIME downgrade plans made so far, by "8-bit header fields allowed" (SMTPUTF8 in use)
    downgrades: dict[bool, Plan | DowngradeError | None] = field(default_factory=dict)


def _policy_failure(text: str, status: str, stage: Stage = Stage.STARTTLS) -> _SessionOver:
    return _SessionOver(SessionFailed(Reply(451, status, text), stage, local=True))


class _MessageUnreadable(Exception):
    """Reading the message failed: our problem, not the server's; the attempt stops."""


def _failure(reply: Reply, stage: Stage, local: bool, target: Target | None) -> RecipientResult:
    placeholder = OutboundRecipient("")
    return RecipientResult(placeholder, reply, stage, local, target)


class RemoteDeliverer:
    """Delivers messages to remote domains; one per process, sharing its connection cache."""

    def __init__(self, settings: RemoteSettings, router: Router,
                 cache: ConnectionCache | None = None) -> None:
        self.settings = settings
        self.router = router
        self.cache = cache if cache is not None else ConnectionCache(
            settings.cache_idle, settings.cache_max_age, settings.cache_max)
        self._client = settings.client()
        self._verify: ssl.SSLContext | None = None
        self._unverified: ssl.SSLContext | None = None

    async def close(self) -> None:
        """QUIT every idle connection (call before the event loop ends)."""
        await self.cache.close()

    async def deliver(self, domain: str, envelope: OutboundEnvelope, message: MessageSource,
                      *, queue_id: str | None = None) -> AttemptResult:
        """One attempt for ``envelope`` (whose recipients all belong to ``domain``)."""
        attempt = _Attempt(envelope, open=list(range(len(envelope.recipients))),
                           started=asyncio.get_running_loop().time(), queue_id=queue_id)
        if envelope.size is None:
            try:
                attempt.envelope = dataclasses.replace(envelope, size=message.size)
            except OSError as exc:
                unreadable = Reply(451, "4.3.0", f"cannot read the message: {exc}")
                self._decide_rest(attempt, _failure(unreadable, Stage.CONNECT, True, None))
                return self._result(domain, attempt)
        try:
            attempt.route = await self.router.route(domain)
        except RouteError as exc:
            self._decide_rest(attempt, _failure(exc.reply, Stage.CONNECT, True, None))
            return self._result(domain, attempt)
        route = attempt.route
        attempt.notes.extend(route.notes)
        policy = route.tls or self.settings.tls_policy
        user = route.auth.username if route.auth else None
        try:
            await self._sessions(attempt, route, policy, user, message)
        except _MessageUnreadable as exc:
            self._decide_rest(attempt, _failure(Reply(451, "4.3.0", str(exc)), Stage.END, True,
                                                None))
        if attempt.open:
            last = attempt.last or _failure(
                Reply(451, "4.4.1", "no server could be reached"), Stage.CONNECT, True, None)
            self._decide_rest(attempt, last)
        return self._result(domain, attempt)

    async def _sessions(self, attempt: _Attempt, route: Route, policy: TlsPolicy,
                        user: str | None, message: MessageSource) -> None:
        """Sessions in order (a cached one first) until nobody is open or none may follow."""
        cached = self.cache.take_for_hop(route.key, policy, user)
        if cached is not None:
            await self._on_session(attempt, cached, message, reused=True)
        for target in route.targets:
            if not attempt.open or attempt.sessions >= self.settings.max_sessions:
                break
            session = self.cache.take((target.ip, target.port, policy, user))
            if session is not None:
                await self._on_session(attempt, session, message, reused=True)
                if not attempt.open or attempt.sessions >= self.settings.max_sessions:
                    break
            session = await self._connect(attempt, target, policy, user)
            if session is None:
                continue
            retry_plain = await self._on_session(attempt, session, message, reused=False)
            if retry_plain and attempt.open:
                attempt.notes.append(f"{target.relay}: TLS handshake failed; trying plaintext")
                session = await self._connect(attempt, target, TlsPolicy.NONE, user)
                if session is not None:
                    await self._on_session(attempt, session, message, reused=False,
                                           policy=TlsPolicy.NONE)

    # -- steps --------------------------------------------------------------------------------
    async def _connect(self, attempt: _Attempt, target: Target, policy: TlsPolicy,
                       user: str | None) -> OutboundSession | None:
        loop = asyncio.get_running_loop()
        try:
            _, session = await asyncio.wait_for(
                loop.create_connection(
                    lambda: OutboundSession(self._client, target, policy, user),
                    target.ip, target.port),
                self.settings.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            if isinstance(exc, TimeoutError):
                reason = "Connection timed out"
            elif exc.errno is not None:
                reason = os.strerror(exc.errno)
            else:
                reason = str(exc)
            text = f"connect to {target.relay}: {reason}"
            attempt.notes.append(text)
            attempt.last = _failure(Reply(451, "4.4.1", text), Stage.CONNECT, True, None)
            return None
        return session

    async def _on_session(self, attempt: _Attempt, session: OutboundSession,
                          message: MessageSource, *, reused: bool,
                          policy: TlsPolicy | None = None) -> bool:
        """Run one session; True when an opportunistic TLS handshake failed (retry plain)."""
        route = attempt.route
        assert route is not None
        policy = policy or route.tls or self.settings.tls_policy
        target = session.target
        try:
            if reused:
                session.conn.reset()
                session.flush()
                await self._expect(session, ResetDone)
                self.cache.reused += 1
            else:
                attempt.sessions += 1
                if await self._open(session, route, policy):  # opportunistic TLS failed
                    attempt.sessions -= 1  # the plaintext retry takes its place
                    failed = Reply(451, "4.7.5", "TLS handshake failed")
                    attempt.last = RecipientResult(OutboundRecipient(""), failed, Stage.STARTTLS,
                                                   True, target)
                    return True
            if reused:
                attempt.sessions += 1
            result = await self._transaction(session, attempt, message)
        except _SessionOver as over:
            failure = over.failure
            session.close(polite=False)
            if reused and (failure.stage is Stage.RSET or failure.local):
                attempt.notes.append(f"{target.relay}: cached connection unusable")
                return False
            stage = failure.stage
            if failure.local and stage in _UNANSWERED:
                # accepted the connection, then no greeting (or no answer to EHLO) in time, or
                # hung up: as unreachable as a refused connection, and reported the same way,
                # so the queue skips the destination for a while when no host of it answered
                stage = Stage.CONNECT
            attempt.last = RecipientResult(OutboundRecipient(""), failure.reply, stage,
                                           failure.local, target, session.conn.tls_active)
            detail = attempt.last.detail
            attempt.notes.append(f"{target.relay}: {detail}" if failure.local else detail)
            return False
        self._apply(attempt, result, session)
        if session.usable:
            self.cache.put(route.key, session)
        else:
            session.close(polite=False)
        return False

    @staticmethod
    async def _expect(session: OutboundSession, *wanted: type[ClientEvent]) -> ClientEvent:
        """Events until one of the types ``wanted``; SessionFailed ends the session."""
        while True:
            event = await session.event()
            if isinstance(event, wanted):
                return event
            if isinstance(event, SessionFailed):
                raise _SessionOver(event)

    async def _open(self, session: OutboundSession, route: Route, policy: TlsPolicy) -> bool:
        """Greeting, EHLO, STARTTLS per policy, AUTH; True when the TLS handshake failed."""
        await self._expect(session, Ready)
        conn = session.conn
        if policy is not TlsPolicy.NONE and conn.extensions.starttls:
            conn.starttls()
            session.flush()
            event = await self._expect(session, TlsReady, TlsRefused)
            if isinstance(event, TlsRefused):
                if policy is TlsPolicy.REQUIRED:
                    raise _policy_failure(f"TLS is required, but STARTTLS was refused: "
                                          f"{event.reply.code} {event.reply.lines[0]}", "4.7.4")
            else:
                try:
                    async with asyncio.timeout(self.settings.tls_timeout):
                        await session.start_tls(self._context(policy), self._tls_name(session))
                except (ssl.SSLError, OSError, TimeoutError, ConnectionError) as exc:
                    session.close(polite=False)
                    if policy is TlsPolicy.OPPORTUNISTIC:
                        return True
                    reason = getattr(exc, "verify_message", None) or str(exc) or type(exc).__name__
                    raise _policy_failure(f"TLS handshake failed: {reason}", "4.7.5") from None
                await self._expect(session, Ready)
        elif policy is TlsPolicy.REQUIRED:
            raise _policy_failure("TLS is required, but was not offered by the server", "4.7.4")
        if route.auth is not None:
            if not conn.tls_active and not self.settings.auth_without_tls:
                raise _policy_failure("refusing to send credentials without TLS", "4.7.0",
                                      Stage.AUTH)
            conn.authenticate(route.auth.username, route.auth.password)
            session.flush()
            await self._expect(session, Authenticated)
        return False

    @staticmethod
    def _tls_name(session: OutboundSession) -> str | None:
        """SNI and, for ``required``, the name the certificate must carry: the MX host name
        (or the configured next hop); an address literal is checked as an IP address."""
        host = session.target.host.strip("[]")
        if host.lower().startswith("ipv6:"):
            host = host[5:]
        return host

    def _context(self, policy: TlsPolicy) -> ssl.SSLContext:
        if policy is TlsPolicy.REQUIRED:
            if self._verify is None:
                ca = self.settings.tls_ca_file
                self._verify = ssl.create_default_context(cafile=str(ca) if ca else None)
                if ca is not None:
                    self._verify.load_default_certs()
            return self._verify
        if self._unverified is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._unverified = context
        return self._unverified

    async def _transaction(self, session: OutboundSession, attempt: _Attempt,
                           message: MessageSource) -> TransactionResult:
        envelope = attempt.envelope
        recipients = tuple(envelope.recipients[i] for i in attempt.open)
        attempt.transaction = asyncio.get_running_loop().time()
        outbound = dataclasses.replace(envelope, recipients=recipients)
        refusal = None
        ext = session.conn.extensions
        if (self.settings.mime_conversion and not ext.eightbitmime
                and outbound.body != "BINARYMIME"  # the core refuses that
                and not (outbound.needs_smtputf8 and not ext.smtputf8)):  # 5.6.7 comes first
            prepared = await self._downgrade(session, attempt, message,
                                             outbound.smtputf8 and ext.smtputf8)
            if isinstance(prepared, DowngradeError):
                refusal = Reply(554, "5.6.3", f"Conversion required but not supported: "
                                              f"{prepared.reason} (the server does not offer "
                                              f"8BITMIME)")
            elif prepared is not None:
                message = DowngradedSource(message, prepared)
                outbound = dataclasses.replace(outbound, size=prepared.size, body="7BIT")
        session.conn.send_mail(outbound, refusal)
        session.flush()
        while True:
            event = await session.event()
            if isinstance(event, TransactionDone):
                return event.result
            if isinstance(event, ContentWanted):
                await self._send_content(session, message)
            elif isinstance(event, SessionFailed):  # pragma: no cover - TransactionDone comes first
                raise _SessionOver(event)

    async def _downgrade(self, session: OutboundSession, attempt: _Attempt,
                         message: MessageSource, utf8_headers: bool) -> Plan | DowngradeError | None:
        """The server lacks 8BITMIME: how to make the message 7-bit (RFC 6152 3), as Postfix
        does unless told not to; None when it is 7-bit already. The plan is made once per
        attempt (it reads the whole message, off the event loop)."""
        if utf8_headers not in attempt.downgrades:
            try:
                attempt.downgrades[utf8_headers] = await asyncio.to_thread(
                    prepare_downgrade, message, self.settings.chunk_size, utf8_headers)
            except OSError as exc:
                session.close()
                raise _MessageUnreadable(f"cannot read the message: {exc}") from None
            prepared = attempt.downgrades[utf8_headers]
            if isinstance(prepared, Plan):
                self._log_downgrade(session, attempt, prepared)
        return attempt.downgrades[utf8_headers]

    @staticmethod
    def _log_downgrade(session: OutboundSession, attempt: _Attempt, prepared: Plan) -> None:
        relay = session.target.relay
        text = (f"{relay} does not offer 8BITMIME: {len(prepared.encode)} part(s) converted to "
                f"quoted-printable")
        if prepared.dkim_signed:  # Postfix converts signed mail too; the receiver may see a
            text += "; this breaks the message's DKIM signature"  # "body hash did not verify"
        attempt.notes.append(text)
        logger.info("%s: %s", attempt.queue_id or "-", text)

    async def _send_content(self, session: OutboundSession, message: MessageSource) -> None:
        conn = session.conn
        chunks = message.chunks(self.settings.chunk_size)
        try:
            while not conn.closed:
                try:
                    chunk = next(chunks, None)
                except OSError as exc:
                    # dropped without a final dot (or BDAT LAST): the server discards it all
                    if session.transport is not None:
                        session.transport.abort()
                    raise _MessageUnreadable(f"cannot read the message: {exc}") from None
                if chunk is None:
                    break
                conn.send_content(chunk)
                session.flush()
                await session.drain()
        finally:
            _close(chunks)
        if not conn.closed:
            conn.end_content()
            session.flush()

    def _apply(self, attempt: _Attempt, result: TransactionResult,
               session: OutboundSession) -> None:
        """Record the transaction's outcomes; deferrals before end of data stay open for the
        next server (while there may be one)."""
        target = session.target
        still_open = []
        for index, outcome in zip(attempt.open, result.outcomes, strict=True):
            decided = RecipientResult(outcome.recipient, outcome.reply, outcome.stage,
                                      outcome.local, target, session.conn.tls_active,
                                      result.dsn_passed)
            retry_elsewhere = (
                outcome.verdict is Verdict.TEMPORARY
                and outcome.stage not in (Stage.END, Stage.BDAT)
                and attempt.sessions < self.settings.max_sessions
            )
            if retry_elsewhere:
                still_open.append(index)
                attempt.notes.append(f"<{outcome.recipient.address}>: {decided.detail}")
            attempt.decided[index] = decided
        attempt.open = still_open

    def _decide_rest(self, attempt: _Attempt, failure: RecipientResult) -> None:
        for index in attempt.open:
            recipient = attempt.envelope.recipients[index]
            if index in attempt.decided:
                continue  # what a server said about it beats a later failure to reach another
            attempt.decided[index] = dataclasses.replace(failure, recipient=recipient)
        attempt.open = []

    @staticmethod
    def _result(domain: str, attempt: _Attempt) -> AttemptResult:
        recipients = tuple(attempt.decided[i] for i in range(len(attempt.envelope.recipients)))
        now = asyncio.get_running_loop().time()
        begun = attempt.transaction if attempt.transaction is not None else now
        return AttemptResult(domain, recipients, tuple(attempt.notes),
                             setup=max(0.0, begun - attempt.started), transmission=now - begun)

