"""POP3 over asyncio: listeners on 110 (STLS, RFC 2595) and 995 (implicit TLS, RFC 8314),
sessions that feed the sans-I/O core (:mod:`postroom.pop3`) and answer its requests.

Nothing here parses POP3. A session answers the core's requests, each in a task when it waits:

- ``CheckPassword``: argon2 in a worker thread, at most ``password_checks`` at once. The throttle
  is asked once a slot is free, not before: a guess queued behind others is not checked if they
  blocked the address meanwhile, and one from a client that has left is not checked at all. A
  blocked client is told ``-ERR [SYS/TEMP]`` and disconnected, like SMTP's ``421 4.7.0``;
- ``LoginFailed``: a guess by the client (``counted``) tells the throttle, is logged for
  fail2ban and waits as long as the throttle says (a tarpit) before the answer; a cancel or a
  credential-store outage is answered at once and counts nothing, as in SMTP AUTH;
- ``OpenMaildrop``: in a thread, the backend opens the user's INBOX, takes its POP3 lock
  (``[IN-USE]`` when held), syncs it (new mail moves to ``cur/``) and lists it; the list stays
  fixed for the session. With ``login_delay`` a login sooner than that after the mailbox's last
  one is refused ``[LOGIN-DELAY]`` (RFC 2449 6.5, 8.1.1) under the lock, so two workers cannot
  both pass; with ``expire`` days, messages retrieved longer ago than that are removed before the
  list is made (RFC 2449 6.7). Both remember through :mod:`postroom.store.pop3records`, in the
  Maildir, so every worker and a restarted server agree;
- ``Retrieve``: the message file in chunks of :data:`READ_CHUNK`, each fed to the core only when
  the socket is not backed up (``pause_writing``), so a session holds at most about a chunk;
  a message of at most ``inline_read`` octets is read at once on the event loop. With
  ``read_ahead``, after RETR of message n the session reads n+1 as soon as the loop is free
  and hands it to the core (``Pop3Connection.prepare``), which answers a RETR of it without a
  request: one message at a time, dropped after :data:`READ_AHEAD_HOLD` seconds of idleness;
- ``Commit`` (QUIT in TRANSACTION): expunge the deleted messages (with ``expire = 0`` the core
  has added what was retrieved), mark the retrieved ones seen, log their first retrieval when
  ``expire`` is a number of days, release the lock.

A session that ends without QUIT deletes nothing (RFC 1939 6) but still marks what it retrieved
as seen, as Dovecot does. Timeouts are swept once a second: ``auth_timeout`` before login, the
RFC 1939 3 autologout (at least 10 minutes) after.

The pieces the daemon provides are small typed protocols: :class:`Pop3Backend` (SASL settings,
the throttle, opening a user's mailbox) and :class:`LoginThrottle` (shared with SMTP AUTH).
:class:`MaildirBackend` is a backend over Maildirs given a function from user to Maildir path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal, Protocol, runtime_checkable

from postroom import log
from postroom.errors import StorageError
from postroom.net.auth import account_name
from postroom.net.drain import drain
from postroom.net.limits import ConnectionCounts, LocalCounts
from postroom.net.session import TLS_SHUTDOWN_TIMEOUT
from postroom.net.tls import describe
from postroom.policy.authlimit import Reservation, Verdict
from postroom.pop3 import (
    CheckPassword,
    Commit,
    LoginFailed,
    Maildrop,
    OpenMaildrop,
    Pop3Connection,
    Pop3Settings,
    ProtocolViolation,
    Request,
    Retrieve,
    SizeMismatch,
    StartTls,
    uidl_for,
)
from postroom.pop3 import responses as r
from postroom.sasl import DEFAULT_MECHANISMS, SaslSettings
from postroom.store.base import Mailbox, MailboxInUse, MessageGone, MessageInfo, SessionLock
from postroom.store.maildir import MaildirMailbox, open_inbox
from postroom.store.names import SEEN
from postroom.store.pop3records import MaildirPop3Records, Pop3Records, expired

#: Octets read from a message file at a time while sending it.
READ_CHUNK: Final = 64 * 1024
#: Seconds a session may sit idle before the message it read ahead is dropped (checked by the
#: once-a-second sweep): a client that stopped downloading does not keep a copy in memory,
#: and nobody gets a copy much older than the file.
READ_AHEAD_HOLD: Final = 1.0
_SWEEP_INTERVAL: Final = 1.0
#: At shutdown, how long a session whose transport is closing (its last response written; a TLS
#: one waits for the client's close_notify, RFC 8446 6.1) may take before it is aborted: an idle
#: client that never answers must not hold the shutdown for its whole grace period.


class LoginThrottle(Protocol):
    """Brute-force throttling, shared with SMTP AUTH (``policy/authlimit.py`` adapts to this).

    *client* is the client's IP address; *user* the identity tried (None when the client sent
    none). Calls are quick and made on the event loop.
    """

    def blocked(self, client: str, user: str | None) -> bool:
        """True while logins from *client*, or as *user*, are refused outright."""
        ...

    def failure(self, client: str, user: str | None) -> float:
        """Count a failed login; the seconds to wait before answering it."""
        ...

    def success(self, client: str, user: str) -> None:
        """A login succeeded."""
        ...


@runtime_checkable
class LoginReservations(LoginThrottle, Protocol):
    """A throttle that counts a login before its password is checked (the shared one,
    :class:`postroom.net.auth.LoginThrottleAdapter`; see :mod:`postroom.policy.authlimit`):
    parallel guesses cannot all pass the test before the first is recorded. Sessions use this
    when the throttle offers it, else the plain :class:`LoginThrottle` calls."""

    def reserve(self, client: str) -> Reservation:
        """Right before a check: refused while *client* is blocked, else counted until settled."""
        ...

    def release(self, client: str, reservation: Reservation) -> None:
        """Give back a reservation whose check was not judged (the client left, no mailbox)."""
        ...

    def verdict(self, client: str, user: str | None,
                reservation: Reservation | None = None) -> Verdict:
        """Count a failed login, counted already by *reservation* if given."""
        ...

    def success(self, client: str, user: str, reservation: Reservation | None = None) -> None:
        """A login succeeded: give *reservation* back."""
        ...


#: The answer to a blocked client, which is then disconnected (SMTP's 421 4.7.0). Not [AUTH]:
#: that tells a client its credentials are wrong, and it would ask the user for new ones.
BLOCKED: Final = r.err("Too many failed authentications; try again later.", r.SYS_TEMP)


class NoThrottle:
    """Throttling off: every login is tried, failures answered at once."""

    def blocked(self, client: str, user: str | None) -> bool:
        return False

    def failure(self, client: str, user: str | None) -> float:
        return 0.0

    def success(self, client: str, user: str) -> None:
        return None


class Pop3Backend(Protocol):
    """What POP3 sessions need from the rest of the server."""

    @property
    def sasl_settings(self) -> SaslSettings:
        """The credential store and SASL settings (USER/PASS and APOP use them too)."""
        ...

    @property
    def throttle(self) -> LoginThrottle: ...

    def open_mailbox(self, user: str) -> Mailbox:
        """The INBOX of *user* (the authentication identity as the client sent it). Blocking:
        called in a worker thread. Raises LookupError when the user has no mailbox here,
        StorageError when it cannot be opened now."""
        ...

    def pop3_records(self, mailbox: Mailbox) -> Pop3Records:
        """What LOGIN-DELAY and EXPIRE remember about *mailbox* (one of :meth:`open_mailbox`'s)."""
        ...


@dataclass
class MaildirBackend:
    """A :class:`Pop3Backend` over Maildirs: *maildir_for* maps a user to the Maildir path (for
    the accounts store, ``lambda u: store.get_user(u).maildir``), None when there is none."""

    sasl_settings: SaslSettings
    maildir_for: Callable[[str], Path | None]
    throttle: LoginThrottle = field(default_factory=NoThrottle)
    owner: tuple[int, int] | None = None

    def open_mailbox(self, user: str) -> Mailbox:
        path = self.maildir_for(user)
        if path is None:
            raise LookupError(user)
        return open_inbox(path, owner=self.owner)

    def pop3_records(self, mailbox: Mailbox) -> Pop3Records:
        if not isinstance(mailbox, MaildirMailbox):
            raise TypeError(f"not a Maildir mailbox: {mailbox!r}")
        return MaildirPop3Records(mailbox.path, owner=self.owner)


@dataclass(frozen=True, slots=True)
class Pop3ServerSettings:
    """The POP3 service's configuration (the ``[pop3]`` section, when the daemon wires it)."""

    hostname: str
    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    allow_plaintext: bool = False  # USER/PASS, PLAIN, LOGIN before TLS (RFC 2595 2.3)
    apop: bool = False
    #: RFC 2449 6.7: days a message stays after POP3 first retrieved it; 0: removed at the QUIT
    #: of the session that retrieved it; "NEVER" (or None, which does not advertise it): kept.
    expire: int | Literal["NEVER"] | None = None
    #: RFC 2449 6.5: seconds from one successful login to a mailbox to the next.
    login_delay: int | None = None
    idle_timeout: float = 600.0  # RFC 1939 3: the autologout timer is at least 10 minutes
    auth_timeout: float = 60.0  # before login
    handshake_timeout: float = 30.0
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    max_errors: int = 10
    max_auth_failures: int = 3
    password_checks: int = 4  # argon2 checks running at once in this process
    shutdown_grace: float = 10.0
    #: Messages up to this size are read on the event loop (a page-cache read of a small file
    #: costs less than a thread hop, and RETR of many small messages is the common case);
    #: larger ones, and everything when 0, in a worker thread.
    inline_read: int = 64 * 1024
    #: After RETR of message n, read message n+1 (when it is at most ``inline_read``) while the
    #: client takes in the answer, so a client downloading in order gets each answer without
    #: waiting for the file read and the encoding. Costs one message's read when the client
    #: asks for something else; the copy is held until the next RETR, at most about
    #: :data:`READ_AHEAD_HOLD` seconds of idleness.
    read_ahead: bool = True


def expire_days(expire: int | str | None) -> int | None:
    """The retention period in days when messages expire after it (not 0: those go at QUIT)."""
    return expire if isinstance(expire, int) and expire > 0 else None


class LoginTooSoon(Exception):
    """A login within ``login_delay`` seconds of the mailbox's last one (RFC 2449 6.5)."""

    def __init__(self, left: int) -> None:
        super().__init__(f"{left} s left")
        self.left = left


def check_login_delay(records: Pop3Records, delay: int, now: float) -> None:
    """Raise :class:`LoginTooSoon` if the last login was less than *delay* seconds before *now*.
    A last login up to *delay* in the future counts too (another host's clock a little ahead);
    further ahead, the clock was set back and the record says nothing."""
    last = records.last_login()
    if last is None:
        return
    elapsed = now - last
    if abs(elapsed) < delay:
        raise LoginTooSoon(max(1, math.ceil(delay - max(elapsed, 0.0))))


def _no_delay(transport: asyncio.BaseTransport) -> None:
    """Turn Nagle's algorithm off. asyncio does so only for sockets whose ``proto`` is
    IPPROTO_TCP, and a socket accepted from a listener made with ``socket.socket()`` has proto
    0: the last piece of a multi-line response then waits for the client's delayed ACK
    (40 ms on Linux) whenever earlier pieces are still unacknowledged."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _maildrop(infos: Sequence[MessageInfo]) -> Maildrop:
    """What the POP3 core lists: sizes and UIDLs, which never change for a message, so the
    mailbox keeps it for later logins while the messages stay the same (``list_view``)."""
    return Maildrop([info.crlf_size for info in infos], _uidls(infos))


def _uidls(infos: Sequence[MessageInfo]) -> list[str]:
    """A UIDL for each message (:func:`uidl_for`), unique: a shortened key that two messages
    share gives both the digest of their full key instead."""
    uidls = [uidl_for(info.key) for info in infos]
    if len(set(uidls)) != len(uidls):
        counts = collections.Counter(uidls)
        uidls = [u if counts[u] == 1 else uidl_for("\0" + info.key) for u, info in zip(
            uidls, infos, strict=True)]
    return uidls


class Pop3Session(asyncio.Protocol):
    """One POP3 connection."""

    def __init__(self, server: Pop3Server, *, implicit_tls: bool) -> None:
        self.server = server
        self.implicit_tls = implicit_tls
        stamp = server.apop_timestamp() if server.settings.apop else None
        self.conn = Pop3Connection(server.core_settings, apop_timestamp=stamp, tls=implicit_tls)
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.port = 0
        self.tls: str | None = None
        self.last_activity = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._cancellable = True  # the task may be cancelled when the connection is lost
        self._upgrade = False
        #: Decrypted input that arrived before start_tls() returned (see _handshake).
        self._early: bytearray | None = None
        self._write_paused = False
        self._writable = asyncio.Event()
        self._writable.set()
        self._mailbox: Mailbox | None = None
        self._lock: SessionLock | None = None
        self._infos: list[MessageInfo] = []
        self._committed = False
        self._read_ahead_due = False  # a _read_ahead() call is scheduled
        #: The login attempt counted for the password check in flight, until settled.
        self._reservation: Reservation | None = None

    def describe(self) -> str:
        return f"[{self.address}]:{self.port}"

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        _no_delay(transport)
        peer = transport.get_extra_info("peername") or ("", 0)
        address = str(peer[0])
        self.address = address[7:] if address.startswith("::ffff:") else address
        self.port = int(peer[1])
        if self.implicit_tls:
            self.tls = describe(transport.get_extra_info("ssl_object"))
        refusal = self.server.admit(self)
        if refusal is not None:
            log.logger.warning("pop3 reject: connect from %s: %s", self.describe(), refusal.text)
            self.conn.reject_connection(refusal)
        else:
            log.logger.info("pop3 connect from %s%s", self.describe(),
                            f" {self.tls}" if self.tls else "")
            self.conn.start()
        self._pump()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        if self._early is not None:
            self._early += data
            return
        self.conn.receive_data(data)
        self._pump()

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self._pump()
        return True  # keep writing the answers to what was sent before the half-close

    def pause_writing(self) -> None:
        self._write_paused = True
        self._writable.clear()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._writable.set()
        self.last_activity = time.monotonic()
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.release(self)
        self._release_reservation()  # left before learning the answer: nothing judged for it
        task = self._task
        if task is not None and not task.done() and self._cancellable:
            task.cancel()  # opening the maildrop and the UPDATE run to their end
        self._writable.set()
        if self._mailbox is not None and not self._committed:
            self.server.background(self._finish_after_disconnect())
        log.logger.info("pop3 disconnect from %s%s", self.describe(),
                        f" user=<{self.conn.user}>" if self.conn.user else "")

    # -- the pump -----------------------------------------------------------------------------
    def _pump(self) -> None:
        conn = self.conn
        transport = self.transport
        if transport is None:
            return
        while self._task is None and not self._write_paused and not transport.is_closing():
            event = conn.next_event()
            if event is not None:
                if isinstance(event, Request):
                    self._decide(event)
                else:
                    self._observe(event)
                continue
            out = conn.data_to_send()
            if not out:
                break
            transport.write(out)
        self._flush()
        if self._upgrade and self._task is None:
            self._upgrade = False
            self._start_tls()
        elif (self._task is None and not self._read_ahead_due and self._mailbox is not None
              and not self._write_paused and self.server.settings.read_ahead):
            number = conn.read_ahead_wanted()
            if number is not None:
                self._read_ahead_due = True
                asyncio.get_running_loop().call_soon(self._read_ahead)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out = self.conn.data_to_send()
        if out:
            transport.write(out)
        if self.conn.closed and self._task is None:
            transport.close()

    def _spawn(self, work: Callable[[], Awaitable[None]], *, cancellable: bool = True) -> None:
        """Run a coroutine answering the pending request; parsing resumes after it."""
        self._cancellable = cancellable

        async def run() -> None:
            try:
                await work()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug costs this session, never the server
                log.logger.exception("pop3 error for %s", self.describe())
                self.conn.shutdown(r.err("Internal error.", r.SYS_TEMP))
            finally:
                self._task = None
            self._pump()

        self._task = asyncio.get_running_loop().create_task(run())

    def _decide(self, request: Request) -> None:
        conn = self.conn
        if isinstance(request, Retrieve):  # first: the one asked for thousands of times
            info = self._infos[request.number - 1]
            if info.size <= self.server.settings.inline_read and self._send_small(request, info):
                return
            self._spawn(lambda: self._retrieve(request))
        elif isinstance(request, StartTls):
            if self.server.tls_context is None:
                conn.refuse(r.err("TLS is not available.", r.SYS_TEMP))
            else:
                conn.proceed()
                self._upgrade = True
        elif isinstance(request, CheckPassword):
            self._spawn(lambda: self._check_password(request))
        elif isinstance(request, LoginFailed):
            self._spawn(lambda: self._login_failed(request))
        elif isinstance(request, OpenMaildrop):
            self._spawn(lambda: self._open_maildrop(request), cancellable=False)
        elif isinstance(request, Commit):
            self._committed = True  # from now on the UPDATE owns the mailbox
            self._spawn(lambda: self._commit(request), cancellable=False)
        else:  # pragma: no cover - a request this transport does not know is a bug
            raise AssertionError(f"unexpected request {request!r}")

    def _observe(self, event: object) -> None:
        if isinstance(event, ProtocolViolation):
            log.logger.warning("pop3 %s from %s", event.response.text, self.describe())
        elif isinstance(event, SizeMismatch):
            log.logger.warning(
                "pop3 message %d of <%s> was %d octets, listed as %d (wrong W= in its name?)",
                event.number, self.conn.user, event.sent, event.announced)

    # -- authentication -----------------------------------------------------------------------
    def _gone(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def _release_reservation(self) -> None:
        reservation, self._reservation = self._reservation, None
        throttle = self.server.backend.throttle
        if reservation is not None and isinstance(throttle, LoginReservations):
            throttle.release(self.address, reservation)

    def _refuse_blocked(self, wait: float, user: str | None) -> None:
        """The address is blocked: no check, no failure counted; -ERR and disconnect."""
        log.logger.info("pop3 login refused (throttled, %d s left) from %s: user=<%s>",
                        round(wait), self.describe(), user or "")
        self.conn.shutdown(BLOCKED)

    async def _check_password(self, request: CheckPassword) -> None:
        throttle = self.server.backend.throttle
        async with self.server.password_slots:
            # Asked now, with the slot taken: the guesses ahead of this one may have blocked the
            # address while it waited, and the client may have given up.
            if self._gone():
                return
            if isinstance(throttle, LoginReservations):
                reservation = throttle.reserve(self.address)
                if not reservation.granted:
                    self._refuse_blocked(reservation.blocked_for, request.user)
                    return
                self._reservation = reservation
                ok = await asyncio.to_thread(request.check.check)
            elif throttle.blocked(self.address, request.user):
                ok = False
            else:
                ok = await asyncio.to_thread(request.check.check)
        self.conn.password_checked(ok)

    async def _login_failed(self, request: LoginFailed) -> None:
        if not request.counted:
            # A cancel, or our credential store failing: not a guess, so nothing counted, no
            # fail2ban-shaped line and no tarpit (as SMTP AUTH does).
            self._release_reservation()
            log.logger.info("pop3 authentication ended from %s: user=<%s>, method=%s: %s",
                            self.describe(), request.user or "", request.mechanism,
                            request.reason)
            self.conn.proceed()
            return
        throttle = self.server.backend.throttle
        reservation, self._reservation = self._reservation, None
        blocked = False
        if isinstance(throttle, LoginReservations):
            verdict = throttle.verdict(self.address, request.user, reservation)
            delay, blocked = verdict.delay, verdict.blocked
        else:
            delay = throttle.failure(self.address, request.user)
        # The same shape as SMTP AUTH's failures, for fail2ban (contrib/fail2ban).
        log.logger.warning("unknown[%s]: SASL %s authentication failed: %s", self.address,
                           request.mechanism, request.reason)
        log.logger.info("pop3 authentication failed from %s: user=<%s>, method=%s",
                        self.describe(), request.user or "", request.mechanism)
        if blocked:  # this failure blocked the address, or it was blocked meanwhile
            self.conn.shutdown(BLOCKED)
            return
        if delay > 0:
            await asyncio.sleep(delay)
        self.conn.proceed()

    async def _open_maildrop(self, request: OpenMaildrop) -> None:
        throttle = self.server.backend.throttle
        reservation, self._reservation = self._reservation, None
        if isinstance(throttle, LoginReservations):
            if reservation is None:
                # SCRAM, CRAM-MD5 or APOP: the core judged the proof as the line came in; a
                # blocked address must still not log in, whatever it proved.
                reservation = throttle.reserve(self.address)
                if not reservation.granted:
                    self._refuse_blocked(reservation.blocked_for, request.user)
                    return
            await self._open_reserved(request, throttle, reservation)
        elif throttle.blocked(self.address, request.user):
            log.logger.info("pop3 login refused (throttled) from %s: user=<%s>",
                            self.describe(), request.user)
            self.conn.refuse(r.AUTH_FAILED)
        else:
            await self._open_maildrop_as(request, throttle, None)

    async def _open_reserved(self, request: OpenMaildrop, throttle: LoginReservations,
                             reservation: Reservation) -> None:
        self._reservation = reservation  # given back if the connection is lost meanwhile
        try:
            await self._open_maildrop_as(request, throttle, reservation)
        finally:
            self._release_reservation()  # unless the login settled it

    async def _open_maildrop_as(self, request: OpenMaildrop, throttle: LoginThrottle,
                                reservation: Reservation | None) -> None:
        # The account's own spelling of its address (alice@example.com, however it was typed)
        # for the throttle's account count and the log lines.
        user = account_name(self.server.backend.sasl_settings.credentials, request.user)
        try:
            mailbox, lock, infos, maildrop = await asyncio.to_thread(self._open, request.user)
        except MailboxInUse:
            log.logger.info("pop3 login from %s: user=<%s>: mailbox in use", self.describe(),
                            user)
            self.conn.refuse(r.IN_USE_REPLY)
            return
        except LoginTooSoon as exc:
            delay = self.server.settings.login_delay or 0
            log.logger.info("pop3 login from %s: user=<%s>: within the login delay (%d s left)",
                            self.describe(), user, exc.left)
            self.conn.refuse(r.login_too_soon(delay, exc.left))
            return
        except LookupError:
            log.logger.warning("pop3 login from %s: user=<%s>: no mailbox", self.describe(),
                               user)
            self.conn.refuse(r.err("No mailbox for this account.", r.SYS_PERM))
            return
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 login from %s: user=<%s>: mailbox unavailable: %s",
                             self.describe(), user, exc)
            self.conn.refuse(r.MAILDROP_UNAVAILABLE)
            return
        if self.transport is None or self.transport.is_closing():
            await asyncio.to_thread(self._close_mailbox, mailbox, lock)
            return
        self._mailbox, self._lock, self._infos = mailbox, lock, infos
        if isinstance(throttle, LoginReservations):
            self._reservation = None
            throttle.success(self.address, user, reservation)
        else:
            throttle.success(self.address, request.user)
        log.logger.info("pop3 login: user=<%s>, method=%s, client=%s, messages=%d, size=%d%s",
                        user, request.mechanism, self.describe(), len(maildrop),
                        maildrop.octets, f", tls={self.tls}" if self.tls else "")
        self.conn.maildrop_opened(maildrop)

    def _open(self, user: str) -> tuple[Mailbox, SessionLock, list[MessageInfo], Maildrop]:
        settings = self.server.settings
        backend = self.server.backend
        mailbox = backend.open_mailbox(user)
        try:
            lock = mailbox.lock_exclusive("pop3")
            try:
                delay, days = settings.login_delay, expire_days(settings.expire)
                records = backend.pop3_records(mailbox) if delay or days else None
                now = time.time()
                if delay and records is not None:  # under the lock: one login wins a race
                    check_login_delay(records, delay, now)
                mailbox.sync(move_new=True)
                if days and records is not None:
                    self._expire(user, mailbox, records, days, now)
                if delay and records is not None:
                    records.record_login(now)
                infos = list(mailbox.messages())
                return mailbox, lock, infos, mailbox.list_view("pop3", _maildrop)
            except BaseException:
                lock.release()
                raise
        except BaseException:
            mailbox.close()
            raise

    def _expire(self, user: str, mailbox: Mailbox, records: Pop3Records, days: int,
                now: float) -> None:
        """RFC 2449 6.7: remove what POP3 retrieved more than *days* days ago, before the list
        is made, and forget log entries whose message is gone."""
        retrieved = records.retrieved()
        if not retrieved:
            return
        old = expired(retrieved, now, days)
        if old:
            doomed = [info.uid for info in mailbox.messages() if info.key in old]
            removed = mailbox.expunge(doomed) if doomed else []
            if removed:
                log.logger.info("pop3 expire: user=<%s>, removed=%d (retrieved over %d days ago)",
                                user, len(removed), days)
        present = {info.key for info in mailbox.messages()}
        if any(key not in present for key in retrieved):
            records.keep_only(present)

    def _log_retrieved(self, mailbox: Mailbox, keys: Sequence[str]) -> None:
        """With EXPIRE days, the first retrieval of each message starts its retention period.
        A failure is logged and passed over: the messages then stay (never the unsafe way)."""
        if not keys or expire_days(self.server.settings.expire) is None:
            return
        try:
            self.server.backend.pop3_records(mailbox).record_retrieved(keys, time.time())
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 <%s>: logging retrieved messages for EXPIRE failed: %s",
                             self.conn.user, exc)

    @staticmethod
    def _close_mailbox(mailbox: Mailbox, lock: SessionLock | None) -> None:
        try:
            if lock is not None:
                lock.release()
        finally:
            mailbox.close()

    # -- transaction --------------------------------------------------------------------------
    def _open_message(self, uid: int) -> tuple[BinaryIO, bytes]:
        assert self._mailbox is not None
        fh = self._mailbox.open_message(uid)
        try:
            return fh, fh.read(READ_CHUNK)
        except BaseException:
            fh.close()
            raise

    def _read_ahead(self) -> None:
        """Read the message the core would like next (``read_ahead_wanted``), now that the loop
        has written the last answer and has nothing else to do. Asked again here: the client may
        have sent a command meanwhile, or left. Any trouble with the file is left for the RETR
        that may follow, which reports it."""
        self._read_ahead_due = False
        conn = self.conn
        mailbox = self._mailbox
        if (mailbox is None or self._task is not None or self._write_paused or self._committed
                or self.transport is None or self.transport.is_closing()):
            return
        number = conn.read_ahead_wanted()
        if number is None:
            return
        info = self._infos[number - 1]
        if info.size > self.server.settings.inline_read:
            return
        try:
            data = mailbox.read_message(info.uid, READ_CHUNK)
        except (MessageGone, StorageError, OSError):
            return
        if len(data) < READ_CHUNK:
            conn.prepare(number, data)

    def _send_small(self, request: Retrieve, info: MessageInfo) -> bool:
        """Send a small message at once, read on the event loop (see ``inline_read``): no task
        and no thread hop per message. False when it turned out larger than listed: the caller
        streams it instead."""
        conn = self.conn
        assert self._mailbox is not None
        try:
            data = self._mailbox.read_message(info.uid, READ_CHUNK)
        except MessageGone:
            conn.refuse(r.MESSAGE_UNAVAILABLE)
            return True
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 RETR for <%s>: %s", conn.user, exc)
            conn.refuse(r.MESSAGE_UNAVAILABLE)
            return True
        if len(data) >= READ_CHUNK:
            return False
        if data:
            conn.message_data(data)
        conn.message_end()
        return True

    async def _retrieve(self, request: Retrieve) -> None:
        info = self._infos[request.number - 1]
        conn = self.conn
        try:
            if info.size <= self.server.settings.inline_read:
                fh, data = self._open_message(info.uid)
            else:
                fh, data = await asyncio.to_thread(self._open_message, info.uid)
        except MessageGone:
            conn.refuse(r.MESSAGE_UNAVAILABLE)
            return
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 RETR for <%s>: %s", conn.user, exc)
            conn.refuse(r.MESSAGE_UNAVAILABLE)
            return
        try:
            while True:
                if data and not conn.message_data(data):
                    break  # TOP has its lines, or the session ended
                if len(data) < READ_CHUNK:
                    break  # a short read of a regular file is its end
                self._flush()
                self.last_activity = time.monotonic()
                await self._writable.wait()
                if self.transport is None or self.transport.is_closing():
                    return
                data = await asyncio.to_thread(fh.read, READ_CHUNK)
            conn.message_end()
        except OSError as exc:
            log.logger.error("pop3 RETR for <%s>: %s", conn.user, exc)
            conn.refuse(r.MESSAGE_UNAVAILABLE)  # data went out already: the core closes
        finally:
            fh.close()

    async def _commit(self, request: Commit) -> None:
        try:
            await asyncio.to_thread(self._update, request.deleted, request.retrieved)
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 UPDATE for <%s> failed: %s", self.conn.user, exc)
            self.conn.refuse(r.UPDATE_FAILED)
            return
        log.logger.info("pop3 logout: user=<%s>, client=%s, retrieved=%d, deleted=%d, octets=%d",
                        self.conn.user, self.describe(), len(request.retrieved),
                        len(request.deleted), self.conn.retrieved_octets)
        self.conn.proceed()

    def _update(self, deleted: Sequence[int], retrieved: Sequence[int]) -> None:
        """RFC 1939 6: remove the deleted messages; then mark what was retrieved as seen."""
        mailbox, lock = self._mailbox, self._lock
        assert mailbox is not None
        try:
            if deleted:
                mailbox.expunge([self._infos[n - 1].uid for n in deleted])
            if retrieved:
                mailbox.store_flags([self._infos[n - 1].uid for n in retrieved], add=(SEEN,))
                self._log_retrieved(mailbox, [self._infos[n - 1].key for n in retrieved])
        finally:
            self._mailbox = self._lock = None
            self._close_mailbox(mailbox, lock)

    async def _finish_after_disconnect(self) -> None:
        """No QUIT: nothing is deleted (RFC 1939 6), but what was retrieved is marked seen."""
        mailbox, lock = self._mailbox, self._lock
        self._mailbox = self._lock = None
        if mailbox is None:
            return
        seen = [self._infos[n - 1].uid for n in self.conn.retrieved]
        keys = [self._infos[n - 1].key for n in self.conn.retrieved]

        def finish() -> None:
            try:
                if seen:
                    mailbox.store_flags(seen, add=(SEEN,))
                    self._log_retrieved(mailbox, keys)
            finally:
                self._close_mailbox(mailbox, lock)

        try:
            await asyncio.to_thread(finish)
        except (StorageError, OSError) as exc:
            log.logger.error("pop3 <%s>: marking messages seen failed: %s", self.conn.user, exc)

    # -- TLS ----------------------------------------------------------------------------------
    def _start_tls(self) -> None:
        """The +OK to STLS is written: hand the socket to TLS (RFC 2595 4)."""
        transport = self.transport
        context = self.server.tls_context
        if transport is None or transport.is_closing() or context is None:
            return
        transport.pause_reading()
        self._early = bytearray()
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport, context))

    async def _handshake(self, transport: asyncio.Transport, context: ssl.SSLContext) -> None:
        """TLS over the connection. A client may send its first command in the same flight as
        the end of the handshake (TLS 1.3), and asyncio hands it to data_received() before
        start_tls() returns: it is kept in ``_early`` and fed once the core knows TLS is up.
        (Plaintext sent after STLS never gets there: the core dropped it, and reading was
        paused before the handshake.)"""
        loop = asyncio.get_running_loop()
        try:
            secure = await loop.start_tls(transport, self, context, server_side=True,
                                          ssl_handshake_timeout=self.server.settings.handshake_timeout,
                                          ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.logger.info("pop3 TLS handshake failed from %s: %s", self.describe(), exc)
            self._task = None
            self._early = None
            transport.abort()
            return
        self._task = None
        early, self._early = self._early, None
        if secure is None:
            return
        self.transport = secure
        self.tls = describe(secure.get_extra_info("ssl_object"))
        log.logger.info("pop3 TLS established from %s: %s", self.describe(), self.tls)
        self.conn.tls_established()
        self.last_activity = time.monotonic()
        if early:
            self.conn.receive_data(bytes(early))
        self._pump()

    # -- called by the server -----------------------------------------------------------------
    @property
    def closing(self) -> bool:
        """The transport is closing: the session has said its last word (a TLS session may still
        wait for the client's close_notify, up to :data:`TLS_SHUTDOWN_TIMEOUT`)."""
        return self.transport is not None and self.transport.is_closing()

    @property
    def busy(self) -> bool:
        """Answering a request (a password check, a message, the UPDATE): let it finish."""
        return self._task is not None

    def check_timeout(self, now: float) -> None:
        if self.conn.closed:
            return
        settings = self.server.settings
        if now - self.last_activity > READ_AHEAD_HOLD:
            self.conn.drop_prepared()
        limit = settings.idle_timeout if self.conn.logged_in else settings.auth_timeout
        if now - self.last_activity <= limit:
            return
        log.logger.info("pop3 timeout in %s from %s", self.conn.state.phase, self.describe())
        if self._task is not None:  # stuck sending to a client that does not read
            self._task.cancel()
            self.abort()
            return
        self.conn.timeout()
        self._flush()

    def shutdown(self, force: bool = False) -> None:
        if self.conn.closed or (self.busy and not force):
            return
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.conn.shutdown()
        self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class Pop3Server:
    """Every POP3 listener of one process and the sessions they accepted."""

    def __init__(
        self,
        settings: Pop3ServerSettings,
        backend: Pop3Backend,
        tls_context: ssl.SSLContext | None = None,
        counts: ConnectionCounts | None = None,
    ) -> None:
        self.backend = backend
        self.tls_context = tls_context
        self.counts: ConnectionCounts = counts if counts is not None else LocalCounts()
        self.sessions: set[Pop3Session] = set()
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._password_slots: asyncio.Semaphore | None = None
        self._drained: asyncio.Event | None = None  # set when the last session is gone
        self.reconfigure(settings)

    def reconfigure(self, settings: Pop3ServerSettings) -> None:
        """Apply new settings to new sessions; live sessions keep theirs."""
        self.settings = settings
        self.core_settings = Pop3Settings(
            hostname=settings.hostname,
            sasl=self.backend.sasl_settings,
            mechanisms=settings.mechanisms,
            allow_plaintext=settings.allow_plaintext,
            stls=self.tls_context is not None,
            apop=settings.apop,
            expire=settings.expire,
            login_delay=settings.login_delay,
            max_errors=settings.max_errors,
            max_auth_failures=settings.max_auth_failures,
        )

    def set_tls_context(self, context: ssl.SSLContext | None) -> None:
        """A reloaded certificate (or none): new sessions use it."""
        self.tls_context = context
        self.reconfigure(self.settings)

    @property
    def password_slots(self) -> asyncio.Semaphore:
        if self._password_slots is None:
            self._password_slots = asyncio.Semaphore(max(1, self.settings.password_checks))
        return self._password_slots

    def apop_timestamp(self) -> str:
        """RFC 1939 7: ``<process-ID.clock@hostname>``, unique to the connection; a random
        part keeps it unpredictable."""
        return f"<{os.getpid()}.{time.time_ns()}.{secrets.token_hex(4)}@{self.settings.hostname}>"

    async def start(
        self, plain: Sequence[socket.socket] = (), implicit_tls: Sequence[socket.socket] = ()
    ) -> None:
        """Serve on *plain* sockets (role ``pop3``, port 110, STLS when a context is set) and
        *implicit_tls* ones (role ``pop3s``, port 995; a context is required)."""
        loop = asyncio.get_running_loop()
        if implicit_tls and self.tls_context is None:
            raise ValueError("a pop3s listener needs a TLS context")
        for sock in plain:
            server = await loop.create_server(lambda: Pop3Session(self, implicit_tls=False),
                                              sock=sock)
            self._servers.append(server)
            name = sock.getsockname()
            log.logger.info("listening for POP3 on %s:%d", name[0], name[1])
        front = self._implicit_tls_context() if implicit_tls else None
        for sock in implicit_tls:
            server = await loop.create_server(
                lambda: Pop3Session(self, implicit_tls=True), sock=sock, ssl=front,
                ssl_handshake_timeout=self.settings.handshake_timeout,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT)
            self._servers.append(server)
            name = sock.getsockname()
            log.logger.info("listening for POP3S on %s:%d", name[0], name[1])
        self._sweeper = loop.create_task(self._sweep())

    def _implicit_tls_context(self) -> ssl.SSLContext:
        """The context the 995 listeners are made with. A listener keeps the context it was
        created with, so each handshake is switched (``sni_callback``, which OpenSSL calls with
        or without SNI, before it picks the certificate) to whatever :attr:`tls_context` is
        then: a reload's certificate reaches 995 too. SmtpServer does the same on its own ports.

        The context is POP3's own, not the start-up one: the daemon hands one context to SMTP
        and POP3, and a callback is per context, so setting it there would replace SMTP's. It
        takes the start-up context's protocol settings (versions, options, TLS 1.2 ciphers),
        which stay those of the connection; the certificate and key come from the switch."""
        startup = self.tls_context
        assert startup is not None
        front = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        front.minimum_version = startup.minimum_version
        front.maximum_version = startup.maximum_version
        front.options = startup.options
        ciphers = [c["name"] for c in startup.get_ciphers() if c["protocol"] != "TLSv1.3"]
        if ciphers:
            front.set_ciphers(":".join(ciphers))

        def current(ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            # With TLS off since a reload (no context), keep serving the last one set.
            ssl_object.context = self.tls_context or startup

        front.sni_callback = current
        return front

    def admit(self, session: Pop3Session) -> r.Response | None:
        settings = self.settings
        self.sessions.add(session)
        total, from_address = self.counts.add(session.address)
        if self.shutting_down:
            return r.SHUTDOWN
        if total > settings.max_connections:
            return r.err("Too many connections.", r.SYS_TEMP)
        if from_address > settings.max_connections_per_ip:
            return r.err("Too many connections from your address.", r.SYS_TEMP)
        return None

    def release(self, session: Pop3Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.counts.remove(session.address)
        if not self.sessions and self._drained is not None:
            self._drained.set()

    def background(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Run cleanup that outlives its session (shutdown waits for it)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            for session in list(self.sessions):
                try:
                    session.check_timeout(now)
                except Exception:  # one session's trouble must not end every timeout
                    log.logger.exception("pop3 timeout check failed for %s", session.describe())

    async def shutdown(self) -> None:
        """Stop accepting; tell idle sessions -ERR [SYS/TEMP]; let busy ones finish (bounded)."""
        self.shutting_down = True
        for server in self._servers:
            server.close()
        await drain(self.sessions, self.settings.shutdown_grace)
        if self.sessions:  # connection_lost() starts each session's cleanup: wait for it
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), 1.0)
        if self._background:
            await asyncio.wait(list(self._background), timeout=self.settings.shutdown_grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for server in self._servers:
            await server.wait_closed()
