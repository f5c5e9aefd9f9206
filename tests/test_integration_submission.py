"""Submission over real sockets and real TLS (issue 3): ports 587 (STARTTLS, then AUTH) and 465
(implicit TLS), with smtplib, swaks, msmtp (SCRAM-SHA-256), openssl; sender authorisation; the
headers a submission server adds; brute-force throttling and its fail2ban-readable log."""

from __future__ import annotations

import email
import email.policy
import shutil
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, free_port, make_server

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Submission:
    server: ServerHandle
    submission: int  # 587's stand-in: STARTTLS, then AUTH
    submissions: int  # 465's stand-in: implicit TLS


def submission_config(sub: int, subs: int, extra: str = "") -> str:
    return f"""
[[listener]]
role = "submission"
address = "127.0.0.1:{sub}"

[[listener]]
role = "submissions"
address = "127.0.0.1:{subs}"

[auth]
mechanisms = ["SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5"]
max_delay = 0.2
ip_free_failures = 2
ip_max_failures = 12
block_seconds = 60
{extra}
"""


def start(tmp_path: Path, extra: str = "", server_extra: str = "") -> Submission:
    sub, subs = free_port(), free_port()
    handle = make_server(tmp_path, submission_config(sub, subs, extra), server_extra)
    handle.cli("user", "add", "carol@example.com", "--allow-cram-md5", "--password-stdin",
               stdin="carol-secret\n")
    handle.start()
    return Submission(handle, sub, subs)


@pytest.fixture
def sub(tmp_path: Path) -> Iterator[Submission]:
    running = start(tmp_path)
    try:
        yield running
    finally:
        if running.server.proc is not None:
            running.server.stop()


def context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test server's certificate is self-signed
    return ctx


def smtp(port: int, source: str = "127.0.0.1") -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=15,
                        source_address=(source, 0))


def parse(raw: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(message, email.message.EmailMessage)
    return message


# -- the ports ---------------------------------------------------------------------------------
def test_587_offers_auth_only_after_starttls_and_needs_it_for_mail(sub: Submission) -> None:
    with smtp(sub.submission) as client:
        client.ehlo()
        assert client.has_extn("starttls") and not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==") == (
            538, b"5.7.11 Encryption required for requested authentication mechanism")
        assert client.docmd("MAIL", "FROM:<alice@example.com>") == (
            530, b"5.7.0 Must issue a STARTTLS command first")
        client.starttls(context=context())
        client.ehlo()
        assert client.esmtp_features["auth"].strip() == "SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5"
        assert client.docmd("MAIL", "FROM:<alice@example.com>") == (
            530, b"5.7.0 Authentication required")
        client.login("alice@example.com", "alice-secret")
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==") == (
            503, b"5.5.1 Error: already authenticated")
        client.sendmail("alice@example.com", ["bob@example.com"],
                        b"From: alice@example.com\r\nSubject: via 587\r\n\r\nhello bob\r\n")
    [raw] = sub.server.messages("bob@example.com")
    message = parse(raw)
    assert message["Subject"] == "via 587"
    assert "with ESMTPSA id" in message["Received"]
    assert "alice" not in message["Received"]  # not named unless configured
    log = sub.server.log()
    assert "SASL PLAIN authentication succeeded, sasl_username=alice@example.com" in log
    assert "sasl_method=PLAIN, sasl_username=alice@example.com" in log


