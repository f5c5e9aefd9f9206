"""The POP3 transport on real loopback sockets: Python's poplib, and the real clients mpop,
fetchmail and getmail downloading mail from a Maildir and getting the same bytes."""

from __future__ import annotations

import contextlib
import mailbox
import os
import poplib
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.store import open_store
from postroom.store.names import crlf_size_of
from tests.pop3_support import Pop3TestServer, client_context, deliver

ALICE = "alice@example.com"
MESSAGES = [
    b"Subject: one\nFrom: a@example.net\n\nbody\n.dot line\n..two dots\n",
    b"Subject: two\n\nsecond message\n",
    b"Subject: three\n\n" + b"x" * 70 + b"\n" * 3 + b"end without line end",
]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Pop3TestServer]:
    with Pop3TestServer(tmp_path) as srv:
        yield srv


@pytest.fixture(params=["asyncio", "uvloop"])
def any_loop(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Pop3TestServer]:
    """The server on asyncio's loop and on uvloop, which the daemon runs."""
    with Pop3TestServer(tmp_path, loop=request.param) as srv:
        yield srv


def inbox(srv: Pop3TestServer, user: str = ALICE) -> Path:
    return srv.root / user / "Maildir"


def fill(srv: Pop3TestServer, messages: list[bytes] = MESSAGES) -> list[Path]:
    return [deliver(inbox(srv), m) for m in messages]


def files(maildir: Path) -> list[Path]:
    return sorted([*maildir.glob("new/*"), *maildir.glob("cur/*")])


def wire(lf: bytes) -> bytes:
    """What RETR must deliver, unstuffed: CRLF line ends, and a final one."""
    crlf = lf.replace(b"\n", b"\r\n")
    return crlf if crlf.endswith(b"\r\n") else crlf + b"\r\n"


def login(srv: Pop3TestServer, user: str = ALICE, password: str = "alice-secret") -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    client.stls(client_context(srv.cert))
    client.user(user)
    client.pass_(password)
    return client


def test_poplib_stls_list_retr_uidl_top_dele_quit(any_loop: Pop3TestServer) -> None:
    server = any_loop
    paths = fill(server)
    client = poplib.POP3("127.0.0.1", server.port, timeout=10)
    assert client.getwelcome() == b"+OK POP3 server ready"
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext"):
        client.user(ALICE)
    client.stls(client_context(server.cert))
    assert "USER" in client.capa() and "STLS" not in client.capa()
    client.user(ALICE)
    client.pass_("alice-secret")
    sizes = [crlf_size_of(m) for m in MESSAGES]  # the line end added at the end is not counted
    assert client.stat() == (3, sum(sizes))
    assert client.list()[1] == [f"{i} {s}".encode() for i, s in enumerate(sizes, 1)]
    uidls = [line.split()[1].decode() for line in client.uidl()[1]]
    assert uidls == [p.name for p in paths]  # the unique names, as delivered
    for number, message in enumerate(MESSAGES, 1):
        response, lines, _octets = client.retr(number)
        assert response == f"+OK {sizes[number - 1]} octets".encode()
        assert b"\r\n".join(lines) + b"\r\n" == wire(message)
    assert client.top(1, 1)[1] == [b"Subject: one", b"From: a@example.net", b"", b"body"]
    client.dele(2)
    assert client.quit().startswith(b"+OK Logging out, 2 messages left")
    left = files(inbox(server))
    assert len(left) == 2 and all(p.parent.name == "cur" for p in left)
    assert all(p.name.endswith(":2,S") for p in left)  # RETR marks seen, at QUIT
    assert {p.name.partition(":")[0] for p in left} == {paths[0].name, paths[2].name}
    assert [p.read_bytes() for p in left] == [MESSAGES[0], MESSAGES[2]]


def test_implicit_tls_and_a_file_without_size_fields(server: Pop3TestServer) -> None:
    inbox(server).parent.mkdir()
    mailbox.Maildir(str(inbox(server))).add(b"Subject: from mailbox.Maildir\r\n\r\nCRLF body\r\n")
    client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=client_context(server.cert),
                             timeout=10)
    assert "STLS" not in client.capa() and "USER" in client.capa()
    client.user(ALICE)
    client.pass_("alice-secret")
    assert client.stat() == (1, 44)
    assert client.retr(1)[1] == [b"Subject: from mailbox.Maildir", b"", b"CRLF body"]
    client.quit()


