"""Relay end to end (issue 4): a running postroom delivers mail for other domains by DNS MX to
real receivers on 127.0.0.2-4 (a second postroom, a greylisting server, nothing at all), retries
temporary failures, and returns bounces (RFC 3464) into the sender's local Maildir.

DNS comes from a dnslib server on 127.0.0.1 (tests/dns_support.py); every MX host listens on
the same port, which the sender's ``outbound.smtp_port`` names."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage, Message
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, free_port, make_server
from tests.dns_support import DnsTestServer, serve_dns
from tests.relay_support import parse, relay_config

ZONE = {
    "remote.test": ["MX 10 mx1.remote.test."],
    "mx1.remote.test": ["A 127.0.0.2"],
    "fallback.test": ["MX 10 dead.fallback.test.", "MX 20 mx1.remote.test."],
    "dead.fallback.test": ["A 127.0.0.4"],
    "grey.test": ["MX 10 mx.grey.test."],
    "mx.grey.test": ["A 127.0.0.3"],
    "nullmx.test": ["MX 0 ."],
    "down.test": ["MX 10 dead.fallback.test."],
}


@dataclass
class Net:
    dns: DnsTestServer
    port: int  # where every MX host listens
    sender: ServerHandle  # mx.test.example, users alice and bob of example.com
    receiver: ServerHandle  # mx1.remote.test on 127.0.0.2, user carol@remote.test


def remote_mx(root: Path, port: int) -> ServerHandle:
    """mx1.remote.test: a postroom on 127.0.0.2:*port* with the user carol@remote.test."""
    receiver = make_server(root, host="127.0.0.2", port=port, hostname="mx1.remote.test")
    receiver.cli("domain", "add", "remote.test")
    receiver.cli("user", "add", "carol@remote.test", "--password-stdin", stdin="c\n")
    return receiver


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    port = free_port()
    with serve_dns(ZONE) as dns:
        receiver = remote_mx(tmp_path / "b", port)
        sender = make_server(tmp_path / "a", relay_config(dns.port, port))
        receiver.start()
        sender.start()
        try:
            yield Net(dns, port, sender, receiver)
        finally:
            for handle in (sender, receiver):
                if handle.proc is not None:
                    handle.stop()


def send(server: ServerHandle, sender: str, *rcpts: str, subject: str = "relayed") -> None:
    body = (f"From: {sender or 'MAILER-DAEMON@mx.test.example'}\r\nTo: {rcpts[0]}\r\n"
            f"Subject: {subject}\r\nMessage-ID: <{subject.replace(' ', '-')}@test>\r\n\r\n"
            "Hello over there.\r\n.a line with a leading dot\r\n")
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test", timeout=15) as client:
        client.sendmail(sender, list(rcpts), body.encode())


def report(bounce: EmailMessage) -> tuple[Message, list[Message]]:
    """The per-message and per-recipient field groups of a DSN's delivery-status part."""
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    status = bounce.get_payload()[1]
    assert status.get_content_type() == "message/delivery-status"
    groups = status.get_payload()
    return groups[0], groups[1:]


def wait_bounce(server: ServerHandle, mailbox: str, count: int = 1) -> list[EmailMessage]:
    server.wait_for(lambda: len(server.messages(mailbox)) >= count, timeout=20)
    return [parse(raw) for raw in server.messages(mailbox)]


def test_delivered_by_mx_to_another_postroom(net: Net) -> None:
    send(net.sender, "alice@example.com", "carol@remote.test")
    net.receiver.wait_for(lambda: net.receiver.messages("carol@remote.test"), timeout=20)
    [raw] = net.receiver.messages("carol@remote.test")
    message = parse(raw)
    assert message["Subject"] == "relayed"
    assert b"\n.a line with a leading dot\n" in raw  # dot-stuffed on the way, unstuffed there
    received = message.get_all("Received")
    assert "by mx1.remote.test" in received[0] and "with ESMTPS" in received[0]
    log = net.sender.log()
    assert "to=<carol@remote.test>, relay=mx1.remote.test[127.0.0.2]:" in log
    assert "dsn=2.0.0, status=sent (250 2.0.0 Ok: queued as" in log
    net.sender.wait_for(lambda: not list((net.sender.data_dir / "queue/active").iterdir()))
    assert ("remote.test", "MX") in net.dns.queries


