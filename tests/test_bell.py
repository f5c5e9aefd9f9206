"""The hand-off of queued message ids from the workers to the queue manager (queue/bell.py),
over a real pipe: lines arrive whole and in order, a full pipe never blocks the worker, and a
worker whose backlog overflows asks for one scan instead."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from postroom.ids import new_queue_id
from postroom.queue import bell as bell_mod
from postroom.queue.bell import QueueBell
from postroom.queue.envelope import Envelope


def _envelope() -> Envelope:
    return Envelope(new_queue_id(), "a@example.org", 0.0)


def test_ids_arrive_in_order_with_their_domain() -> None:
    bell = QueueBell()
    got: list[tuple[str, str | None]] = []
    scans: list[int] = []
    sent = [_envelope() for _ in range(50)]

    async def main() -> None:
        bell.listen(lambda qid, dom: got.append((qid, dom)), lambda: scans.append(1))
        send = bell.sender(lambda env: "d.test" if env is sent[0] else None)
        for envelope in sent:
            send(envelope, Path("/nonexistent"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(got) == len(sent):
                break
        bell.close_listener()

    asyncio.run(main())
    assert got == [(sent[0].queue_id, "d.test")] + [(e.queue_id, None) for e in sent[1:]]
    assert scans == []


def test_a_full_pipe_keeps_a_backlog_then_asks_for_a_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bell_mod, "MAX_BACKLOG", 100)
    bell = QueueBell()
    received: list[str] = []
    scans: list[int] = []

    async def main() -> None:
        send = bell.sender(lambda env: None)
        # nobody reads: the pipe (64 KiB) fills, then the backlog, which overflows
        ids = []
        for _ in range(6000):
            envelope = _envelope()
            ids.append(envelope.queue_id)
            send(envelope, Path("/nonexistent"))  # never blocks
        assert bell._backlog and len(bell._backlog) <= 100
        bell.listen(lambda qid, dom: received.append(qid), lambda: scans.append(1))
        for _ in range(300):
            await asyncio.sleep(0.01)
            if not bell._backlog and scans:
                break
        await asyncio.sleep(0.05)
        bell.close_listener()
        # every id came through whole and in order (a subsequence: the overflow became a scan)
        position = {qid: n for n, qid in enumerate(ids)}
        assert all(qid in position for qid in received)
        assert [position[qid] for qid in received] == sorted(position[qid] for qid in received)
        assert 0 < len(received) < len(ids)

    asyncio.run(main())
    assert scans, "the lost ids were replaced by a request to scan"


def test_garbage_in_the_pipe_is_ignored() -> None:
    bell = QueueBell()
    got: list[str] = []
    good = new_queue_id()

    async def main() -> None:
        bell.listen(lambda qid, dom: got.append(qid), lambda: None)
        os.write(bell.write_end, b"../../etc/passwd -\n" + good.encode() + b" -\n")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if got:
                break
        bell.close_listener()

    asyncio.run(main())
    assert got == [good]
