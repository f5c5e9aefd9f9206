"""The spool: incoming data, durable acceptance (fast path and queue file), the queue files."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import hashlib
import json
import logging
import mailbox
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.delivery.maildir import MaildirUsage
from postroom.errors import StorageError
from postroom.policy.routes import LocalDelivery, RemoteDelivery
from postroom.queue.committer import Committer, Disk
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.incoming import IncomingMessage
from postroom.queue.spool import (
    AcceptError,
    AcceptResult,
    Spool,
    read_envelope,
)

CONTENT = b"From: a@example.org\r\nSubject: test\r\nMessage-ID: <1@x>\r\n\r\nHello\r\n.dot\r\n"
PREPEND = b"Received: from client (client [192.0.2.1])\r\n\tby mx.example.com; today\r\n"
NOW = 1_732_900_000.0


class PathDisk(Disk):
    """Real calls; remembers which path each fd belongs to, and fails on chosen directories.

    ``full_in``: writes there fail with ENOSPC; ``fsync_fails_in``: fsyncs of files there fail with
    ``fsync_errno`` (in phase 2 of the round); ``fail_dir_sync``: that directory's fsync fails.
    """

    def __init__(
        self,
        *,
        full_in: Path | None = None,
        fail_dir_sync: Path | None = None,
        fsync_fails_in: Path | None = None,
        fsync_errno: int = errno.EIO,
    ) -> None:
        self.paths: dict[int, str] = {}
        self.full_in = full_in
        self.fail_dir_sync = fail_dir_sync
        self.fsync_fails_in = fsync_fails_in
        self.fsync_errno = fsync_errno
        self.dir_syncs: list[str] = []

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        if self.full_in is not None and self.paths[fd].startswith(str(self.full_in)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self.fsync_fails_in is not None and self.paths[fd].startswith(str(self.fsync_fails_in)):
            raise OSError(self.fsync_errno, os.strerror(self.fsync_errno))
        super().fsync(fd)

    def fsync_dir(self, path: str) -> None:
        if self.fail_dir_sync is not None and path == str(self.fail_dir_sync):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync_dir(path)
        self.dir_syncs.append(path)


@pytest.fixture
def committer() -> Iterator[Committer]:
    c = Committer()
    c.start()
    yield c
    c.stop()


def make_spool(tmp_path: Path, committer: Committer, disk: Disk | None = None) -> Spool:
    return Spool(
        tmp_path / "data",
        committer,
        MaildirUsage(),
        "mx.example.com",
        disk=disk or Disk(),
        clock=lambda: NOW + 5,
        first_retry=300.0,
    )


def local(tmp_path: Path, user: str, quota: int = 0, original: str | None = None) -> Recipient:
    mailbox_name = f"{user}@example.com"
    return Recipient(
        original or mailbox_name,
        LocalDelivery(mailbox_name, tmp_path / "mail" / user / "Maildir", quota),
    )


def remote(address: str) -> Recipient:
    return Recipient(address, RemoteDelivery(address))


def envelope(*recipients: Recipient, sender: str = "a@example.org") -> Envelope:
    return Envelope(
        queue_id="4Q8X2B0C1DFG",
        sender=sender,
        arrival=NOW,
        client_address="192.0.2.1",
        recipients=list(recipients),
    )


def message_of(spool: Spool, *parts: bytes) -> IncomingMessage:
    message = spool.open_message()
    for part in parts:
        message.write(part)
    return message


def accept(spool: Spool, env: Envelope, message: IncomingMessage) -> AcceptResult:
    return asyncio.run(spool.accept(env, message, PREPEND))


def maildir_files(root: Path) -> list[Path]:
    return sorted((root / "new").iterdir()) if (root / "new").exists() else []


def expected_maildir(mailbox_name: str, sender: str = "a@example.org") -> bytes:
    whole = (
        f"Return-Path: <{sender}>\r\nDelivered-To: {mailbox_name}\r\n".encode() + PREPEND + CONTENT
    )
    return whole.replace(b"\r\n", b"\n")


# ---- IncomingMessage ------------------------------------------------------------------------


def test_incoming_small_stays_in_memory(tmp_path: Path) -> None:
    message = IncomingMessage(tmp_path)
    for line in CONTENT.splitlines(keepends=True):
        message.write(line)
    message.seal()
    assert message.spill_path is None and os.listdir(tmp_path) == []
    assert message.size == len(CONTENT)
    assert b"".join(message.chunks()) == CONTENT
    assert message.header_section() == CONTENT[: CONTENT.index(b"\r\n\r\n") + 2]


def test_incoming_spills_past_threshold(tmp_path: Path) -> None:
    message = IncomingMessage(tmp_path, memory_limit=1000)
    data = CONTENT + b"x" * 5000 + b"\r\n"
    for i in range(0, len(data), 100):
        message.write(data[i : i + 100])
    message.seal()
    assert message.spill_path is not None and message.spill_path.parent == tmp_path
    assert b"".join(message.chunks()) == data
    message.discard()
    assert os.listdir(tmp_path) == []
    message.discard()  # idempotent


@pytest.mark.parametrize(
    ("parts", "header"),
    [
        ([b"A: 1\r\nB: 2\r\n\r\nbody\r\n"], b"A: 1\r\nB: 2\r\n"),
        ([b"A: 1\r\n", b"\r", b"\n", b"body\r\n"], b"A: 1\r\n"),  # end split over writes
        ([b"A: 1\r\n\r", b"\nbody\r\n\r\n"], b"A: 1\r\n"),
        ([b"\r\nbody\r\n"], b""),  # no header fields
        ([b"A: 1\r\nB: 2\r\n"], b"A: 1\r\nB: 2\r\n"),  # no body
    ],
)
def test_header_section(tmp_path: Path, parts: list[bytes], header: bytes) -> None:
    message = IncomingMessage(tmp_path)
    for part in parts:
        message.write(part)
    assert message.header_section() == header


def test_header_section_is_bounded(tmp_path: Path) -> None:
    message = IncomingMessage(tmp_path, header_limit=100)
    for _ in range(1000):
        message.write(b"X-Long: " + b"y" * 50 + b"\r\n")
    assert len(message.header_section()) == 100


def test_fifty_megabytes_in_bounded_memory(tmp_path: Path) -> None:
    line = b"x" * 78 + b"\r\n"
    chunk = line * 800  # 64,000 octets, as a session hands over DataChunks
    total = 50 * 1024 * 1024 // len(chunk)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        message = IncomingMessage(tmp_path)
        message.write(b"Subject: big\r\n\r\n")
        digest.update(b"Subject: big\r\n\r\n")
        for _ in range(total):
            message.write(chunk)
            digest.update(chunk)
        message.seal()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert message.size == 16 + total * len(chunk) > 50_000_000
    assert peak < 1_500_000, peak  # 256 KiB in memory, 64 KiB write buffer, some slack
    check = hashlib.sha256()
    for block in message.chunks():
        check.update(block)
    assert check.digest() == digest.digest()
    message.discard()
    assert os.listdir(tmp_path) == []


def test_fifty_megabytes_accepted_in_bounded_memory(tmp_path: Path, committer: Committer) -> None:
    spool = make_spool(tmp_path, committer)
    chunk = (b"x" * 78 + b"\r\n") * 800
    message = message_of(spool, b"Subject: big\r\n\r\n", *[chunk] * 820)
    env = envelope(local(tmp_path, "alice"), remote("carol@example.net"))
    tracemalloc.start()
    try:
        result = accept(spool, env, message)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8_000_000, peak  # read and written in blocks of 1 MiB, whatever the size
    body = len(PREPEND) + 16 + 820 * len(chunk)  # > 50 MB
    line_ends = PREPEND.count(b"\r\n") + 2 + 820 * 800
    assert result.queue_file is not None
    assert spool.body_size(result.queue_file) == body
    [copy] = result.delivered
    assert copy.delivered is not None
    head = len(b"Return-Path: <a@example.org>\nDelivered-To: alice@example.com\n")
    assert copy.delivered.stat().st_size == head + body - line_ends


def test_spill_failure_is_kept_for_accept(tmp_path: Path) -> None:
    message = IncomingMessage(tmp_path / "missing", memory_limit=10)
    message.write(b"Subject: x\r\n\r\n")
    message.write(b"more than ten octets\r\n")  # cannot spill: the directory does not exist
    assert message.error is not None
    with pytest.raises(StorageError):
        message.seal()


# ---- accept ---------------------------------------------------------------------------------


def test_fast_path_local(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(tmp_path, committer)
    alice = local(tmp_path, "alice")
    env = envelope(alice)
    with caplog.at_level(logging.INFO, logger="postroom"):
        result = accept(spool, env, message_of(spool, CONTENT))
    assert result.queue_file is None and os.listdir(spool.active) == []
    [outcome] = result.delivered
    assert outcome.dsn == "2.0.0" and outcome.recipient is alice
    assert alice.state is RecipientState.DELIVERED
    assert isinstance(alice.destination, LocalDelivery)
    [path] = maildir_files(alice.destination.maildir)
    assert outcome.delivered == path
    assert path.read_bytes() == expected_maildir("alice@example.com")
    box = mailbox.Maildir(str(alice.destination.maildir), factory=None, create=False)
    assert [box.get_bytes(k) for k in box.iterkeys()] == [expected_maildir("alice@example.com")]
    assert env.size == len(CONTENT)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "4Q8X2B0C1DFG: to=<alice@example.com>, relay=local, delay=5, dsn=2.0.0, "
        "status=sent (delivered to maildir)",
        "4Q8X2B0C1DFG: removed",
    ]
    assert os.listdir(spool.incoming) == []


def test_same_maildir_gets_one_copy(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(tmp_path, committer)
    direct = local(tmp_path, "bob")
    tagged = local(tmp_path, "bob", original="bob+news@example.com")
    with caplog.at_level(logging.INFO, logger="postroom"):
        result = accept(spool, envelope(direct, tagged), message_of(spool, CONTENT))
    assert isinstance(direct.destination, LocalDelivery)
    files = maildir_files(direct.destination.maildir)
    assert len(files) == 1
    assert [o.delivered for o in result.delivered] == [files[0], files[0]]
    assert "to=<bob@example.com>, orig_to=<bob+news@example.com>, relay=local" in caplog.text


def test_remote_goes_to_queue_file(tmp_path: Path, committer: Committer) -> None:
    spool = make_spool(tmp_path, committer)
    alice = local(tmp_path, "alice")
    env = envelope(alice, remote("carol@example.net"))
    result = accept(spool, env, message_of(spool, CONTENT[:10], CONTENT[10:]))
    assert result.queue_file == spool.active / "4Q8X2B0C1DFG"
    assert [o.queued for o in result.outcomes] == [False, True]
    data = result.queue_file.read_bytes()
    line, _, body = data.partition(b"\n")
    assert body == PREPEND + CONTENT  # byte for byte, CRLF
    queued = json.loads(line)
    assert [r["original"] for r in queued["recipients"]] == ["carol@example.net"]
    assert queued["recipients"][0]["state"] == "pending"
    assert queued["size"] == len(CONTENT)
    assert os.listdir(spool.incoming) == []
    [(loaded, path)] = spool.load_queue()
    assert path == result.queue_file and loaded.recipients[0].address == "carol@example.net"


def test_a_success_notice_owed_for_local_mail_is_recorded(
    tmp_path: Path, committer: Committer
) -> None:
    """NOTIFY=SUCCESS for a copy written before the 250: the notice is a duty the queue keeps
    (a queue file with the recipient delivered and the notice owed), so a crash after the 250
    cannot lose it; without NOTIFY=SUCCESS no queue file is written."""
    spool = make_spool(tmp_path, committer)
    alice = local(tmp_path, "alice")
    alice.notify = frozenset({"SUCCESS"})
    result = accept(spool, envelope(alice), message_of(spool, CONTENT))
    assert [o.delivered is not None for o in result.outcomes] == [True]
    assert result.queue_file is not None
    [(loaded, _)] = spool.load_queue()
    [rcpt] = loaded.recipients
    assert (rcpt.state, rcpt.success, rcpt.notified) == (RecipientState.DELIVERED, "delivered", [])
    assert len(maildir_files(alice.destination.maildir)) == 1  # delivered once, not queued again
    bob = local(tmp_path, "bob")
    env = envelope(bob)
    env.queue_id = "4Q8X2B0C1DFH"
    assert accept(spool, env, message_of(spool, CONTENT)).queue_file is None


def test_over_quota_is_queued(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    spool = make_spool(tmp_path, committer)
    full = local(tmp_path, "dave", quota=100)
    with caplog.at_level(logging.INFO, logger="postroom"):
        result = accept(spool, envelope(full), message_of(spool, CONTENT))
    assert result.delivered == []
    [outcome] = result.queued
    assert outcome.dsn == "4.2.2" and outcome.error == "mailbox full (over quota)"
    [(loaded, _)] = spool.load_queue()
    [rcpt] = loaded.recipients
    assert rcpt.state is RecipientState.DEFERRED and rcpt.attempts == 1
    assert rcpt.next_attempt == NOW + 5 + 300.0
    assert (
        "to=<dave@example.com>, relay=local, delay=5, dsn=4.2.2, "
        "status=deferred (mailbox full (over quota))"
    ) in caplog.text
    assert "removed" not in caplog.text


def test_failed_maildir_write_is_queued(tmp_path: Path, committer: Committer) -> None:
    spool = make_spool(tmp_path, committer)
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "erin").write_bytes(b"a file where a directory should be")
    erin = local(tmp_path, "erin")
    tagged = local(tmp_path, "erin", original="erin+x@example.com")  # same Maildir: tried once
    result = accept(spool, envelope(erin, tagged), message_of(spool, CONTENT))
    first, second = result.queued
    assert first.dsn == "4.3.0" and first.error and "creating Maildir" in first.error
    assert (second.dsn, second.error) == (first.dsn, first.error)
    assert result.queue_file is not None
    [(loaded, _)] = spool.load_queue()
    assert [r.state for r in loaded.recipients] == [RecipientState.DEFERRED] * 2


def test_queue_file_disk_full(tmp_path: Path, committer: Committer) -> None:
    disk = PathDisk(full_in=tmp_path / "data" / "queue" / "incoming")
    spool = make_spool(tmp_path, committer, disk)
    alice = local(tmp_path, "alice")
    with pytest.raises(AcceptError) as info:
        accept(spool, envelope(alice, remote("carol@example.net")), message_of(spool, CONTENT))
    assert info.value.disk_full  # 452 4.3.1
    # The job failed as a whole: its Maildir copy was never committed, so the client's retry
    # brings no duplicate, and nothing is reported delivered.
    assert info.value.result.delivered == [] and info.value.result.outcomes == ()
    assert isinstance(alice.destination, LocalDelivery)
    assert maildir_files(alice.destination.maildir) == []
    assert os.listdir(alice.destination.maildir / "tmp") == []
    assert alice.state is RecipientState.PENDING
    assert os.listdir(spool.active) == [] and os.listdir(spool.incoming) == []


def test_queue_dir_sync_failure_removes_queue_file(tmp_path: Path) -> None:
    disk = PathDisk(fail_dir_sync=tmp_path / "data" / "queue" / "active")
    committer = Committer(disk=disk)
    committer.start()
    try:
        spool = make_spool(tmp_path, committer, disk)
        with pytest.raises(AcceptError) as info:
            accept(spool, envelope(remote("carol@example.net")), message_of(spool, CONTENT))
    finally:
        committer.stop()
    assert not info.value.disk_full  # 451 4.3.0
    assert os.listdir(spool.active) == [] and os.listdir(spool.incoming) == []


def test_spilled_message_to_maildir_and_queue(tmp_path: Path, committer: Committer) -> None:
    spool = make_spool(tmp_path, committer)
    big = CONTENT + (b"y" * 998 + b"\r\n") * 600  # 600 KB: spilled to incoming/
    message = message_of(spool, *[big[i : i + 4096] for i in range(0, len(big), 4096)])
    assert message.spill_path is not None
    alice = local(tmp_path, "alice")
    result = accept(spool, envelope(alice, remote("carol@example.net")), message)
    assert isinstance(alice.destination, LocalDelivery)
    [path] = maildir_files(alice.destination.maildir)
    head = b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.com\r\n"
    assert path.read_bytes() == (head + PREPEND + big).replace(b"\r\n", b"\n")
    assert result.queue_file is not None
    assert result.queue_file.read_bytes().partition(b"\n")[2] == PREPEND + big
    assert os.listdir(spool.incoming) == []


@pytest.mark.parametrize(("err", "disk_full"), [(errno.EIO, False), (errno.ENOSPC, True)])
def test_maildir_fsync_failure_fails_the_whole_accept(
    tmp_path: Path,
    committer: Committer,
    caplog: pytest.LogCaptureFixture,
    err: int,
    disk_full: bool,
) -> None:
    alice = local(tmp_path, "alice")
    assert isinstance(alice.destination, LocalDelivery)
    maildir = alice.destination.maildir
    disk = PathDisk(fsync_fails_in=maildir / "tmp", fsync_errno=err)
    spool = make_spool(tmp_path, committer, disk)
    carol = remote("carol@example.net")
    with caplog.at_level(logging.INFO, logger="postroom"), pytest.raises(AcceptError) as info:
        accept(spool, envelope(alice, carol), message_of(spool, CONTENT))
    # Too late to fall back to the queue file: the client gets 451 4.3.0 / 452 4.3.1 and retries.
    assert info.value.disk_full is disk_full
    assert "fsync of" in str(info.value)
    assert info.value.result.outcomes == () and info.value.result.queue_file is None
    assert alice.state is RecipientState.PENDING
    assert maildir_files(maildir) == [] and os.listdir(maildir / "tmp") == []
    assert os.listdir(spool.active) == [] and os.listdir(spool.incoming) == []
    assert "status=sent" not in caplog.text and "removed" not in caplog.text


def test_queue_file_fsync_failure_drops_the_maildir_copy_too(
    tmp_path: Path, committer: Committer
) -> None:
    disk = PathDisk(fsync_fails_in=tmp_path / "data" / "queue" / "incoming", fsync_errno=errno.ENOSPC)
    spool = make_spool(tmp_path, committer, disk)
    alice = local(tmp_path, "alice")
    assert isinstance(alice.destination, LocalDelivery)
    with pytest.raises(AcceptError) as info:
        accept(spool, envelope(alice, remote("carol@example.net")), message_of(spool, CONTENT))
    assert info.value.disk_full
    assert info.value.result.delivered == []
    assert maildir_files(alice.destination.maildir) == []
    assert os.listdir(alice.destination.maildir / "tmp") == []
    assert os.listdir(spool.active) == [] and os.listdir(spool.incoming) == []


def test_failed_commit_fails_only_its_own_accept(tmp_path: Path, committer: Committer) -> None:
    bob = local(tmp_path, "bob")
    alice = local(tmp_path, "alice")
    assert isinstance(bob.destination, LocalDelivery)
    assert isinstance(alice.destination, LocalDelivery)
    disk = PathDisk(fsync_fails_in=bob.destination.maildir)
    spool = make_spool(tmp_path, committer, disk)
    gate, started = threading.Event(), threading.Event()

    def hold(dirsync: object) -> None:
        started.set()
        gate.wait(10)

    async def main() -> list[AcceptResult | BaseException]:
        held = committer.submit(hold)  # both accepts wait for, then share, the next round
        await asyncio.to_thread(started.wait, 10)
        env_bob = envelope(bob)
        env_alice = dataclasses.replace(envelope(alice), queue_id="4Q8X2B0C1DFH")
        tasks = [
            asyncio.create_task(spool.accept(env, message_of(spool, CONTENT), PREPEND))
            for env in (env_bob, env_alice)
        ]
        await asyncio.sleep(0.05)  # both jobs are queued
        rounds = committer.rounds
        gate.set()
        await held
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert committer.rounds == rounds + 2
        return results

    failed, ok = asyncio.run(main())
    assert isinstance(failed, AcceptError) and not failed.disk_full
    assert isinstance(ok, AcceptResult) and ok.queue_file is None
    [copy] = maildir_files(alice.destination.maildir)
    assert [o.delivered for o in ok.delivered] == [copy]
    assert alice.state is RecipientState.DELIVERED and bob.state is RecipientState.PENDING
    assert maildir_files(bob.destination.maildir) == []
    assert os.listdir(bob.destination.maildir / "tmp") == []


def test_sent_is_logged_only_once_the_copy_is_durable(tmp_path: Path) -> None:
    disk = PathDisk()
    committer = Committer(disk=disk)  # the committer fsyncs the directories
    committer.start()
    spool = make_spool(tmp_path, committer, disk)
    alice = local(tmp_path, "alice")
    assert isinstance(alice.destination, LocalDelivery)
    new_dir = str(alice.destination.maildir / "new")
    seen: list[tuple[bool, bool]] = []

    class Check(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "status=sent" in record.getMessage():
                seen.append((new_dir in disk.dir_syncs, len(os.listdir(new_dir)) == 1))

    handler = Check()
    log_root = logging.getLogger("postroom")
    log_root.addHandler(handler)
    level = log_root.level
    log_root.setLevel(logging.INFO)
    try:
        accept(spool, envelope(alice), message_of(spool, CONTENT))
    finally:
        log_root.removeHandler(handler)
        log_root.setLevel(level)
        committer.stop()
    assert seen == [(True, True)]


class GatedDisk(Disk):
    """Writes wait for a gate, so a test can act while a job is under way."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        self.entered.set()
        self.gate.wait(10)
        super().write(fd, data)