def test_wrong_password_and_unknown_user(server: Pop3TestServer) -> None:
    client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=client_context(server.cert),
                             timeout=10)
    client.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        client.pass_("wrong")
    client.user("carol@example.com")
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        client.pass_("whatever")
    client.user(ALICE)
    client.pass_("alice-secret")
    client.quit()


def test_one_session_per_mailbox(server: Pop3TestServer) -> None:
    fill(server)
    first = login(server)
    second = poplib.POP3("127.0.0.1", server.port, timeout=10)
    second.stls(client_context(server.cert))
    second.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[IN-USE\]"):
        second.pass_("alice-secret")
    first.quit()
    second.user(ALICE)
    second.pass_("alice-secret")  # the lock went with the first session
    assert second.stat()[0] == 3
    second.quit()


def test_the_message_list_is_fixed_at_login(server: Pop3TestServer) -> None:
    fill(server, MESSAGES[:1])
    client = login(server)
    assert client.stat()[0] == 1
    deliver(inbox(server), MESSAGES[1])  # delivery while the session is open
    assert client.stat()[0] == 1 and len(client.list()[1]) == 1
    client.dele(1)
    client.quit()
    client = login(server)
    assert client.stat() == (1, crlf_size_of(MESSAGES[1]))
    assert b"\r\n".join(client.retr(1)[1]) + b"\r\n" == wire(MESSAGES[1])
    client.quit()


def test_no_quit_deletes_nothing_but_marks_what_was_read(server: Pop3TestServer) -> None:
    fill(server)
    client = login(server)
    client.retr(2)
    client.dele(1)
    client.close()  # gone without QUIT
    deadline = time.monotonic() + 5
    names: list[str] = []
    while time.monotonic() < deadline:
        names = sorted(p.name for p in files(inbox(server)))
        if sum(n.endswith(":2,S") for n in names) == 1:
            break
        time.sleep(0.02)
    assert len(names) == 3
    assert [n.endswith(":2,S") for n in names] == [False, True, False]
    client = login(server)  # and the lock is free again
    assert client.stat()[0] == 3
    client.quit()


def test_a_large_message_streams_exactly(server: Pop3TestServer) -> None:
    line = b"".join(bytes([65 + i % 26]) * 75 + b"\n" for i in range(40000))  # ~3 MB
    big = b"Subject: big\n\n" + b".starts with a dot\n" + line
    fill(server, [big])
    client = login(server)
    response, lines, _ = client.retr(1)
    assert response == f"+OK {crlf_size_of(big)} octets".encode()
    assert b"\r\n".join(lines) + b"\r\n" == wire(big)
    client.quit()


