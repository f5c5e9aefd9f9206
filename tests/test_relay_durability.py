"""The queue survives SIGKILL (issue 4): relaying, a postroom is killed at random moments and
restarted, and at the end every recipient has its message; the only duplicates are of
deliveries that were under way when a kill came (RFC 5321 6.1: a duplicate rather than a loss).

The remote MX hosts are :class:`RecordingMx` servers on 127.0.0.2 and 127.0.0.3 that note every
(Message-ID, recipient) they took, just before their ``250`` to the final dot, as a real MTA
commits before it answers. Between the kills the test reads the sender's queue files the way a
restart will: none may be torn, none may call a recipient delivered that the MX never took, and a
message gone from the queue must have reached all its recipients.

Under strace, the runner's record of an attempt (``attempts`` + 1, appended to the attempt
journal and fsynced) is shown to come before the connect() to the MX: a crash during the delivery
can never make the retry forget that attempt. The kill test reads the queue after applying the
journal, as the restart does.
"""

from __future__ import annotations

import collections
import os
import random
import re
import shutil
import signal
import smtplib
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from postroom.queue import journal
from postroom.queue.envelope import RecipientState
from postroom.queue.runner import ATTEMPT_UNDER_WAY
from postroom.queue.spool import read_envelope
from tests.conftest import ServerHandle, free_port, make_server, wait_port
from tests.dns_support import serve_dns
from tests.relay_support import relay_config
from tests.test_durability import completed_calls

pytestmark = pytest.mark.slow

ZONE = {
    "r1.test": ["MX 10 mx.r1.test."],
    "mx.r1.test": ["A 127.0.0.2"],
    "r2.test": ["MX 10 mx.r2.test."],
    "mx.r2.test": ["A 127.0.0.3"],
}
#: Deliveries at once per destination: what a kill can catch in flight, per domain.
CONCURRENCY = 2

Key = tuple[str, str]  # (Message-ID, recipient address)
OUTBOUND = f"dead_destination_time = 0\nmax_per_destination = {CONCURRENCY}"


def sender_config(dns_port: int, mx_port: int) -> str:
    return relay_config(dns_port, mx_port, min_backoff=0.5, max_backoff=1.0, outbound=OUTBOUND)


# ---- the receiving side ---------------------------------------------------------------------

class Recorder:
    """What the MX hosts took: one entry per (Message-ID, recipient) per accepted transaction."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.accepted: list[Key] = []

    def counts(self) -> collections.Counter[Key]:
        with self.lock:
            return collections.Counter(self.accepted)

    def has(self, key: Key) -> bool:
        with self.lock:
            return key in self.accepted


class RecordingMx(socketserver.ThreadingTCPServer):
    """A plain SMTP server (no PIPELINING, no TLS) that records what it accepts.

    ``delay`` seconds pass between the final dot and the record + ``250``, to widen the window
    in which a kill finds a transaction in flight; addresses in ``greylist`` get a ``450`` to
    their first RCPT; while ``gate`` is clear, DATA waits (``at_gate`` is set when one does)."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, address: tuple[str, int], recorder: Recorder, *, delay: float = 0.0,
                 greylist: frozenset[str] = frozenset()) -> None:
        self.recorder = recorder
        self.delay = delay
        self.greylist = set(greylist)
        self.gate = threading.Event()
        self.gate.set()
        self.at_gate = threading.Event()
        self.name = f"mx-{address[0]}"
        super().__init__(address, _MxHandler)


