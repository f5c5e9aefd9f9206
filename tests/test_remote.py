"""Remote delivery against real receivers on loopback: Postfix's smtp-sink, and receivers built
here on postroom's own server core (refused greetings, per-recipient answers, silence, STARTTLS
with a self-signed certificate). DNS comes from a dnslib server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from postroom.config import from_dict
from postroom.delivery.maildir import MaildirUsage
from postroom.delivery.remote import (
    AttemptResult,
    BytesSource,
    ConnectionCache,
    FileSource,
    RecipientResult,
    RemoteDeliverer,
    RemoteSettings,
)
from postroom.delivery.route import Credentials, NextHop, Router, RouteSettings, TlsPolicy
from postroom.ids import new_queue_id
from postroom.net.tls import self_signed
from postroom.policy.routes import RemoteDelivery
from postroom.queue.committer import Committer
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.runner import QueueRunner
from postroom.queue.spool import Spool, read_envelope
from postroom.smtp import codes
from postroom.smtp.client import (
    ClientTimeouts,
    OutboundEnvelope,
    OutboundRecipient,
    Stage,
    Verdict,
)
from postroom.smtp.codes import Reply
from postroom.smtp.events import (
    DataChunk,
    EndOfData,
    Hello,
    MailFrom,
    RcptTo,
    Request,
    Reset,
    StartTls,
    Vrfy,
)
from postroom.smtp.server import ServerConnection
from postroom.testing import settings as server_settings
from tests.dns_support import DnsTestServer, serve_dns

SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
MESSAGE = b"Subject: test\r\nFrom: a@example.com\r\n\r\nline one\r\n.dot line\r\n..two dots\r\n"


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def envelope(*rcpts: str, sender: str = "alice@example.com", **kw: Any) -> OutboundEnvelope:
    return OutboundEnvelope(sender, tuple(OutboundRecipient(r) for r in rcpts), **kw)


# -- a receiver built on the server core --------------------------------------------------------
Policy = Callable[[Request], Reply | None]  # None: never answer


def accept_all(request: Request) -> Reply | None:
    if isinstance(request, (Hello, StartTls)):
        return codes.OK if isinstance(request, Hello) else Reply(220, "2.0.0", "Ready to start TLS")
    if isinstance(request, MailFrom):
        return codes.OK_MAIL
    if isinstance(request, RcptTo):
        return codes.OK_RCPT
    if isinstance(request, EndOfData):
        return codes.ok_queued("TESTID")
    if isinstance(request, Vrfy):
        return codes.CANNOT_VRFY
    raise AssertionError(request)


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    mail: MailFrom | None = None  # the MAIL command, with its parameters


@dataclass
class Receiver:
    host: str
    port: int
    policy: Policy = accept_all
    refuse: Reply | None = None  # answer the connection with this instead of the banner
    tls: ssl.SSLContext | None = None  # offer STARTTLS with this context
    break_tls: bool = False  # answer 220 to STARTTLS, then hang up (a broken TLS stack)
    silent: bool = False  # take the connection, never greet
    hang_up_at_once: bool = False  # take the connection, close it before greeting
    no_8bitmime: bool = False  # leave 8BITMIME out of the EHLO reply
    connections: int = 0
    commands: list[str] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    tls_sessions: int = 0
    server: asyncio.Server | None = None
    sessions: list[_ReceiverSession] = field(default_factory=list)

    async def start(self) -> Receiver:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ReceiverSession(self), self.host, self.port)
        return self

    def hang_up(self) -> None:
        """Close every connection (Server.close_clients needs Python 3.13)."""
        for session in self.sessions:
            if session.transport is not None:
                session.transport.abort()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        self.hang_up()
        await self.server.wait_closed()


class _ReceiverSession(asyncio.Protocol):
    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.conn = ServerConnection(server_settings(hostname=f"mx.{receiver.host}"))
        self.transport: asyncio.Transport | None = None
        self.mail: MailFrom | None = None
        self.rcpts: list[str] = []
        self.content = b""
        self.tls_pending = False
        self.early = b""  # what arrived inside TLS before start_tls() returned

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        receiver = self.receiver
        receiver.connections += 1
        receiver.sessions.append(self)
        if receiver.silent:
            return
        if receiver.hang_up_at_once:
            self.transport.close()
            return
        if receiver.refuse is not None:
            self.conn.reject_connection(receiver.refuse)
        else:
            if receiver.tls is not None:
                self.conn.extensions.append("STARTTLS")
            self.conn.start()
        self.pump()

    def data_received(self, data: bytes) -> None:
        if self.tls_pending:  # decrypted data can come before the start_tls() awaiter resumes
            self.early += data
            return
        self.conn.receive_data(data)
        self.pump()

    def eof_received(self) -> bool:
        self.conn.receive_eof()
        self.pump()
        return True

    def pump(self) -> None:
        conn = self.conn
        while (event := conn.next_event()) is not None:
            if isinstance(event, DataChunk):
                self.content += event.data
            elif isinstance(event, Reset):
                self.mail, self.rcpts, self.content = None, [], b""
            if not isinstance(event, Request):
                continue
            self.receiver.commands.append(type(event).__name__)
            reply = self.receiver.policy(event)
            if reply is None:
                break  # stay silent: the client must time out
            if isinstance(event, MailFrom) and reply.code < 300:
                self.mail = event
            if isinstance(event, RcptTo) and reply.code < 300:
                self.rcpts.append(str(event.address))
            if isinstance(event, EndOfData) and reply.code < 300 and self.mail is not None:
                self.receiver.messages.append(Received(str(self.mail.address), self.rcpts,
                                                       self.content, self.mail))
            conn.respond(reply)
            if isinstance(event, StartTls) and reply.code == 220:
                self.tls_pending = True
                self.write()
                asyncio.get_running_loop().create_task(self.start_tls())
                return
        self.write()

    def write(self) -> None:
        out = self.conn.data_to_send()
        if self.receiver.no_8bitmime:
            out = out.replace(b"250-8BITMIME\r\n", b"")
        if self.transport is not None and not self.transport.is_closing():
            if out:
                self.transport.write(out)
            if self.conn.closed:
                self.transport.close()

    async def start_tls(self) -> None:
        assert self.transport is not None and self.receiver.tls is not None
        if self.receiver.break_tls:
            self.transport.abort()
            return
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.receiver.tls,
                                             server_side=True)
        except (ssl.SSLError, OSError):
            return
        assert transport is not None
        self.transport = transport
        self.receiver.tls_sessions += 1
        self.tls_pending = False
        self.conn.tls_established()
        self.conn.receive_data(self.early)
        self.pump()


# -- fixtures -----------------------------------------------------------------------------------
@dataclass
class Sink:
    port: int
    dump: Path
    proc: subprocess.Popen[bytes]

    def messages(self) -> list[str]:
        return [p.read_text() for p in sorted(self.dump.iterdir())]


def wait_banner(port: int, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1) as sock:
                if sock.recv(100).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("smtp-sink did not start")


@contextlib.contextmanager
def smtp_sinks() -> Iterator[Callable[..., Sink]]:
    """``start(*options, host=...)`` runs smtp-sink on a free port, dumping what it takes; all
    stop at the end."""
    started: list[Sink] = []

    def start(*options: str, host: str = "127.0.0.1") -> Sink:
        port = free_port(host)
        dump = Path(tempfile.mkdtemp(prefix="postroom-sink-"))
        os.chmod(dump, 0o777)  # smtp-sink writes as nobody
        proc = subprocess.Popen(
            [SMTP_SINK, "-u", "nobody", "-d", f"{dump}/m.", *options, f"{host}:{port}", "10"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        sink = Sink(port, dump, proc)
        started.append(sink)
        wait_banner(port, host)
        return sink

    try:
        yield start
    finally:
        for sink in started:
            sink.proc.terminate()
            sink.proc.wait(5)
            shutil.rmtree(sink.dump, ignore_errors=True)


@pytest.fixture
def sink_factory() -> Iterator[Callable[..., Sink]]:
    with smtp_sinks() as start:
        yield start


def zone(port_hosts: dict[str, str]) -> dict[str, list[str]]:
    """``{"mx.a.test": "127.0.0.2"}`` -> A/AAAA records."""
    return {host: [f"{'AAAA' if ':' in ip else 'A'} {ip}"] for host, ip in port_hosts.items()}


DNS = {
    "example.test": ["MX 10 mx.example.test."],
    "second.test": ["MX 10 mx.example.test."],
    "third.test": ["MX 10 mx.third.test."],
    "mx.third.test": ["A 127.0.0.2"],
    "mx.example.test": ["A 127.0.0.1"],
    "backup.test": ["MX 10 dead.backup.test.", "MX 20 grumpy.backup.test.", "MX 30 ok.backup.test."],
    **zone({"dead.backup.test": "127.0.0.2", "grumpy.backup.test": "127.0.0.3",
            "ok.backup.test": "127.0.0.4"}),
    "grey.test": ["MX 10 primary.grey.test.", "MX 20 secondary.grey.test."],
    **zone({"primary.grey.test": "127.0.0.5", "secondary.grey.test": "127.0.0.6"}),
    "tls.test": ["MX 10 mx.tls.test."],
    "mx.tls.test": ["A 127.0.0.7"],
    "v6.test": ["MX 10 mx.v6.test."],
    "mx.v6.test": ["AAAA ::1"],
    "null.test": ["MX 0 ."],
    "nothere.test": ["MX 10 mx.nothere.test."],
    "mx.nothere.test": ["A 127.0.0.9"],
    "smart.test": ["A 127.0.0.1"],
}


@pytest.fixture(scope="module")
def dns_server() -> Iterator[DnsTestServer]:
    with serve_dns(DNS) as server:
        yield server


def deliverer(dns_server: DnsTestServer, port: int, **kw: Any) -> RemoteDeliverer:
    route_kw = {k: kw.pop(k) for k in ("relayhost", "transports") if k in kw}
    router = Router(dns_server.resolver(),
                    RouteSettings(allow_networks=LOOPBACK, port=port, **route_kw))
    kw.setdefault("timeouts", ClientTimeouts(greeting=5, helo=5, mail=5, rcpt=5, data_init=5,
                                             data_block=5, data_end=5, rset=5, quit=1))
    return RemoteDeliverer(RemoteSettings(helo_name="out.example.com", connect_timeout=2, **kw),
                           router)


async def once(d: RemoteDeliverer, domain: str, env: OutboundEnvelope,
               source: BytesSource | FileSource) -> AttemptResult:
    """One delivery, then the deliverer's idle connections closed."""
    try:
        return await d.deliver(domain, env, source)
    finally:
        await d.close()


