"""POP3 through ``postroom serve`` (issue 5): mail sent over SMTP is downloaded over POP3 with
the same bytes, by poplib (STLS and 995) and mpop (SCRAM-SHA-256); logins are refused before
TLS; failures count with SMTP AUTH's against one throttle."""

from __future__ import annotations

import email
import email.policy
import poplib
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, free_port, make_server

MESSAGE = (b"From: john@example.net\r\nTo: alice@example.com\r\nSubject: pop me\r\n"
           b"Message-ID: <pop@test>\r\n\r\nfirst line\r\n.a dotted line\r\nlast\r\n")


@dataclass
class Pop:
    server: ServerHandle
    pop3: int
    pop3s: int
    submission: int


@pytest.fixture
def pop(tmp_path: Path) -> Iterator[Pop]:
    pop3, pop3s, sub = free_port(), free_port(), free_port()
    handle = make_server(tmp_path, f"""
[[listener]]
role = "pop3"
address = "127.0.0.1:{pop3}"

[[listener]]
role = "pop3s"
address = "127.0.0.1:{pop3s}"

[[listener]]
role = "submission"
address = "127.0.0.1:{sub}"

[auth]
max_delay = 0.1
ip_free_failures = 1
ip_max_failures = 4
""")
    handle.start()
    try:
        yield Pop(handle, pop3, pop3s, sub)
    finally:
        if handle.proc is not None:
            handle.stop()


def context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def deliver(server: ServerHandle, count: int = 1) -> None:
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=10) as client:
        for _ in range(count):
            client.sendmail("john@example.net", ["alice@example.com"], MESSAGE)


def stored(server: ServerHandle) -> list[bytes]:
    """alice's messages as the server stored them (LF), in CRLF as POP3 sends them."""
    maildir = server.maildir("alice@example.com")
    return sorted(p.read_bytes().replace(b"\n", b"\r\n")
                  for p in [*maildir.glob("new/*"), *maildir.glob("cur/*")])


def test_poplib_stls_downloads_what_smtp_delivered(pop: Pop) -> None:
    deliver(pop.server, 2)
    expected = stored(pop.server)
    client = poplib.POP3("127.0.0.1", pop.pop3, timeout=10)
    try:
        assert "STLS" in client.capa()
        with pytest.raises(poplib.error_proto) as refused:
            client.user("alice@example.com")
            client.pass_("alice-secret")
        assert b"[AUTH]" in refused.value.args[0]
        client.stls(context=context())
        client.user("alice@example.com")
        client.pass_("alice-secret")
        count, size = client.stat()
        assert count == 2 and size == sum(len(m) for m in expected)
        got = sorted(b"\r\n".join(client.retr(i)[1]) + b"\r\n" for i in (1, 2))
        assert got == expected
        assert b"Subject: pop me" in got[0] and b"\r\n.a dotted line\r\n" in got[0]
        client.dele(1)
        client.quit()
    finally:
        client.close()
    assert len(stored(pop.server)) == 1  # deletion committed at QUIT


def test_pop3s_and_uidl_stable(pop: Pop) -> None:
    deliver(pop.server)
    uidls = []
    for _ in range(2):
        client = poplib.POP3_SSL("127.0.0.1", pop.pop3s, timeout=10, context=context())
        client.user("alice@example.com")
        client.pass_("alice-secret")
        uidls.append(client.uidl()[1])
        client.quit()
    assert uidls[0] == uidls[1] and len(uidls[0]) == 1


@pytest.mark.interop
@pytest.mark.skipif(shutil.which("mpop") is None, reason="needs mpop")
def test_mpop_scram_sha_256_against_the_daemon(pop: Pop, tmp_path: Path) -> None:
    deliver(pop.server)
    expected = [m.replace(b"\r\n", b"\n") for m in stored(pop.server)]
    out = tmp_path / "out"
    for sub in ("tmp", "new", "cur"):
        (out / sub).mkdir(parents=True)
    rc = tmp_path / "mpoprc"
    rc.write_text(f"""
account default
host 127.0.0.1
port {pop.pop3}
tls on
tls_starttls on
tls_certcheck off
user alice@example.com
password alice-secret
auth scram-sha-256
delivery maildir {out}
received_header off
uidls_file {tmp_path / "uidls"}
keep off
""")
    rc.chmod(0o600)
    result = subprocess.run(["mpop", "-C", str(rc), "--debug"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "AUTH SCRAM-SHA-256" in result.stdout
    assert sorted(p.read_bytes() for p in out.glob("new/*")) == expected
    assert stored(pop.server) == []


def test_pop3_and_smtp_failures_share_one_count(pop: Pop) -> None:
    for _ in range(3):  # three POP3 failures from 127.0.0.1 ...
        client = poplib.POP3_SSL("127.0.0.1", pop.pop3s, timeout=10, context=context())
        with pytest.raises(poplib.error_proto):
            client.user("alice@example.com")
            client.pass_("wrong")
        client.close()
    # ... and the fourth, over SMTP AUTH, blocks the address (ip_max_failures = 4)
    with smtplib.SMTP("127.0.0.1", pop.submission, local_hostname="c.test", timeout=10) as smtp:
        smtp.starttls(context=context())
        smtp.ehlo()
        assert smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHdyb25n")[0] == 421
    client = poplib.POP3_SSL("127.0.0.1", pop.pop3s, timeout=10, context=context())
    try:
        client.user("alice@example.com")
        with pytest.raises(poplib.error_proto):
            client.pass_("alice-secret")  # the right password, but the address is refused
    finally:
        client.close()
    log = pop.server.log()
    assert log.count("SASL") >= 4 and "too many failed authentications" in log


def test_new_accounts_get_the_special_folders(pop: Pop) -> None:
    pop.server.cli("user", "add", "dora@example.com", "--password-stdin", stdin="d\n")
    maildir = pop.server.maildir("dora@example.com")
    assert sorted(p.name for p in maildir.iterdir() if p.name.startswith(".")) == [
        ".Drafts", ".Junk", ".Sent", ".Trash"]
    assert email.message_from_bytes(MESSAGE, policy=email.policy.default)["Subject"] == "pop me"
