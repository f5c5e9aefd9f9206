"""The queue runner: delivery of queued local mail, backoff, expiry, remote deferral, crashes."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.config import Config, from_dict
from postroom.delivery.maildir import MaildirUsage
from postroom.ids import new_queue_id
from postroom.policy.routes import LocalDelivery, RemoteDelivery
from postroom.queue import journal
from postroom.queue.committer import Committer, Disk
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.runner import (
    ATTEMPT_UNDER_WAY,
    NO_RELAY,
    QueuedMessage,
    QueueRunner,
    backoff_delay,
)
from postroom.queue.spool import Spool, read_envelope

#: The delays= field, whose last part is a measured duration.
DELAYS = re.compile(r"delays=[0-9./]+, ")
CONTENT = b"From: a@example.org\r\nSubject: queued\r\n\r\nHello\r\n"
PREPEND = b"Received: from client by mx.example.com; today\r\n"
NOW = 1_732_900_000.0
QID = "4Q8X2B0C1DFG"
QUEUE = {"min_backoff": 10.0, "max_backoff": 40.0, "max_lifetime": 1000.0, "scan_interval": 3600.0}


class RecordingDisk(Disk):
    def __init__(self) -> None:
        self.renames: list[str] = []
        self.paths: dict[int, str] = {}
        self.calls: list[tuple[str, str]] = []  # (call, path), in order

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.paths[fd] = path
        return fd

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.calls.append(("fsync", self.paths.get(fd, "?")))

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.renames.append(dst)
        self.calls.append(("rename", dst))


class FsyncFailsIn(Disk):
    """Real calls, except that fsync of a file created under *root* fails with *err*."""

    def __init__(self, root: Path, err: int) -> None:
        self.root = str(root)
        self.err = err
        self.paths: dict[int, str] = {}

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.paths[fd] = path
        return fd

    def fsync(self, fd: int) -> None:
        if self.paths[fd].startswith(self.root):
            raise OSError(self.err, os.strerror(self.err))
        super().fsync(fd)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def committer() -> Iterator[Committer]:
    c = Committer()
    c.start()
    yield c
    c.stop()


def config(**queue: float) -> Config:
    return from_dict({"queue": {**QUEUE, **queue}})


def mailbox_for(tmp_path: Path, user: str) -> LocalDelivery:
    return LocalDelivery(f"{user}@example.com", tmp_path / "mail" / user / "Maildir")


def blocked_mailbox(tmp_path: Path, user: str) -> LocalDelivery:
    """A Maildir that cannot be created: a regular file sits where its parent should be."""
    (tmp_path / "mail").mkdir(exist_ok=True)
    (tmp_path / "mail" / user).write_bytes(b"in the way")
    return mailbox_for(tmp_path, user)


def queue_message(
    spool: Spool, committer: Committer, *recipients: Recipient, sender: str = "a@example.org"
) -> Path:
    """Put a message with exactly *recipients* (all pending, due) into active/."""
    forced = [
        Recipient(r.original, LocalDelivery(r.destination.mailbox, r.destination.maildir, 1))
        if isinstance(r.destination, LocalDelivery)
        else Recipient(r.original, r.destination)
        for r in recipients
    ]
    env = Envelope(QID, sender, NOW, recipients=forced)

    async def accept() -> Path | None:
        message = spool.open_message()
        message.write(CONTENT)
        return (await spool.accept(env, message, PREPEND)).queue_file

    path = asyncio.run(accept())
    assert path is not None
    env.recipients = list(recipients)
    committer.run_now(lambda ds: spool.update_envelope(path, env, ds))
    return path


def make(
    tmp_path: Path, committer: Committer, clock: Clock, disk: Disk | None = None, **queue: float
) -> tuple[Spool, QueueRunner]:
    spool = Spool(
        tmp_path / "data",
        committer,
        MaildirUsage(),
        "mx.example.com",
        disk=disk or Disk(),
        clock=clock,
    )
    runner = QueueRunner(spool, committer, config(**queue), clock=clock, rng=random.Random(7))
    return spool, runner


def new_files(delivery: LocalDelivery) -> list[Path]:
    return sorted((delivery.maildir / "new").iterdir())


def test_delivers_due_local_mail(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    disk = RecordingDisk()
    clock = Clock(NOW + 10)
    spool, runner = make(tmp_path, committer, clock, disk)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(
        spool,
        committer,
        Recipient("alias@example.com", alice),
        Recipient("alice@example.com", alice),
    )
    disk.renames.clear()
    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(runner.run_once())
    [copy] = new_files(alice)  # two recipients, one Maildir: one copy
    assert copy.read_bytes() == (
        b"Return-Path: <a@example.org>\r\nDelivered-To: alice@example.com\r\n" + PREPEND + CONTENT
    ).replace(b"\r\n", b"\n")
    assert not path.exists()
    # The attempt was recorded (appended to the journal and fsynced, no queue file rewritten)
    # before the Maildir copy was made; the outcome finished the message, so its removal
    # records it (no rewrite first).
    assert [Path(p).parent for p in disk.renames] == [alice.maildir / "new"]
    journal_sync = next(i for i, (call, p) in enumerate(disk.calls)
                        if call == "fsync" and Path(p).parent == spool.journal.directory)
    copy_rename = disk.calls.index(("rename", str(copy)))
    assert journal_sync < copy_rename, disk.calls
    lines = [r.getMessage() for r in caplog.records]
    assert [DELAYS.sub("", line) for line in lines] == [
        f"{QID}: to=<alice@example.com>, orig_to=<alias@example.com>, relay=local, delay=10, "
        "dsn=2.0.0, status=sent (delivered to maildir)",
        f"{QID}: to=<alice@example.com>, relay=local, delay=10, dsn=2.0.0, "
        "status=sent (delivered to maildir)",
        f"{QID}: removed",
    ]
    # before the queue 0 (queued at arrival here), waiting 10 s, no setup, the Maildir write
    assert re.search(r"delays=0/10/0/[0-9.]+, dsn=2.0.0", lines[0])


def test_defers_with_doubling_backoff(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(NOW + 1)
    spool, runner = make(tmp_path, committer, clock)
    path = queue_message(
        spool, committer, Recipient("bob@example.com", blocked_mailbox(tmp_path, "bob"))
    )
    seen: list[float] = []
    for attempt in range(1, 5):
        with caplog.at_level(logging.INFO, logger="postroom"):
            asyncio.run(runner.run_once())
        [rcpt] = read_envelope(path).recipients
        assert rcpt.state is RecipientState.DEFERRED and rcpt.attempts == attempt
        assert rcpt.last_error and "creating Maildir" in rcpt.last_error
        seen.append(rcpt.next_attempt - clock.now)
        # not due yet: a scan now changes nothing
        asyncio.run(runner.run_once())
        assert read_envelope(path).recipients[0].attempts == attempt
        clock.now = rcpt.next_attempt
    assert 9.0 <= seen[0] <= 11.0 and 18.0 <= seen[1] <= 22.0
    assert 36.0 <= seen[2] <= 40.0 and 36.0 <= seen[3] <= 40.0  # capped at max_backoff
    assert ("relay=local, delay=1, dsn=4.3.0, status=deferred (creating Maildir"
            in DELAYS.sub("", caplog.text))


def test_expiry_bounces(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    """Without a notifier (none in this process) the bounce is logged and the message goes;
    tests/test_relay.py covers the notice itself."""
    clock = Clock(NOW + 1000)
    spool, runner = make(tmp_path, committer, clock)
    path = queue_message(
        spool, committer, Recipient("bob@example.com", blocked_mailbox(tmp_path, "bob"))
    )
    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(runner.run_once())
    assert ("dsn=5.4.7, status=bounced (message expired after 0.0115741 days in queue: "
            "creating Maildir") in caplog.text
    assert f"{QID}: removed" in caplog.text and not path.exists()


@pytest.mark.parametrize(
    ("sender", "notify"),
    [("", None), ("a@example.org", frozenset({"NEVER"})), ("a@example.org", frozenset({"DELAY"}))],
)
def test_expiry_without_notification_removes(
    tmp_path: Path,
    committer: Committer,
    caplog: pytest.LogCaptureFixture,
    sender: str,
    notify: frozenset[str] | None,
) -> None:
    clock = Clock(NOW + 2000)
    spool, runner = make(tmp_path, committer, clock)
    rcpt = Recipient("bob@example.com", blocked_mailbox(tmp_path, "bob"), notify=notify)
    path = queue_message(spool, committer, rcpt, sender=sender)
    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(runner.run_once())
    assert not path.exists()
    assert "status=bounced" in caplog.text and f"{QID}: removed" in caplog.text
    assert "sender_notification" not in caplog.text


def test_last_try_falls_at_expiry(tmp_path: Path, committer: Committer) -> None:
    clock = Clock(NOW + 990)
    spool, runner = make(tmp_path, committer, clock)
    path = queue_message(
        spool, committer, Recipient("bob@example.com", blocked_mailbox(tmp_path, "bob"))
    )
    asyncio.run(runner.run_once())
    [rcpt] = read_envelope(path).recipients
    assert rcpt.state is RecipientState.DEFERRED
    assert rcpt.next_attempt == NOW + 1000  # not NOW + 990 + ~10..40


def test_remote_is_deferred_without_spinning(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(NOW + 3)
    spool, runner = make(tmp_path, committer, clock)
    path = queue_message(
        spool, committer, Recipient("carol@example.net", RemoteDelivery("carol@example.net"))
    )
    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(runner.run_once())
    [rcpt] = read_envelope(path).recipients
    assert rcpt.state is RecipientState.DEFERRED and rcpt.attempts == 1
    assert rcpt.last_error == NO_RELAY
    assert NOW + 3 + 9.0 <= rcpt.next_attempt <= NOW + 3 + 11.0
    assert (
        f"{QID}: to=<carol@example.net>, relay=none, delay=3, delays=0/3/0/0, dsn=4.4.1, "
        f"status=deferred ({NO_RELAY})"
    ) in caplog.text
    before = path.read_bytes()
    clock.now += 5
    asyncio.run(runner.run_once())
    assert path.read_bytes() == before


def test_mixed_message_keeps_only_what_is_left(tmp_path: Path, committer: Committer) -> None:
    clock = Clock(NOW + 1)
    spool, runner = make(tmp_path, committer, clock)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(
        spool,
        committer,
        Recipient("alice@example.com", alice),
        Recipient("carol@example.net", RemoteDelivery("carol@example.net")),
    )
    asyncio.run(runner.run_once())
    assert len(new_files(alice)) == 1
    states = [r.state for r in read_envelope(path).recipients]
    assert states == [RecipientState.DELIVERED, RecipientState.DEFERRED]
    assert path.read_bytes().partition(b"\n")[2] == PREPEND + CONTENT
    clock.now += 100
    asyncio.run(runner.run_once())
    assert len(new_files(alice)) == 1  # never delivered twice


@pytest.mark.parametrize(("err", "dsn"), [(errno.EIO, "4.3.0"), (errno.ENOSPC, "4.3.1")])
def test_failed_commit_defers_the_whole_attempt(
    tmp_path: Path, committer: Committer, caplog: pytest.LogCaptureFixture, err: int, dsn: str
) -> None:
    clock = Clock(NOW + 1)
    alice, bob = mailbox_for(tmp_path, "alice"), mailbox_for(tmp_path, "bob")
    spool, runner = make(tmp_path, committer, clock)
    path = queue_message(
        spool, committer, Recipient("alice@example.com", alice), Recipient("bob@example.com", bob)
    )
    spool.disk = FsyncFailsIn(bob.maildir, err)  # alice's copy is fine, bob's cannot be synced
    with caplog.at_level(logging.INFO, logger="postroom"):
        asyncio.run(runner.run_once())
    rcpts = read_envelope(path).recipients
    assert [r.state for r in rcpts] == [RecipientState.DEFERRED] * 2
    assert [r.attempts for r in rcpts] == [1, 1]
    assert all(r.last_error and "fsync of" in r.last_error for r in rcpts)
    assert f"dsn={dsn}, status=deferred (fsync of" in caplog.text
    assert "status=sent" not in caplog.text
    # The attempt failed as a whole: alice's copy was not committed either (no duplicate later).
    for box in (alice, bob):
        assert new_files(box) == [] and os.listdir(box.maildir / "tmp") == []
    assert path.read_bytes().partition(b"\n")[2] == PREPEND + CONTENT
    spool.disk = Disk()
    clock.now = max(r.next_attempt for r in rcpts)
    asyncio.run(runner.run_once())
    assert len(new_files(alice)) == 1 and len(new_files(bob)) == 1 and not path.exists()


def test_held_message_is_left_alone(tmp_path: Path, committer: Committer) -> None:
    clock = Clock(NOW + 1)
    spool, runner = make(tmp_path, committer, clock)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(spool, committer, Recipient("alice@example.com", alice))
    env = read_envelope(path)
    env.hold = True
    committer.run_now(lambda ds: spool.update_envelope(path, env, ds))
    asyncio.run(runner.run_once())
    assert path.exists() and not alice.maildir.exists()


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, os, sys
    from pathlib import Path
    from postroom.config import from_dict
    from postroom.delivery.maildir import MaildirUsage
    from postroom.queue.committer import Committer, Disk
    from postroom.queue.runner import QueueRunner
    from postroom.queue.spool import Spool

    class CrashInMaildir(Disk):
        def create(self, path):
            if "/Maildir/tmp/" in path:
                os._exit(0)  # the power goes out while the message is being written
            return super().create(path)

    committer = Committer()
    committer.start()
    spool = Spool(Path(sys.argv[1]), committer, MaildirUsage(), "mx", disk=CrashInMaildir())
    config = from_dict({"queue": {"min_backoff": 10.0, "max_backoff": 40.0}})
    runner = QueueRunner(spool, committer, config, clock=lambda: float(sys.argv[2]))
    asyncio.run(runner.run_once())
    sys.exit(3)  # not reached
    """
)


