"""Queue administration on real queue files: list, show, hold, release, delete, flush, retry."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.config import from_dict
from postroom.delivery.maildir import MaildirUsage
from postroom.errors import StorageError
from postroom.policy.routes import LocalDelivery, RemoteDelivery
from postroom.queue import admin
from postroom.queue.committer import Committer, Disk
from postroom.queue.envelope import Envelope, Recipient, RecipientState
from postroom.queue.runner import QueueRunner
from postroom.queue.spool import Spool, read_envelope

CONTENT = b"From: a@example.org\r\nSubject: queued\r\nX-Long: one\r\n two\r\n\r\nHello\r\n"
PREPEND = b"Received: from client by mx.example.com; today\r\n"
NOW = 1_732_900_000.0
QID1 = "4Q8X2B0C1DFG"
QID2 = "4Q8X2B0C1DFH"
QID3 = "4Q8X2B0C1DFJ"


class RecordingDisk(Disk):
    """Real calls, recorded in order: ("fsync", path), ("rename", dst), ("fsync_dir", path)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self._paths: dict[int, str] = {}

    def create(self, path: str) -> int:
        fd = super().create(path)
        self._paths[fd] = path
        return fd

    def fsync(self, fd: int) -> None:
        super().fsync(fd)
        self.calls.append(("fsync", self._paths[fd]))

    def rename(self, src: str, dst: str) -> None:
        super().rename(src, dst)
        self.calls.append(("rename", dst))

    def fsync_dir(self, path: str) -> None:
        super().fsync_dir(path)
        self.calls.append(("fsync_dir", path))


class Queue:
    """A real spool under tmp_path, and messages put into it with the spool's own writer."""

    def __init__(self, root: Path, committer: Committer) -> None:
        self.data = root / "data"
        self.committer = committer
        self.spool = Spool(self.data, committer, MaildirUsage(), "mx.example.com")
        self.active = self.data / "queue" / "active"
        self.hold = self.data / "queue" / "hold"

    def add(
        self,
        queue_id: str,
        *recipients: Recipient,
        sender: str = "a@example.org",
        arrival: float = NOW,
        content: bytes = CONTENT,
    ) -> Path:
        """Accept a message for remote recipients (always queued), then set the recipients'
        states as given, as the runner would (update_envelope)."""
        env = Envelope(
            queue_id,
            sender,
            arrival,
            client_address="192.0.2.1",
            client_name="client.example",
            helo="client.example",
            recipients=[Recipient(r.original, RemoteDelivery(r.original)) for r in recipients],
        )

        async def accept() -> Path | None:
            message = self.spool.open_message()
            message.write(content)
            return (await self.spool.accept(env, message, PREPEND)).queue_file

        path = asyncio.run(accept())
        assert path is not None
        env.recipients = list(recipients)
        self.committer.run_now(lambda ds: self.spool.update_envelope(path, env, ds))
        return path


@pytest.fixture
def committer() -> Iterator[Committer]:
    c = Committer()
    c.start()
    yield c
    c.stop()


@pytest.fixture
def q(tmp_path: Path, committer: Committer) -> Queue:
    return Queue(tmp_path, committer)


def remote(address: str, **kw: object) -> Recipient:
    return Recipient(address, RemoteDelivery(address), **kw)  # type: ignore[arg-type]


def deferred(address: str, error: str = "connection refused", attempts: int = 2) -> Recipient:
    return remote(
        address,
        state=RecipientState.DEFERRED,
        attempts=attempts,
        next_attempt=NOW + 3600 * 24 * 365 * 50,  # far in the future whatever the clock says
        last_error=error,
    )


def body_of(path: Path) -> bytes:
    return path.read_bytes().partition(b"\n")[2]


# ---- list -------------------------------------------------------------------------------------


