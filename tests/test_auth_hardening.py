"""The issue 3 review of SMTP AUTH, finding by finding (the unit-level halves are in
test_authlimit, test_accounts and test_credentials):

1. The block is asked before every password or proof check, not once at AUTH: connections parked
   at a prompt, and parallel guesses queued for an argon2 slot, are refused (SMTP 421, POP3
   [SYS/TEMP]) once the address is blocked, whatever they send; in-flight attempts count, so no
   more than ``ip_max_failures`` guesses are ever checked; a client that left is not checked.
2. (unit tests only: overlong IDN names cost no punycode.)
3. One account, one name: ``ALICE@Example.COM.`` logs in as ``alice@example.com`` (the logs, the
   Received line; the throttle's account count in test_authlimit).
4. SIGTERM does not wait for an idle TLS client that never answers close_notify; and (found on
   the way) implicit TLS no longer loses a ClientHello sent at once.
5. "AUTH refused" (a blocked address knocking again) is an info line, not a fail2ban failure.

The integration tests run ``postroom serve`` (tests/conftest.py) with plaintext logins allowed
from loopback, so the exchanges need no TLS, and one argon2 slot, so parallel guesses queue.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import hashlib
import hmac
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from postroom.net.auth import AuthService
from postroom.policy.authlimit import LocalThrottle, ThrottleSettings
from postroom.sasl import PasswordCheck
from tests.conftest import ServerHandle, free_port, make_server
from tests.sasl_support import DECOY_SECRET, MemoryStore

REPO = Path(__file__).resolve().parent.parent
MAX_FAILURES = 5


@dataclass
class Running:
    server: ServerHandle
    submission: int  # STARTTLS port; plaintext AUTH allowed from loopback
    submissions: int  # implicit TLS
    pop3: int  # USER/PASS allowed without TLS


def start(tmp_path: Path, extra: str = "") -> Running:
    sub, subs, pop3 = free_port(), free_port(), free_port()
    handle = make_server(tmp_path, f"""
[[listener]]
role = "submission"
address = "127.0.0.1:{sub}"

[[listener]]
role = "submissions"
address = "127.0.0.1:{subs}"

[[listener]]
role = "pop3"
address = "127.0.0.1:{pop3}"

[pop3]
allow_plaintext = true
max_connections_per_ip = 40

