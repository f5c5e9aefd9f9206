"""``postroom serve``: put the parts together and run them until SIGTERM.

Order matters for safety: bind the listening sockets (ports below 1024 need root), make the data
directory private to the mail user, drop privileges, and only then open the accounts database,
start the group-commit writer and accept mail, so every file is created by the unprivileged user.

Signals: SIGTERM/SIGINT shut down gracefully (transactions in flight finish, then ``421``); SIGHUP
reloads the configuration file (limits, relay networks, delivery settings, log level; the
listeners themselves need a restart and a warning says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from postroom import config as config_mod
from postroom import log
from postroom.accounts.credentials import AccountCredentials, decoy_password_hash
from postroom.accounts.secrets import ServerKey
from postroom.accounts.store import AccountStore
from postroom.config import Config, ListenerSection
from postroom.delivery.maildir import MaildirUsage
from postroom.delivery.remote import RemoteDeliverer, RemoteSettings
from postroom.delivery.route import Credentials, NextHop, RouteSettings, TlsPolicy
from postroom.delivery.route import Router as OutboundRouter
from postroom.dns import Resolver
from postroom.errors import ConfigError
from postroom.net.auth import AuthService, LoginThrottleAdapter, throttle_settings
from postroom.net.control import ControlServer, queue_handler, socket_path
from postroom.net.limits import ConnectionCounts, SharedCounts
from postroom.net.pop3 import MaildirBackend, Pop3Server, Pop3ServerSettings
from postroom.net.server import SmtpServer, bind_listener
from postroom.net.tls import server_context
from postroom.policy.authlimit import AuthThrottle, LocalThrottle, SharedThrottle
from postroom.policy.router import Router
from postroom.queue.bell import QueueBell
from postroom.queue.bounce import Notifier
from postroom.queue.committer import Committer
from postroom.queue.runner import QueueRunner, only_domain
from postroom.queue.spool import Spool
from postroom.receive import Receiver, ReceiveSettings

DEFAULT_USER = "postroom"


def receive_settings(config: Config) -> ReceiveSettings:
    return ReceiveSettings(
        hostname=config.hostname,
        max_message_size=config.smtp.max_message_size,
        max_received_headers=config.smtp.max_received_headers,
        vrfy=config.smtp.vrfy,
        enforce_sender=config.auth.enforce_sender,
        received_auth_user=config.auth.received_header_user,
    )


@dataclass(frozen=True)
class LoginParts:
    """What every worker's logins share, made once before the workers fork: the server key
    (the decoy secret and the CRAM-MD5 box come from it), the decoy argon2 hash (slow to make)
    and the brute-force counters (shared memory when there are several workers)."""

    key: ServerKey
    decoy_hash: str
    throttle: AuthThrottle

    @classmethod
    def make(cls, config: Config) -> LoginParts | None:
        if not any(listener.offers_auth or not listener.smtp for listener in config.listeners()):
            return None
        settings = throttle_settings(config.auth)
        throttle: AuthThrottle = (SharedThrottle(settings) if config.server.workers > 1
                                  else LocalThrottle(settings))
        return cls(ServerKey.load_or_create(config.data_dir), decoy_password_hash(config.passwords),
                   throttle)


def route_settings(config: Config) -> RouteSettings:
    """``[outbound]`` as the outbound router takes it; ConfigError for a bad next hop."""
    out = config.outbound
    relayhost = None
    if out.relayhost:
        auth = (Credentials(out.relayhost_username, out.relayhost_password)
                if out.relayhost_username else None)
        tls = TlsPolicy(out.relayhost_tls) if out.relayhost_tls else None
        relayhost = NextHop.parse(out.relayhost, tls=tls, auth=auth)
    return RouteSettings(
        relayhost=relayhost,
        transports={domain.lower(): NextHop.parse(hop) for domain, hop in out.transports.items()},
        allow_networks=[ipaddress.ip_network(n, strict=False) for n in out.allow_networks],
        port=out.smtp_port,
        own_names=frozenset({config.hostname.lower()}),
    )


def outbound_deliverer(config: Config) -> RemoteDeliverer:
    out = config.outbound
    resolver = Resolver(out.nameservers, port=out.dns_port, timeout=out.dns_timeout)
    router = OutboundRouter(resolver, route_settings(config))
    settings = RemoteSettings(helo_name=config.hostname, tls_policy=TlsPolicy(out.tls_policy),
                              connect_timeout=out.connect_timeout,
                              mime_conversion=out.mime_conversion)
    return RemoteDeliverer(settings, router)


def pop3_settings(config: Config) -> Pop3ServerSettings:
    pop3 = config.pop3
    return Pop3ServerSettings(
        hostname=config.hostname,
        mechanisms=tuple(m for m in config.auth.mechanisms if m != "CRAM-MD5"),
        allow_plaintext=pop3.allow_plaintext,
        apop=pop3.apop,
        expire=pop3.expire,
        login_delay=pop3.login_delay,
        idle_timeout=pop3.idle_timeout,
        max_connections=pop3.max_connections,
        max_connections_per_ip=pop3.max_connections_per_ip,
        password_checks=config.auth.max_parallel_checks,
        shutdown_grace=config.smtp.shutdown_grace,
    )


def pop3_server(config: Config, accounts: AccountStore, auth: AuthService,
                context: ssl.SSLContext | None) -> Pop3Server:
    def maildir_for(user: str) -> Path | None:
        account = accounts.get_user(user)
        return None if account is None else account.maildir

    backend = MaildirBackend(auth.settings, maildir_for, LoginThrottleAdapter(auth.throttle))
    return Pop3Server(pop3_settings(config), backend, context)


def auth_service(config: Config, accounts: AccountStore, parts: LoginParts) -> AuthService:
    auth = config.auth
    return AuthService(
        credentials=AccountCredentials(accounts, parts.key.cram_box()),
        throttle=parts.throttle,
        hostname=config.hostname,
        decoy_secret=parts.key.decoy_secret(),
        mechanisms=auth.mechanisms,
        scram_iterations=auth.scram_iterations,
        max_parallel_checks=auth.max_parallel_checks,
        allow_plaintext_on_loopback=auth.allow_plaintext_on_loopback,
        decoy_hash=parts.decoy_hash,
    )


# -- privileges -------------------------------------------------------------------------------
def _ensure_user(name: str, home: Path) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if name != DEFAULT_USER or shutil.which("useradd") is None:
        raise ConfigError(f"server.run_as: no such user {name!r}")
    nologin = "/usr/sbin/nologin" if Path("/usr/sbin/nologin").exists() else "/bin/false"
    subprocess.run(
        ["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", str(home),
         "--shell", nologin, name],
        check=True,
    )
    log.logger.warning("created system user %r to run the mail server as", name)
    return pwd.getpwnam(name)


def make_private(data_dir: Path, uid: int, gid: int) -> None:
    """Create *data_dir* (0700) and give everything in it to uid:gid (what changed only)."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    for root, dirs, files in os.walk(data_dir):
        for name in [".", *dirs, *files]:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(path, uid, gid)