def test_465_is_tls_from_the_first_byte(sub: Submission) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", sub.submissions, local_hostname="c.test", timeout=15,
                          context=context()) as client:
        client.ehlo()
        assert not client.has_extn("starttls")
        assert "PLAIN" in client.esmtp_features["auth"]
        assert client.sock is not None and client.sock.version() in ("TLSv1.2", "TLSv1.3")
        client.login("bob@example.com", "bob-secret")
        client.sendmail("bob@example.com", ["alice@example.com"],
                        b"From: Bob <bob@example.com>\r\nSubject: via 465\r\n\r\nhi\r\n")
    [raw] = sub.server.messages("alice@example.com")
    assert parse(raw)["Subject"] == "via 465"
    # plaintext to the implicit-TLS port gets no SMTP banner at all
    with socket.create_connection(("127.0.0.1", sub.submissions), timeout=2) as raw_sock:
        raw_sock.sendall(b"EHLO c.test\r\n")
        try:
            answer = raw_sock.recv(1024)
        except (TimeoutError, ConnectionError):
            answer = b""
        assert not answer.startswith(b"220")


def test_mx_port_offers_no_auth_and_does_not_relay(sub: Submission) -> None:
    with smtp(sub.server.port) as client:
        client.ehlo()
        client.starttls(context=context())
        client.ehlo()
        assert not client.has_extn("auth")
        assert client.docmd("AUTH", "PLAIN =")[0] == 502
        client.docmd("MAIL", "FROM:<x@remote.example>")
        assert client.docmd("RCPT", "TO:<someone@elsewhere.example>") == (
            554, b"5.7.1 <someone@elsewhere.example>: Relay access denied")


def test_authenticated_mail_may_relay_and_is_queued(sub: Submission) -> None:
    with smtp(sub.submission) as client:
        client.starttls(context=context())
        client.login("alice@example.com", "alice-secret")
        client.sendmail("alice@example.com", ["friend@elsewhere.example"],
                        b"From: alice@example.com\r\nSubject: out\r\n\r\nbye\r\n")
    active = sub.server.data_dir / "queue" / "active"
    [queued] = list(active.iterdir())
    assert b"friend@elsewhere.example" in queued.read_bytes().split(b"\n", 1)[0]


# -- what a submission server adds and checks --------------------------------------------------
def test_message_id_and_date_added_only_when_missing(sub: Submission) -> None:
    with smtp(sub.submission) as client:
        client.starttls(context=context())
        client.login("alice@example.com", "alice-secret")
        client.sendmail("alice@example.com", ["bob@example.com"],
                        b"From: alice@example.com\r\nSubject: bare\r\n\r\nno id\r\n")
        client.sendmail("alice@example.com", ["bob@example.com"],
                        b"From: alice@example.com\r\nSubject: full\r\n"
                        b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\n"
                        b"Message-ID: <own@client.example>\r\n\r\nhas id\r\n")
    messages = {m["Subject"]: m for m in map(parse, sub.server.messages("bob@example.com"))}
    bare, full = messages["bare"], messages["full"]
    assert bare["Message-ID"].endswith("@mx.test.example>") and bare["Date"] is not None
    assert full.get_all("Message-ID") == ["<own@client.example>"]
    assert full.get_all("Date") == ["Mon, 02 Nov 2026 10:00:00 +0000"]


def test_sender_must_belong_to_the_user(sub: Submission) -> None:
    sub.server.cli("alias", "add", "sales@example.com", "alice@example.com")
    with smtp(sub.submission) as client:
        client.starttls(context=context())
        client.login("alice@example.com", "alice-secret")
        assert client.docmd("MAIL", "FROM:<bob@example.com>") == (
            553, b"5.7.1 <bob@example.com>: Sender address rejected: not owned by user "
                 b"alice@example.com")
        for own in ("alice@example.com", "Alice+lists@example.com", "sales@example.com"):
            assert client.docmd("MAIL", f"FROM:<{own}>")[0] == 250, own
            client.rset()
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.com", ["bob@example.com"],
                            b"From: Bob <bob@example.com>\r\nSubject: forged\r\n\r\nx\r\n")
        assert refused.value.smtp_code == 553
        assert b"From: header address rejected" in refused.value.smtp_error
    assert sub.server.messages("bob@example.com") == []