def _edge_messages() -> list[bytes]:
    """Messages for the encoder's edge cases; the last is read in chunks (READ_CHUNK = 64 KiB):
    a CRLF cut between the first two chunks, an LF and the "." after it between the next two."""
    chunk = 64 * 1024
    big = bytearray(b"Subject: big\n\n")
    while len(big) < chunk - 1:
        big += b"filler line\n"
    del big[chunk - 1:]
    big += b"\r\n"  # the CR ends the first chunk, its LF starts the second
    while len(big) < 2 * chunk - 1:
        big += b"more\n"
    del big[2 * chunk - 1:]
    big += b"\n.dot after a chunk boundary\n.\n"  # stuffed across the cut
    assert big[chunk - 1 : chunk + 1] == b"\r\n" and big[2 * chunk - 1 : 2 * chunk + 1] == b"\n."
    return [b".first line\nx\n.\n..\nno final line end", b"crlf\r\n.stored\r\n", b"bare\rcr\r",
            bytes(big)]


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_retr_sends_exactly_the_encoded_octets(tmp_path: Path, loop: str, tls: bool) -> None:
    """The wire bytes of RETR, unparsed, for dot lines (first, lone, last without line end),
    CRLF- and CR-stored messages and a streamed one, in plaintext and over TLS."""
    from tests.test_pop3_content import reference

    messages = _edge_messages()
    with Pop3TestServer(tmp_path, loop=loop, allow_plaintext=True) as srv:
        fill(srv, messages)
        with contextlib.ExitStack() as stack:
            sock = stack.enter_context(socket.create_connection(
                ("127.0.0.1", srv.tls_port if tls else srv.port), timeout=10))
            if tls:
                sock = stack.enter_context(client_context(srv.cert).wrap_socket(sock))
            data = b""

            def until(end: bytes) -> bytes:
                nonlocal data
                while end not in data:
                    chunk = sock.recv(65536)
                    assert chunk, data[-200:]
                    data += chunk
                answer, _, data = data.partition(end)
                return answer + end

            until(b"\r\n")
            sock.sendall(b"USER alice@example.com\r\nPASS alice-secret\r\n")
            assert until(b"+OK Logged in.\r\n").endswith(b"+OK Logged in.\r\n")
            for number, message in enumerate(messages, 1):
                sock.sendall(b"LIST %d\r\nRETR %d\r\n" % (number, number))
                body, octets = reference(message)
                assert until(b"\r\n") == b"+OK %d %d\r\n" % (number, octets)
                assert until(b"\r\n") == b"+OK %d octets\r\n" % octets
                assert until(b"\r\n.\r\n") == body  # the first CRLF "." CRLF ends it
                assert data == b""
            sock.sendall(b"QUIT\r\n")
            until(b"left.\r\n")


def test_pipelined_commands_on_the_wire(server: Pop3TestServer) -> None:
    fill(server)
    context = client_context(server.cert)
    with socket.create_connection(("127.0.0.1", server.tls_port), timeout=10) as raw, \
            context.wrap_socket(raw) as sock:
        sock.sendall(b"CAPA\r\nUSER alice@example.com\r\nPASS alice-secret\r\nSTAT\r\n"
                     b"RETR 2\r\nDELE 2\r\nQUIT\r\n")
        data = b""
        while not data.endswith(b"left.\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    assert b"+OK Logged in.\r\n+OK 3 " in data
    assert (f"+OK {crlf_size_of(MESSAGES[1])} octets\r\n".encode()
            + b"Subject: two\r\n\r\nsecond message\r\n.\r\n+OK Message 2 deleted.\r\n") in data
    assert data.endswith(b"+OK Logging out, 2 messages left.\r\n")
    assert len(files(inbox(server))) == 2


class RecordingThrottle:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.block: set[str] = set()

    def blocked(self, client: str, user: str | None) -> bool:
        self.calls.append(("blocked", user))
        return user in self.block

    def failure(self, client: str, user: str | None) -> float:
        self.calls.append(("failure", user))
        return 0.3

    def success(self, client: str, user: str) -> None:
        self.calls.append(("success", user))


def test_throttle_hooks(tmp_path: Path) -> None:
    throttle = RecordingThrottle()
    with Pop3TestServer(tmp_path, throttle=throttle) as srv:
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=client_context(srv.cert),
                                 timeout=10)
        client.user(ALICE)
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        assert time.monotonic() - started >= 0.3  # the failure waited as the throttle said
        throttle.block.add(ALICE)
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("alice-secret")  # blocked: even the right password fails
        throttle.block.clear()
        client.user(ALICE)
        client.pass_("alice-secret")
        client.quit()
    assert throttle.calls == [
        ("blocked", ALICE), ("failure", ALICE),
        ("blocked", ALICE), ("failure", ALICE),
        ("blocked", ALICE), ("blocked", ALICE), ("success", ALICE),
    ]


def test_timeout_before_login(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, auth_timeout=0.3) as srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        data = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
        sock.close()
    assert data == b"+OK POP3 server ready\r\n-ERR Disconnected for inactivity.\r\n"


def test_connection_limit_per_address(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, max_connections_per_ip=1) as srv:
        first = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as sock:
            assert sock.recv(4096) == b"-ERR [SYS/TEMP] Too many connections from your address.\r\n"
        first.quit()