def test_crash_during_attempt_keeps_the_count(tmp_path: Path, committer: Committer) -> None:
    clock = Clock(NOW + 5)
    spool, _ = make(tmp_path, committer, clock)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(spool, committer, Recipient("alice@example.com", alice))
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(tmp_path / "data"), str(NOW + 5)],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    # The record is in the attempt journal; the next start (or an offline queue command)
    # applies it to the queue file before anything reads the queue.
    assert read_envelope(path).recipients[0].attempts == 0
    assert journal.recover(spool.root) == 1
    assert not any(spool.journal.directory.glob("*.log"))
    [rcpt] = read_envelope(path).recipients
    assert rcpt.attempts == 1 and rcpt.state is RecipientState.DEFERRED
    assert rcpt.last_error == ATTEMPT_UNDER_WAY
    assert NOW + 5 + 9 <= rcpt.next_attempt <= NOW + 5 + 11  # no retry in a tight loop
    assert not (alice.maildir / "new").exists() or new_files(alice) == []


def test_start_wake_stop(tmp_path: Path, committer: Committer) -> None:
    spool, runner = make(tmp_path, committer, Clock(0.0))
    runner = QueueRunner(spool, committer, config(), clock=time.time)
    alice = mailbox_for(tmp_path, "alice")

    async def main() -> None:
        runner.start()
        await asyncio.sleep(0.05)  # the first scan finds an empty queue
        path = await asyncio.to_thread(
            queue_message, spool, committer, Recipient("alice@example.com", alice)
        )
        runner.wake()
        for _ in range(500):
            if not path.exists():
                break
            await asyncio.sleep(0.01)
        await runner.stop()
        assert not path.exists()

    asyncio.run(main())
    assert len(new_files(alice)) == 1