def test_a_from_hidden_past_the_header_limit_is_refused(sub: Submission) -> None:
    padding = b"".join(b"X-Pad-%05d: %s\r\n" % (i, b"p" * 60) for i in range(1200))  # ~90 KB
    with smtp(sub.submission) as client:
        client.starttls(context=context())
        client.login("alice@example.com", "alice-secret")
        with pytest.raises(smtplib.SMTPDataError) as refused:
            client.sendmail("alice@example.com", ["bob@example.com"],
                            padding + b"From: Bob <bob@example.com>\r\n\r\nx\r\n")
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            552, b"5.3.4 Message header section too large for submission")
    assert sub.server.messages("bob@example.com") == []


def test_received_names_the_user_when_configured(tmp_path: Path) -> None:
    running = start(tmp_path, "received_header_user = true\n")
    try:
        with smtp(running.submission) as client:
            client.starttls(context=context())
            client.login("alice@example.com", "alice-secret")
            client.sendmail("alice@example.com", ["bob@example.com"], b"Subject: t\r\n\r\nx\r\n")
        [raw] = running.server.messages("bob@example.com")
        assert "(Authenticated sender: alice@example.com)" in parse(raw)["Received"]
    finally:
        running.server.stop()


# -- real clients -------------------------------------------------------------------------------
def swaks(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["swaks", "--helo", "swaks.test", "--timeout", "15", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.interop
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_swaks_auth_over_starttls(sub: Submission, mechanism: str) -> None:
    result = swaks("--server", f"127.0.0.1:{sub.submission}", "--tls", "--auth", mechanism,
                   "--auth-user", "carol@example.com", "--auth-password", "carol-secret",
                   "--from", "carol@example.com", "--to", "bob@example.com",
                   "--header", f"Subject: swaks {mechanism}", "--header",
                   "From: carol@example.com")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "235 2.7.0 Authentication successful" in result.stdout
    [raw] = sub.server.messages("bob@example.com")
    assert parse(raw)["Subject"] == f"swaks {mechanism}"


@pytest.mark.interop
def test_swaks_tls_on_connect_and_cram_md5_needs_opt_in(sub: Submission) -> None:
    ok = swaks("--server", f"127.0.0.1:{sub.submissions}", "--tls-on-connect", "--auth", "PLAIN",
               "--auth-user", "alice@example.com", "--auth-password", "alice-secret",
               "--from", "alice@example.com", "--to", "bob@example.com")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    refused = swaks("--server", f"127.0.0.1:{sub.submissions}", "--tls-on-connect",
                    "--auth", "CRAM-MD5", "--auth-user", "alice@example.com",
                    "--auth-password", "alice-secret", "--from", "alice@example.com",
                    "--to", "bob@example.com")
    assert refused.returncode != 0
    assert "535 5.7.8 Authentication credentials invalid" in refused.stdout


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("msmtp") is None, reason="msmtp is not installed")
def test_msmtp_submits_with_scram_sha_256(sub: Submission, tmp_path: Path) -> None:
    config = tmp_path / "msmtprc"
    config.write_text(f"""
account default
host 127.0.0.1
port {sub.submission}
domain c.test
tls on
tls_starttls on
tls_certcheck off
auth scram-sha-256
user alice@example.com
password alice-secret
from alice@example.com
logfile {tmp_path / "msmtp.log"}
""")
    config.chmod(0o600)
    message = b"From: alice@example.com\r\nTo: bob@example.com\r\nSubject: msmtp scram\r\n\r\nhi\r\n"
    result = subprocess.run(["msmtp", "-C", str(config), "bob@example.com"], input=message,
                            capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    [raw] = sub.server.messages("bob@example.com")
    assert parse(raw)["Subject"] == "msmtp scram"
    assert "SASL SCRAM-SHA-256 authentication succeeded" in sub.server.log()
    wrong = config.read_text().replace("password alice-secret", "password wrong")
    config.write_text(wrong)
    result = subprocess.run(["msmtp", "-C", str(config), "bob@example.com"], input=message,
                            capture_output=True, timeout=60)
    assert result.returncode != 0


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")
def test_openssl_s_client_on_587(sub: Submission) -> None:
    result = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-name", "c.test", "-connect",
         f"127.0.0.1:{sub.submission}", "-quiet"],
        input=b"EHLO c.test\r\nQUIT\r\n", capture_output=True, timeout=30)
    assert b"250 AUTH SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5\r\n" in result.stdout
    assert b"221 2.0.0 Bye" in result.stdout