def test_shutdown_tells_idle_sessions(tmp_path: Path) -> None:
    srv = Pop3TestServer(tmp_path)
    with srv:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        assert sock.recv(4096) == b"+OK POP3 server ready\r\n"
    assert sock.recv(4096) == b"-ERR [SYS/TEMP] Server shutting down.\r\n"
    sock.close()


def test_a_corrupt_index_is_rebuilt_and_uidls_survive(server: Pop3TestServer) -> None:
    fill(server)
    client = login(server)
    before = client.uidl()[1]
    client.quit()
    (inbox(server) / "postroom-index.sqlite").write_bytes(b"garbage" * 100)
    client = login(server)
    assert client.uidl()[1] == before
    client.quit()


# --- real clients --------------------------------------------------------------------------


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False,
                          **kwargs)  # type: ignore[call-overload]


def _maildir_messages(path: Path) -> list[bytes]:
    return sorted(p.read_bytes() for p in [*path.glob("new/*"), *path.glob("cur/*")])


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("mpop") is None, reason="needs mpop")
@pytest.mark.parametrize("auth", ["scram-sha-256", "plain"])
def test_mpop_downloads_and_deletes(any_loop: Pop3TestServer, tmp_path: Path, auth: str) -> None:
    server = any_loop
    fill(server)
    out = tmp_path / "mpop-out"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    rc = tmp_path / "mpoprc"
    rc.write_text(f"""
account test
host 127.0.0.1
port {server.port}
tls on
tls_starttls on
tls_trust_file {server.cert}
tls_host_override pop.example.test
user {ALICE}
password alice-secret
auth {auth}
delivery maildir {out}
received_header off
uidls_file {tmp_path / "uidls"}
keep off
""")
    rc.chmod(0o600)
    result = _run(["mpop", "-C", str(rc), "--debug", "test"])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"AUTH {auth.upper()}" in result.stdout
    assert _maildir_messages(out) == sorted(wire(m).replace(b"\r\n", b"\n") for m in MESSAGES)
    assert files(inbox(server)) == []  # DELE and QUIT removed them


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("fetchmail") is None, reason="needs fetchmail")
def test_fetchmail_keeps_then_fetches_and_deletes(server: Pop3TestServer, tmp_path: Path) -> None:
    fill(server)
    home = tmp_path / "fetchmail"
    home.mkdir()

    def fetch(keep: str) -> subprocess.CompletedProcess[str]:
        rc = home / "rc"
        rc.write_text(f"""set no bouncemail
poll 127.0.0.1 with protocol POP3 port {server.port} uidl
  user "{ALICE}" there with password "alice-secret" is root here
  sslproto tls1.2+ sslcertck sslcertfile "{server.cert}" sslcommonname "pop.example.test"
  {keep} fetchall
  mda "/bin/sh -c 'cat > {home}/msg.$$'"
""")
        rc.chmod(0o600)
        return _run(["fetchmail", "-f", str(rc), "-v", "--nodetach", "--invisible"],
                    env={**os.environ, "HOME": str(home), "FETCHMAILHOME": str(home)})

    result = fetch("keep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "STLS" in result.stderr + result.stdout
    got = sorted(p.read_bytes() for p in home.glob("msg.*"))
    expected = sorted(wire(m).replace(b"\r\n", b"\n") for m in MESSAGES)
    assert got == expected
    assert len(files(inbox(server))) == 3
    for path in home.glob("msg.*"):
        path.unlink()
    result = fetch("no keep")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.read_bytes() for p in home.glob("msg.*")) == expected
    assert files(inbox(server)) == []


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("getmail") is None or shutil.which("setpriv") is None
                    or os.geteuid() != 0, reason="needs getmail, setpriv and root (to run as nobody)")
