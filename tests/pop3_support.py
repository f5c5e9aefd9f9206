"""Shared by the POP3 tests: a transport-less driver for the core, dialogs, and Maildir helpers.

:class:`Driver` answers every request of a :class:`Pop3Connection` the way the asyncio transport
does, with an in-memory maildrop, so byte scripts run with no sockets. :func:`run_dialog` feeds a
dialog turn by turn (whole, in 7-octet pieces, or one octet at a time) and returns what the
server sent.

A dialog reads like RFC 1939's examples: ``C: text`` is a client line (CRLF added), ``C| text``
raw client octets with the escapes ``\\r \\n \\t \\0 \\\\ \\xHH``, ``S: text`` a server line (CRLF
added), ``S| text`` raw server octets. Consecutive client lines form one turn: the client sends
them together (pipelining) and then waits for the answers.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime
import ipaddress
import os
import re
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from postroom.delivery.maildir import unique_base
from postroom.net.pop3 import MaildirBackend, NoThrottle, Pop3Server, Pop3ServerSettings
from postroom.pop3 import (
    CheckPassword,
    Commit,
    Event,
    LoginFailed,
    MaildropMessage,
    OpenMaildrop,
    Pop3Connection,
    Pop3Settings,
    Request,
    Response,
    Retrieve,
    StartTls,
    uidl_for,
)
from postroom.pop3 import responses as r
from postroom.store.names import crlf_size_of
from tests.sasl_support import MemoryStore, make_settings

HOST = "pop.example.test"
APOP_STAMP = "<1896.697170952@pop.example.test>"

STORE = MemoryStore()
STORE.add("alice@example.com", "alice-secret", cram=True)
STORE.add("bob@example.com", "bob secret with spaces")


def settings(**overrides: object) -> Pop3Settings:
    base = Pop3Settings(hostname=HOST, sasl=make_settings(STORE, hostname=HOST), stls=True,
                        mechanisms=("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"))
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


#: The maildrop every dialog sees unless told otherwise (LF-stored, as the Maildir keeps it).
MESSAGES: list[bytes] = [
    b"Subject: one\n\nfirst body\n.leading dot\n..two dots\n",
    b"Subject: two\nX: y\n\nline 1\nline 2\nline 3\n",
    b"Subject: three\r\n\r\nstored with CRLF\r\nno final line end",
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@dataclass
class Driver:
    """Answers the core's requests like the transport, from an in-memory maildrop."""

    messages: list[bytes] = field(default_factory=lambda: list(MESSAGES))
    chunk: int = 5  # message octets per message_data() call
    refuse_open: Response | None = None  # e.g. the [IN-USE] answer
    login_failed: Response | None = None  # answer LoginFailed with this instead of proceed()
    commit_error: Response | None = None
    check_passwords: bool = True  # run argon2 for real (FAST cost)
    events: list[Event] = field(default_factory=list)
    commits: list[Commit] = field(default_factory=list)
    logins: list[OpenMaildrop] = field(default_factory=list)
    failures: list[LoginFailed] = field(default_factory=list)

    def maildrop(self) -> list[MaildropMessage]:
        return [MaildropMessage(crlf_size_of(m), uidl_for(f"msg{i}.key,S={len(m)}"))
                for i, m in enumerate(self.messages, 1)]

    def answer(self, conn: Pop3Connection, request: Request) -> None:
        if isinstance(request, StartTls):
            conn.proceed()
            conn.tls_established()
        elif isinstance(request, CheckPassword):
            conn.password_checked(request.check.check() if self.check_passwords else False)
        elif isinstance(request, LoginFailed):
            self.failures.append(request)
            if self.login_failed is not None:
                conn.refuse(self.login_failed)
            else:
                conn.proceed()
        elif isinstance(request, OpenMaildrop):
            self.logins.append(request)
            if self.refuse_open is not None:
                conn.refuse(self.refuse_open)
            else:
                conn.maildrop_opened(self.maildrop())
        elif isinstance(request, Retrieve):
            data = self.messages[request.number - 1]
            for start in range(0, len(data), self.chunk):
                if not conn.message_data(data[start : start + self.chunk]):
                    break
            conn.message_end()
        elif isinstance(request, Commit):
            self.commits.append(request)
            if self.commit_error is not None:
                conn.refuse(self.commit_error)
            else:
                conn.proceed()
        else:  # pragma: no cover - a new request type the driver does not know
            raise AssertionError(f"unexpected request {request!r}")

    def pump(self, conn: Pop3Connection) -> bytes:
        """Run the core until it needs input; what it sent."""
        out = bytearray()
        while True:
            event = conn.next_event()
            if event is not None:
                self.events.append(event)
                if isinstance(event, Request):
                    self.answer(conn, event)
                continue
            data = conn.data_to_send()
            if not data:
                return bytes(out)
            out += data


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[rnt0\\])")


def _unescape(text: str) -> bytes:
    def sub(match: re.Match[str]) -> str:
        code = match.group(1)
        return {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\"}.get(code) or chr(
            int(code[1:], 16))

    return _ESCAPE.sub(sub, text).encode("latin-1")