def drop_privileges(config: Config) -> None:
    """As root: make the data directory the mail user's, then become that user."""
    data_dir = config.data_dir.resolve()
    if os.geteuid() != 0:
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    user = config.server.run_as
    if not user or user == "root":
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.logger.warning("running as root (server.run_as is %r)", user)
        return
    entry = _ensure_user(user, data_dir)
    make_private(data_dir, entry.pw_uid, entry.pw_gid)
    os.setgroups([])  # no supplementary groups: the mail user needs none
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    os.umask(0o077)
    log.logger.info("running as %s (uid %d)", user, entry.pw_uid)


# -- running ----------------------------------------------------------------------------------
#: A listening socket and the listener section it was bound for.
Bound = tuple[socket.socket, ListenerSection]

def queue_worker(config: Config) -> int:
    """The index of the process that runs the queue: worker 0, or with ``server.queue_process``
    the process after the last worker."""
    return config.server.workers if config.server.queue_process else 0


class Daemon:
    """One process: an event loop with the SMTP and POP3 listeners and the committer; in the
    queue's process (:func:`queue_worker`) also the queue runner and the control socket. With
    ``server.queue_process`` that process takes no connections."""

    def __init__(
        self,
        config: Config,
        sockets: list[Bound],
        *,
        worker: int = 0,
        counts: ConnectionCounts | None = None,
        tls_context: ssl.SSLContext | None = None,
        logins: LoginParts | None = None,
        queue_bell: QueueBell | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.worker = worker
        self.counts = counts
        self.tls_context = tls_context
        self.logins = logins
        #: With several processes: the workers hand what they queue to the queue's process.
        self.queue_bell = queue_bell
        self.runs_queue = worker == queue_worker(config)
        self.listens = not (config.server.queue_process and self.runs_queue)
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        config = self.config
        data_dir = config.data_dir
        accounts = AccountStore.for_config(config)
        usage = MaildirUsage()
        # On the loop the router only reads cached counts; a miss is counted in a thread.
        router = Router(accounts, config.delivery, usage.cached, data_dir)
        committer = Committer()
        committer.start()
        spool = Spool(data_dir, committer, usage, config.hostname,
                      first_retry=config.queue.min_backoff)
        deliverer = outbound_deliverer(config)
        notifier = Notifier(spool, router, config.hostname,
                            size_limit=config.queue.bounce_size_limit,
                            double_bounces=config.queue.double_bounce_to_postmaster,
                            delay_warnings=config.queue.delay_warning > 0)
        def quota_of(mailbox: str) -> int | None:
            user = accounts.get_user(mailbox)
            return None if user is None else user.quota

        runner = QueueRunner(spool, committer, config, deliverer=deliverer, notifier=notifier,
                             quota_of=quota_of)
        receiver = Receiver(receive_settings(config), router, spool)
        auth = None if self.logins is None else auth_service(config, accounts, self.logins)
        server = SmtpServer(config, receiver, self.counts, self.tls_context, auth)
        if not self.listens:  # the queue manager's process: the workers take the connections
            for sock, _ in self.sockets:
                sock.close()
            self.sockets = []
        pop3_sockets = [(sock, lst) for sock, lst in self.sockets if not lst.smtp]
        pop3 = None
        if pop3_sockets and auth is not None:
            pop3 = pop3_server(config, accounts, auth, self.tls_context)
        self._reload_targets = (server, receiver, router, runner, pop3)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        control = None
        if self.runs_queue:  # the queue tools talk to the runner's process
            control = ControlServer(socket_path(data_dir), queue_handler(
                data_dir, message_lock=runner.message_lock, on_change=runner.wake))
        self._wire_bell(spool, runner)
        try:
            if control is not None:
                await control.start()
                runner.start()  # one runner per queue: two would deliver twice
            if self.listens:
                await server.start([(sock, lst) for sock, lst in self.sockets if lst.smtp])
            if pop3 is not None and self.listens:
                await pop3.start(
                    plain=[sock for sock, lst in pop3_sockets if not lst.implicit_tls],
                    implicit_tls=[sock for sock, lst in pop3_sockets if lst.implicit_tls])
            log.logger.info("postroom ready: %s, data in %s%s", config.hostname, data_dir,
                            "" if self.listens else " (queue manager)")
            await self.stopping.wait()
            log.logger.info("shutting down")
            if pop3 is not None:
                await asyncio.gather(server.shutdown(), pop3.shutdown())
            elif self.listens:
                await server.shutdown()
        finally:
            if control is not None:
                await control.stop()
            await runner.stop()
            await deliverer.close()
            await asyncio.to_thread(committer.stop)
            accounts.close()
            log.logger.info("stopped")

    def _wire_bell(self, spool: Spool, runner: QueueRunner) -> None:
        bell = self.queue_bell
        if bell is None:
            return
        if self.runs_queue:
            bell.listen(runner.handed, runner.wake)
        else:
            spool.on_queued = bell.sender(only_domain)

    def reload(self) -> None:
        old = self.config
        if old.source is None:
            log.logger.info("reload: no configuration file, nothing to reload")
            return
        try:
            new = config_mod.load(old.source)
        except ConfigError as exc:
            log.logger.error("reload failed, keeping the running configuration: %s", exc)
            return
        if new.listeners() != old.listeners() or new.server.data_dir != old.server.data_dir:
            log.logger.warning("reload: listener or data_dir changes need a restart")
        server, receiver, router, runner, pop3 = self._reload_targets
        try:
            server.tls_context = tls_context(new)  # new certificates, for new sessions
            if pop3 is not None:
                pop3.set_tls_context(server.tls_context)
                pop3.reconfigure(pop3_settings(new))
        except ConfigError as exc:
            log.logger.error("reload: keeping the TLS certificate in use: %s", exc)
        server.reconfigure(new)
        if server.auth is not None:
            server.auth.reconfigure(new.auth)
        receiver.settings = receive_settings(new)
        router.delivery = new.delivery
        runner.config = new
        if runner.deliverer is not None:
            try:
                runner.deliverer.router.settings = route_settings(new)
            except ConfigError as exc:
                log.logger.error("reload: keeping the outbound routes in use: %s", exc)
        log.logger.setLevel(new.server.log_level.upper())
        self.config = new
        log.logger.info("reloaded %s", new.source)


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run *main* on uvloop when it is installed, else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
        return
    uvloop.run(main)


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The TLS context, or None when no listener uses TLS (STARTTLS turned off on mx, no
    submission ports)."""
    if not config.tls.starttls and all(lst.role == "mx" for lst in config.listeners()):
        return None
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return server_context(config)


def _setup_logging(config: Config) -> None:
    log.setup(
        hostname=config.hostname,
        level=config.server.log_level,
        json_lines=config.server.log_json,
        file=config.server.log_file,
    )


def preload() -> None:
    """Import now what Python and our libraries otherwise import on first use. After the drop
    of privileges the interpreter's own files may be unreadable (a Python installed under a
    private home directory), and a lazy import would then fail deep inside a session: the
    thread pool of ``asyncio.to_thread`` (argon2 checks, quota counts), the lock of the shared
    counts (several processes), uvloop, the IDNA and punycode codecs, dnspython's record
    classes (MX answers), the email package's policies."""
    import concurrent.futures.thread  # noqa: F401
    import email.headerregistry
    import email.policy  # noqa: F401
    import encodings.idna
    import encodings.punycode  # noqa: F401
    import multiprocessing.synchronize  # noqa: F401

    import dns.rdata

    dns.rdata.load_all_types()  # type: ignore[no-untyped-call]
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401