[auth]
mechanisms = ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]
allow_plaintext_on_loopback = true
max_parallel_checks = 1
max_delay = 0
ip_free_failures = 1
ip_max_failures = {MAX_FAILURES}
block_seconds = 60
{extra}
""")
    handle.cli("user", "add", "carol@example.com", "--allow-cram-md5", "--password-stdin",
               stdin="carol-secret\n")
    handle.start()
    return Running(handle, sub, subs, pop3)


@pytest.fixture
def running(tmp_path: Path) -> Iterator[Running]:
    r = start(tmp_path)
    try:
        yield r
    finally:
        if r.server.proc is not None:
            r.server.stop()


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode("ascii")


def smtp(port: int) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=15)
    client.ehlo()
    return client


def plain(user: str, password: str) -> str:
    return "PLAIN " + b64(f"\0{user}\0{password}")


def block_the_address(port: int) -> None:
    """Wrong passwords on a fresh connection until the address is blocked (the last 421)."""
    with smtp(port) as client:
        codes = [client.docmd("AUTH", plain("alice@example.com", "wrong"))[0]
                 for _ in range(MAX_FAILURES)]
    assert codes == [535] * (MAX_FAILURES - 1) + [421]


def tls_client() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def closed(client: smtplib.SMTP) -> bool:
    """The server hung up after its reply."""
    assert client.sock is not None
    client.sock.settimeout(5)
    try:
        return client.sock.recv(1) == b""
    except ConnectionError:
        return True


# -- 1: the block holds at every check ----------------------------------------------------------


def test_passwords_parked_at_the_login_prompt_are_refused_once_blocked(running: Running) -> None:
    """Twenty connections wait at LOGIN's "Password:" while the address gets blocked; then each
    sends the right password. Each gets 421 and is disconnected; none is let in."""
    parked = []
    for _ in range(20):
        client = smtp(running.submission)
        assert client.docmd("AUTH", "LOGIN") == (334, b"VXNlcm5hbWU6")
        assert client.docmd(b64("alice@example.com")) == (334, b"UGFzc3dvcmQ6")
        parked.append(client)
    block_the_address(running.submission)
    for client in parked:
        code, text = client.docmd(b64("alice-secret"))
        assert code == 421 and b"4.7.0" in text
        assert closed(client)
        client.close()
    log = running.server.log()
    assert "authentication succeeded" not in log
    assert log.count("SASL PLAIN authentication failed") == MAX_FAILURES  # no other check ran
    assert "SASL LOGIN authentication failed" not in log


def scram_first(client: smtplib.SMTP, user: str) -> tuple[str, str]:
    bare = f"n={user},r=clientNONCE"
    code, reply = client.docmd("AUTH", "SCRAM-SHA-256 " + b64("n,," + bare))
    assert code == 334
    return bare, base64.b64decode(reply).decode()


def scram_final(bare: str, server_first: str, password: str) -> str:
    fields = dict(item.split("=", 1) for item in server_first.split(","))
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(fields["s"]),
                                 int(fields["i"]))
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    without_proof = f"c={b64('n,,')},r={fields['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth_message, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return b64(f"{without_proof},p={b64(proof)}")


def test_scram_and_cram_proofs_sent_after_the_block_are_refused(running: Running) -> None:
    """SCRAM and CRAM-MD5 check their proofs without argon2, inside the exchange; a proof that
    arrives after the block gets 421 too, right as it is."""
    scram = smtp(running.submission)
    bare, server_first = scram_first(scram, "alice@example.com")
    cram = smtp(running.submission)
    code, challenge = cram.docmd("AUTH", "CRAM-MD5")
    assert code == 334
    digest = hmac.new(b"carol-secret", base64.b64decode(challenge), "md5").hexdigest()

    # the same proofs work while the address is not blocked (so the 421s below are the block's)
    with smtp(running.submission) as control:
        first = scram_first(control, "alice@example.com")
        code, _ = control.docmd(scram_final(*first, "alice-secret"))
        assert code == 334 and control.docmd("")[0] == 235

    block_the_address(running.submission)
    assert scram.docmd(scram_final(bare, server_first, "alice-secret"))[0] == 421
    assert cram.docmd(b64(f"carol@example.com {digest}"))[0] == 421
    for client in (scram, cram):
        assert closed(client)
        client.close()
    log = running.server.log()
    assert "SCRAM-SHA-256 authentication succeeded" in log  # the control, before the block
    assert "CRAM-MD5 authentication succeeded" not in log


def test_parallel_guesses_never_exceed_the_limit(running: Running) -> None:
    """Thirty connections send a wrong PLAIN at once. Without counting in-flight attempts, all
    passed the block test before the first check was done; now exactly ip_max_failures guesses
    are checked, and the rest are refused unchecked."""
    clients = [smtp(running.submission) for _ in range(30)]
    line = f"AUTH {plain('alice@example.com', 'wrong')}\r\n".encode()
    for client in clients:
        assert client.sock is not None
        client.sock.sendall(line)
    codes = sorted(client.getreply()[0] for client in clients)
    for client in clients:
        client.close()
    assert codes == [421] * (30 - MAX_FAILURES + 1) + [535] * (MAX_FAILURES - 1)
    running.server.wait_for(lambda: "refused for 60 s" in running.server.log())
    log = running.server.log()
    assert log.count("SASL PLAIN authentication failed") == MAX_FAILURES
    assert log.count("too many failed authentications; refused for 60 s") == 1


def pop3_replies(sock: socket.socket, count: int) -> list[bytes]:
    """*count* response lines (all single-line here), or fewer if the server hangs up."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.splitlines()