def parse_dialog(text: str) -> tuple[list[bytes], bytes]:
    """The client's turns and every octet the server must send."""
    turns: list[bytes] = []
    expected = bytearray()
    current = bytearray()
    for raw in text.strip("\n").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tag, body = line[:2], line[3:] if len(line) > 2 else ""
        if tag in ("C:", "C|"):
            current += (body.encode("utf-8") + b"\r\n") if tag == "C:" else _unescape(body)
        elif tag in ("S:", "S|"):
            if current:
                turns.append(bytes(current))
                current.clear()
            expected += (body.encode("utf-8") + b"\r\n") if tag == "S:" else _unescape(body)
        else:
            raise ValueError(f"bad dialog line {raw!r}")
    if current:
        turns.append(bytes(current))
    return turns, bytes(expected)


def run_turns(turns: Sequence[bytes], *, conn: Pop3Connection, driver: Driver,
              segment: int | None = None) -> bytes:
    out = bytearray(driver.pump(conn))
    for turn in turns:
        step = segment or len(turn) or 1
        for start in range(0, len(turn), step):
            conn.receive_data(turn[start : start + step])
            out += driver.pump(conn)
    return bytes(out)


def run_dialog(
    text: str,
    *,
    config: Pop3Settings | None = None,
    make_driver: Callable[[], Driver] = Driver,
    tls: bool = True,
    apop_timestamp: str | None = APOP_STAMP,
) -> tuple[bytes, Driver, Pop3Connection]:
    """Run *text* whole, in 7-octet segments and octet by octet; the three must agree with
    the dialog's server lines. Returns the whole run's output, driver and connection."""
    turns, expected = parse_dialog(text)
    results = []
    for segment in (None, 7, 1):
        driver = make_driver()
        conn = Pop3Connection(config or settings(), apop_timestamp=apop_timestamp, tls=tls)
        conn.start()
        out = run_turns(turns, conn=conn, driver=driver, segment=segment)
        assert out.decode("latin-1") == expected.decode("latin-1"), f"segment={segment}"
        results.append((out, driver, conn))
    return results[0]


LOGIN = """
S: +OK POP3 server ready
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: +OK Logged in.
"""

__all__ = ["LOGIN", "Driver", "b64", "r", "run_dialog", "settings"]


# --- a real server on loopback, for the transport tests --------------------------------------

def deliver(maildir: Path, content: bytes, *, sizes: bool = True) -> Path:
    """Put *content* (LF form) into ``new/`` as local delivery does (durability aside)."""
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    name = unique_base()
    if sizes:
        name += f",S={len(content)},W={crlf_size_of(content)}"
    tmp = maildir / "tmp" / name
    tmp.write_bytes(content)
    final = maildir / "new" / name
    os.rename(tmp, final)
    return final


def tls_files(directory: Path, hostname: str = HOST) -> tuple[Path, Path]:
    """A self-signed certificate for *hostname* and for 127.0.0.1 (clients such as getmail
    check the name they connected to, and the tests connect to the address)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    if cert.exists():
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(private.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    key.write_bytes(private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return cert, key


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False  # we connect to 127.0.0.1; the chain is still verified
    return context


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    """asyncio's own loop, or uvloop's (what the daemon runs); POSTROOM_TEST_UVLOOP=1 makes
    uvloop the default."""
    if kind == "uvloop" or (kind == "" and os.environ.get("POSTROOM_TEST_UVLOOP") == "1"):
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


class Pop3TestServer:
    """The asyncio POP3 server in a thread of its own, on two loopback ports: plain with STLS
    and implicit TLS. Users map to ``root/<address>/Maildir``."""

    def __init__(self, root: Path, *, throttle: object = None, loop: str = "",
                 **overrides: object) -> None:
        self.root = root
        self.cert, self.key = tls_files(root)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        sasl = make_settings(STORE, hostname=HOST)
        self.backend = MaildirBackend(sasl, self.maildir_for, throttle or NoThrottle())  # type: ignore[arg-type]
        config = dataclasses.replace(Pop3ServerSettings(hostname=HOST, shutdown_grace=1.0),
                                     **overrides)  # type: ignore[arg-type]
        self.loop = _new_loop(loop)
        self.server = Pop3Server(config, self.backend, tls_context=context)
        self._plain, self._tls = _listening(), _listening()
        self.port = self._plain.getsockname()[1]
        self.tls_port = self._tls.getsockname()[1]
        self._thread = threading.Thread(target=self._run, daemon=True)

    def maildir_for(self, user: str) -> Path | None:
        if user not in STORE.hashes:
            return None
        return self.root / user / "Maildir"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coroutine: object, timeout: float = 10.0) -> object:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)  # type: ignore[arg-type]

    def __enter__(self) -> Pop3TestServer:
        self._thread.start()
        self.call(self.server.start([self._plain], [self._tls]))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.shutdown(), timeout=20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
