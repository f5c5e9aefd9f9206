"""``postroom queue ...`` and ``mailq``: in-process with CliRunner, through a running control
socket, and as real programs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from postroom.cli import format_mailq, mailq, main
from postroom.net.control import ControlServer, queue_handler, socket_path
from postroom.queue import admin
from postroom.queue.committer import Committer
from postroom.queue.envelope import RecipientState

from .test_queue_admin import CONTENT, NOW, PREPEND, QID1, QID2, QID3, Queue, deferred, remote

SIZE = len(PREPEND + CONTENT)
REFUSED = "connect to mx.example.net[192.0.2.9]:25: Connection refused"
FULL = "host mx.example.org said: 452 4.2.2 mailbox full"


class Cli:
    def __init__(self, root: Path) -> None:
        self.config = root / "postroom.toml"
        self.config.write_text(
            f'[server]\nhostname = "mx.test.example"\ndata_dir = "{root / "data"}"\nrun_as = ""\n'
        )
        self.runner = CliRunner()

    def __call__(self, *args: str, code: int = 0) -> Result:
        result = self.runner.invoke(main, ["-c", str(self.config), *args])
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        assert "Traceback" not in result.output
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)

    def mailq(self, *args: str) -> Result:
        result = self.runner.invoke(mailq, ["-c", str(self.config), *args])
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return result


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    committer = Committer()
    committer.start()
    yield Queue(tmp_path, committer)
    committer.stop()


@pytest.fixture
def cli(tmp_path: Path, q: Queue) -> Cli:
    return Cli(tmp_path)


def asctime(stamp: float) -> str:
    return time.asctime(time.localtime(stamp))[:19]


def fill(q: Queue) -> None:
    """QID1: two recipients with one error, one with another, one never tried, one delivered.
    QID2 (older, null sender): on hold."""
    q.add(
        QID1,
        deferred("bob@example.net", REFUSED),
        deferred("carol@example.net", REFUSED),
        deferred("dave@example.org", FULL),
        remote("erin@example.org"),
        remote("done@example.org", state=RecipientState.DELIVERED),
        arrival=NOW + 100,
    )
    q.add(QID2, deferred("frank@example.com", "timeout"), sender="", arrival=NOW)
    admin.hold(q.data, QID2)


# ---- reading --------------------------------------------------------------------------------------


def test_an_empty_queue(cli: Cli) -> None:
    assert cli("queue", "list").stdout == "Mail queue is empty\n"
    assert cli.json("queue", "list") == []
    assert cli.mailq().stdout == "Mail queue is empty\n"
    assert json.loads(cli.mailq("--json").stdout) == []


def test_mailq_prints_postfix_layout(cli: Cli, q: Queue) -> None:
    fill(q)
    pad = " " * 47
    expected = "\n".join([
        "----Queue ID----- --Size-- ---Arrival Time---- --Sender/Recipient------",
        f"{QID2}!     {SIZE:>8} {asctime(NOW)} MAILER-DAEMON",
        f"{'(timeout)':>78}",
        f"{pad}frank@example.com",
        "",
        f"{QID1}      {SIZE:>8} {asctime(NOW + 100)} a@example.org",
        f"{'(' + REFUSED + ')':>78}",
        f"{pad}bob@example.net",
        f"{pad}carol@example.net",
        f"{'(' + FULL + ')':>78}",
        f"{pad}dave@example.org",
        f"{'(reason unavailable)':>78}",
        f"{pad}erin@example.org",
        "",
        f"-- {2 * SIZE // 1024} Kbytes in 2 Requests.",
        "",
    ])
    assert cli.mailq().stdout == expected
    assert json.loads(cli.mailq("--json").stdout) == cli.json("queue", "list")


def test_mailq_counts_kbytes_and_a_single_request() -> None:
    entry = {
        "queue_id": QID1, "held": False, "size": 5000, "arrival": NOW, "sender": "a@b.example",
        "recipients": [{"address": "c@d.example", "state": "pending", "last_error": None}],
    }
    text = format_mailq([entry])
    assert text.endswith("\n-- 4 Kbytes in 1 Request.\n")
    # a recipient with no error after none before: no reason line at all (as Postfix)
    assert "reason" not in text and "(" not in text


def test_queue_list_table_and_json(cli: Cli, q: Queue) -> None:
    fill(q)
    out = cli("queue", "list").stdout
    assert f"{QID1} " in out and f"{QID2}!" in out
    for text in ("bob@example.net", "deferred", "Connection refused", "erin@example.org",
                 "pending", "delivered", "<>", "mailbox full"):
        assert text in out, text
    listing = cli.json("queue", "list")
    assert [m["queue_id"] for m in listing] == [QID2, QID1]
    assert listing == [e.to_dict() for e in admin.list_queue(q.data)]
    assert listing[0]["held"] and listing[0]["queue"] == "hold"


def test_queue_show(cli: Cli, q: Queue) -> None:
    fill(q)
    out = cli("queue", "show", QID1).stdout
    assert f"Queue ID:  {QID1} (active)" in out
    assert "Sender:    <a@example.org>" in out
    assert "Client:    client.example[192.0.2.1], helo client.example" in out
    assert "  <bob@example.net>\n    state deferred, attempts 2, next attempt 20" in out
    assert "    last error: connect to mx.example.net[192.0.2.9]:25: Connection refused" in out
    assert "  <erin@example.org>\n    state pending, attempts 0, next attempt now" in out
    assert "  <done@example.org>\n    state delivered, attempts 0, next attempt -" in out
    assert out.endswith("Headers:\n  Received: from client by mx.example.com; today\n"
                        "  From: a@example.org\n  Subject: queued\n  X-Long: one\n   two\n")
    assert f"Queue ID:  {QID2} (on hold)" in cli("queue", "show", QID2).stdout
    shown = cli.json("queue", "show", QID1)
    assert shown == admin.show(q.data, QID1)


def test_queue_show_refusals(cli: Cli, q: Queue) -> None:
    assert cli("queue", "show", QID3, code=1).stderr == f"Error: {QID3}: no such message\n"
    assert "is not a queue id" in cli("queue", "show", "../../etc/passwd", code=1).stderr


# ---- changing, on the files (no server) ----------------------------------------------------------


def test_hold_release_delete_offline(cli: Cli, q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    q.add(QID3, deferred("carol@example.net"))
    assert cli("queue", "hold", QID1).stdout == f"{QID1}: placed on hold\n"
    assert (q.hold / QID1).exists() and not (q.active / QID1).exists()
    assert cli("queue", "hold", QID1).stdout == f"{QID1}: unchanged (already on hold)\n"
    assert cli.json("queue", "release", "ALL") == {
        "ok": True, "via": "files",
        "results": [{"queue_id": QID1, "result": "released", "detail": ""}],
    }
    assert (q.active / QID1).exists()
    result = cli("queue", "delete", QID1, QID2, code=1)  # one missing: exit 1, the other done
    assert result.stdout == f"{QID1}: removed\n"
    assert result.stderr == f"{QID2}: no such message\n"
    assert not (q.active / QID1).exists()
    assert cli("queue", "delete", "ALL").stdout == f"{QID3}: removed\n"
    assert cli("queue", "delete", "ALL").stdout == "no messages\n"


def test_flush_and_retry_offline(cli: Cli, q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net", attempts=3), deferred("carol@example.org"))
    q.add(QID3, deferred("dave@example.org"))
    out = cli("queue", "flush", "--domain", "example.net").stdout
    assert out == f"{QID1}: due for delivery now\n{QID3}: unchanged (nothing to flush)\n"
    [entry] = [e for e in admin.list_queue(q.data) if e.queue_id == QID1]
    bob, carol = entry.envelope.recipients
    assert (bob.next_attempt, bob.attempts) == (0.0, 3) and carol.next_attempt > NOW
    assert cli("queue", "flush", QID3).stdout == f"{QID3}: due for delivery now\n"
    assert cli("queue", "retry", QID1).stdout == (
        f"{QID1}: due for delivery now, attempt count reset\n"
    )
    assert [r.attempts for r in admin.list_queue(q.data)[0].envelope.recipients] == [0, 0]
    response = cli.json("queue", "flush")
    assert response["via"] == "files" and [r["queue_id"] for r in response["results"]] == [
        QID1, QID3
    ]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["queue", "hold", "ALL", QID1], 2, "ALL stands alone"),
        (["queue", "hold"], 2, "Missing argument"),
        (["queue", "flush", QID1, "--domain", "example.net"], 2, "not both"),
        (["queue", "delete", "../" + QID1], 1, "is not a queue id"),
        (["queue", "flush", "--domain", "a@b"], 1, "is not a domain"),
    ],
)
def test_refusals(cli: Cli, q: Queue, args: list[str], code: int, message: str) -> None:
    q.add(QID1, deferred("bob@example.net"))
    assert message in cli(*args, code=code).stderr
    assert (q.active / QID1).exists()


# ---- changing, through the running server ----------------------------------------------------------


@contextlib.contextmanager
def control_server(data_dir: Path, events: list[str]) -> Iterator[None]:
    """A real ControlServer with the queue handler, on an event loop in a thread."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Event | None = None

    @contextlib.asynccontextmanager
    async def lock(queue_id: str) -> AsyncIterator[None]:
        events.append(f"lock {queue_id}")
        yield

    async def run() -> None:
        nonlocal stop
        stop = asyncio.Event()
        handler = queue_handler(data_dir, message_lock=lock, on_change=lambda: events.append("wake"))
        server = ControlServer(socket_path(data_dir), handler)
        await server.start()
        ready.set()
        await stop.wait()
        await server.stop()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),))
    thread.start()
    try:
        assert ready.wait(5)
        yield
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
        loop.close()