class _MxHandler(socketserver.StreamRequestHandler):
    server: RecordingMx

    def reply(self, text: str) -> None:
        self.wfile.write(text.encode() + b"\r\n")

    def handle(self) -> None:
        try:
            self._session()
        except OSError:  # the sender was killed mid-session
            pass

    def _session(self) -> None:
        srv = self.server
        self.reply(f"220 {srv.name} ESMTP")
        rcpts: list[str] = []
        while line := self.rfile.readline(4096):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                rcpts = []
                self.reply(f"250 {srv.name}")
            elif verb in (b"MAIL", b"RSET"):
                rcpts = []
                self.reply("250 2.0.0 Ok")
            elif verb == b"RCPT":
                address = line.decode().partition(":")[2].strip().strip("<>").lower()
                with srv.recorder.lock:
                    grey = address in srv.greylist
                    srv.greylist.discard(address)
                if grey:
                    self.reply("450 4.7.1 Greylisted, try again later")
                else:
                    rcpts.append(address)
                    self.reply("250 2.1.5 Ok")
            elif verb == b"DATA":
                if not rcpts:
                    self.reply("503 5.5.1 No valid recipients")
                    continue
                if not srv.gate.is_set():
                    srv.at_gate.set()
                    srv.gate.wait()
                self.reply("354 End data with <CR><LF>.<CR><LF>")
                data = b""
                while not data.endswith(b"\r\n.\r\n"):
                    chunk = self.rfile.readline(65536)
                    if not chunk:
                        return  # cut off before the dot: nothing was accepted
                    data += chunk
                found = re.search(rb"^Message-ID:\s*<([^>]+)>", data, re.MULTILINE | re.IGNORECASE)
                msgid = found.group(1).decode() if found else "?"
                time.sleep(srv.delay)
                with srv.recorder.lock:
                    srv.recorder.accepted.extend((msgid, rcpt) for rcpt in rcpts)
                rcpts = []
                self.reply("250 2.0.0 Ok: queued")
            elif verb == b"NOOP":
                self.reply("250 2.0.0 Ok")
            elif verb == b"QUIT":
                self.reply("221 2.0.0 Bye")
                return
            else:
                self.reply("502 5.5.1 Not implemented")