def serve(config: Config) -> None:
    # Until the event loop installs its handler, a SIGHUP (the default action ends the process)
    # is ignored: the configuration was only just read.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # The committer thread makes one system call after another and needs the GIL back after
    # each; an event loop busy with sessions holds it for up to the switch interval (5 ms by
    # default), which then stretches every group-commit round and so every 250 waiting on
    # it. 0.5 ms measured 2-18 % more relayed mail per second (bench/RESULTS.md).
    sys.setswitchinterval(0.0005)
    _setup_logging(config)
    sockets = [(bind_listener(listener), listener) for listener in config.listeners()]
    context = tls_context(config)  # the key may be readable by root only: load it first
    preload()
    # Everything imported so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise stall a session for 20-40 ms at random.
    gc.freeze()
    drop_privileges(config)
    logins = LoginParts.make(config)  # as the mail user: a new key file is theirs
    try:
        if config.server.workers == 1 and not config.server.queue_process:
            _run(Daemon(config, sockets, tls_context=context, logins=logins).run())
        else:
            if Supervisor(config, sockets, context, logins).run():
                raise SystemExit(1)
    finally:
        log.flush()


_MASTER_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}


#: A worker that dies sooner than this after its start counts as failing at once.
_FAST_FAILURE = 5.0
#: After this many fast failures in a row the supervisor gives up (a configuration problem).
_MAX_FAST_FAILURES = 5