def test_session_cancelled_during_accept(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    disk = GatedDisk()
    spool = make_spool(tmp_path, committer, disk)
    alice = local(tmp_path, "alice")
    big = CONTENT + b"z" * 400_000  # spilled: the job reads the spill file after the cancel
    message = message_of(spool, big)
    assert message.spill_path is not None

    async def main() -> None:
        task = asyncio.create_task(
            spool.accept(envelope(alice, remote("carol@example.net")), message, PREPEND)
        )
        await asyncio.to_thread(disk.entered.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        disk.gate.set()
        await committer.submit(lambda ds: None)  # the accept job's round is over
        await asyncio.sleep(0)  # and its callbacks have run

    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(main())
    # No 250 went out: the client retries, so the queue copy is dropped; the data is gone.
    assert os.listdir(spool.active) == [] and os.listdir(spool.incoming) == []
    assert isinstance(alice.destination, LocalDelivery)
    [copy] = maildir_files(alice.destination.maildir)  # delivered before the cancel landed
    assert copy.read_bytes().endswith(big.replace(b"\r\n", b"\n"))
    assert "status=sent (delivered to maildir)" in caplog.text
    assert "status=not accepted (session ended during accept)" in caplog.text


# ---- queue files ----------------------------------------------------------------------------


def queued_message(tmp_path: Path, committer: Committer) -> tuple[Spool, Envelope, Path]:
    spool = make_spool(tmp_path, committer)
    env = envelope(remote("carol@example.net"), remote("dan@example.net"))
    result = accept(spool, env, message_of(spool, CONTENT))
    assert result.queue_file is not None
    return spool, env, result.queue_file


def test_update_envelope(tmp_path: Path, committer: Committer) -> None:
    spool, env, path = queued_message(tmp_path, committer)
    env.recipients[0].state = RecipientState.DEFERRED
    env.recipients[0].attempts = 3
    committer.run_now(lambda ds: spool.update_envelope(path, env, ds))
    loaded = read_envelope(path)
    assert loaded.recipients[0].attempts == 3
    assert path.read_bytes().partition(b"\n")[2] == PREPEND + CONTENT
    assert os.listdir(spool.incoming) == []


def test_update_envelope_disk_full_keeps_old(tmp_path: Path, committer: Committer) -> None:
    spool, env, path = queued_message(tmp_path, committer)
    before = path.read_bytes()
    spool.disk = PathDisk(full_in=spool.incoming)
    env.recipients[0].attempts = 7
    with pytest.raises(StorageError) as info:
        committer.run_now(lambda ds: spool.update_envelope(path, env, ds))
    assert info.value.disk_full
    assert path.read_bytes() == before
    assert os.listdir(spool.incoming) == []


CRASH_SCRIPT = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from postroom.delivery.maildir import MaildirUsage
    from postroom.queue.committer import Committer, Disk
    from postroom.queue.spool import Spool, read_envelope

    class CrashingDisk(Disk):
        def rename(self, src, dst):
            if sys.argv[2] == "before-rename":
                os._exit(0)
            super().rename(src, dst)
            os._exit(0)  # after the rename, before anything else

    data, _ = Path(sys.argv[1]), sys.argv[2]
    spool = Spool(data, Committer(), MaildirUsage(), "mx", disk=CrashingDisk())
    [(env, path)] = spool.load_queue()
    env.recipients[0].attempts = 42
    Committer().run_now(lambda ds: spool.update_envelope(path, env, ds))
    sys.exit(3)  # not reached
    """
)


@pytest.mark.parametrize(("point", "attempts"), [("before-rename", 0), ("after-rename", 42)])
def test_update_envelope_crash(
    tmp_path: Path, committer: Committer, point: str, attempts: int
) -> None:
    spool, _, path = queued_message(tmp_path, committer)
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "data"), point],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    # The file holds the old or the new envelope, whole, and the message data unchanged.
    assert read_envelope(path).recipients[0].attempts == attempts
    assert path.read_bytes().partition(b"\n")[2] == PREPEND + CONTENT
    leftovers = os.listdir(spool.incoming)
    assert len(leftovers) == (1 if point == "before-rename" else 0)
    assert spool.clean_incoming(older_than=-1) == len(leftovers)


def test_load_queue_moves_corrupt(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    spool, _, path = queued_message(tmp_path, committer)
    (spool.active / "BROKEN").write_bytes(b"{not json\nbody")
    (spool.active / "NOLINE").write_bytes(b'{"queue_id": "x"')
    with caplog.at_level(logging.WARNING, logger="postroom"):
        found = spool.load_queue()
    assert [p for _, p in found] == [path]
    assert sorted(os.listdir(spool.corrupt)) == ["BROKEN", "NOLINE"]
    assert "BROKEN: status=corrupt" in caplog.text


def test_remove(tmp_path: Path, committer: Committer) -> None:
    spool, env, path = queued_message(tmp_path, committer)
    assert committer.run_now(lambda ds: spool.remove(env.queue_id, ds))
    assert not path.exists()
    assert not spool.remove(env.queue_id)


# ---- system call order ----------------------------------------------------------------------

STRACE_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from postroom.delivery.maildir import MaildirUsage
    from postroom.policy.routes import LocalDelivery, RemoteDelivery
    from postroom.queue.committer import Committer
    from postroom.queue.envelope import Envelope, Recipient
    from postroom.queue.spool import Spool

    base = Path(sys.argv[1])
    committer = Committer()
    committer.start()
    spool = Spool(base / "data", committer, MaildirUsage(), "mx")
    maildir = base / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (maildir / sub).mkdir(parents=True)
    env = Envelope("4Q8X2B0C1DFG", "a@example.org", 0.0, recipients=[
        Recipient("b@example.com", LocalDelivery("b@example.com", maildir)),
        Recipient("c@example.net", RemoteDelivery("c@example.net")),
    ])

    async def main():
        message = spool.open_message()
        message.write(b"Subject: x\\r\\n\\r\\nbody\\r\\n")
        await spool.accept(env, message, b"Received: x\\r\\n")
        try:  # a marker in the trace: the 250 would be sent here
            os.rename("/nonexistent/ACCEPTED", "/nonexistent/ACCEPTED2")
        except OSError:
            pass

    asyncio.run(main())
    committer.stop()
    """
)


def strace_usable() -> str | None:
    strace = shutil.which("strace") or (
        "/usr/bin/strace" if os.path.exists("/usr/bin/strace") else None
    )
    if strace is None:
        return None
    probe = subprocess.run(
        [strace, "-f", "-o", os.devnull, "true"], capture_output=True, timeout=30, check=False
    )
    return strace if probe.returncode == 0 else None


def test_syscall_order_under_strace(tmp_path: Path) -> None:
    strace = strace_usable()
    if strace is None:
        pytest.skip("strace is missing, or ptrace is not permitted here (seccomp, yama)")
    trace = tmp_path / "trace"
    proc = subprocess.run(
        [
            strace,
            "-f",
            "-e",
            "trace=fsync,fdatasync,rename,renameat,renameat2,link,linkat,openat",
            "-o",
            str(trace),
            sys.executable,
            "-c",
            STRACE_SCRIPT,
            str(tmp_path),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    events = parse_trace(trace.read_text())
    maildir_new = str(tmp_path / "Maildir" / "new")
    active = str(tmp_path / "data" / "queue" / "active")
    marker = next(i for i, e in enumerate(events) if e[0] == "rename" and "ACCEPTED" in e[1])
    for target_dir in (maildir_new, active):
        [(rename_at, src)] = [
            (i, e[1])
            for i, e in enumerate(events)
            if e[0] == "rename" and e[2].startswith(target_dir + "/")
        ]
        file_syncs = [i for i, e in enumerate(events) if e == ("fsync", src, "")]
        dir_syncs = [i for i, e in enumerate(events) if e == ("fsync", target_dir, "")]
        assert file_syncs and file_syncs[0] < rename_at, (target_dir, events)
        assert dir_syncs and rename_at < dir_syncs[0] < marker, (target_dir, events)
    # One round: the Maildir copy and the queue file, then both directory fsyncs.
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and "ACCEPTED" not in e[1]]
    dir_syncs = [
        i for i, e in enumerate(events) if e in (("fsync", maildir_new, ""), ("fsync", active, ""))
    ]
    assert max(renames) < min(dir_syncs)


_CALL = re.compile(r"^\d+\s+(\w+)\((.*)")
_RESUMED = re.compile(r"^\d+\s+<\.\.\. (\w+) resumed>.*= (-?\d+)")


def parse_trace(text: str) -> list[tuple[str, str, str]]:
    """("fsync", path, ""), ("rename", src, dst) in call order; fds mapped back to paths."""
    fds: dict[str, str] = {}
    pending: dict[str, str] = {}  # thread id -> path of an unfinished openat
    events: list[tuple[str, str, str]] = []
    for line in text.splitlines():
        tid = line.split(None, 1)[0]
        resumed = _RESUMED.match(line)
        if resumed:
            if resumed.group(1) == "openat" and tid in pending:
                fds[resumed.group(2)] = pending.pop(tid)
            continue
        match = _CALL.match(line)
        if not match:
            continue
        name, args = match.groups()
        strings = re.findall(r'"((?:[^"\\]|\\.)*)"', args)
        if name == "openat" and strings:
            result = re.search(r"= (-?\d+)", args)
            if result:
                fds[result.group(1)] = strings[0]
            else:
                pending[tid] = strings[0]
        elif name in ("fsync", "fdatasync"):
            fd = re.match(r"(\d+)", args)
            if fd:
                events.append(("fsync", fds.get(fd.group(1), "?"), ""))
        elif name.startswith(("rename", "link")) and len(strings) >= 2:
            # a queue file is linked into place (never replacing one): it counts as the move
            events.append(("rename", strings[0], strings[1]))
    return events


def test_a_queue_file_never_replaces_another(tmp_path: Path, committer: Committer) -> None:
    """Should a queue id ever repeat, the new message fails (451) and the old one stays."""
    spool = make_spool(tmp_path, committer)
    env = envelope(remote("x@remote.example"))
    existing = spool.active / env.queue_id
    spool.active.mkdir(parents=True, exist_ok=True)
    existing.write_bytes(b"another message's queue file")
    with pytest.raises(AcceptError):
        accept(spool, env, message_of(spool, CONTENT))
    assert existing.read_bytes() == b"another message's queue file"
    assert list(spool.incoming.iterdir()) == []