def test_5xx_bounces_into_the_senders_maildir(net: Net) -> None:
    send(net.sender, "alice@example.com", "nobody@remote.test", subject="to nobody")
    [bounce] = wait_bounce(net.sender, "alice@example.com")
    assert bounce["From"].addresses[0].username == "MAILER-DAEMON"
    assert bounce["Auto-Submitted"] == "auto-replied"
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    per_message, [rcpt] = report(bounce)
    assert per_message["Reporting-MTA"] == "dns; mx.test.example"
    assert rcpt["Final-Recipient"] == "rfc822; nobody@remote.test"
    assert rcpt["Action"] == "failed"
    assert rcpt["Status"] == "5.1.1"
    assert rcpt["Remote-MTA"] == "dns; mx1.remote.test"
    assert rcpt["Diagnostic-Code"].startswith("smtp; 550 5.1.1")
    returned = bounce.get_payload()[2]
    assert "to nobody" in returned.as_string()
    human = bounce.get_payload()[0].get_content()
    assert "nobody@remote.test" in human
    log = net.sender.log()
    assert "status=bounced (host mx1.remote.test[127.0.0.2] said: 550 5.1.1" in log
    assert "sender non-delivery notification:" in log


@pytest.mark.parametrize(("rcpt", "status"), [("x@nullmx.test", "5.1.10"),
                                              ("x@nxdomain.test", "5.1.2")])
def test_dns_verdicts_bounce_at_once(net: Net, rcpt: str, status: str) -> None:
    send(net.sender, "bob@example.com", rcpt)
    [bounce] = wait_bounce(net.sender, "bob@example.com")
    _, [group] = report(bounce)
    assert group["Status"] == status and group["Action"] == "failed"
    assert "Remote-MTA" not in group


def test_next_mx_when_the_first_refuses(net: Net) -> None:
    send(net.sender, "alice@example.com", "carol@fallback.test")
    # fallback.test's second MX is mx1.remote.test, which takes carol@... only for remote.test:
    # the point is that it was reached after 127.0.0.4 refused the connection
    net.sender.wait_for(lambda: "relay=mx1.remote.test[127.0.0.2]" in net.sender.log(), timeout=20)
    assert ("dead.fallback.test", "A") in net.dns.queries  # the preferred MX, tried first


