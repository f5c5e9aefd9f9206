"""The attempt journal (queue/journal.py): records appended and fsynced once per round, applied
to the queue files after a crash only where they are newer, torn lines skipped, segments removed
once every attempt in them is settled."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.errors import StorageError
from postroom.queue import journal as journal_mod
from postroom.queue.committer import Committer, Disk
from postroom.queue.envelope import Recipient, RecipientState
from postroom.queue.journal import Journal, decode, encode, recover
from postroom.queue.runner import ATTEMPT_UNDER_WAY
from postroom.queue.spool import read_envelope
from tests.test_runner import NOW, Clock, mailbox_for, make, new_files, queue_message


@pytest.fixture
def committer() -> Iterator[Committer]:
    c = Committer()
    c.start()
    yield c
    c.stop()


def _attempted(path: Path, next_attempt: float) -> str:
    """The envelope line of queue file *path* as the runner records an attempt on it."""
    envelope = read_envelope(path)
    envelope.rev += 1
    for recipient in envelope.recipients:
        recipient.attempts += 1
        recipient.state = RecipientState.DEFERRED
        recipient.next_attempt = next_attempt
        recipient.last_error = ATTEMPT_UNDER_WAY
    return envelope.to_json()


def record(journal: Journal, committer: Committer, path: Path, next_attempt: float) -> str:
    """Append the record of an attempt on queue file *path*, as the runner does; its segment."""
    line = _attempted(path, next_attempt)
    return committer.run_now(lambda ds: journal.append(line, ds))


def test_a_record_round_trips_and_damage_is_seen(tmp_path: Path, committer: Committer) -> None:
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    record = encode(_attempted(path, NOW + 300))
    assert decode(record) is not None and decode(record).recipients[0].attempts == 1  # type: ignore[union-attr]
    assert decode(record[:-1]) is None  # torn: no newline
    assert decode(record[:20] + b"X" + record[21:]) is None  # checksum
    assert decode(b"\n") is None


def test_recovery_applies_only_newer_records(tmp_path: Path, committer: Committer) -> None:
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    journal = Journal(spool.root)
    record(journal, committer, path, NOW + 300)
    # a torn record after it (the crash came during the append): never fsynced, skipped
    segment = next(journal.directory.glob("*.log"))
    with open(segment, "ab") as fh:
        fh.write(encode(_attempted(path, NOW + 999))[:-5])
    journal.close()  # the process dies; its segment stays (the attempt was never settled)
    assert next(journal.directory.glob("*.log")) == segment
    assert recover(spool.root) == 1
    [rcpt] = read_envelope(path).recipients
    assert (rcpt.attempts, rcpt.next_attempt, rcpt.last_error) == (1, NOW + 300, ATTEMPT_UNDER_WAY)
    assert list(journal.directory.glob("*.log")) == []
    # a record older than the queue file (its outcome was saved) changes nothing
    journal = Journal(spool.root)
    stale = read_envelope(path)
    stale.recipients[0].attempts = 0
    committer.run_now(lambda ds: journal.append(stale.to_json(), ds))
    envelope = read_envelope(path)
    committer.run_now(lambda ds: spool.update_envelope(path, envelope, ds))
    journal.close()
    assert recover(spool.root) == 0
    assert read_envelope(path).recipients[0].attempts == 1


def test_recovery_keeps_a_held_message_held(tmp_path: Path, committer: Committer) -> None:
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    journal = Journal(spool.root)
    record(journal, committer, path, NOW + 300)
    journal.close()
    held = spool.hold / path.name
    envelope = read_envelope(path)
    envelope.hold = True
    committer.run_now(lambda ds: spool.update_envelope(path, envelope, ds))
    os.rename(path, held)  # as `postroom queue hold` would, with an older rev than the record
    envelope = read_envelope(held)
    envelope.rev = 0
    committer.run_now(lambda ds: spool.update_envelope(held, envelope, ds))
    assert recover(spool.root) == 1
    recovered = read_envelope(held)
    assert recovered.hold and recovered.recipients[0].attempts == 1
    assert not path.exists()


def test_a_running_owner_blocks_recovery(tmp_path: Path, committer: Committer) -> None:
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    owner = Journal(spool.root)
    assert owner.open() == 0
    line = _attempted(path, NOW + 300)
    committer.run_now(lambda ds: owner.append(line, ds))
    assert recover(spool.root) == 0  # the server's attempt is still under way
    assert read_envelope(path).recipients[0].attempts == 0
    assert len(list(owner.directory.glob("*.log"))) == 1
    owner.close()
    assert recover(spool.root) == 1


def test_segments_rotate_and_go_once_settled(
    tmp_path: Path, committer: Committer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_mod, "SEGMENT_SIZE", 1)  # every record begins a segment
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    journal = Journal(spool.root)
    line = _attempted(path, NOW + 300)
    first = committer.run_now(lambda ds: journal.append(line, ds))
    second = committer.run_now(lambda ds: journal.append(line, ds))
    assert first != second
    assert len(list(journal.directory.glob("*.log"))) == 2
    journal.release([first])  # not the segment being written: removed at once
    assert [p.name for p in journal.directory.glob("*.log")] == [second]
    journal.release([second])  # the current one stays until the next rotation or the close
    assert [p.name for p in journal.directory.glob("*.log")] == [second]
    journal.close()
    assert list(journal.directory.glob("*.log")) == []


class JournalFsyncFails(Disk):
    """fsync of a journal segment fails once with EIO."""

    def __init__(self) -> None:
        self.paths: dict[int, str] = {}
        self.failures = 1

    def create(self, path: str) -> int:
        fd = super().create(path)
        self.paths[fd] = path
        return fd

    def fsync(self, fd: int) -> None:
        if "/journal/" in self.paths.get(fd, "") and self.failures:
            self.failures -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync(fd)


def test_a_failed_fsync_fails_the_record_and_starts_a_new_segment(
    tmp_path: Path, committer: Committer
) -> None:
    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    journal = Journal(spool.root, JournalFsyncFails())
    line = _attempted(path, NOW + 300)
    with pytest.raises(StorageError, match="fsync"):
        committer.run_now(lambda ds: journal.append(line, ds))
    broken = {p.name for p in journal.directory.glob("*.log")}
    segment = committer.run_now(lambda ds: journal.append(line, ds))
    assert segment not in broken


def test_the_runner_applies_the_journal_before_its_first_scan(
    tmp_path: Path, committer: Committer
) -> None:
    """A crash came after the record of an attempt: on start the message is not due until
    its backoff is over, although the queue file alone says it is due now."""
    clock = Clock(NOW + 10)
    spool, runner = make(tmp_path, committer, clock)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(spool, committer, Recipient("alice@example.com", alice))
    journal = Journal(spool.root)
    record(journal, committer, path, NOW + 500)
    journal.close()

    async def start_and_stop() -> None:
        runner.start()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not list(spool.journal.directory.glob("*.log")):
                break
        await asyncio.sleep(0.2)  # a scan would have delivered the message by now
        await runner.stop()

    asyncio.run(start_and_stop())
    [rcpt] = read_envelope(path).recipients
    assert rcpt.attempts == 1 and rcpt.next_attempt == NOW + 500
    assert not alice.maildir.exists() or new_files(alice) == []
    # without the record the same start delivers it (so the test above can fail)
    shutil.rmtree(alice.maildir, ignore_errors=True)
    envelope = read_envelope(path)
    envelope.recipients[0].next_attempt = 0.0
    committer.run_now(lambda ds: spool.update_envelope(path, envelope, ds))
    _, runner2 = make(tmp_path, committer, clock)

    async def run() -> None:
        runner2.start()
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not path.exists():
                break
        await runner2.stop()

    asyncio.run(run())
    assert not path.exists() and len(new_files(alice)) == 1


def test_offline_queue_tools_see_the_recorded_attempt(tmp_path: Path, committer: Committer) -> None:
    """`postroom queue list` with the server stopped after a crash shows the attempt count the
    journal holds (the listing applies it first)."""
    from postroom.queue import admin

    spool, _ = make(tmp_path, committer, Clock(NOW))
    path = queue_message(spool, committer, Recipient("a@example.com", mailbox_for(tmp_path, "a")))
    journal = Journal(spool.root)
    record(journal, committer, path, NOW + 300)
    journal.close()
    [entry] = admin.list_queue(spool.root.parent)
    [rcpt] = entry.to_dict()["recipients"]
    assert rcpt["attempts"] == 1 and rcpt["last_error"] == ATTEMPT_UNDER_WAY


def test_a_second_queue_manager_waits_for_the_first(tmp_path: Path, committer: Committer) -> None:
    """Only one process may run a queue (two would deliver twice): a runner whose journal is
    held by another owner does nothing until that owner lets go, then recovers and works."""
    clock = Clock(NOW + 10)
    spool, runner = make(tmp_path, committer, clock)
    alice = mailbox_for(tmp_path, "alice")
    path = queue_message(spool, committer, Recipient("alice@example.com", alice))
    owner = Journal(spool.root)
    assert owner.open() == 0

    async def main() -> None:
        runner.start()
        await asyncio.sleep(0.5)
        assert path.exists() and not alice.maildir.exists(), "worked on a queue it does not own"
        owner.close()  # the other manager stops
        for _ in range(200):
            await asyncio.sleep(0.02)
            if not path.exists():
                break
        await runner.stop()

    asyncio.run(main())
    assert not path.exists() and len(new_files(alice)) == 1
