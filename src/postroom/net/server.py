"""The SMTP listeners: accept connections, enforce connection limits, sweep timeouts, shut down.

Limits: at most ``smtp.max_connections`` sessions in all and ``smtp.max_connections_per_ip`` from
one address; a connection over either gets ``421 4.7.0`` instead of a banner. Timeouts (RFC 5321
4.5.3.2) are checked once a second by one sweeper for every session. Shutdown (SIGTERM) stops
accepting, tells idle sessions ``421 4.3.2``, lets transactions in flight finish for
``smtp.shutdown_grace`` seconds, then closes what is left. A session that has already closed its
side is not waited for beyond :data:`postroom.net.drain.CLOSING_GRACE`: an idle TLS client
that never answers our close_notify would otherwise hold the whole grace period.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import ssl
import time
from collections.abc import Sequence

from postroom import log
from postroom.config import Config, ListenerSection
from postroom.net.auth import AuthService
from postroom.net.drain import drain
from postroom.net.limits import ConnectionCounts, LocalCounts
from postroom.net.session import TLS_SHUTDOWN_TIMEOUT, SmtpSession
from postroom.policy.relay import may_relay
from postroom.receive import Receiver
from postroom.smtp.codes import Reply
from postroom.smtp.server import ServerSettings

_SWEEP_INTERVAL = 1.0
#: At shutdown, how long a session whose transport is closing may take to finish (its last reply
#: leaving, the client answering TLS close_notify) before it is aborted.


def smtp_settings(config: Config) -> ServerSettings:
    smtp = config.smtp
    return ServerSettings(
        hostname=config.hostname,
        banner=smtp.banner,
        max_message_size=smtp.max_message_size,
        max_recipients=smtp.max_recipients,
        max_line_length=smtp.max_line_length,
        reject_bare_lf=smtp.reject_bare_lf,
        max_errors=smtp.max_errors,
    )


def bind_listener(listener: ListenerSection) -> socket.socket:
    """Bind (as root, before privileges are dropped) and return a listening socket."""
    host, port = listener.host_port()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio turns Nagle off only for sockets that say they are TCP
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


class SmtpServer:
    """Every SMTP listener of one process and the sessions they accepted."""

    def __init__(
        self,
        config: Config,
        receiver: Receiver,
        counts: ConnectionCounts | None = None,
        tls_context: ssl.SSLContext | None = None,
        auth: AuthService | None = None,
    ) -> None:
        self.receiver = receiver
        #: Logins (SMTP AUTH); None: AUTH is not offered anywhere.
        self.auth = auth
        #: Offered as STARTTLS to new sessions; None: no STARTTLS. Replaced on reload.
        self.tls_context = tls_context
        self.sessions: set[SmtpSession] = set()
        self.counts: ConnectionCounts = counts if counts is not None else LocalCounts()
        self.shutting_down = False
        self._servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Apply a (re)loaded config to new sessions; live sessions keep what they have."""
        self.config = config
        self.hostname = config.hostname
        self.smtp_settings = smtp_settings(config)

    async def start(self, listeners: Sequence[tuple[socket.socket, ListenerSection]]) -> None:
        loop = asyncio.get_running_loop()
        front = self._implicit_tls_context()
        for sock, listener in listeners:
            # Implicit TLS (RFC 8314) is the loop's from the first byte: see
            # SmtpSession._implicit_tls for why not start_tls in the session.
            tls = front if listener.implicit_tls else None
            server = await loop.create_server(
                functools.partial(SmtpSession, self, listener),
                sock=sock, ssl=tls,
                ssl_handshake_timeout=self.config.smtp.command_timeout if tls else None,
                ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT if tls else None)
            self._servers.append(server)
            name = sock.getsockname()
            log.logger.info("listening for SMTP (%s) on %s:%d", listener.role, name[0], name[1])
        self._sweeper = loop.create_task(self._sweep())

    def _implicit_tls_context(self) -> ssl.SSLContext | None:
        """The context implicit-TLS listeners are made with: today's, switched during each
        handshake (``sni_callback``, which OpenSSL calls with or without SNI) to whatever
        :attr:`tls_context` is then, so a reload's new certificate reaches these ports too."""
        context = self.tls_context
        if context is None:
            return None

        def current(ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            if self.tls_context is not None and ssl_object.context is not self.tls_context:
                ssl_object.context = self.tls_context

        context.sni_callback = current
        return context

    # -- limits -------------------------------------------------------------------------------
    def admit(self, session: SmtpSession) -> Reply | None:
        """Register *session*; return a refusal when a connection limit is reached."""
        smtp = self.config.smtp
        address = session.client.address
        self.sessions.add(session)
        total, from_address = self.counts.add(address)
        if self.shutting_down:
            return Reply(421, "4.3.2", f"{self.hostname} Service shutting down")
        if total > smtp.max_connections:
            return Reply(421, "4.7.0", f"{self.hostname} Error: too many connections")
        if from_address > smtp.max_connections_per_ip:
            return Reply(421, "4.7.0",
                         f"{self.hostname} Error: too many connections from {address}")
        return None

    def release(self, session: SmtpSession) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.counts.remove(session.client.address)

    def may_relay(self, address: str) -> bool:
        return may_relay(address, self.config.relay)

    # -- timeouts -----------------------------------------------------------------------------
    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            smtp = self.config.smtp
            for session in list(self.sessions):
                try:
                    session.check_timeout(now, smtp.command_timeout, smtp.data_timeout)
                except Exception:  # one session's trouble must not end every timeout
                    log.logger.exception("timeout check failed for %s",
                                         session.client.describe())

    # -- shutdown -----------------------------------------------------------------------------
    async def shutdown(self) -> None:
        """Stop accepting; let transactions finish (bounded); 421 to everyone else."""
        self.shutting_down = True
        for server in self._servers:
            server.close()
        await drain(self.sessions, self.config.smtp.shutdown_grace)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for server in self._servers:
            await server.wait_closed()