def run(d: RemoteDeliverer, domain: str, env: OutboundEnvelope,
        source: BytesSource | FileSource) -> AttemptResult:
    return asyncio.run(once(d, domain, env, source))


# -- smtp-sink ------------------------------------------------------------------------------------
def test_delivers_to_smtp_sink_with_data(dns_server: DnsTestServer,
                                         sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory()
    result = run(deliverer(dns_server, sink.port), "example.test",
                 envelope("bob@example.test", "carol@example.test", body="8BITMIME"),
                 BytesSource(MESSAGE))
    assert [r.verdict for r in result.recipients] == [Verdict.DELIVERED, Verdict.DELIVERED]
    first = result.recipients[0]
    assert first.relay == f"mx.example.test[127.0.0.1]:{sink.port}"
    assert first.stage is Stage.END and first.reply.code == 250 and first.dsn == "2.0.0"
    assert first.dsn_passed  # smtp-sink offers DSN
    assert first.detail == "250 2.0.0 Ok"
    deadline = time.monotonic() + 3
    while not sink.messages() and time.monotonic() < deadline:
        time.sleep(0.02)
    (dumped,) = sink.messages()
    assert "X-Mail-Args: <alice@example.com> BODY=8BITMIME" in dumped
    assert "X-Rcpt-Args: <bob@example.test>" in dumped and "X-Rcpt-Args: <carol@example.test>" in dumped
    assert dumped.endswith(MESSAGE.decode().replace("\r\n", "\n") + "\n")  # dots came back intact


def test_large_message_from_a_file_in_chunks(dns_server: DnsTestServer,
                                             sink_factory: Callable[..., Sink],
                                             tmp_path: Path) -> None:
    sink = sink_factory()
    body = b"".join(b".%06d %s\r\n" % (i, b"x" * 90) for i in range(20000))  # ~2 MB
    path = tmp_path / "queued"
    path.write_bytes(b'{"envelope": "first line"}\n' + body)
    source = FileSource(path, offset=path.read_bytes().index(b"\n") + 1)
    assert source.size == len(body)
    result = run(deliverer(dns_server, sink.port, chunk_size=8192), "example.test",
                 envelope("bob@example.test"), source)
    assert result.recipients[0].verdict is Verdict.DELIVERED
    (dumped,) = sink.messages()
    assert dumped.endswith(body.decode().replace("\r\n", "\n") + "\n")


def test_smtp_sink_soft_rejects_rcpt_without_pipelining(dns_server: DnsTestServer,
                                                         sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("-r", "RCPT")  # -r implies no PIPELINING
    result = run(deliverer(dns_server, sink.port),
                 "example.test", envelope("bob@example.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.stage is Stage.RCPT and not rcpt.local
    assert rcpt.detail == ("host mx.example.test[127.0.0.1] said: 450 4.3.0 Error: command failed "
                           "(in reply to RCPT TO command)")
    assert not any("Subject: test" in m for m in sink.messages())  # no DATA after the refusal


def test_smtp_sink_hard_rejects_end_of_data(dns_server: DnsTestServer,
                                            sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory("-f", ".")
    result = run(deliverer(dns_server, sink.port),
                 "example.test", envelope("bob@example.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.PERMANENT and rcpt.stage is Stage.END
    assert "(in reply to end of DATA command)" in rcpt.detail


def test_smtputf8_not_offered_bounces_5_6_7(dns_server: DnsTestServer,
                                            sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory()
    result = run(deliverer(dns_server, sink.port),
                 "example.test", envelope("j\u00f6rg@example.test", smtputf8=True), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.PERMANENT and rcpt.dsn == "5.6.7" and rcpt.local
    assert sink.messages() == []


def test_smarthost_auth(dns_server: DnsTestServer, sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory()  # offers AUTH PLAIN LOGIN, no STARTTLS
    hop = NextHop.parse(f"[smart.test]:{sink.port}", tls=TlsPolicy.NONE,
                        auth=Credentials("user", "secret"))
    # credentials never travel in plaintext unless allowed
    result = run(deliverer(dns_server, 1, relayhost=hop),
                 "far.away.test", envelope("bob@far.away.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.dsn == "4.7.0" and rcpt.stage is Stage.AUTH
    result = run(deliverer(dns_server, 1, relayhost=hop, auth_without_tls=True),
                 "far.away.test", envelope("bob@far.away.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED
    assert rcpt.relay == f"smart.test[127.0.0.1]:{sink.port}"


# -- MX fallback and per-recipient answers ------------------------------------------------------
def test_next_mx_after_refused_connection_and_4xx_greeting(dns_server: DnsTestServer) -> None:
    port = free_port()

    async def go() -> tuple[AttemptResult, Receiver, Receiver]:
        grumpy = await Receiver("127.0.0.3", port,
                                refuse=Reply(421, "4.3.2", "mx.grumpy too busy")).start()
        good = await Receiver("127.0.0.4", port).start()
        try:  # nothing listens on 127.0.0.2
            result = await once(deliverer(dns_server, port),
                "backup.test", envelope("bob@backup.test"), BytesSource(MESSAGE))
        finally:
            await grumpy.stop()
            await good.stop()
        return result, grumpy, good

    result, grumpy, good = asyncio.run(go())
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED
    assert rcpt.relay == f"ok.backup.test[127.0.0.4]:{port}"
    assert rcpt.stage is Stage.BDAT  # the core offers CHUNKING and PIPELINING
    assert grumpy.connections == 1 and grumpy.commands == []
    assert good.messages[0].content == MESSAGE
    assert any("127.0.0.2" in note and "refused" in note.lower() for note in result.notes)
    assert any("127.0.0.3" in note and "421" in note for note in result.notes), result.notes


def test_everything_unreachable_defers_with_the_last_reason(dns_server: DnsTestServer) -> None:
    port = free_port()
    result = run(deliverer(dns_server, port),
                 "backup.test", envelope("bob@backup.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.local and rcpt.stage is Stage.CONNECT
    assert rcpt.detail == f"connect to ok.backup.test[127.0.0.4]:{port}: Connection refused"
    assert rcpt.relay == "none"


def test_per_recipient_mix_and_retry_of_deferrals_at_the_next_mx(dns_server: DnsTestServer) -> None:
    port = free_port()

    def primary_policy(request: Request) -> Reply | None:
        if isinstance(request, RcptTo) and request.address.local == "grey":
            return Reply(450, "4.2.0", "greylisted, try later")
        if isinstance(request, RcptTo) and request.address.local == "nobody":
            return Reply(550, "5.1.1", "no such user")
        return accept_all(request)

    async def go() -> tuple[AttemptResult, Receiver, Receiver]:
        primary = await Receiver("127.0.0.5", port, policy=primary_policy).start()
        secondary = await Receiver("127.0.0.6", port).start()
        try:
            result = await once(deliverer(dns_server, port),
                "grey.test", envelope("ok@grey.test", "grey@grey.test", "nobody@grey.test"),
                BytesSource(MESSAGE))
        finally:
            await primary.stop()
            await secondary.stop()
        return result, primary, secondary

    result, primary, secondary = asyncio.run(go())
    ok, grey, nobody = result.recipients
    assert ok.verdict is Verdict.DELIVERED and ok.target is not None
    assert ok.target.ip == "127.0.0.5"
    assert grey.verdict is Verdict.DELIVERED and grey.target is not None
    assert grey.target.ip == "127.0.0.6"  # deferred by the primary, taken by the backup
    assert nobody.verdict is Verdict.PERMANENT and nobody.stage is Stage.RCPT
    assert nobody.detail == ("host primary.grey.test[127.0.0.5] said: 550 5.1.1 no such user "
                             "(in reply to RCPT TO command)")
    assert [m.recipients for m in primary.messages] == [["ok@grey.test"]]
    assert [m.recipients for m in secondary.messages] == [["grey@grey.test"]]


def test_last_server_decides_deferrals(dns_server: DnsTestServer) -> None:
    port = free_port()

    def busy(request: Request) -> Reply | None:
        if isinstance(request, MailFrom):
            return Reply(451, "4.3.0", "try again later")
        return accept_all(request)

    async def go() -> AttemptResult:
        primary = await Receiver("127.0.0.5", port, policy=busy).start()
        secondary = await Receiver("127.0.0.6", port, policy=busy).start()
        try:
            return await once(deliverer(dns_server, port),
                "grey.test", envelope("a@grey.test"), BytesSource(MESSAGE))
        finally:
            await primary.stop()
            await secondary.stop()

    (rcpt,) = asyncio.run(go()).recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.stage is Stage.MAIL
    assert rcpt.target is not None and rcpt.target.ip == "127.0.0.6"


def test_silent_server_times_out(dns_server: DnsTestServer) -> None:
    port = free_port()

    def silent_rcpt(request: Request) -> Reply | None:
        return None if isinstance(request, RcptTo) else accept_all(request)

    async def go() -> AttemptResult:
        mute = await Receiver("127.0.0.1", port, policy=silent_rcpt).start()
        try:
            fast = ClientTimeouts(rcpt=0.3, mail=0.3)
            return await once(deliverer(dns_server, port, timeouts=fast, max_sessions=1),
                "example.test", envelope("bob@example.test"), BytesSource(MESSAGE))
        finally:
            await mute.stop()

    started = time.monotonic()
    (rcpt,) = asyncio.run(go()).recipients
    assert time.monotonic() - started < 3
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.local and rcpt.stage is Stage.RCPT
    assert "timed out while sending RCPT TO" in rcpt.detail


def test_routing_failures_decide_everyone(dns_server: DnsTestServer) -> None:
    result = run(deliverer(dns_server, 25), "null.test", envelope("a@null.test", "b@null.test"),
                 BytesSource(b""))
    assert [(r.verdict, r.dsn, r.relay) for r in result.recipients] == [
        (Verdict.PERMANENT, "5.1.10", "none")] * 2
    (rcpt,) = run(deliverer(dns_server, 25), "nowhere.test", envelope("a@nowhere.test"),
                  BytesSource(b"")).recipients
    assert rcpt.verdict is Verdict.PERMANENT and rcpt.dsn == "5.1.2"


def test_unreadable_message_defers_without_a_final_dot(dns_server: DnsTestServer,
                                                       tmp_path: Path) -> None:
    port = free_port()
    path = tmp_path / "gone"
    path.write_bytes(MESSAGE)

    class Vanishing(FileSource):
        def chunks(self, chunk_size: int) -> Iterator[bytes]:
            yield b"Subject: half\r\n"
            raise OSError(5, "Input/output error")

    async def go() -> tuple[AttemptResult, Receiver]:
        receiver = await Receiver("127.0.0.1", port).start()
        try:
            return await once(deliverer(dns_server, port, chunking=False),
                "example.test", envelope("bob@example.test"), Vanishing(path)), receiver
        finally:
            await asyncio.sleep(0.05)
            await receiver.stop()

    result, receiver = asyncio.run(go())
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.dsn == "4.3.0" and rcpt.local
    assert receiver.messages == [] and receiver.commands[-1] == "RcptTo"  # no end of data
    missing = run(deliverer(dns_server, port), "example.test", envelope("bob@example.test"),
                  FileSource(tmp_path / "never-written"))
    assert missing.recipients[0].dsn == "4.3.0" and "cannot read" in missing.recipients[0].detail


def test_ipv6(dns_server: DnsTestServer) -> None:
    port = free_port("::1")

    async def go() -> tuple[AttemptResult, Receiver]:
        receiver = await Receiver("::1", port).start()
        try:
            return await once(deliverer(dns_server, port),
                "v6.test", envelope("bob@v6.test"), BytesSource(MESSAGE)), receiver
        finally:
            await receiver.stop()

    result, receiver = asyncio.run(go())
    assert result.recipients[0].verdict is Verdict.DELIVERED
    assert result.recipients[0].relay == f"mx.v6.test[::1]:{port}"
    assert len(receiver.messages) == 1


# -- connection reuse ---------------------------------------------------------------------------
def test_connection_reuse_for_consecutive_messages(dns_server: DnsTestServer) -> None:
    port = free_port()

    async def go() -> tuple[list[AttemptResult], Receiver, ConnectionCache]:
        receiver = await Receiver("127.0.0.1", port).start()
        d = deliverer(dns_server, port, cache_idle=0.3)
        results = []
        try:
            for n in range(3):
                results.append(await d.deliver(
                    "example.test", envelope(f"r{n}@example.test"), BytesSource(MESSAGE)))
            assert receiver.connections == 1 and len(d.cache) == 1
            await asyncio.sleep(0.5)  # idle past cache_idle: the connection is closed
            assert len(d.cache) == 0
            results.append(await d.deliver(
                "example.test", envelope("late@example.test"), BytesSource(MESSAGE)))
        finally:
            await d.close()
            await asyncio.sleep(0.05)
            await receiver.stop()
        return results, receiver, d.cache

    results, receiver, cache = asyncio.run(go())
    assert all(r.recipients[0].verdict is Verdict.DELIVERED for r in results)
    assert receiver.connections == 2
    assert cache.reused == 2
    assert [m.recipients for m in receiver.messages] == [
        ["r0@example.test"], ["r1@example.test"], ["r2@example.test"], ["late@example.test"]]


def test_dead_cached_connection_is_replaced(dns_server: DnsTestServer) -> None:
    port = free_port()

    async def go() -> tuple[list[AttemptResult], Receiver]:
        receiver = await Receiver("127.0.0.1", port).start()
        d = deliverer(dns_server, port, cache_idle=10)
        try:
            first = await d.deliver("example.test", envelope("a@example.test"), BytesSource(MESSAGE))
            receiver.hang_up()
            await asyncio.sleep(0.05)
            second = await d.deliver("example.test", envelope("b@example.test"), BytesSource(MESSAGE))
        finally:
            await d.close()
            await receiver.stop()
        return [first, second], receiver

    results, receiver = asyncio.run(go())
    assert all(r.recipients[0].verdict is Verdict.DELIVERED for r in results)
    assert receiver.connections == 2


# -- STARTTLS -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    self_signed("mx.tls.test", cert, key)
    return cert, key


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


def tls_delivery(dns_server: DnsTestServer, certificate: tuple[Path, Path], *,
                 break_tls: bool = False, **kw: Any) -> tuple[AttemptResult, Receiver]:
    port = free_port()

    async def go() -> tuple[AttemptResult, Receiver]:
        receiver = await Receiver("127.0.0.7", port, tls=server_tls(certificate),
                                  break_tls=break_tls).start()
        d = deliverer(dns_server, port, **kw)
        try:
            return await once(d, "tls.test", envelope("bob@tls.test"), BytesSource(MESSAGE)), receiver
        finally:
            await d.close()
            await asyncio.sleep(0.05)
            await receiver.stop()

    return asyncio.run(go())


def test_opportunistic_tls_accepts_a_self_signed_certificate(
        dns_server: DnsTestServer, certificate: tuple[Path, Path]) -> None:
    result, receiver = tls_delivery(dns_server, certificate, tls_policy=TlsPolicy.OPPORTUNISTIC)
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED and rcpt.tls
    assert receiver.tls_sessions == 1 and receiver.messages[0].content == MESSAGE
    assert receiver.commands.count("Hello") == 2  # EHLO again after the handshake


def test_required_tls_refuses_an_unverified_certificate(
        dns_server: DnsTestServer, certificate: tuple[Path, Path]) -> None:
    result, receiver = tls_delivery(dns_server, certificate, tls_policy=TlsPolicy.REQUIRED)
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.dsn == "4.7.5" and rcpt.local
    assert "certificate verify failed" in rcpt.detail or "self" in rcpt.detail
    assert receiver.messages == [] and "MailFrom" not in receiver.commands


def test_required_tls_with_the_ca_verifies(dns_server: DnsTestServer,
                                           certificate: tuple[Path, Path]) -> None:
    result, receiver = tls_delivery(dns_server, certificate, tls_policy=TlsPolicy.REQUIRED,
                                    tls_ca_file=certificate[0])
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED and rcpt.tls and receiver.tls_sessions == 1


def test_no_tls_policy_stays_plain(dns_server: DnsTestServer,
                                   certificate: tuple[Path, Path]) -> None:
    result, receiver = tls_delivery(dns_server, certificate, tls_policy=TlsPolicy.NONE)
    assert result.recipients[0].verdict is Verdict.DELIVERED and not result.recipients[0].tls
    assert receiver.tls_sessions == 0 and "StartTls" not in receiver.commands


def test_required_tls_not_offered_defers(dns_server: DnsTestServer,
                                         sink_factory: Callable[..., Sink]) -> None:
    sink = sink_factory()
    result = run(deliverer(dns_server, sink.port, tls_policy=TlsPolicy.REQUIRED),
                 "example.test", envelope("bob@example.test"), BytesSource(MESSAGE))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.dsn == "4.7.4"
    assert sink.messages() == []  # not even MAIL


def test_failed_opportunistic_handshake_retries_in_plaintext(
        dns_server: DnsTestServer, certificate: tuple[Path, Path]) -> None:
    result, receiver = tls_delivery(dns_server, certificate, break_tls=True,
                                    tls_policy=TlsPolicy.OPPORTUNISTIC)
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED and not rcpt.tls
    assert receiver.connections == 2 and len(receiver.messages) == 1
    assert any("trying plaintext" in note for note in result.notes)


def test_552_to_rcpt_is_retried_but_552_to_the_message_bounces() -> None:
    """RFC 5321 4.5.3.1.10: a 552 to RCPT is the legacy "too many recipients" (retried, as
    Postfix does); a 552 at the end of the message (too big) is final."""
    rcpt = OutboundRecipient("a@grey.test")
    too_many = RecipientResult(rcpt, Reply(552, "5.5.3", "Too many recipients"), Stage.RCPT,
                               local=False)
    too_big = RecipientResult(rcpt, Reply(552, "5.3.4", "Message too big"), Stage.END,
                              local=False)
    assert too_many.verdict is Verdict.TEMPORARY
    assert too_big.verdict is Verdict.PERMANENT


# -- servers that take the connection but never get going ---------------------------------------
GREETING_TIMEOUT = ClientTimeouts(greeting=0.3, helo=0.3, mail=5, rcpt=5, data_init=5,
                                  data_block=5, data_end=5, rset=5, quit=1)


def unanswered(dns_server: DnsTestServer, **receiver_kw: Any) -> tuple[AttemptResult, Receiver]:
    port = free_port()

    async def go() -> tuple[AttemptResult, Receiver]:
        receiver = await Receiver("127.0.0.1", port, **receiver_kw).start()
        try:
            return await once(deliverer(dns_server, port, timeouts=GREETING_TIMEOUT),
                              "example.test", envelope("bob@example.test"),
                              BytesSource(MESSAGE)), receiver
        finally:
            await receiver.stop()

    return asyncio.run(go())


def test_a_server_that_never_greets_is_reported_as_unreachable(dns_server: DnsTestServer) -> None:
    """Stage CONNECT (local, temporary) is what the queue runner counts as "no host answered"
    when it marks a destination dead; a greeting time-out now counts like a refused connect."""
    started = time.monotonic()
    result, receiver = unanswered(dns_server, silent=True)
    (rcpt,) = result.recipients
    assert time.monotonic() - started < 3 and receiver.connections == 1
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.local and rcpt.stage is Stage.CONNECT
    assert rcpt.detail == ("mx.example.test[127.0.0.1]: conversation timed out while receiving "
                           "the initial server greeting")
    assert rcpt.relay == f"mx.example.test[127.0.0.1]:{receiver.port}"


def test_a_server_that_hangs_up_before_greeting_is_reported_as_unreachable(
        dns_server: DnsTestServer) -> None:
    result, _ = unanswered(dns_server, hang_up_at_once=True)
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and rcpt.local and rcpt.stage is Stage.CONNECT
    assert "lost connection while receiving the initial server greeting" in rcpt.detail


def test_a_refused_greeting_is_an_answer_not_unreachable(dns_server: DnsTestServer) -> None:
    result, _ = unanswered(dns_server, refuse=Reply(421, "4.3.2", "too busy"))
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.TEMPORARY and not rcpt.local
    assert rcpt.stage is Stage.GREETING  # the server said something: not a dead destination


def test_a_silent_primary_mx_falls_back_to_the_next(dns_server: DnsTestServer) -> None:
    port = free_port()

    async def go() -> tuple[AttemptResult, Receiver]:
        primary = await Receiver("127.0.0.5", port, silent=True).start()
        secondary = await Receiver("127.0.0.6", port).start()
        try:
            return await once(deliverer(dns_server, port, timeouts=GREETING_TIMEOUT),
                              "grey.test", envelope("a@grey.test"), BytesSource(MESSAGE)), secondary
        finally:
            await primary.stop()
            await secondary.stop()

    result, secondary = asyncio.run(go())
    (rcpt,) = result.recipients
    assert rcpt.verdict is Verdict.DELIVERED and len(secondary.messages) == 1
    assert any("127.0.0.5" in note and "initial server greeting" in note for note in result.notes)


def test_the_queue_skips_a_destination_whose_server_never_greets(
        dns_server: DnsTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The runner's existing dead-destination logic, fed by a greeting time-out: the next
    message for the domain is deferred without a connection ("delivery temporarily
    suspended"), as after a refused connection. Without the change it waited again."""
    port = free_port()
    committer = Committer()
    committer.start()
    now = time.time()

    async def queue(spool: Spool, rcpt: str) -> Path:
        env = Envelope(new_queue_id(), "alice@example.com", now,
                       recipients=[Recipient(rcpt, RemoteDelivery(rcpt))])
        message = spool.open_message()
        message.write(MESSAGE)
        path = (await spool.accept(env, message, b"")).queue_file
        assert path is not None
        return path

    async def go() -> tuple[list[Path], Receiver]:
        silent = await Receiver("127.0.0.1", port, silent=True).start()
        spool = Spool(tmp_path / "data", committer, MaildirUsage(), "out.example.com")
        config = from_dict({"queue": {"scan_interval": 3600.0},
                            "outbound": {"dead_destination_time": 30.0}})
        d = deliverer(dns_server, port, timeouts=GREETING_TIMEOUT)
        runner = QueueRunner(spool, committer, config, deliverer=d)
        spool.on_queued = None  # run_once below does the work, one message at a time
        try:
            first = await queue(spool, "bob@example.test")
            await runner.run_once()
            second = await queue(spool, "carol@example.test")
            await runner.run_once()
        finally:
            await d.close()
            await silent.stop()
        return [first, second], silent

    try:
        with caplog.at_level(logging.INFO, logger="postroom"):
            paths, silent = asyncio.run(go())
    finally:
        committer.stop()
    assert silent.connections == 1  # the second message did not wait for the greeting again
    first, second = (read_envelope(p).recipients[0] for p in paths)
    assert "timed out while receiving the initial server greeting" in (first.last_error or "")
    assert (second.last_error or "").startswith("delivery temporarily suspended: ")
    assert "to=<carol@example.test>, relay=none" in caplog.text


def test_messages_waiting_for_the_slot_of_a_silent_destination_are_not_tried(
        dns_server: DnsTestServer, tmp_path: Path) -> None:
    """One delivery at a time per domain, messages for two domains (so they wait for each
    domain's slot inside their turn): the first waits out the greeting time-out and marks both
    destinations dead; the others, already waiting for the slots, are deferred when they get
    them, without connections of their own."""
    port = free_port()
    committer = Committer()
    committer.start()
    now = time.time()

    async def go() -> tuple[list[Path], Receiver]:
        silent = await Receiver("127.0.0.1", port, silent=True).start()
        spool = Spool(tmp_path / "data", committer, MaildirUsage(), "out.example.com")
        config = from_dict({"queue": {"scan_interval": 3600.0},
                            "outbound": {"dead_destination_time": 30.0,
                                         "max_per_destination": 1}})
        d = deliverer(dns_server, port, timeouts=GREETING_TIMEOUT)
        runner = QueueRunner(spool, committer, config, deliverer=d)
        spool.on_queued = None
        paths = []
        try:
            for user in ("bob", "carol", "dan"):  # two domains each: no slot is taken first
                rcpts = [f"{user}@example.test", f"{user}@second.test"]
                env = Envelope(new_queue_id(), "alice@example.com", now,
                               recipients=[Recipient(r, RemoteDelivery(r)) for r in rcpts])
                message = spool.open_message()
                message.write(MESSAGE)
                path = (await spool.accept(env, message, b"")).queue_file
                assert path is not None
                paths.append(path)
            await runner.run_once()  # all three start; two wait for the one slot
        finally:
            await d.close()
            await silent.stop()
        return paths, silent

    try:
        paths, silent = asyncio.run(go())
    finally:
        committer.stop()
    assert silent.connections == 2  # one per domain
    errors = sorted(r.last_error or "" for p in paths for r in read_envelope(p).recipients)
    assert sum(e.startswith("delivery temporarily suspended: ") for e in errors) == 4, errors


def test_a_message_for_a_busy_and_a_free_domain_does_not_hold_its_turn(
        dns_server: DnsTestServer, tmp_path: Path) -> None:
    """example.test has one slot, taken by a delivery its silent server never greets; a message
    for example.test and third.test gets third.test delivered at once and ends its turn (its lock
    free for an operator's command) instead of waiting inside it for example.test's slot; once
    the slot is free it comes back for example.test."""
    port = free_port()
    committer = Committer()
    committer.start()
    now = time.time()
    slow = ClientTimeouts(greeting=1, helo=1, mail=5, rcpt=5, data_init=5, data_block=5,
                          data_end=5, rset=5, quit=1)

    async def go() -> tuple[float, Receiver, Receiver, list[Path]]:
        silent = await Receiver("127.0.0.1", port, silent=True).start()
        ok = await Receiver("127.0.0.2", port).start()
        spool = Spool(tmp_path / "data", committer, MaildirUsage(), "out.example.com")
        config = from_dict({"queue": {"scan_interval": 3600.0},
                            "outbound": {"dead_destination_time": 0, "max_per_destination": 1}})
        d = deliverer(dns_server, port, timeouts=slow)
        runner = QueueRunner(spool, committer, config, deliverer=d)
        spool.on_queued = None
        paths = []
        try:
            for rcpts in (["bob@example.test"], ["carol@example.test", "dave@third.test"]):
                env = Envelope(new_queue_id(), "alice@example.com", now,
                               recipients=[Recipient(r, RemoteDelivery(r)) for r in rcpts])
                message = spool.open_message()
                message.write(MESSAGE)
                path = (await spool.accept(env, message, b"")).queue_file
                assert path is not None
                paths.append(path)
            run = asyncio.ensure_future(runner.run_once())
            for _ in range(100):
                await asyncio.sleep(0.02)
                if ok.messages:
                    break
            assert ok.messages, "third.test waited behind example.test"
            began = time.monotonic()
            async with runner.message_lock(paths[1].name):  # as `postroom queue hold` would
                waited = time.monotonic() - began
            await run
        finally:
            await d.close()
            await silent.stop()
            await ok.stop()
        return waited, silent, ok, paths

    try:
        waited, silent, _, paths = asyncio.run(go())
    finally:
        committer.stop()
    assert waited < 0.5, f"the message's lock was held {waited:.2f} s for a busy destination"
    assert silent.connections == 2  # bob's, then carol's once the slot was free
    carol, dave = read_envelope(paths[1]).recipients
    assert dave.state is RecipientState.DELIVERED
    assert carol.attempts == 1 and carol.state is RecipientState.DEFERRED