class Greylister(socketserver.ThreadingTCPServer):
    """An SMTP server that answers 450 to the first RCPT of each recipient, then takes it."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.seen: set[str] = set()
        self.messages: list[bytes] = []
        super().__init__(address, _GreyHandler)


class _GreyHandler(socketserver.StreamRequestHandler):
    server: Greylister

    def handle(self) -> None:
        self.wfile.write(b"220 mx.grey.test ESMTP\r\n")
        while line := self.rfile.readline(1024):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 mx.grey.test\r\n")
            elif verb == b"MAIL" or verb == b"RSET" or verb == b"NOOP":
                self.wfile.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"RCPT":
                address = line.decode().partition(":")[2].strip().lower()
                if address in self.server.seen:
                    self.wfile.write(b"250 2.1.5 Ok\r\n")
                else:
                    self.server.seen.add(address)
                    self.wfile.write(b"450 4.7.1 Greylisted, try again later\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline(65536)
                    if not chunk:
                        return
                    data += chunk
                self.server.messages.append(data)
                self.wfile.write(b"250 2.0.0 Ok: queued\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                self.wfile.write(b"502 5.5.1 Not implemented\r\n")


def test_greylisting_450_is_retried(net: Net) -> None:
    grey = Greylister(("127.0.0.3", net.port))
    thread = threading.Thread(target=grey.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        send(net.sender, "alice@example.com", "dave@grey.test", subject="grey")
        net.sender.wait_for(lambda: grey.messages, timeout=20)
        assert b"Subject: grey" in grey.messages[0]
        log = net.sender.log()
        assert ("to=<dave@grey.test>, relay=mx.grey.test[127.0.0.3]:" in log
                and "status=deferred (host mx.grey.test[127.0.0.3] said: 450 4.7.1 Greylisted"
                in log)
        net.sender.wait_for(lambda: "dsn=2.0.0, status=sent" in net.sender.log())
        assert net.sender.messages("alice@example.com") == []  # no bounce
    finally:
        grey.shutdown()
        grey.server_close()


def test_unreachable_destination_expires_into_a_bounce(tmp_path: Path) -> None:
    port = free_port()
    with serve_dns(ZONE) as dns:
        sender = make_server(tmp_path, relay_config(dns.port, port, lifetime=4.0))
        sender.start()
        try:
            send(sender, "alice@example.com", "eve@down.test", subject="never")
            [bounce] = wait_bounce(sender, "alice@example.com")
            _, [group] = report(bounce)
            assert group["Action"] == "failed" and group["Status"] == "5.4.7"
            log = sender.log()
            assert "to=<eve@down.test>, relay=none" in log and "status=deferred" in log
            assert "status=bounced (message expired after" in log
        finally:
            sender.stop()


def test_a_bounce_is_never_bounced(net: Net) -> None:
    """A message from <> that fails goes to the postmaster once, and nothing answers that."""
    send(net.sender, "", "nobody@remote.test", subject="null sender")
    postmaster = net.sender.data_dir / "postmaster"
    net.sender.wait_for(lambda: "postmaster non-delivery notification" in net.sender.log(),
                        timeout=20)
    net.sender.wait_for(lambda: any(postmaster.rglob("new/*")), timeout=10)
    [raw] = [p.read_bytes() for p in postmaster.rglob("new/*")]
    notice = parse(raw)
    assert notice["Subject"].startswith("Postmaster Copy")
    assert notice.get_all("Return-Path") == ["<>"]
    net.sender.wait_for(lambda: not list((net.sender.data_dir / "queue/active").iterdir()))
    assert net.sender.log().count("non-delivery notification") == 1


def test_smtp_sink_takes_many_recipients_in_one_transaction(net: Net) -> None:
    """Postfix's smtp-sink as the remote MTA: one connection, one transaction for the domain."""
    proc = subprocess.Popen(["smtp-sink", "-u", "nobody", "-c", f"127.0.0.3:{net.port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.3", net.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        send(net.sender, "alice@example.com", "a@grey.test", "b@grey.test", "c@grey.test")
        net.sender.wait_for(lambda: net.sender.log().count("dsn=2.0.0, status=sent (250") == 3,
                            timeout=20)
        assert not list((net.sender.data_dir / "queue/active").iterdir())
    finally:
        proc.terminate()
        proc.wait(5)


def test_queue_tools_against_the_running_server(tmp_path: Path) -> None:
    """mailq, queue list/show/hold/release/flush/delete on a deferred message, through the
    server's control socket while the runner works on the queue."""
    port = free_port()
    with serve_dns(ZONE) as dns:
        sender = make_server(tmp_path, relay_config(dns.port, port))
        sender.start()
        try:
            send(sender, "alice@example.com", "eve@down.test", subject="stuck")
            sender.wait_for(lambda: "to=<eve@down.test>" in sender.log()
                            and "status=deferred" in sender.log(), timeout=20)
            [entry] = json.loads(sender.cli("queue", "list", "--json"))
            queue_id = entry["queue_id"]
            [rcpt] = entry["recipients"]
            assert rcpt["address"] == "eve@down.test" and rcpt["state"] == "deferred"
            mailq = subprocess.run(
                [str(Path(sys.executable).parent / "mailq"), "-c", str(sender.config_path)],
                capture_output=True, text=True, timeout=30, check=True).stdout
            assert queue_id in mailq and "alice@example.com" in mailq
            assert "eve@down.test" in mailq and "in 1 Request." in mailq
            shown = json.loads(sender.cli("queue", "show", queue_id, "--json"))
            assert shown["recipients"][0]["history"][0]["result"] == "deferred"
            sender.cli("queue", "hold", queue_id)
            assert (sender.data_dir / "queue" / "hold" / queue_id).exists()
            held = subprocess.run(
                [str(Path(sys.executable).parent / "mailq"), "-c", str(sender.config_path)],
                capture_output=True, text=True, timeout=30, check=True).stdout
            assert f"{queue_id}!" in held
            sender.cli("queue", "release", queue_id)
            assert (sender.data_dir / "queue" / "active" / queue_id).exists()
            sender.cli("queue", "flush")
            sender.cli("queue", "delete", queue_id)
            assert not (sender.data_dir / "queue" / "active" / queue_id).exists()
            assert "Mail queue is empty" in sender.cli("queue", "list") + subprocess.run(
                [str(Path(sys.executable).parent / "mailq"), "-c", str(sender.config_path)],
                capture_output=True, text=True, timeout=30).stdout
            sender.wait_for(lambda: f"{queue_id}: removed" in sender.log())
            assert sender.proc is not None and sender.proc.poll() is None
        finally:
            sender.stop()


def test_smarthost_with_auth_over_starttls(tmp_path: Path) -> None:
    """relayhost = [host]:port: no MX lookup; AUTH PLAIN inside STARTTLS on the relay host's
    submission port (a second postroom), which then delivers."""
    sub = free_port()
    receiver = make_server(tmp_path / "b", f"""
[[listener]]
role = "submission"
address = "127.0.0.2:{sub}"
""", host="127.0.0.2", hostname="smarthost.remote.test")
    receiver.cli("domain", "add", "remote.test")
    receiver.cli("user", "add", "carol@remote.test", "--password-stdin", stdin="carol-pw\n")
    # the smarthost's own sender rule: the login carol may send for example.com's users
    receiver.cli("user", "sender", "add", "carol@remote.test", "@example.com")
    sender = make_server(tmp_path / "a", f"""
[relay]
trusted_networks = ["127.0.0.0/8"]

[outbound]
nameservers = ["127.0.0.1"]
dns_port = 9
relayhost = "[127.0.0.2]:{sub}"
relayhost_username = "carol@remote.test"
relayhost_password = "carol-pw"
relayhost_tls = "opportunistic"

[queue]
scan_interval = 0.5
""")
    receiver.start()
    sender.start()
    try:
        send(sender, "alice@example.com", "carol@remote.test", subject="via smarthost")
        receiver.wait_for(lambda: receiver.messages("carol@remote.test"), timeout=20)
        assert parse(receiver.messages("carol@remote.test")[0])["Subject"] == "via smarthost"
        assert f"relay=127.0.0.2[127.0.0.2]:{sub}" in sender.log()
        assert "SASL PLAIN authentication succeeded, sasl_username=carol@remote.test" in (
            receiver.log())
    finally:
        sender.stop()
        receiver.stop()


def test_notify_success_for_local_and_for_a_relay_without_dsn(net: Net) -> None:
    """RFC 3461: NOTIFY=SUCCESS gets a "delivered" notice for a local mailbox, and "relayed"
    when the next hop does not take DSN (the Greylister offers no DSN); no notice when the next
    hop took NOTIFY itself (another postroom offers DSN). The local copy was written before the
    250; its notice is recorded in a queue file and sent by the queue with the relayed one."""
    grey = Greylister(("127.0.0.3", net.port))
    grey.seen.add("<dave@grey.test>")  # no greylisting for this one
    thread = threading.Thread(target=grey.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        body = (b"From: alice@example.com\r\nSubject: tell me\r\nMessage-ID: <tell@test>\r\n"
                b"\r\nplease confirm\r\n")
        with smtplib.SMTP("127.0.0.1", net.sender.port, local_hostname="c.test",
                          timeout=15) as client:
            client.sendmail("alice@example.com",
                            ["bob@example.com", "dave@grey.test", "carol@remote.test"], body,
                            rcpt_options=["NOTIFY=SUCCESS"])
        # one notice for both (the queue sends it, at the end of the message's first turn)
        [notice] = wait_bounce(net.sender, "alice@example.com", count=1)
        notices = [notice]
        actions = {}
        for notice in notices:
            assert notice["Subject"] == "Successful Mail Delivery Report"
            _, groups = report(notice)
            for group in groups:
                actions[group["Final-Recipient"]] = (group["Action"], group["Status"])
        assert actions == {"rfc822; bob@example.com": ("delivered", "2.0.0"),
                           "rfc822; dave@grey.test": ("relayed", "2.0.0")}
        net.receiver.wait_for(lambda: net.receiver.messages("carol@remote.test"))
        time.sleep(1.0)  # a notice for carol would have come by now
        assert len(net.sender.messages("alice@example.com")) == 1
        # the next hop was asked to report, as RFC 3461 4.1 wants
        [raw] = net.receiver.messages("carol@remote.test")
        assert parse(raw)["Subject"] == "tell me"
    finally:
        grey.shutdown()
        grey.server_close()


def test_delay_warning_once(tmp_path: Path) -> None:
    port = free_port()
    with serve_dns(ZONE) as dns:
        config = relay_config(dns.port, port, queue="delay_warning = 1.0")
        sender = make_server(tmp_path, config)
        sender.start()
        try:
            send(sender, "alice@example.com", "eve@down.test", subject="slow")
            [notice] = wait_bounce(sender, "alice@example.com")
            assert notice["Subject"] == "Delayed Mail (still being retried)"
            _, [group] = report(notice)
            assert group["Action"] == "delayed" and group["Status"].startswith("4.")
            assert "Will-Retry-Until" in group
            time.sleep(3.0)  # more retries, no second notice
            assert len(sender.messages("alice@example.com")) == 1
            assert "sender delay notification:" in sender.log()
        finally:
            sender.stop()


def test_a_dead_destination_is_skipped_and_does_not_hold_up_others(tmp_path: Path) -> None:
    port = free_port()
    with serve_dns(ZONE) as dns:
        receiver = remote_mx(tmp_path / "b", port)
        sender = make_server(tmp_path / "a", relay_config(
            dns.port, port, outbound="dead_destination_time = 30"))
        receiver.start()
        sender.start()
        try:
            send(sender, "alice@example.com", "eve@down.test", subject="first")
            sender.wait_for(lambda: "to=<eve@down.test>" in sender.log(), timeout=20)
            send(sender, "alice@example.com", "frank@down.test", subject="second")
            send(sender, "alice@example.com", "carol@remote.test", subject="elsewhere")
            receiver.wait_for(lambda: receiver.messages("carol@remote.test"), timeout=20)
            sender.wait_for(lambda: "to=<frank@down.test>" in sender.log(), timeout=20)
            log = sender.log()
            # the second message to the dead domain was not tried: no connect, a clear reason
            assert ("to=<frank@down.test>, relay=none" in log
                    and "status=deferred (delivery temporarily suspended: connect to "
                        "dead.fallback.test[127.0.0.4]" in log)
        finally:
            sender.stop()
            receiver.stop()


def test_a_transport_override_skips_the_mx_lookup(tmp_path: Path) -> None:
    port = free_port()
    with serve_dns(ZONE) as dns:
        receiver = remote_mx(tmp_path / "b", port)
        sender = make_server(tmp_path / "a", relay_config(
            dns.port, 9, outbound=f'transports = {{ "remote.test" = "[127.0.0.2]:{port}" }}'))
        receiver.start()
        sender.start()
        try:
            send(sender, "alice@example.com", "carol@remote.test", subject="routed")
            receiver.wait_for(lambda: receiver.messages("carol@remote.test"), timeout=20)
            assert f"relay=127.0.0.2[127.0.0.2]:{port}" in sender.log()
            assert not any(name == "remote.test" for name, _ in dns.queries)
        finally:
            sender.stop()
            receiver.stop()


def test_a_bounce_reaches_a_sender_with_a_quota(net: Net) -> None:
    """Routing a notice to a mailbox with a quota needs its usage counted (off the loop)."""
    net.sender.cli("user", "quota", "alice@example.com", "100M")
    send(net.sender, "alice@example.com", "nobody@remote.test", subject="quota bounce")
    [bounce] = wait_bounce(net.sender, "alice@example.com")
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"
    net.sender.wait_for(lambda: not list((net.sender.data_dir / "queue/active").iterdir()))
    assert "queue run failed" not in net.sender.log()


def test_a_bounce_to_a_full_mailbox_waits_in_the_queue(net: Net) -> None:
    """alice's mailbox is over its quota when her bounce is made: the notice is queued for her
    (4.2.2, as Postfix's local delivery defers it), not dropped, and arrives once there is
    room."""
    net.sender.cli("user", "quota", "alice@example.com", "1K")
    maildir = net.sender.data_dir / "mail" / "example.com" / "alice" / "new"
    maildir.mkdir(parents=True, exist_ok=True)
    (maildir / "1.big.mx:2,").write_bytes(b"Subject: filler\n\n" + b"x" * 4096)
    (net.sender.data_dir / "mail" / "example.com" / "alice" / "maildirsize").unlink(
        missing_ok=True)  # counted afresh: over quota
    send(net.sender, "alice@example.com", "nobody@remote.test", subject="bounce to full")
    net.sender.wait_for(lambda: "sender non-delivery notification:" in net.sender.log(),
                        timeout=20)
    notice_id = net.sender.log().split("sender non-delivery notification: ")[1].split()[0]
    listing = json.loads(net.sender.cli("queue", "list", "--json"))
    [queued] = [m for m in listing if m["queue_id"] == notice_id]
    [rcpt] = queued["recipients"]
    assert (queued["sender"], rcpt["address"] if "address" in rcpt else rcpt["original"]) == (
        "", "alice@example.com")
    assert rcpt["state"] == "deferred" and "quota" in (rcpt["last_error"] or "")
    assert len(net.sender.messages("alice@example.com")) == 1  # only the filler
    net.sender.cli("user", "quota", "alice@example.com", "0")
    net.sender.cli("queue", "flush", notice_id)
    [bounce] = [m for m in wait_bounce(net.sender, "alice@example.com", count=2)
                if m["Subject"] != "filler"]
    assert bounce["Subject"] == "Undelivered Mail Returned to Sender"


def test_with_two_workers_queued_mail_goes_out_at_once(tmp_path: Path) -> None:
    """The queue runner lives in worker 0; the other worker hands it the id of each message it
    queues, so that mail does not wait for the next periodic scan (a minute here)."""
    port = free_port()
    with serve_dns(ZONE) as dns:
        receiver = remote_mx(tmp_path / "b", port)
        config = relay_config(dns.port, port).replace("scan_interval = 0.5", "scan_interval = 60")
        sender = make_server(tmp_path / "a", config, server_extra="workers = 2")
        receiver.start()
        sender.start()
        try:
            time.sleep(1.0)  # the first scans are over
            # connections open at once, in rounds until each worker has taken some (which
            # process accepts is the kernel's choice)
            sent = 0
            pids: set[str] = set()
            for _ in range(10):
                clients = [smtplib.SMTP("127.0.0.1", sender.port, local_hostname="c.test",
                                        timeout=15) for _ in range(6)]
                for client in clients:
                    with client:
                        client.sendmail("alice@example.com", ["carol@remote.test"],
                                        f"Subject: w{sent}\r\nMessage-ID: <w{sent}@test>\r\n"
                                        "\r\nhi\r\n")
                    sent += 1
                pids = {line.split("]:")[0].rsplit("[", 1)[1]
                        for line in sender.log().splitlines() if "client=" in line}
                if len(pids) == 2:
                    break
            assert len(pids) == 2, "both workers took some of the mail"
            receiver.wait_for(lambda: len(receiver.messages("carol@remote.test")) == sent,
                              timeout=15)
        finally:
            sender.stop()
            receiver.stop()


def test_a_success_notice_owed_at_a_crash_is_sent_after_it(net: Net) -> None:
    """The delivery of dave@grey.test (NOTIFY=SUCCESS, a next hop without DSN) was saved, then
    the server died before the "relayed" notice was spooled: the queue file says a notice is
    owed, so the restart sends it rather than dropping the message."""
    from postroom.ids import new_queue_id
    from postroom.policy.routes import RemoteDelivery
    from postroom.queue.envelope import Envelope, Recipient, RecipientState

    net.sender.stop()
    queue_id = new_queue_id()
    recipient = Recipient("dave@grey.test", RemoteDelivery("dave@grey.test"),
                          notify=frozenset({"SUCCESS"}), state=RecipientState.DELIVERED,
                          attempts=1, status="2.0.0", success="relayed")
    envelope = Envelope(queue_id, "alice@example.com", time.time() - 5, recipients=[recipient],
                        queued=time.time() - 5)
    message = (b"Received: from c.test\r\nFrom: alice@example.com\r\nSubject: crash\r\n"
               b"Message-ID: <crash@test>\r\n\r\nbody\r\n")
    path = net.sender.data_dir / "queue" / "active" / queue_id
    path.write_bytes(envelope.to_json().encode() + b"\n" + message)
    net.sender.start()
    [notice] = wait_bounce(net.sender, "alice@example.com")
    assert notice["Subject"] == "Successful Mail Delivery Report"
    _, [group] = report(notice)
    assert (group["Final-Recipient"], group["Action"]) == ("rfc822; dave@grey.test", "relayed")
    net.sender.wait_for(lambda: not path.exists(), timeout=10)


def test_a_queue_process_of_its_own_relays_what_the_worker_queues(tmp_path: Path) -> None:
    """server.queue_process: the worker takes the mail and hands each queue id to the queue
    manager's process, which relays it at once (no scan: a minute here), answers the queue
    tools, and is started again when it dies."""
    port = free_port()
    with serve_dns(ZONE) as dns:
        receiver = remote_mx(tmp_path / "b", port)
        config = relay_config(dns.port, port).replace("scan_interval = 0.5", "scan_interval = 60")
        sender = make_server(tmp_path / "a", config, server_extra="queue_process = true")
        receiver.start()
        sender.start()
        try:
            time.sleep(1.0)  # the first scan is over
            for n in range(6):
                send(sender, "alice@example.com", "carol@remote.test", subject=f"q{n}")
            receiver.wait_for(lambda: len(receiver.messages("carol@remote.test")) == 6,
                              timeout=15)

            def pids(marker: str) -> set[str]:
                return {line.split("]:")[0].rsplit("[", 1)[1]
                        for line in sender.log().splitlines() if marker in line}

            [intake] = pids("client=")
            [relay] = pids("status=sent")
            assert intake != relay, "the queue manager is a process of its own"
            assert json.loads(sender.cli("queue", "list", "--json")) == []
            # the control socket is the queue manager's: a change goes through it
            assert json.loads(sender.cli("queue", "flush", "ALL", "--json"))["via"] == "server"
            os.kill(int(relay), signal.SIGKILL)
            sender.wait_for(lambda: "(queue manager)" in sender.log().split(
                f"(pid {relay}) died", 1)[-1], timeout=15)
            send(sender, "alice@example.com", "carol@remote.test", subject="after")
            receiver.wait_for(lambda: len(receiver.messages("carol@remote.test")) == 7,
                              timeout=20)
        finally:
            sender.stop()
            receiver.stop()