def test_parallel_pop3_guesses_never_exceed_the_limit(running: Running) -> None:
    """POP3 had the same gap: the block was asked before the wait for an argon2 slot. Thirty
    parallel USER/PASS guesses: five are checked, the rest are refused with [SYS/TEMP] and
    disconnected, unchecked and uncounted."""
    socks: list[socket.socket] = []
    try:
        for _ in range(30):
            socks.append(socket.create_connection(("127.0.0.1", running.pop3), timeout=10))
            assert pop3_replies(socks[-1], 1)[0].startswith(b"+OK")
        for sock in socks:
            sock.sendall(b"USER alice@example.com\r\nPASS wrong\r\n")
        answers = sorted(pop3_replies(sock, 2)[1].split(b"]")[0] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    # The failures of checked guesses may be answered [SYS/TEMP] too: the block that the fifth
    # reservation sets holds for the guesses still in flight.
    assert set(answers) <= {b"-ERR [AUTH", b"-ERR [SYS/TEMP"}
    assert answers.count(b"-ERR [AUTH") <= MAX_FAILURES - 1
    log = running.server.log()
    assert log.count("SASL USER authentication failed") == MAX_FAILURES


def test_pop3_login_parked_at_the_password_prompt_is_refused_once_blocked(
        running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.pop3), timeout=10) as sock:
        pop3_replies(sock, 1)
        sock.sendall(b"AUTH LOGIN\r\n" + b64("alice@example.com").encode() + b"\r\n")
        assert pop3_replies(sock, 2) == [b"+ VXNlcm5hbWU6", b"+ UGFzc3dvcmQ6"]
        block_the_address(running.submission)
        sock.sendall(b64("alice-secret").encode() + b"\r\n")
        reply = pop3_replies(sock, 1)
        assert reply[0].startswith(b"-ERR [SYS/TEMP]")
        assert sock.recv(1) == b""  # disconnected
    assert "pop3 login:" not in running.server.log()


class RecordingCheck:
    """Stands in for a PasswordCheck: records that argon2 would have run."""

    def __init__(self, ok: bool = False, delay: float = 0.0) -> None:
        self.ok, self.delay, self.calls = ok, delay, 0

    def check(self) -> bool:
        self.calls += 1
        time.sleep(self.delay)
        return self.ok


def service(throttle: LocalThrottle) -> AuthService:
    return AuthService(credentials=MemoryStore(), throttle=throttle, hostname="mx.test",
                       decoy_secret=DECOY_SECRET, mechanisms=["PLAIN"], scram_iterations=4096,
                       max_parallel_checks=1)


def test_verify_asks_the_throttle_once_the_slot_is_free() -> None:
    """Ten checks queue for one slot. Each reserves its attempt when its turn comes: the third
    reaches the limit (and is still checked), the seven behind it are refused unchecked."""
    throttle = LocalThrottle(ThrottleSettings(ip_free_failures=1, ip_max_failures=3))
    auth = service(throttle)
    check = RecordingCheck(delay=0.01)

    async def scenario() -> list[bool]:
        results = await asyncio.gather(*(
            auth.verify(cast(PasswordCheck, check), "192.0.2.1") for _ in range(10)))
        return [r.reservation is not None and r.reservation.granted for r in results]

    assert asyncio.run(scenario()) == [True] * 3 + [False] * 7
    assert check.calls == 3
    assert not throttle.check("192.0.2.1", time.monotonic()).allowed


def test_verify_skips_a_client_that_left_while_it_waited() -> None:
    throttle = LocalThrottle()
    auth = service(throttle)
    check = RecordingCheck(ok=True)
    result = asyncio.run(auth.verify(cast(PasswordCheck, check), "192.0.2.2", lambda: True))
    assert result.reservation is None and not result.ok
    assert check.calls == 0
    assert throttle.check("192.0.2.2", time.monotonic()).ip_failures == 0.0  # nothing counted


def test_a_guess_whose_client_left_is_not_checked(running: Running) -> None:
    """Clients that send a password and reset the connection while queued for the one argon2
    slot cost no check (nor a count). A slow guess holds the slot meanwhile: dave's, whose hash
    is made costly for this test."""
    server = running.server
    config = server.config_path.read_text()
    server.config_path.write_text(config.replace("memory_cost_kib = 8", "memory_cost_kib = 131072")
                                  .replace("time_cost = 1", "time_cost = 6"))  # ~0.5 s a check
    server.cli("user", "add", "dave@example.com", "--password-stdin", stdin="dave-secret\n")
    server.config_path.write_text(config)  # the running server never read the costly one
    slow = smtp(running.submission)
    assert slow.sock is not None
    slow.sock.sendall(f"AUTH {plain('dave@example.com', 'wrong')}\r\n".encode())
    time.sleep(0.05)  # its check holds the slot now
    leavers = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", running.submission), timeout=10)
        sock.recv(1024)
        sock.sendall(b"EHLO c.test\r\n" + f"AUTH {plain('alice@example.com', 'x')}\r\n".encode())
        leavers.append(sock)
    time.sleep(0.05)
    for sock in leavers:  # queued behind dave's check: reset the connection (RST)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()
    assert slow.getreply()[0] == 535
    slow.close()
    with smtp(running.submission) as client:  # the slot is free again; the address not blocked
        assert client.docmd("AUTH", plain("alice@example.com", "alice-secret"))[0] == 235
    # the log is written once per turn of the server's loop: wait for the success line
    server.wait_for(lambda: "succeeded, sasl_username=alice@example.com" in server.log())
    assert server.log().count("SASL PLAIN authentication failed") == 1  # only dave's