def test_getmail_as_nobody_over_implicit_tls(server: Pop3TestServer) -> None:
    fill(server)
    nobody = pwd.getpwnam("nobody")
    work = Path(tempfile.mkdtemp(prefix="postroom-getmail-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        out = work / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (out / sub).mkdir(parents=True)
        shutil.copy(server.cert, work / "cert.pem")
        (work / "rc").write_text(f"""[retriever]
type = SimplePOP3SSLRetriever
server = 127.0.0.1
port = {server.tls_port}
username = {ALICE}
password = alice-secret
ca_certs = {work / "cert.pem"}

[destination]
type = Maildir
path = {out}/

[options]
read_all = true
delete = true
delivered_to = false
received = false
""")
        for path in [work, *work.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        result = _run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                       "--clear-groups", "getmail", "--getmaildir", str(work), "--rcfile",
                       str(work / "rc")])
        assert result.returncode == 0, result.stdout + result.stderr
        got = sorted(b"".join(line for line in m.splitlines(keepends=True)
                              if not line.startswith(b"Return-Path: <unknown>"))
                     for m in _maildir_messages(out))
        assert got == sorted(wire(m).replace(b"\r\n", b"\n") for m in MESSAGES)
        assert files(inbox(server)) == []
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_delivery_and_a_session_at_once(server: Pop3TestServer) -> None:
    """Messages delivered while sessions come and go are each downloaded exactly once."""
    stop = threading.Event()
    delivered: list[bytes] = []

    def deliverer() -> None:
        i = 0
        while not stop.is_set() and i < 60:
            body = f"Subject: m{i}\n\nmessage {i}\n".encode()
            deliver(inbox(server), body)
            delivered.append(body)
            i += 1
            time.sleep(0.005)

    thread = threading.Thread(target=deliverer)
    thread.start()
    got: list[bytes] = []
    with contextlib.ExitStack():
        for _ in range(8):
            client = login(server)
            count = client.stat()[0]
            for n in range(1, count + 1):
                got.append(b"\n".join(client.retr(n)[1]) + b"\n")
                client.dele(n)
            client.quit()
    thread.join()
    stop.set()
    client = login(server)
    for n in range(1, client.stat()[0] + 1):
        got.append(b"\n".join(client.retr(n)[1]) + b"\n")
        client.dele(n)
    client.quit()
    assert sorted(got) == sorted(delivered)
    with open_store(inbox(server)) as store:
        box = store.mailbox()
        box.sync()
        assert box.messages() == []


def test_tls_context_required_for_implicit_listener(tmp_path: Path) -> None:
    import asyncio

    from postroom.net.pop3 import MaildirBackend, Pop3Server, Pop3ServerSettings
    from tests.pop3_support import STORE
    from tests.sasl_support import make_settings

    backend = MaildirBackend(make_settings(STORE), lambda user: None)
    server = Pop3Server(Pop3ServerSettings(hostname="h"), backend)
    sock = socket.socket()

    async def start() -> None:
        await server.start(implicit_tls=[sock])

    with pytest.raises(ValueError, match="TLS context"):
        asyncio.run(start())
    sock.close()


# --- TLS: certificate reload on 995, bounded close ---------------------------------------------


def _peer_serial(srv: Pop3TestServer, cafile: Path) -> int:
    """The serial number of the certificate a new 995 connection is shown."""
    from cryptography import x509

    client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=client_context(cafile), timeout=10)
    try:
        der = client.sock.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        client.quit()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_reload_reaches_the_implicit_tls_port(tmp_path: Path, loop: str) -> None:
    import ssl

    from cryptography import x509

    from tests.pop3_support import tls_files

    with Pop3TestServer(tmp_path, loop=loop) as srv:
        old = x509.load_pem_x509_certificate(srv.cert.read_bytes()).serial_number
        assert _peer_serial(srv, srv.cert) == old
        (tmp_path / "new").mkdir()
        cert, key = tls_files(tmp_path / "new")
        new = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
        assert new != old
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)

        async def reload() -> None:
            srv.server.set_tls_context(context)

        srv.call(reload())
        assert _peer_serial(srv, cert) == new  # a client trusting only the old one would fail
        with pytest.raises(ssl.SSLCertVerificationError):
            poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=client_context(srv.cert),
                            timeout=10)
        # STLS on 110 takes the new one as well
        client = poplib.POP3("127.0.0.1", srv.port, timeout=10)
        client.stls(client_context(cert))
        client.quit()