# -- brute force --------------------------------------------------------------------------------
def wrong_logins(port: int, count: int) -> list[int]:
    """Try *count* wrong passwords from 127.0.0.1 over as many connections as needed; the
    codes of the replies, stopping at the first 421."""
    codes: list[int] = []
    while len(codes) < count:
        with smtp(port) as client:
            client.starttls(context=context())
            client.ehlo()
            while len(codes) < count:
                code, _ = client.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")  # alice / wrong
                codes.append(code)
                if code == 421:
                    return codes
    return codes


def test_thirty_wrong_passwords_are_throttled_then_refused(sub: Submission) -> None:
    started = time.monotonic()
    codes = wrong_logins(sub.submission, 30)
    assert codes[-1] == 421 and set(codes[:-1]) == {535}
    assert len(codes) == 12  # ip_max_failures
    assert time.monotonic() - started >= 0.2 * 5  # the failures past the free ones waited
    with smtp(sub.submission) as client:  # refused for the cool-down, on a new connection too
        client.starttls(context=context())
        client.ehlo()
        assert client.docmd("AUTH", "PLAIN AGFsaWNlAGFsaWNlLXNlY3JldA==")[0] == 421
    # the right password from another address works at once: the account is never locked
    begun = time.monotonic()
    with smtp(sub.submission, source="127.0.0.2") as client:
        client.starttls(context=context())
        client.login("alice@example.com", "alice-secret")
    assert time.monotonic() - begun < 2.0
    log = sub.server.log()
    assert log.count("SASL PLAIN authentication failed: bad credentials") == len(codes)
    assert "too many failed authentications; refused for 60 s" in log


def test_workers_share_the_failure_counts(tmp_path: Path) -> None:
    """Two worker processes: the kernel spreads the connections, the block holds for both."""
    running = start(tmp_path, server_extra="workers = 2")
    try:
        codes: list[int] = []
        pids: set[str] = set()
        while not codes or codes[-1] != 421:  # one attempt per connection
            with smtp(running.submission) as client:
                client.starttls(context=context())
                client.ehlo()
                codes.append(client.docmd("AUTH", "PLAIN AGFsaWNlAHdyb25n")[0])
            assert len(codes) <= 13
        for line in running.server.log().splitlines():
            if "SASL PLAIN authentication failed" in line:
                pids.add(line.split("]:")[0].rsplit("[", 1)[1])
        assert len(pids) == 2, "both workers answered some of the attempts"
        assert len(codes) == 12
    finally:
        running.server.stop()


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("fail2ban-regex") is None, reason="fail2ban is not installed")
def test_fail2ban_filter_reads_the_failures(sub: Submission, tmp_path: Path) -> None:
    wrong_logins(sub.submission, 4)
    with smtp(sub.submission) as client:  # a success must not match
        client.starttls(context=context())
        client.login("bob@example.com", "bob-secret")
    filter_file = REPO / "contrib" / "fail2ban" / "filter.d" / "postroom.conf"
    work = tmp_path / "f2b"
    shutil.copytree("/etc/fail2ban", work, ignore=shutil.ignore_patterns("jail.d", "*.local"))
    shutil.copy(filter_file, work / "filter.d" / "postroom.conf")
    result = subprocess.run(
        ["fail2ban-regex", "--config", str(work), str(sub.server.log_path), "postroom"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Failregex: 5 total" in result.stdout, result.stdout  # smtplib tried CRAM-MD5 first for bob