# -- 3: one account, one name ---------------------------------------------------------------------


def test_a_login_is_recorded_under_the_accounts_own_address(tmp_path: Path) -> None:
    running = start(tmp_path, "received_header_user = true")
    try:
        with smtp(running.submission) as client:
            assert client.docmd("AUTH", plain("ALICE@Example.COM.", "alice-secret"))[0] == 235
            client.sendmail("alice@example.com", ["bob@example.com"],
                            b"Subject: hi\r\n\r\nhello\r\n")
        server = running.server
        server.wait_for(lambda: server.messages("bob@example.com"))
        message = email.message_from_bytes(server.messages("bob@example.com")[0],
                                           policy=email.policy.default)
        received = str(message["Received"])
        assert "alice@example.com" in received and "ALICE" not in received
        log = server.log()
        assert "sasl_username=alice@example.com" in log
        assert "sasl_username=ALICE@Example.COM." not in log
    finally:
        running.server.stop()


def test_a_pop3_login_is_recorded_under_the_accounts_own_address(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.pop3), timeout=10) as sock:
        pop3_replies(sock, 1)
        sock.sendall(b"USER ALICE@Example.COM.\r\nPASS alice-secret\r\nQUIT\r\n")
        assert [line[:3] for line in pop3_replies(sock, 3)] == [b"+OK"] * 3
    running.server.wait_for(lambda: "pop3 login:" in running.server.log())
    assert "pop3 login: user=<alice@example.com>, method=USER" in running.server.log()


# -- 4: shutdown does not wait for an idle TLS client ----------------------------------------------


def test_sigterm_does_not_wait_for_an_idle_tls_client(running: Running) -> None:
    """An implicit-TLS client and a STARTTLS client finish the handshake and then neither read
    nor answer anything, so our close_notify is never answered. The server still exits at once
    (it used to wait out smtp.shutdown_grace, 30 s)."""
    implicit = tls_client().wrap_socket(
        socket.create_connection(("127.0.0.1", running.submissions), timeout=10))
    starttls = smtp(running.submission)
    starttls.starttls(context=tls_client())
    time.sleep(0.3)  # both sessions are established on the server's side
    proc = running.server.proc
    assert proc is not None
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        assert proc.wait(20) == 0
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        pytest.fail("the server waited for the idle TLS clients")
    finally:
        running.server.proc = None
        implicit.close()
        starttls.close()
    assert time.monotonic() - started < 6.0