@settings(max_examples=100, deadline=None)
@given(
    attempts=st.integers(min_value=1, max_value=60),
    low=st.floats(min_value=1, max_value=1000),
    factor=st.floats(min_value=1, max_value=100),
    seed=st.integers(0, 2**32),
)
def test_backoff_delay_bounds(attempts: int, low: float, factor: float, seed: int) -> None:
    high = low * factor
    delay = backoff_delay(attempts, low, high, random.Random(seed))
    assert low <= delay <= high
    ideal = min(low * 2.0 ** (attempts - 1), high)
    assert ideal * 0.9 - 1e-9 <= delay <= ideal * 1.1 + 1e-9


class _SlowFsyncDisk(Disk):
    def fsync(self, fd: int) -> None:
        time.sleep(0.3)
        super().fsync(fd)


def test_stop_lets_the_delivery_in_flight_finish_and_record(tmp_path: Path) -> None:
    """SIGTERM during a queue delivery: the copy made is recorded, never made again."""
    committer = Committer()
    committer.start()
    clock = Clock(NOW + 10)
    spool, runner = make(tmp_path, committer, clock, _SlowFsyncDisk())
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(spool, committer, Recipient("alice@example.com", alice))

    async def main() -> None:
        runner.start()
        await asyncio.sleep(0.5)  # the attempt is recorded; the Maildir copy is being made
        await runner.stop()  # what the daemon does on SIGTERM
        await asyncio.to_thread(committer.stop)

    asyncio.run(main())
    assert len(new_files(alice)) == 1
    assert not path.exists()  # delivered and recorded: nothing left to deliver again