class Supervisor:
    """With ``server.workers`` > 1 or ``server.queue_process``: fork the workers (and the queue
    manager's process), pass SIGTERM/SIGHUP on to them, and start a new one when one dies
    unexpectedly (its connection counts are reset), with a growing delay; a process that keeps
    failing at start stops the server."""

    def __init__(
        self, config: Config, sockets: list[Bound], context: ssl.SSLContext | None,
        logins: LoginParts | None = None,
    ) -> None:
        self.config = config
        self.sockets = sockets
        self.context = context
        self.logins = logins
        self.processes = config.server.workers + (1 if config.server.queue_process else 0)
        self.counts = SharedCounts(self.processes)
        self.queue_bell = QueueBell()
        self.children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, started)
        self.respawn: dict[int, float] = {}  # worker index -> when to start it again
        self.failures: dict[int, int] = {}  # worker index -> fast failures in a row
        self.stopping = False
        self.exit_code = 0

    def _spawn(self, worker: int) -> None:
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                signal.pthread_sigmask(signal.SIG_SETMASK, set())
                for sig in _MASTER_SIGNALS:
                    signal.signal(sig, signal.SIG_DFL)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop handles it
                _stop_with_parent(parent)
                self.counts.worker = worker
                log.after_fork()  # the log files stay open: they were opened as root
                daemon = Daemon(self.config, self.sockets, worker=worker, counts=self.counts,
                                tls_context=self.context, logins=self.logins,
                                queue_bell=self.queue_bell)
                _run(daemon.run())
            except BaseException:
                log.logger.exception("worker %d failed", worker)
                code = 1
            finally:
                log.flush()
                os._exit(code)
        self.children[pid] = (worker, time.monotonic())
        log.logger.info("started worker %d (pid %d)", worker, pid)

    def run(self) -> int:
        # SIGCHLD must not be ignored (a parent may have passed that on), or the kernel reaps
        # the workers itself and we could not tell a crash from a stop.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_BLOCK, _MASTER_SIGNALS)
        for worker in range(self.processes):
            self._spawn(worker)
        while self.children or (self.respawn and not self.stopping):
            timeout = None
            if self.respawn and not self.stopping:
                timeout = max(0.0, min(self.respawn.values()) - time.monotonic())
            info: signal.struct_siginfo | None
            if timeout is None:
                info = signal.sigwaitinfo(_MASTER_SIGNALS)
            else:
                info = signal.sigtimedwait(_MASTER_SIGNALS, timeout)
            if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
                self._stop()
            elif info is not None and info.si_signo == signal.SIGHUP:
                self._reload()
            self._reap()
            self._respawn_due()
        log.logger.info("all workers stopped")
        return self.exit_code

    def _stop(self) -> None:
        self.stopping = True
        self.respawn.clear()
        self._signal_all(signal.SIGTERM)

    def _reload(self) -> None:
        """Check the file here too: a worker started later must get the new configuration."""
        if self.config.source is not None:
            try:
                self.config = config_mod.load(self.config.source)
            except ConfigError as exc:
                log.logger.error("reload failed, keeping the running configuration: %s", exc)
                return
        self._signal_all(signal.SIGHUP)

    def _signal_all(self, sig: int) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            entry = self.children.pop(pid, None)
            if entry is None:
                continue
            worker, started = entry
            self.counts.reset(worker)
            if self.stopping:
                continue
            fast = time.monotonic() - started < _FAST_FAILURE
            self.failures[worker] = self.failures.get(worker, 0) + 1 if fast else 0
            if self.failures[worker] >= _MAX_FAST_FAILURES:
                log.logger.error("worker %d failed %d times right after starting; stopping",
                                 worker, self.failures[worker])
                self.exit_code = 1
                self._stop()
                continue
            delay = 0.5 * 2 ** self.failures[worker] if fast else 0.1
            log.logger.error("worker %d (pid %d) died (%s); starting a new one in %.1f s",
                             worker, pid, _describe_status(status), delay)
            self.respawn[worker] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        if self.stopping:
            return
        now = time.monotonic()
        for worker, when in list(self.respawn.items()):
            if when <= now:
                del self.respawn[worker]
                self._spawn(worker)


def _stop_with_parent(parent: int) -> None:
    """A worker whose supervisor dies (killed, crashed) gets SIGTERM and shuts down as on a
    stop, rather than running on unsupervised and holding the ports (Linux prctl
    PR_SET_PDEATHSIG)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the supervisor's own SIGTERM still works
        return
    if os.getppid() != parent:  # it died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def _describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