def test_implicit_tls_takes_a_client_hello_sent_at_once_and_follows_a_reload(
        tmp_path: Path) -> None:
    """Found while testing the shutdown: on uvloop the session's start_tls raced the client's
    ClientHello (reading starts once connection_made returns, paused or not), and about half the
    connections to 465 hung until the handshake timeout. The listener now does TLS from the first
    byte, and still serves the certificate a reload (SIGHUP) put in place."""
    from postroom.net.tls import self_signed

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    self_signed("first.example", cert, key)
    running = start(tmp_path / "srv", f'[tls]\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    try:
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", running.submissions), timeout=5) as raw, \
                    tls_client().wrap_socket(raw) as sock:
                assert sock.recv(512).startswith(b"220 ")
        self_signed("second.example", cert, key)
        assert running.server.proc is not None
        running.server.proc.send_signal(signal.SIGHUP)
        running.server.wait_for(lambda: "reloaded" in running.server.log())
        with socket.create_connection(("127.0.0.1", running.submissions), timeout=5) as raw, \
                tls_client().wrap_socket(raw) as sock:
            der = sock.getpeercert(binary_form=True)
            assert der == ssl.PEM_cert_to_DER_cert(cert.read_text())
            assert sock.recv(512).startswith(b"220 ")
    finally:
        running.server.stop()


async def _in_process_shutdown(tmp_path: Path) -> tuple[list[int], float]:
    """SmtpServer on this test's plain asyncio loop: 465 and 587 (no uvloop, unlike serve)."""
    from postroom import config as config_mod
    from postroom.accounts.store import AccountStore
    from postroom.daemon import receive_settings, tls_context
    from postroom.delivery.maildir import MaildirUsage
    from postroom.net.server import SmtpServer, bind_listener
    from postroom.policy.router import Router
    from postroom.queue.committer import Committer
    from postroom.queue.spool import Spool
    from postroom.receive import Receiver

    cfg = config_mod.from_dict({
        "server": {"hostname": "mx.test.example", "data_dir": str(tmp_path / "data")},
        "listener": [{"address": "127.0.0.1:0", "role": "submissions"},
                     {"address": "127.0.0.1:0", "role": "submission"}],
        "passwords": {"time_cost": 1, "memory_cost_kib": 8, "parallelism": 1},
    })
    store = AccountStore.for_config(cfg)
    usage = MaildirUsage()
    committer = Committer()
    committer.start()
    spool = Spool(cfg.data_dir, committer, usage, cfg.hostname)
    receiver = Receiver(receive_settings(cfg), Router(store, cfg.delivery, usage.usage,
                                                      cfg.data_dir), spool)
    server = SmtpServer(cfg, receiver, tls_context=tls_context(cfg))
    listeners = [(bind_listener(listener), listener) for listener in cfg.listeners()]
    implicit, submission = (sock.getsockname()[1] for sock, _ in listeners)
    await server.start(listeners)

    def idle_clients() -> tuple[list[int], list[ssl.SSLSocket | smtplib.SMTP]]:
        codes: list[int] = []
        keep: list[ssl.SSLSocket | smtplib.SMTP] = []
        for _ in range(10):  # the ClientHello goes out at once, every time
            with smtplib.SMTP_SSL("127.0.0.1", implicit, local_hostname="c.test", timeout=5,
                                  context=tls_client()) as client:
                codes.append(client.noop()[0])
        quiet = tls_client().wrap_socket(socket.create_connection(("127.0.0.1", implicit)))
        starttls = smtp(submission)
        starttls.starttls(context=tls_client())
        keep += [quiet, starttls]
        return codes, keep

    try:
        codes, keep = await asyncio.to_thread(idle_clients)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await server.shutdown()
        took = time.monotonic() - started
        for thing in keep:
            thing.close()
    finally:
        await asyncio.to_thread(committer.stop)
        store.close()
    return codes, took


def test_implicit_tls_and_shutdown_on_plain_asyncio(tmp_path: Path) -> None:
    codes, took = asyncio.run(_in_process_shutdown(tmp_path))
    assert codes == [250] * 10
    assert took < 4.0  # not smtp.shutdown_grace (30 s) nor asyncio's 30 s TLS shutdown


# -- 5: a refusal is not a failure ------------------------------------------------------------------


def test_auth_refused_while_blocked_is_an_info_line(running: Running) -> None:
    block_the_address(running.submission)
    with smtp(running.submission) as client:
        assert client.docmd("AUTH", plain("alice@example.com", "alice-secret"))[0] == 421
    running.server.wait_for(lambda: "AUTH refused" in running.server.log())
    refused = [line for line in running.server.log().splitlines() if "AUTH refused" in line]
    assert refused and not any("warning:" in line for line in refused)
    filter_text = (REPO / "contrib" / "fail2ban" / "filter.d" / "postroom.conf").read_text()
    patterns = [p.strip().removeprefix("failregex =").strip() for p in filter_text.splitlines()
                if "<HOST>" in p]
    for pattern in patterns:  # the filter's own regexes, with its prefix reduced to ours
        regex = (pattern.replace("^%(__prefix_line)s", r"^\w{3} [ \d]\d [\d:]{8} \S+ postroom\[\d+\]: ")
                 .replace("<HOST>", r"[\d.]+"))
        assert not any(re.search(regex, line) for line in refused)
        assert any(re.search(regex, line) for line in running.server.log().splitlines())