def test_changes_go_through_the_running_server(cli: Cli, q: Queue) -> None:
    q.add(QID1, deferred("bob@example.net"))
    events: list[str] = []
    with control_server(q.data, events):
        response = cli.json("queue", "hold", QID1)
        assert response["via"] == "server"
        assert response["results"] == [{"queue_id": QID1, "result": "held", "detail": ""}]
        assert events == [f"lock {QID1}", "wake"]
        assert cli("queue", "release", QID1).stdout == f"{QID1}: released from hold\n"
        assert "is not a queue id" in cli("queue", "delete", "x/y", code=1).stderr
        assert cli("queue", "delete", QID1).stdout == f"{QID1}: removed\n"
    assert admin.list_queue(q.data) == []
    assert not socket_path(q.data).exists()
    # the server is gone (its socket removed): the CLI acts on the files again
    q.add(QID3, deferred("carol@example.net"))
    assert cli.json("queue", "hold", QID3)["via"] == "files"


# ---- as programs -------------------------------------------------------------------------------------


def test_mailq_and_queue_list_as_programs(cli: Cli, q: Queue) -> None:
    fill(q)
    mailq_run = subprocess.run(
        [sys.executable, "-c", "from postroom.cli import mailq_main; mailq_main()",
         "-c", str(cli.config)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert mailq_run.returncode == 0, mailq_run.stderr
    assert mailq_run.stdout == cli.mailq().stdout
    assert mailq_run.stdout.startswith("----Queue ID----- --Size--")
    listed = subprocess.run(
        [sys.executable, "-m", "postroom", "-c", str(cli.config), "queue", "list", "--json"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert [m["queue_id"] for m in json.loads(listed.stdout)] == [QID2, QID1]