def test_a_delivery_reads_the_message_it_opened_while_the_envelope_is_rewritten(
    tmp_path: Path, committer: Committer
) -> None:
    """The runner saves outcomes of one message's other transactions while a delivery reads
    it: the reader keeps the file it opened, whose envelope line it skipped."""
    spool, _ = make(tmp_path, committer, Clock(NOW))
    rcpt = Recipient("carol@example.net", RemoteDelivery("carol@example.net"))
    path = queue_message(spool, committer, rcpt)
    source = QueuedMessage(path)
    try:
        env = read_envelope(path)
        env.recipients[0].last_error = "x" * 5000  # a much longer envelope line
        committer.run_now(lambda ds: spool.update_envelope(path, env, ds))
        assert len(path.read_bytes().split(b"\n", 1)[0]) > 5000
        for _ in range(2):  # every attempt starts over
            assert b"".join(source.chunks(7)) == PREPEND + CONTENT
        assert source.size == len(PREPEND + CONTENT)
    finally:
        source.close()


def test_queued_and_deferred_mail_cost_no_rescan(tmp_path: Path, committer: Committer) -> None:
    """Each queued message is worked on directly and a deferral only moves the next wake-up:
    the whole queue is read once (at start), not once per message (O(n^2) under load)."""
    spool, runner = make(tmp_path, committer, Clock(NOW))
    blocked = blocked_mailbox(tmp_path, "bob")
    reads = []
    original = spool.load_due

    def counting(now: float | None, horizon: float = 86400.0
                 ) -> tuple[list[tuple[Envelope, Path]], float | None]:
        reads.append(1)
        return original(now, horizon)

    spool.load_due = counting  # type: ignore[method-assign]

    async def main() -> None:
        runner.start()
        await asyncio.sleep(0.05)  # the first scan
        for _ in range(10):
            env = Envelope(new_queue_id(), "a@example.org", NOW,
                           recipients=[Recipient("bob@example.com", blocked)])
            message = spool.open_message()
            message.write(CONTENT)
            await spool.accept(env, message, PREPEND)
        await asyncio.sleep(0.5)
        await runner.stop()

    asyncio.run(main())
    assert len(list(spool.active.iterdir())) == 10
    assert len(reads) == 1