def test_list_reads_envelopes_sizes_and_both_queues(q: Queue) -> None:
    p1 = q.add(QID1, deferred("bob@example.net"), remote("carol@example.org"), arrival=NOW + 5)
    q.add(QID2, deferred("dave@example.net"), sender="", arrival=NOW)
    assert admin.hold(q.data, QID2).result == admin.HELD
    entries = admin.list_queue(q.data)
    assert [e.queue_id for e in entries] == [QID2, QID1]  # oldest first
    held, active = entries
    assert held.queue == "hold" and held.held and not active.held
    assert active.size == len(PREPEND + CONTENT) == len(body_of(p1))
    record = active.to_dict()
    assert record["sender"] == "a@example.org" and record["arrival"] == NOW + 5
    assert [(r["address"], r["state"], r["last_error"]) for r in record["recipients"]] == [
        ("bob@example.net", "deferred", "connection refused"),
        ("carol@example.org", "pending", None),
    ]
    assert held.to_dict()["sender"] == ""
    json.dumps([e.to_dict() for e in entries])  # JSON-ready


def test_list_of_a_missing_queue_is_empty(tmp_path: Path) -> None:
    assert admin.list_queue(tmp_path / "nothing") == []


def test_list_skips_a_file_that_vanishes_mid_listing(
    q: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    p1 = q.add(QID1, deferred("bob@example.net"))
    q.add(QID2, deferred("carol@example.net"))
    real = admin._entry

    def vanishing(queue: str, path: Path) -> admin.QueueEntry:
        if path == p1:
            path.unlink()  # delivered between the directory scan and the read
        return real(queue, path)

    monkeypatch.setattr(admin, "_entry", vanishing)
    assert [e.queue_id for e in admin.list_queue(q.data)] == [QID2]


def test_list_reads_each_file_whole_while_the_runner_rewrites_it(q: Queue) -> None:
    """Every listing sees one version of the file or the other, never a mix."""
    path = q.add(QID1, deferred("bob@example.net", error="x", attempts=1))
    size = len(body_of(path))
    stop = threading.Event()

    def rewrite() -> None:
        attempts = 1
        while not stop.is_set():
            env = read_envelope(path)
            attempts += 1
            env.recipients[0].attempts = attempts
            env.recipients[0].last_error = "x" * (attempts % 50)  # the line changes length
            q.committer.run_now(lambda ds, env=env: q.spool.update_envelope(path, env, ds))

    writer = threading.Thread(target=rewrite)
    writer.start()
    try:
        seen: set[int] = set()
        deadline = time.monotonic() + 5.0
        reads = 0
        while (len(seen) < 20 or reads < 200) and time.monotonic() < deadline:
            reads += 1
            [entry] = admin.list_queue(q.data)
            assert entry.size == size
            rcpt = entry.envelope.recipients[0]
            assert rcpt.last_error == "x" * (rcpt.attempts % 50)
            seen.add(rcpt.attempts)
    finally:
        stop.set()
        writer.join()
    assert len(seen) >= 20  # the rewrites really happened during the listings


def test_list_leaves_out_an_unreadable_file_with_a_warning(
    q: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    q.add(QID1, deferred("bob@example.net"))
    (q.active / QID2).write_bytes(b"{not json\nbody")
    (q.active / QID3).write_bytes(b"no newline at all")
    with caplog.at_level(logging.WARNING, logger="postroom.queue"):
        assert [e.queue_id for e in admin.list_queue(q.data)] == [QID1]
    assert f"unreadable queue file {q.active / QID2}" in caplog.text
    assert f"unreadable queue file {q.active / QID3}" in caplog.text
    assert (q.active / QID2).exists()  # listing never moves anything


# ---- show -------------------------------------------------------------------------------------


def test_show_gives_envelope_recipients_history_and_headers(q: Queue) -> None:
    path = q.add(QID1, deferred("bob@example.net"), remote("carol@example.org"))
    # An attempt history as the runner will write it (a list of {time, result, detail}).
    line, _, rest = path.read_bytes().partition(b"\n")
    raw = json.loads(line)
    history = [{"time": NOW + 60, "result": "deferred", "detail": "connection refused"}]
    raw["recipients"][0]["history"] = history
    path.write_bytes(json.dumps(raw).encode() + b"\n" + rest)

    shown = admin.show(q.data, QID1)
    assert shown is not None
    assert shown["queue_id"] == QID1 and shown["queue"] == "active" and not shown["held"]
    assert shown["envelope"]["client_address"] == "192.0.2.1"
    assert shown["envelope"]["helo"] == "client.example"
    bob, carol = shown["recipients"]
    assert bob["history"] == history and carol["history"] == []
    assert bob["attempts"] == 2 and bob["next_attempt"] > NOW and bob["remote"]
    assert shown["headers"] == (
        "Received: from client by mx.example.com; today\n"
        "From: a@example.org\nSubject: queued\nX-Long: one\n two\n"
    )
    assert not shown["headers_truncated"]
    json.dumps(shown)


def test_show_cuts_a_huge_header_section(q: Queue) -> None:
    huge = b"X-Big: " + b"a" * (admin.MAX_HEADER_BYTES + 10) + b"\r\n\r\nbody\r\n"
    q.add(QID1, deferred("bob@example.net"), content=huge)
    shown = admin.show(q.data, QID1)
    assert shown is not None and shown["headers_truncated"]
    assert admin.MAX_HEADER_BYTES - 100 < len(shown["headers"]) <= admin.MAX_HEADER_BYTES
    assert shown["headers"].endswith("aaaa")


def test_show_finds_held_messages_and_says_none_for_unknown(q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    admin.hold(q.data, QID1)
    shown = admin.show(q.data, QID1)
    assert shown is not None and shown["queue"] == "hold" and shown["held"]
    assert admin.show(q.data, QID2) is None


def test_show_of_a_corrupt_file_is_a_storage_error(q: Queue) -> None:
    q.active.joinpath(QID1).write_bytes(b"[1, 2\nrest")
    with pytest.raises(StorageError, match="unreadable envelope"):
        admin.show(q.data, QID1)


# ---- ids ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    ["../active/" + QID1, QID1 + "/", "", "ALL", QID1.lower(), QID1[:-1] + "A", QID1 + "B",
     "4Q8X2B0C1DF\x00", 123, None],
)
def test_bad_queue_ids_are_refused_before_any_file_is_touched(q: Queue, bad: object) -> None:
    q.add(QID1, deferred("bob@example.net"))
    before = sorted(os.listdir(q.active))
    for fn in (admin.hold, admin.release, admin.delete, admin.flush, admin.show):
        with pytest.raises(admin.AdminError, match="not a queue id"):
            fn(q.data, bad)  # type: ignore[operator]
    response = admin.dispatch(q.data, "delete", {"ids": [QID1, bad]})
    assert response["ok"] is False and "not a queue id" in response["error"]
    assert sorted(os.listdir(q.active)) == before  # QID1 too: the request is refused whole


@pytest.mark.parametrize(
    ("op", "args", "error"),
    [
        ("explode", {}, "unknown queue operation"),
        ("hold", {}, '"ids" must be'),
        ("hold", {"ids": []}, '"ids" must be'),
        ("hold", {"ids": QID1}, '"ids" must be'),
        ("flush", {"ids": [QID1], "domain": "example.net"}, "not both"),
        ("flush", {"domain": "a@b"}, "is not a domain"),
        ("flush", {"domain": 7}, "is not a domain"),
        ("show", {}, "not a queue id"),
    ],
)
def test_malformed_requests_get_an_error(q: Queue, op: str, args: dict[str, object], error: str) -> None:
    response = admin.dispatch(q.data, op, args)
    assert response["ok"] is False and error in response["error"]


# ---- hold, release, delete --------------------------------------------------------------------


def test_hold_and_release_round_trip(q: Queue, committer: Committer) -> None:
    path = q.add(QID1, deferred("bob@example.net"), remote("carol@example.org"))
    body = body_of(path)
    disk = RecordingDisk()
    assert admin.hold(q.data, QID1, disk=disk) == admin.Outcome(QID1, admin.HELD)
    assert not path.exists() and body_of(q.hold / QID1) == body
    # the destination directory is made durable first, then the one the file left
    assert disk.calls == [("rename", str(q.hold / QID1)), ("fsync_dir", str(q.hold)),
                          ("fsync_dir", str(q.active))]
    assert q.spool.load_queue() == []  # the runner never sees it
    assert admin.hold(q.data, QID1).result == admin.UNCHANGED

    disk = RecordingDisk()
    assert admin.release(q.data, QID1, disk=disk).result == admin.RELEASED
    assert not (q.hold / QID1).exists() and body_of(path) == body
    [rewritten_tmp] = [p for op, p in disk.calls if op == "fsync"]
    assert disk.calls == [
        ("fsync", rewritten_tmp),  # the new version, durable before it replaces the old one
        ("rename", str(q.hold / QID1)),
        ("fsync_dir", str(q.hold)),
        ("rename", str(path)),
        ("fsync_dir", str(q.active)),
        ("fsync_dir", str(q.hold)),
    ]
    assert Path(rewritten_tmp).parent == q.data / "queue" / "incoming"
    assert os.listdir(q.data / "queue" / "incoming") == []
    bob, carol = read_envelope(path).recipients
    assert bob.next_attempt == 0.0 and bob.attempts == 2 and bob.state is RecipientState.DEFERRED
    assert bob.last_error == "connection refused"  # kept: it says what happened last
    assert carol.next_attempt == 0.0 and carol.state is RecipientState.PENDING
    assert admin.release(q.data, QID1).result == admin.UNCHANGED


def test_release_clears_hold_marks_in_the_envelope(q: Queue) -> None:
    """A message held by its envelope (the flag, or HELD recipients) is released in place."""
    delivered = remote("done@example.net", state=RecipientState.DELIVERED, attempts=1)
    path = q.add(
        QID1,
        remote("bob@example.net", state=RecipientState.HELD, attempts=3, next_attempt=NOW + 9e9),
        remote("carol@example.net", state=RecipientState.HELD),
        delivered,
    )
    assert admin.list_queue(q.data)[0].envelope.recipients[0].state is RecipientState.HELD
    assert admin.release(q.data, QID1).result == admin.RELEASED
    bob, carol, done = read_envelope(path).recipients
    assert (bob.state, bob.next_attempt) == (RecipientState.DEFERRED, 0.0)
    assert carol.state is RecipientState.PENDING
    assert done.state is RecipientState.DELIVERED
    assert admin.release(q.data, QID1).result == admin.UNCHANGED


def test_release_never_replaces_an_active_message_of_the_same_id(q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    admin.hold(q.data, QID1)
    q.add(QID1, deferred("other@example.net"))  # cannot happen, but must not lose mail if it did
    with pytest.raises(StorageError, match="exists"):
        admin.release(q.data, QID1)
    assert read_envelope(q.hold / QID1).recipients[0].original == "bob@example.net"
    assert read_envelope(q.active / QID1).recipients[0].original == "other@example.net"


def test_delete_from_either_queue(q: Queue, caplog: pytest.LogCaptureFixture) -> None:
    q.add(QID1, deferred("bob@example.net"))
    q.add(QID2, deferred("carol@example.net"))
    admin.hold(q.data, QID2)
    disk = RecordingDisk()
    with caplog.at_level(logging.INFO, logger="postroom"):
        assert admin.delete(q.data, QID1, disk=disk).result == admin.DELETED
        assert admin.delete(q.data, QID2).result == admin.DELETED
    assert disk.calls == [("fsync_dir", str(q.active))]
    assert os.listdir(q.active) == [] and os.listdir(q.hold) == []
    assert f"{QID1}: removed" in caplog.text and f"{QID2}: removed" in caplog.text
    assert admin.delete(q.data, QID1) == admin.Outcome(QID1, admin.MISSING, "no such message")


def test_missing_messages(q: Queue) -> None:
    for fn in (admin.hold, admin.release, admin.delete, admin.flush):
        assert fn(q.data, QID1).result == admin.MISSING


def test_hold_creates_the_hold_directory_when_missing(q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    q.hold.rmdir()
    assert admin.hold(q.data, QID1).result == admin.HELD
    assert (q.hold / QID1).is_file() and (q.hold.stat().st_mode & 0o777) == 0o700


# ---- flush, retry ---------------------------------------------------------------------------------


def test_flush_makes_waiting_recipients_due(q: Queue) -> None:
    path = q.add(
        QID1,
        deferred("bob@example.net"),
        remote("done@example.net", state=RecipientState.DELIVERED, next_attempt=NOW + 9e9),
        remote("held@example.net", state=RecipientState.HELD, next_attempt=NOW + 9e9),
    )
    body = body_of(path)
    disk = RecordingDisk()
    assert admin.flush(q.data, QID1, disk=disk).result == admin.FLUSHED
    bob, done, held = read_envelope(path).recipients
    assert bob.next_attempt == 0.0 and bob.attempts == 2  # flush keeps the backoff position
    assert done.next_attempt == NOW + 9e9 and held.next_attempt == NOW + 9e9
    assert body_of(path) == body
    assert [op for op, _ in disk.calls] == ["fsync", "rename", "fsync_dir"]
    assert disk.calls[-1] == ("fsync_dir", str(q.active))
    # Nothing left to change: no rewrite at all (same inode).
    inode = path.stat().st_ino
    assert admin.flush(q.data, QID1).result == admin.UNCHANGED
    assert path.stat().st_ino == inode


def test_flush_by_domain_touches_only_that_domain(q: Queue) -> None:
    p1 = q.add(QID1, deferred("bob@Example.NET"), deferred("carol@example.org"))
    p2 = q.add(QID2, deferred("dave@example.org"))
    response = admin.dispatch(q.data, "flush", {"domain": "example.net."})
    assert response == {
        "ok": True,
        "results": [
            {"queue_id": QID1, "result": "flushed", "detail": ""},
            {"queue_id": QID2, "result": "unchanged", "detail": "nothing to flush"},
        ],
    }
    bob, carol = read_envelope(p1).recipients
    assert bob.next_attempt == 0.0 and carol.next_attempt > NOW
    assert read_envelope(p2).recipients[0].next_attempt > NOW


def test_flush_leaves_held_messages_alone(q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    admin.hold(q.data, QID1)
    assert admin.flush(q.data, QID1) == admin.Outcome(QID1, admin.UNCHANGED, "on hold")
    assert read_envelope(q.hold / QID1).recipients[0].next_attempt > NOW
    assert admin.dispatch(q.data, "flush", {}) == {"ok": True, "results": []}


def test_retry_resets_the_attempt_count(q: Queue) -> None:
    bounced = remote("gone@example.net", state=RecipientState.BOUNCED, attempts=5)
    path = q.add(QID1, deferred("bob@example.net", attempts=4), bounced)
    assert admin.apply(q.data, "retry", QID1, {}).result == admin.RETRIED
    bob, gone = read_envelope(path).recipients
    assert (bob.attempts, bob.next_attempt, bob.state) == (0, 0.0, RecipientState.DEFERRED)
    assert (gone.attempts, gone.state) == (5, RecipientState.BOUNCED)  # final stays final
    assert admin.apply(q.data, "retry", QID1, {}).result == admin.UNCHANGED


def test_a_rewrite_keeps_the_owner_of_the_file(q: Queue) -> None:
    """Run as root with the server's files owned by its user, the new file goes to that user."""
    if os.geteuid() != 0:
        pytest.skip("needs root to give files away")
    path = q.add(QID1, deferred("bob@example.net"))
    os.chown(path, 12345, 23456)
    assert admin.flush(q.data, QID1).result == admin.FLUSHED
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (12345, 23456) and st.st_mode & 0o777 == 0o600


def test_a_failed_rewrite_leaves_the_old_file_and_no_temporary(q: Queue) -> None:
    class FullDisk(Disk):
        def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
            raise OSError(28, "No space left on device")

    path = q.add(QID1, deferred("bob@example.net"))
    before = path.read_bytes()
    with pytest.raises(StorageError) as info:
        admin.flush(q.data, QID1, disk=FullDisk())
    assert info.value.disk_full
    assert path.read_bytes() == before
    assert os.listdir(q.data / "queue" / "incoming") == []
    # Through dispatch, the failure is that message's outcome; the others are still done.
    q.add(QID2, deferred("carol@example.net"))
    failed = admin.apply_safely(q.data, "flush", QID1, {}, disk=FullDisk())
    assert failed.result == admin.ERROR and "No space left" in failed.detail
    assert admin.apply_safely(q.data, "flush", QID2, {}).result == admin.FLUSHED


# ---- requests ----------------------------------------------------------------------------------


def test_all_means_every_message_the_operation_applies_to(q: Queue) -> None:
    for qid in (QID1, QID2, QID3):
        q.add(qid, deferred(f"{qid.lower()}@example.net"))
    assert admin.dispatch(q.data, "hold", {"ids": [QID1]})["results"][0]["result"] == "held"
    assert admin.targets(q.data, "hold", {"ids": "ALL"}) == [QID2, QID3]
    assert admin.targets(q.data, "release", {"ids": "ALL"}) == [QID1]
    assert admin.targets(q.data, "flush", {}) == [QID2, QID3]
    assert admin.targets(q.data, "delete", {"ids": [QID3, QID3, QID1]}) == [QID3, QID1]
    response = admin.dispatch(q.data, "delete", {"ids": "ALL"})
    assert [r["queue_id"] for r in response["results"]] == [QID1, QID2, QID3]
    assert {r["result"] for r in response["results"]} == {"deleted"}
    assert admin.list_queue(q.data) == []


def test_read_requests(q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    listing = admin.dispatch(q.data, "list", {})
    assert listing["ok"] and [m["queue_id"] for m in listing["messages"]] == [QID1]
    assert admin.dispatch(q.data, "show", {"id": QID1})["message"]["queue_id"] == QID1
    assert admin.dispatch(q.data, "show", {"id": QID2}) == {
        "ok": False, "error": f"{QID2}: no such message"
    }


# ---- with the runner -------------------------------------------------------------------------------


def test_the_runner_delivers_a_released_message_and_not_a_held_one(
    tmp_path: Path, q: Queue, committer: Committer
) -> None:
    maildir = tmp_path / "mail" / "bob" / "Maildir"
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "bob").write_bytes(b"in the way")  # the first attempt fails
    bob = Recipient("bob@example.com", LocalDelivery("bob@example.com", maildir))
    path = q.add(QID1, bob, arrival=time.time())
    config = from_dict({"queue": {"min_backoff": 600.0, "max_backoff": 6000.0}})
    runner = QueueRunner(q.spool, committer, config, rng=random.Random(1))
    asyncio.run(runner.run_once())
    [rcpt] = read_envelope(path).recipients
    assert rcpt.state is RecipientState.DEFERRED and rcpt.attempts == 1

    (tmp_path / "mail" / "bob").unlink()  # the cause is fixed, but the retry is far away
    admin.hold(q.data, QID1)
    asyncio.run(runner.run_once())
    assert not maildir.exists()  # held: not even looked at
    admin.release(q.data, QID1)
    asyncio.run(runner.run_once())
    assert len(os.listdir(maildir / "new")) == 1
    assert not path.exists()  # delivered and removed
