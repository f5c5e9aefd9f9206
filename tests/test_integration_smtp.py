"""The whole server over real sockets: smtplib, raw pipelined bytes, swaks, limits, signals."""

from __future__ import annotations

import json
import mailbox
import os
import re
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, make_server, wait_port


def smtp(handle: ServerHandle) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", handle.port, local_hostname="client.test", timeout=10)


_OPEN: list[Raw] = []


@pytest.fixture(autouse=True)
def _close_raw_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


class Raw:
    """A plain socket client for byte-exact conversations."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        _OPEN.append(self)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> bytes:
        """One whole reply (all its lines)."""
        while True:
            lines = self.buf.split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) >= 4 and line[3:4] == b" ":
                    out = b"\r\n".join(lines[: i + 1]) + b"\r\n"
                    self.buf = self.buf[len(out):]
                    return out
            chunk = self.sock.recv(65536)
            if not chunk:
                out, self.buf = self.buf, b""
                return out
            self.buf += chunk

    def close(self) -> None:
        self.sock.close()


def body_of(raw: bytes) -> bytes:
    return raw.split(b"\n\n", 1)[1]


def test_smtplib_delivers_to_maildir(server: ServerHandle) -> None:
    msg = EmailMessage()
    msg["From"] = "john@remote.example"
    msg["To"] = "alice@example.com"
    msg["Subject"] = "Hello"
    msg["Message-ID"] = "<hello-1@remote.example>"
    msg.set_content("Hi Alice, this is John.\n.leading dot\n")
    with smtp(server) as client:
        code, _ = client.ehlo()
        assert code == 250
        assert client.has_extn("pipelining") and client.has_extn("chunking")
        refused = client.send_message(msg)
        assert refused == {}
    [raw] = server.messages("alice@example.com")
    assert raw.startswith(b"Return-Path: <john@remote.example>\nDelivered-To: alice@example.com\n")
    assert b"\r\n" not in raw  # Maildir files use Unix line ends
    assert b"Received: from client.test (unknown [127.0.0.1])" in raw
    assert body_of(raw) == b"Hi Alice, this is John.\n.leading dot\n"
    box = mailbox.Maildir(server.maildir("alice@example.com"), create=False)
    [parsed] = list(box)
    assert parsed["Subject"] == "Hello"
    server.wait_for(lambda: "status=sent (delivered to maildir)" in server.log())
    log = server.log()
    queue_id = log.split(": client=")[0].rsplit(" ", 1)[-1]
    assert f"{queue_id}: message-id=<hello-1@remote.example>" in log
    assert f"{queue_id}: from=<john@remote.example>, size=" in log
    assert f"{queue_id}: to=<alice@example.com>, relay=local" in log
    assert f" id {queue_id}" in raw.decode()


def test_queued_reply_carries_queue_id(server: ServerHandle) -> None:
    c = Raw(server.port)
    assert c.reply().startswith(b"220 mx.test.example ESMTP")
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n")
    assert c.reply().startswith(b"250-mx.test.example")
    assert c.reply() == b"250 2.1.0 Ok\r\n"
    assert c.reply() == b"250 2.1.5 Ok\r\n"
    assert c.reply().startswith(b"354 ")
    c.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    done = c.reply()
    assert done.startswith(b"250 2.0.0 Ok: queued as ")
    queue_id = done.split()[-1].decode()
    assert c.reply() == b"221 2.0.0 Bye\r\n"
    c.close()
    [raw] = server.messages("bob@example.com")
    assert f"id {queue_id}".encode() in raw


def test_unknown_user_and_relay_denied(server: ServerHandle) -> None:
    with smtp(server) as client:
        client.ehlo()
        assert client.mail("a@remote.example")[0] == 250
        code, text = client.rcpt("nobody@example.com")
        assert (code, text[:5]) == (550, b"5.1.1")
        code, text = client.rcpt("victim@elsewhere.example")
        assert (code, text[:5]) == (554, b"5.7.1")
        assert b"Relay access denied" in text
        for trick in ('"victim@elsewhere.example"@example.com', "victim%elsewhere.example@example.com",
                      "elsewhere.example!victim@example.com", "@example.com:victim@elsewhere.example",
                      "victim@[127.0.0.1]"):
            code, text = client.rcpt(f"<{trick}>" if trick.startswith("@") else trick)
            assert code in (550, 554), (trick, code, text)
    assert server.log().count("reject: RCPT") >= 3


def test_trusted_network_may_relay(tmp_path: Path) -> None:
    handle = make_server(tmp_path, '[relay]\ntrusted_networks = ["127.0.0.0/8"]\n')
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            client.mail("alice@example.com")
            assert client.rcpt("someone@elsewhere.example")[0] == 250
            code, text = client.data(b"Subject: out\r\n\r\nrelay me\r\n")
            assert code == 250 and text.startswith(b"2.0.0 Ok: queued as ")
        queue = handle.data_dir / "queue" / "active"
        handle.wait_for(lambda: any(queue.iterdir()))
        [qfile] = list(queue.iterdir())
        assert qfile.name == text.split()[-1].decode()
        assert b"relay me" in qfile.read_bytes()
    finally:
        handle.stop()


def test_postmaster_always_accepted(server: ServerHandle) -> None:
    with smtp(server) as client:
        client.ehlo()
        client.mail("")
        assert client.rcpt("<Postmaster>")[0] == 250
        assert client.rcpt("<POSTMASTER@example.com>")[0] == 250
        assert client.data(b"Subject: pm\r\n\r\nhello postmaster\r\n")[0] == 250
    delivered = list((server.data_dir).rglob("new/*"))
    assert any(b"hello postmaster" in p.read_bytes() for p in delivered)


def test_pipelined_segmentation_keeps_replies_in_order(server: ServerHandle) -> None:
    script = (
        b"EHLO c.test\r\n"
        b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<ghost@example.com>\r\nDATA\r\nSubject: p\r\n\r\none\r\n.\r\n"
        b"NOOP\r\nRSET\r\nMAIL FROM:<b@remote.example>\r\nRCPT TO:<bob@example.com>\r\n"
        b"BDAT 12 LAST\r\nSubject: b\r\nQUIT\r\n"
    )
    for size in (len(script), 5, 1):
        c = Raw(server.port)
        c.reply()
        for i in range(0, len(script), size):
            c.send(script[i : i + size])
        codes = []
        while True:
            r = c.reply()
            if not r:
                break
            last = r.splitlines()[-1]
            codes.append(last[:9] if last[4:5].isdigit() else last[:3])
            if r.startswith(b"221"):
                break
        c.close()
        assert codes == [
            b"250", b"250 2.1.0", b"250 2.1.5", b"550 5.1.1", b"354",
            b"250 2.0.0", b"250 2.0.0", b"250 2.0.0", b"250 2.1.0", b"250 2.1.5",
            b"250 2.0.0", b"221 2.0.0",
        ], size


@pytest.mark.parametrize(
    "smuggle",
    [b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\r\n\x00.\r\n",
     b"\r\n.\x00\r\n"],
)
def test_no_smtp_smuggling_over_the_wire(server: ServerHandle, smuggle: bytes) -> None:
    c = Raw(server.port)
    c.reply()
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\nDATA\r\n")
    for _ in range(4):
        c.reply()
    c.send(b"Subject: s\r\n\r\nfirst" + smuggle
           + b"MAIL FROM:<evil@remote.example>\r\nRCPT TO:<bob@example.com>\r\nDATA\r\n"
           + b"smuggled\r\n.\r\n")
    final = c.reply()
    c.send(b"QUIT\r\n")
    assert c.reply().startswith(b"221")
    c.close()
    # Never two messages; bob never receives the smuggled one.
    assert server.messages("bob@example.com") == []
    delivered = server.messages("alice@example.com")
    if b"\r" in smuggle.replace(b"\r\n", b"") or b"\x00" in smuggle:
        assert final.startswith(b"554 5.6.0"), final
        assert delivered == []
    else:
        assert final.startswith(b"250 2.0.0"), final
        [raw] = delivered
        assert b"MAIL FROM:<evil@remote.example>" in raw  # it stayed content


def test_swaks_delivers(server: ServerHandle) -> None:
    result = subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{server.port}", "--helo", "swaks.test",
         "--from", "sender@remote.example", "--to", "bob@example.com",
         "--header", "Subject: from swaks", "--body", "swaks body line"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "250 2.0.0 Ok: queued as" in result.stdout
    [raw] = server.messages("bob@example.com")
    assert b"Subject: from swaks" in raw and b"swaks body line" in raw


def test_swaks_bdat(server: ServerHandle) -> None:
    # swaks has no CHUNKING; send BDAT by hand through its --pipe? Use a raw socket instead.
    c = Raw(server.port)
    c.reply()
    body = b"Subject: chunks\r\n\r\n" + b"x" * 5000 + b"\r\n"
    c.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.example> BODY=8BITMIME\r\n"
           b"RCPT TO:<alice@example.com>\r\n")
    for _ in range(3):
        c.reply()
    c.send(b"BDAT 100\r\n" + body[:100])
    assert c.reply() == b"250 2.0.0 100 octets received\r\n"
    c.send(b"BDAT %d LAST\r\n" % (len(body) - 100) + body[100:])
    assert c.reply().startswith(b"250 2.0.0 Ok: queued as ")
    c.close()
    [raw] = server.messages("alice@example.com")
    assert body_of(raw) == b"x" * 5000 + b"\n"


def test_size_limit_and_quota(tmp_path: Path) -> None:
    handle = make_server(tmp_path, "[smtp]\nmax_message_size = 20000\n")
    handle.cli("user", "add", "tiny@example.com", "--quota", "3000", "--password-stdin",
               stdin="tiny-secret\n")
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            code, text = client.mail("a@remote.example", ["SIZE=30000"])
            assert (code, text[:5]) == (552, b"5.3.4")
            client.rset()
            client.mail("a@remote.example")
            client.rcpt("alice@example.com")
            code, text = client.data(b"Subject: big\r\n\r\n" + b"y" * 30000 + b"\r\n")
            assert (code, text[:5]) == (552, b"5.3.4")
            client.mail("a@remote.example")
            assert client.rcpt("tiny@example.com")[0] == 250
            code, text = client.data(b"Subject: q\r\n\r\n" + b"z" * 4000 + b"\r\n")
            assert (code, text[:5]) == (552, b"5.2.2")
            # A small one fits; a second would not: refused at end of data, or at RCPT when
            # the client declared its SIZE.
            client.mail("a@remote.example")
            client.rcpt("tiny@example.com")
            assert client.data(b"Subject: q\r\n\r\n" + b"z" * 2500 + b"\r\n")[0] == 250
            assert len(handle.messages("tiny@example.com")) == 1
            client.mail("a@remote.example")
            client.rcpt("tiny@example.com")
            code, text = client.data(b"Subject: q\r\n\r\n" + b"z" * 2500 + b"\r\n")
            assert (code, text[:5]) == (552, b"5.2.2")
            client.mail("a@remote.example", ["SIZE=2500"])
            code, text = client.rcpt("tiny@example.com")
            assert (code, text[:5]) == (552, b"5.2.2")
    finally:
        handle.stop()


def test_loop_detection(server: ServerHandle) -> None:
    hops = b"".join(b"Received: from h%d by h%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i)
                    for i in range(101))
    with smtp(server) as client:
        client.ehlo()
        client.mail("a@remote.example")
        client.rcpt("alice@example.com")
        code, text = client.data(hops + b"Subject: loop\r\n\r\nloop\r\n")
        assert (code, text[:5]) == (554, b"5.4.6")
    assert server.messages("alice@example.com") == []


def test_connection_limits(tmp_path: Path) -> None:
    handle = make_server(tmp_path, "[smtp]\nmax_connections_per_ip = 2\n")
    handle.start()
    try:
        a, b = Raw(handle.port), Raw(handle.port)
        assert a.reply().startswith(b"220") and b.reply().startswith(b"220")
        c = Raw(handle.port)
        assert c.reply().startswith(b"421 4.7.0")
        c.close()
        a.close()
        time.sleep(0.2)
        d = Raw(handle.port)
        assert d.reply().startswith(b"220")
        d.close()
        b.close()
    finally:
        handle.stop()


def test_command_timeout(tmp_path: Path) -> None:
    handle = make_server(tmp_path, "[smtp]\ncommand_timeout = 1.0\n")
    handle.start()
    try:
        c = Raw(handle.port)
        c.reply()
        started = time.monotonic()
        assert c.reply().startswith(b"421 4.4.2")
        assert time.monotonic() - started < 5
        c.close()
    finally:
        handle.stop()


def test_data_timeout(tmp_path: Path) -> None:
    handle = make_server(tmp_path, "[smtp]\ndata_timeout = 1.0\n")
    handle.start()
    try:
        c = Raw(handle.port)
        c.reply()
        c.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"
               b"DATA\r\n")
        for _ in range(4):
            c.reply()
        c.send(b"Subject: slow\r\n\r\nhalf a message")
        started = time.monotonic()
        assert c.reply().startswith(b"421 4.4.2")
        assert 0.9 < time.monotonic() - started < 5
        assert handle.messages("alice@example.com") == []
        handle.wait_for(lambda: "timeout after IN_DATA" in handle.log())
    finally:
        handle.stop()


def test_sigterm_finishes_transaction_in_flight(server: ServerHandle) -> None:
    busy, idle = Raw(server.port), Raw(server.port)
    busy.reply()
    idle.reply()
    busy.send(b"EHLO c.test\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"
              b"DATA\r\n")
    for _ in range(4):
        busy.reply()
    busy.send(b"Subject: inflight\r\n\r\npart one\r\n")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    assert idle.reply().startswith(b"421 4.3.2")
    time.sleep(0.3)
    busy.send(b"part two\r\n.\r\n")
    assert busy.reply().startswith(b"250 2.0.0 Ok: queued as ")
    assert busy.reply().startswith(b"421 4.3.2")
    assert server.proc.wait(15) == 0
    server.proc = None
    [raw] = server.messages("alice@example.com")
    assert b"part one\npart two\n" in raw


def test_sighup_reloads_config(server: ServerHandle) -> None:
    server.extra_config = "[smtp]\nbanner = \"ESMTP reloaded\"\n"
    server.write_config()
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    server.wait_for(lambda: "reloaded" in server.log())
    c = Raw(server.port)
    assert c.reply().startswith(b"220 mx.test.example ESMTP reloaded")
    c.close()


def test_large_message_streams(server: ServerHandle) -> None:
    """A 20 MB message (under a raised limit) arrives intact; the server's RSS stays small."""
    server.stop()
    server.extra_config = "[smtp]\nmax_message_size = 60000000\n"
    server.write_config()
    server.start()
    assert server.proc is not None
    line = b"0123456789" * 7 + b"\r\n"
    count = 50_000_000 // len(line)
    with smtp(server) as client:
        client.ehlo()
        client.mail("a@remote.example")
        client.rcpt("alice@example.com")
        client.putcmd("data")
        assert client.getreply()[0] == 354
        client.send(b"Subject: big\r\n\r\n")
        chunk = line * 1000
        for _ in range(count // 1000):
            client.send(chunk)
        client.send(b".\r\n")
        code, _ = client.getreply()
        assert code == 250
        rss_kb = int(Path(f"/proc/{server.proc.pid}/status").read_text()
                     .split("VmHWM:")[1].split()[0])
    assert rss_kb < 120_000, rss_kb
    [path] = list((server.maildir("alice@example.com") / "new").iterdir())
    assert path.stat().st_size > 48_000_000


def test_unreadable_mailbox_is_a_temporary_refusal(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    handle.cli("user", "add", "carol@example.com", "--quota", "1M", "--password-stdin",
               stdin="carol-secret\n")
    maildir = handle.maildir("carol@example.com")
    shutil.rmtree(maildir)  # cur/ new/ tmp/ and the default folders
    maildir.write_text("not a directory")  # the quota count cannot read it
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            client.mail("a@remote.example")
            code, text = client.rcpt("carol@example.com")
            assert (code, text[:5]) == (450, b"4.2.0")
            assert client.rcpt("alice@example.com")[0] == 250  # the session goes on
            assert client.data(b"Subject: x\r\n\r\nstill works\r\n")[0] == 250
    finally:
        handle.stop()


def test_accounts_database_failure_is_451(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            client.mail("a@remote.example")
            assert client.rcpt("alice@example.com")[0] == 250
            db = handle.data_dir / "accounts.db"
            with sqlite3.connect(db) as admin:  # an operator's mistake: the table is gone
                admin.execute("DROP TABLE users")
            code, text = client.rcpt("bob@example.com")
            assert (code, text[:5]) == (451, b"4.3.0")
            assert client.noop()[0] == 250
    finally:
        handle.stop()


@pytest.mark.skipif(shutil.which("smtp-source") is None and not Path("/usr/sbin/smtp-source").exists(),
                    reason="Postfix's smtp-source is not installed")
def test_smtp_source_burst_of_1000(server: ServerHandle, tmp_path: Path) -> None:
    """Postfix's load generator: 1,000 messages over 20 parallel sessions, each a file."""
    content = (b"From: load@remote.example\nTo: alice@example.com\nSubject: burst\n\n"
               + b"".join(b"line %d of the body\n" % i for i in range(60))
               + b".a line that starts with a dot\n..two dots\nlast line\n")
    message = tmp_path / "message.txt"
    message.write_bytes(content)
    tool = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    result = subprocess.run(
        [tool, "-s", "20", "-m", "1000", "-M", "source.test", "-f", "load@remote.example",
         "-t", "alice@example.com", "-F", str(message), f"127.0.0.1:{server.port}"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    new = server.maildir("alice@example.com") / "new"
    files = list(new.iterdir())
    assert len(files) == 1000
    for path in files:
        raw = path.read_bytes()
        head, sep, rest = raw.partition(b"From: load@remote.example\n")
        assert sep, raw[:300]
        assert head.startswith(b"Return-Path: <load@remote.example>\nDelivered-To: alice@example.com\n")
        assert head.count(b"Received: ") == 1
        assert sep + rest == content + b"\n"  # smtp-source -F sends one more empty line
    queue_ids = set(re.findall(r": (\w{12}): to=<alice@example.com>, relay=local, .*"
                               r"status=sent \(delivered to maildir\)", server.log()))
    assert len(queue_ids) == 1000


def test_json_log_lines(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    json_log = tmp_path / "json.log"
    handle.proc = subprocess.Popen(
        [sys.executable, "-m", "postroom", "-c", str(handle.config_path), "serve", "--json",
         "--log-file", str(json_log)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(handle.port, handle.proc)
        with smtp(handle) as client:
            client.sendmail("a@remote.example", ["alice@example.com"], b"Subject: j\r\n\r\njson\r\n")
        handle.wait_for(lambda: "delivered to maildir" in json_log.read_text())
    finally:
        handle.stop()
    records = [json.loads(line) for line in json_log.read_text().splitlines()]
    sent = next(r for r in records if r.get("status") == "sent")
    assert sent["to"] == "alice@example.com" and sent["relay"] == "local"
    assert sent["status_detail"] == "delivered to maildir" and len(sent["queue_id"]) == 12
    assert any(r.get("from") == "a@remote.example" and r["queue_id"] == sent["queue_id"]
               for r in records)


def test_two_worker_processes_share_the_work_and_the_limits(tmp_path: Path) -> None:
    handle = make_server(tmp_path, "[smtp]\nmax_connections_per_ip = 3\n")
    handle.config_path.write_text(handle.config_path.read_text().replace(
        'run_as = ""', 'run_as = ""\nworkers = 2\nqueue_process = false'))  # runner in worker 0
    handle.start()
    try:
        assert handle.proc is not None
        children = Path(f"/proc/{handle.proc.pid}/task/{handle.proc.pid}/children")
        handle.wait_for(lambda: len(children.read_text().split()) == 2)
        handle.wait_for(lambda: handle.log().count("postroom ready") == 2)
        workers = children.read_text().split()
        # The per-IP limit counts connections in both workers together.
        held = [Raw(handle.port) for _ in range(3)]
        assert all(c.reply().startswith(b"220") for c in held)
        extra = Raw(handle.port)
        assert extra.reply().startswith(b"421 4.7.0")
        for c in (*held, extra):
            c.close()
        time.sleep(0.3)
        with smtp(handle) as client:
            for n in range(20):
                client.sendmail("a@remote.example", ["alice@example.com"],
                                b"Subject: w %d\r\n\r\nworker mail\r\n" % n)
        assert len(handle.messages("alice@example.com")) == 20
        # A worker killed outright is replaced; its connections no longer count.
        os.kill(int(workers[0]), signal.SIGKILL)
        handle.wait_for(lambda: "starting a new one" in handle.log())
        handle.wait_for(lambda: len(children.read_text().split()) == 2)
        again = [Raw(handle.port) for _ in range(3)]
        assert all(c.reply().startswith(b"220") for c in again)
    finally:
        assert handle.stop() == 0
    assert "all workers stopped" in handle.log()


def test_vrfy_default_and_enabled(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            assert client.verify("alice@example.com")[0] == 252
    finally:
        handle.stop()
    handle.extra_config = "[smtp]\nvrfy = true\n"
    handle.write_config()
    handle.start()
    try:
        with smtp(handle) as client:
            client.ehlo()
            code, text = client.verify("alice@example.com")
            assert (code, text) == (250, b"2.1.5 <alice@example.com>")
            code, text = client.verify("ghost@example.com")
            assert (code, text[:5]) == (550, b"5.1.1")
    finally:
        handle.stop()


def test_half_closed_client_still_gets_its_replies(server: ServerHandle) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        assert sock.recv(1024).startswith(b"220 ")
        sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"
                     b"DATA\r\nSubject: half\r\n\r\nclosed\r\n.\r\nQUIT\r\n")
        sock.shutdown(socket.SHUT_WR)
        replies = b""
        while chunk := sock.recv(65536):
            replies += chunk
    finally:
        sock.close()
    assert b"\r\n250 2.0.0 Ok: queued as " in replies
    assert replies.endswith(b"221 2.0.0 Bye\r\n")


def test_client_that_never_reads_cannot_grow_server_memory(server: ServerHandle) -> None:
    assert server.proc is not None
    status = Path(f"/proc/{server.proc.pid}/status")

    def rss_kb() -> int:
        return int(status.read_text().split("VmRSS:")[1].split()[0])

    before = rss_kb()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    flood = b"EHLO c.test\r\n" * 8192  # each answered with ~200 octets the client never reads
    sent = 0
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline and sent < 20_000_000:
        try:
            sent += sock.send(flood)
        except BlockingIOError:
            time.sleep(0.01)
    growth = rss_kb() - before
    sock.close()
    # Without flow control the replies to 20 MB of EHLO would be ~300 MB of memory.
    assert growth < 20_000, (growth, sent)


def test_workers_failing_at_start_stop_the_server(tmp_path: Path) -> None:
    """A worker that cannot start (here: its accounts database is a directory) is retried
    with a growing delay, then the server gives up instead of spinning; SIGTERM works meanwhile."""
    handle = make_server(tmp_path)
    handle.config_path.write_text(handle.config_path.read_text()
                                  .replace('run_as = ""', 'run_as = ""\nworkers = 2'))
    db = handle.data_dir / "accounts.db"
    db.unlink()
    db.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "postroom", "-c", str(handle.config_path),
                             "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    log = handle.log()
    assert "failed 5 times right after starting; stopping" in log
    assert "starting a new one in 1.0 s" in log and "starting a new one in 4.0 s" in log


def test_workers_stop_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    """A supervisor killed outright takes its workers with it (they get SIGTERM and stop):
    nothing is left holding the ports or the queue."""
    handle = make_server(tmp_path)
    handle.config_path.write_text(handle.config_path.read_text()
                                  .replace('run_as = ""', 'run_as = ""\nworkers = 2'))
    handle.start()
    assert handle.proc is not None
    children = Path(f"/proc/{handle.proc.pid}/task/{handle.proc.pid}/children")
    try:
        handle.wait_for(lambda: handle.log().count("postroom ready") == 3)  # and queue manager
        workers = [int(pid) for pid in children.read_text().split()]
        assert len(workers) == 3
    except BaseException:
        handle.kill()  # every process of the group: nothing may outlive a failed test
        raise
    handle.proc.kill()  # the supervisor alone (ServerHandle.kill would kill them all)
    handle.proc.wait(10)
    handle.proc = None

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
        except FileNotFoundError:
            return True
        return state == "Z"  # exited; its new parent has not reaped it yet

    deadline = time.monotonic() + 15
    while not all(map(gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in workers if not gone(pid)]
    for pid in left:  # ours, still running: end them so the failure leaves nothing behind
        os.kill(pid, signal.SIGKILL)
    assert left == [], "workers outlived their supervisor"