def test_an_idle_tls_client_does_not_hold_the_shutdown(tmp_path: Path) -> None:
    """The client never reads, so it never answers our close_notify: the shutdown must not wait
    for its grace period (nor asyncio's 30 s TLS shutdown timeout)."""
    import ssl

    srv = Pop3TestServer(tmp_path, shutdown_grace=8.0)
    srv.__enter__()
    raw = socket.create_connection(("127.0.0.1", srv.tls_port), timeout=10)
    tls = client_context(srv.cert).wrap_socket(raw)
    assert tls.recv(4096) == b"+OK POP3 server ready\r\n"
    started = time.monotonic()
    try:
        srv.call(srv.server.shutdown(), timeout=20)
        took = time.monotonic() - started
    finally:
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv._thread.join(10)
        srv.loop.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            tls.close()
    assert took < 3.0, f"shutdown took {took:.1f} s"


# --- which failed logins count ------------------------------------------------------------------


def test_a_cancel_and_a_store_outage_are_not_counted_as_guesses(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """As SMTP AUTH: only a guess by the client counts against it and gets the fail2ban line;
    a cancel ("*", RFC 5034 4) or our credential store failing is answered at once."""
    import logging

    from tests.pop3_support import STORE

    throttle = RecordingThrottle()
    failed_line = "SASL {} authentication failed"
    with caplog.at_level(logging.INFO, logger="postroom"), \
            Pop3TestServer(tmp_path, throttle=throttle) as srv:
        client = poplib.POP3_SSL("127.0.0.1", srv.tls_port, context=client_context(srv.cert),
                                 timeout=10)
        assert client._shortcmd("AUTH PLAIN").startswith(b"+")
        started = time.monotonic()
        with pytest.raises(poplib.error_proto, match=r"-ERR Authentication cancelled"):
            client._shortcmd("*")
        STORE.broken = True
        try:
            client.user(ALICE)
            with pytest.raises(poplib.error_proto, match=r"-ERR \[SYS/TEMP\]"):
                client.pass_("alice-secret")
        finally:
            STORE.broken = False
        assert time.monotonic() - started < 0.3  # no tarpit (the throttle says 0.3 s)
        assert throttle.calls == []
        assert failed_line.format("PLAIN") not in caplog.text
        assert failed_line.format("USER") not in caplog.text
        assert "pop3 authentication ended" in caplog.text
        # a wrong password still is a guess: counted, and logged for fail2ban
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\]"):
            client.pass_("wrong")
        client.close()
    assert throttle.calls == [("blocked", ALICE), ("failure", ALICE)]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert any(failed_line.format("USER") in w for w in warnings)


def test_counted_failures_match_smtp_auth() -> None:
    from postroom.net.auth import _COUNTED
    from postroom.pop3 import COUNTED_FAILURES

    assert COUNTED_FAILURES == _COUNTED


def test_a_warm_login_reuses_the_maildrop_and_still_sees_new_mail(
        server: Pop3TestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sizes and UIDLs of an unchanged mailbox are made once per process, not at every login
    (QUIT's \\Seen changes no size or UIDL); mail delivered right after a QUIT, and a message
    another program removed, show at the next login."""
    import postroom.net.pop3 as net_pop3
    made: list[int] = []
    real = net_pop3._maildrop

    def counting(infos: object) -> object:
        made.append(len(infos))  # type: ignore[arg-type]
        return real(infos)  # type: ignore[arg-type]

    monkeypatch.setattr(net_pop3, "_maildrop", counting)
    fill(server)

    def session(retrieve: bool = False) -> tuple[tuple[int, int], list[bytes]]:
        client = login(server)
        stat = client.stat()
        uidls = client.uidl()[1]
        if retrieve:
            for number in range(1, stat[0] + 1):
                client.retr(number)
        client.quit()
        return stat, uidls

    first = session(retrieve=True)  # QUIT marks all three seen (renames in cur/)
    assert session() == first and session() == first
    assert made == [3]
    late = deliver(inbox(server), b"Subject: late\n\nlate body\n")  # right after a QUIT
    stat, uidls = session()
    assert stat == (4, first[0][1] + crlf_size_of(b"Subject: late\n\nlate body\n"))
    assert uidls[:3] == first[1] and uidls[3].startswith(b"4 ") and made == [3, 4]
    (gone,) = [p for p in files(inbox(server)) if p.name.startswith(late.name.partition(":")[0])]
    gone.unlink()
    assert session() == first and made == [3, 4, 3]