@contextmanager
def recording_mxs(port: int, recorder: Recorder, *, delay: float = 0.0,
                  greylist: frozenset[str] = frozenset()) -> Iterator[list[RecordingMx]]:
    """One RecordingMx on 127.0.0.2 (r1.test) and one on 127.0.0.3 (r2.test), on *port*."""
    servers = [RecordingMx((host, port), recorder, delay=delay, greylist=greylist)
               for host in ("127.0.0.2", "127.0.0.3")]
    threads = [threading.Thread(target=s.serve_forever, args=(0.05,), daemon=True)
               for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers
    finally:
        for server in servers:
            server.gate.set()
            server.shutdown()
            server.server_close()


# ---- the sending side -----------------------------------------------------------------------

def block_maildir(server: ServerHandle, address: str) -> Path:
    """Put a plain file where *address*'s Maildir goes, so every delivery to it fails (even as
    root) and waits in the queue; remove the file to let the runner deliver."""
    maildir = server.maildir(address)
    shutil.rmtree(maildir, ignore_errors=True)
    maildir.parent.mkdir(parents=True, exist_ok=True)
    maildir.write_text("not a Maildir\n")
    return maildir


def maildir_ids(server: ServerHandle, address: str) -> collections.Counter[str]:
    """How many copies of each Message-ID are in *address*'s Maildir (new/)."""
    counts: collections.Counter[str] = collections.Counter()
    new = server.maildir(address) / "new"
    if new.is_dir():
        for path in new.iterdir():
            found = re.search(rb"^Message-ID:\s*<([^>]+)>", path.read_bytes(),
                              re.MULTILINE | re.IGNORECASE)
            counts[found.group(1).decode() if found else "?"] += 1
    return counts


def queue_files(server: ServerHandle, sub: str = "active") -> list[Path]:
    path = server.data_dir / "queue" / sub
    return sorted(path.iterdir()) if path.is_dir() else []


def message_ids_by_queue_id(server: ServerHandle) -> dict[str, str]:
    return dict(re.findall(r": (\w+): message-id=<([^>]+)>", server.log()))


# ---- the test under kills -------------------------------------------------------------------

MESSAGES = 60
KILLS = 5
LOCAL_FAST = "bob@example.com"  # written into its Maildir while the message is received
LOCAL_QUEUED = "carol@example.com"  # its Maildir is blocked then: delivered by the runner


def remote_recipients(n: int) -> list[str]:
    return [f"u{n}a@r1.test", f"u{n}b@r1.test", f"u{n}@r2.test"]


def expected_keys() -> set[Key]:
    return {(f"m{n}@durability.test", rcpt)
            for n in range(MESSAGES) for rcpt in [LOCAL_QUEUED, *remote_recipients(n)]}


def test_sigkill_while_relaying_loses_no_recipient(tmp_path: Path) -> None:
    rng = random.Random(5321)
    recorder = Recorder()
    port = free_port()
    greylist = frozenset(f"u{n}@r2.test" for n in range(0, MESSAGES, 7))
    with serve_dns(ZONE) as dns, recording_mxs(port, recorder, delay=0.15, greylist=greylist):
        sender = make_server(tmp_path, sender_config(dns.port, port))
        sender.cli("user", "add", LOCAL_QUEUED, "--password-stdin", stdin="c\n")
        blocked = block_maildir(sender, LOCAL_QUEUED)
        sender.start()
        flagged: collections.Counter[Key] = collections.Counter()  # under way at a kill
        in_flight: list[int] = []
        started = time.monotonic()
        try:
            with smtplib.SMTP("127.0.0.1", sender.port, local_hostname="c.test",
                              timeout=30) as client:
                for n in range(MESSAGES):
                    rcpts = [LOCAL_FAST, LOCAL_QUEUED, *remote_recipients(n)]
                    client.sendmail("alice@example.com", rcpts, (
                        f"From: alice@example.com\r\nTo: {', '.join(rcpts)}\r\n"
                        f"Subject: durable {n}\r\nMessage-ID: <m{n}@durability.test>\r\n\r\n"
                        f"message {n}\r\n").encode())
            msgids = message_ids_by_queue_id(sender)
            assert len(msgids) == MESSAGES
            injected = time.monotonic() - started
            blocked.unlink()  # from now on the runner can deliver to carol
            while len(in_flight) < KILLS and queue_files(sender):
                time.sleep(rng.uniform(0.2, 0.8))
                sender.kill()
                keys = check_queue_after_kill(sender, recorder, msgids)
                flagged.update(keys)
                in_flight.append(len(keys))
                sender.start()
            sender.wait_for(lambda: not queue_files(sender)
                            and expected_keys() <= set(recorder.counts()) | {
                                (m, LOCAL_QUEUED) for m in maildir_ids(sender, LOCAL_QUEUED)},
                            timeout=60)
            sender.stop()
        finally:
            if sender.proc is not None:
                sender.stop()
    elapsed = time.monotonic() - started
    received = recorder.counts()
    for msgid, copies in maildir_ids(sender, LOCAL_QUEUED).items():
        received[(msgid, LOCAL_QUEUED)] = copies
    expected = expected_keys()
    lost = sorted(expected - set(received))
    strays = sorted(set(received) - expected)
    duplicates = {key: count - 1 for key, count in received.items() if count > 1}
    unexplained = {key: extra for key, extra in duplicates.items() if extra > flagged[key]}
    kills = len(in_flight)
    # what a kill can catch in flight: per destination CONCURRENCY transactions, with two
    # recipients each at r1.test and one at r2.test; local copies are saved as soon as written
    bound = kills * CONCURRENCY * 3
    fast = maildir_ids(sender, LOCAL_FAST)
    print(f"\nmessages={MESSAGES} recipients={len(expected)} kills={kills} "
          f"under-way-at-kill={in_flight} duplicates={sum(duplicates.values())} "
          f"(remote {sum(v for k, v in duplicates.items() if k[1] != LOCAL_QUEUED)}, "
          f"local {sum(v for k, v in duplicates.items() if k[1] == LOCAL_QUEUED)}; "
          f"bound kills x concurrency x recipients per message = {bound}) "
          f"leftover temporary files={len(queue_files(sender, 'incoming'))} "
          f"injected in {injected:.1f}s, all delivered after {elapsed:.1f}s")
    assert lost == [], f"lost: {lost[:10]}"
    assert sum(duplicates.values()) <= bound
    assert strays == []
    assert unexplained == {}, f"duplicates of deliveries that were not under way: {unexplained}"
    assert fast == {f"m{n}@durability.test": 1 for n in range(MESSAGES)}
    assert queue_files(sender) == [] and queue_files(sender, "hold") == []
    assert queue_files(sender, "corrupt") == []  # no queue file was ever torn
    assert sender.messages("alice@example.com") == []  # no bounce, no delay notice
    assert sum(1 for n in in_flight if n) >= 3, "too few kills caught a delivery in flight"


def check_queue_after_kill(sender: ServerHandle, recorder: Recorder,
                           msgids: dict[str, str]) -> list[Key]:
    """Read the queue as a restart will (the attempt journal applied first); return the
    recipients whose attempt was under way."""
    journal.recover(sender.data_dir / "queue", wait=10)  # the killed processes let go of it
    under_way: list[Key] = []
    local = maildir_ids(sender, LOCAL_QUEUED)
    queued: set[str] = set()
    for path in queue_files(sender):
        envelope = read_envelope(path)  # a torn file raises
        msgid = msgids[envelope.queue_id]
        queued.add(msgid)
        for recipient in envelope.recipients:
            key = (msgid, recipient.address)
            if recipient.state is RecipientState.DELIVERED:
                got = local[msgid] > 0 if recipient.address == LOCAL_QUEUED else recorder.has(key)
                assert got, f"{key} is marked delivered but never arrived"
            assert recipient.state is not RecipientState.BOUNCED, (key, recipient.last_error)
            if recipient.last_error == ATTEMPT_UNDER_WAY:
                under_way.append(key)
    received = recorder.counts()
    for n in range(MESSAGES):
        msgid = f"m{n}@durability.test"
        if msgid in queued or msgid not in msgids.values():
            continue
        assert local[msgid] > 0, f"{msgid} left the queue but never reached {LOCAL_QUEUED}"
        for rcpt in remote_recipients(n):
            assert received[(msgid, rcpt)] > 0, f"{msgid} left the queue but never reached {rcpt}"
    return under_way


# ---- one finished delivery, one slow destination, a kill ------------------------------------

def test_a_finished_delivery_is_not_repeated_after_a_kill(tmp_path: Path) -> None:
    """carol (local, through the runner) and u@r1.test are delivered, v@r2.test hangs at DATA;
    a kill now must not deliver carol's and u's copies a second time: they were finished."""
    recorder = Recorder()
    port = free_port()
    msgid = "slow-one@durability.test"
    with serve_dns(ZONE) as dns:
        sender = make_server(tmp_path, sender_config(dns.port, port))
        sender.cli("user", "add", LOCAL_QUEUED, "--password-stdin", stdin="c\n")
        blocked = block_maildir(sender, LOCAL_QUEUED)
        sender.start()
        try:
            rcpts = [LOCAL_QUEUED, "u@r1.test", "v@r2.test"]
            with smtplib.SMTP("127.0.0.1", sender.port, local_hostname="c.test",
                              timeout=30) as client:
                client.sendmail("alice@example.com", rcpts,
                                f"Subject: slow\r\nMessage-ID: <{msgid}>\r\n\r\nbody\r\n".encode())
            # no MX listens yet: both remote recipients are deferred, carol too (her Maildir)
            sender.wait_for(lambda: sender.log().count("status=deferred") >= 3, timeout=15)
            sender.stop()
            blocked.unlink()
            with recording_mxs(port, recorder) as (_, slow):
                slow.gate.clear()
                time.sleep(1.2)  # past every next_attempt: one run takes all three
                sender.start()
                assert slow.at_gate.wait(15), "v@r2.test was never tried"
                sender.wait_for(lambda: recorder.has((msgid, "u@r1.test"))
                                and maildir_ids(sender, LOCAL_QUEUED)[msgid] == 1, timeout=15)
                time.sleep(0.3)  # time enough for any record the runner makes at this point
                sender.kill()
                [path] = queue_files(sender)
                states = {r.address: (r.state.value, r.last_error)
                          for r in read_envelope(path).recipients}
                slow.gate.set()
                sender.start()
                sender.wait_for(lambda: not queue_files(sender), timeout=20)
                sender.stop()
        finally:
            if sender.proc is not None:
                sender.stop()
    print(f"\nqueue file at the kill: {states}")
    assert recorder.counts()[(msgid, "v@r2.test")] == 1
    assert (recorder.counts()[(msgid, "u@r1.test")], maildir_ids(sender, LOCAL_QUEUED)[msgid]) \
        == (1, 1), f"finished deliveries repeated after the kill; queue file then: {states}"


# ---- the order of the attempt record and the connect() --------------------------------------

@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_attempt_is_durable_before_the_connect(tmp_path: Path) -> None:
    recorder = Recorder()
    port = free_port()
    trace_file = tmp_path / "strace.txt"
    with serve_dns(ZONE) as dns, recording_mxs(port, recorder):
        handle = make_server(tmp_path / "sender", sender_config(dns.port, port))
        handle.proc = subprocess.Popen(
            ["strace", "-f", "-y", "-s", "4096", "-o", str(trace_file),
             "-e", "trace=write,pwrite64,fsync,fdatasync,rename,renameat,renameat2,connect",
             sys.executable, "-m", "postroom", "-c", str(handle.config_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_port(handle.port, handle.proc, timeout=60)
            with smtplib.SMTP("127.0.0.1", handle.port, local_hostname="c.test",
                              timeout=30) as client:
                client.sendmail("alice@example.com", ["x@r1.test"],
                                b"Subject: traced\r\nMessage-ID: <traced@durability.test>\r\n"
                                b"\r\nbody\r\n")
            handle.wait_for(lambda: recorder.has(("traced@durability.test", "x@r1.test")),
                            timeout=30)
            handle.wait_for(lambda: not queue_files(handle), timeout=30)
        finally:
            tracer = handle.proc
            children = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()
            for child in children:
                os.kill(int(child), signal.SIGTERM)
            tracer.wait(30)
            handle.proc = None
    calls = completed_calls(trace_file.read_text())
    queue = str(handle.data_dir / "queue")
    connect_at = next(i for i, (name, args) in enumerate(calls)
                      if name == "connect" and f"htons({port})" in args and "127.0.0.2" in args)
    # the last attempt record appended before the connect, and what it says
    journal_dir = f"{queue}/journal"
    writes = [(i, args) for i, (name, args) in enumerate(calls[:connect_at])
              if name in ("write", "pwrite64") and f"<{journal_dir}/" in args]
    assert writes, "no attempt record was written before the connect"
    write_at, written = writes[-1]
    segment = re.search(rf"<({re.escape(journal_dir)}/[^>]+\.log)>", written)
    assert segment, written
    assert re.search(r'\\"attempts\\":1\b', written), written[:600]
    assert ATTEMPT_UNDER_WAY in written
    fsync_at = next(i for i, (name, args) in enumerate(calls)
                    if i > write_at and name in ("fsync", "fdatasync")
                    and f"<{segment.group(1)}>" in args)
    # the segment is new in this process: its name is made durable too
    dir_sync_at = next(i for i, (name, args) in enumerate(calls)
                       if i > write_at and name == "fsync" and f"<{journal_dir}>" in args)
    assert write_at < fsync_at < connect_at and dir_sync_at < connect_at, (
        write_at, fsync_at, dir_sync_at, connect_at)
    # and no queue file was rewritten for it: the only file renamed into active/ is intake's
    renames = [args for name, args in calls[:connect_at]
               if name.startswith("rename") and f'"{queue}/active/' in args]
    assert renames == [], renames