def test_a_scan_does_not_open_the_files_of_deferred_mail(
    tmp_path: Path, committer: Committer
) -> None:
    """A deferral sets the queue file's mtime to the retry time (as Postfix's deferred queue
    does), so a scan before then lists the file without reading it, and still knows when it is
    due; at that time it is read and tried."""
    clock = Clock(NOW + 10)
    spool, runner = make(tmp_path, committer, clock)
    deferred = queue_message(spool, committer, Recipient("bob@example.com",
                                                         blocked_mailbox(tmp_path, "bob")))
    asyncio.run(runner.run_once())  # bob's Maildir cannot be made: deferred
    [rcpt] = read_envelope(deferred).recipients
    assert rcpt.state is RecipientState.DEFERRED and rcpt.next_attempt > clock.now
    assert deferred.stat().st_mtime == pytest.approx(rcpt.next_attempt, abs=1e-3)
    opened: list[Path] = []
    import postroom.queue.spool as spool_mod

    original = spool_mod.read_envelope

    def counting(path: Path) -> Envelope:
        opened.append(path)
        return original(path)

    spool_mod.read_envelope = counting  # type: ignore[assignment]
    try:
        found, later = spool.load_due(clock.now)
        assert (found, opened) == ([], [])
        assert later == pytest.approx(rcpt.next_attempt, abs=1e-3)
        found, _ = spool.load_due(rcpt.next_attempt + 0.01)  # its time has come
        assert [path for _, path in found] == [deferred] and opened == [deferred]
    finally:
        spool_mod.read_envelope = original
