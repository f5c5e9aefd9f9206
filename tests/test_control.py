"""The control socket: a real asyncio server on a Unix socket, and the blocking client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from postroom.errors import PostroomError
from postroom.net import control
from postroom.net.control import ControlError, ControlServer, call, queue_handler
from postroom.queue import admin
from postroom.queue.committer import Committer

from .test_queue_admin import QID1, QID2, Queue, deferred


async def echo(op: str, args: dict[str, Any]) -> dict[str, Any]:
    if op == "boom":
        raise RuntimeError("kaboom")
    if op == "refuse":
        raise admin.AdminError("refused politely")
    if op == "bad":
        return [1, 2]  # type: ignore[return-value]
    if op == "unserialisable":
        return {"ok": True, "x": object()}
    return {"ok": True, "op": op, "args": args}


@contextlib.asynccontextmanager
async def serving(path: Path, handler: control.Handler = echo, **kw: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, handler, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def ask(path: Path, op: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any] | None:
    return await asyncio.to_thread(call, path, op, args or {}, **kw)


async def raw_exchange(path: Path, data: bytes, *, close_write: bool = False) -> bytes:
    """Send raw bytes and read the whole answer (the server closes after one)."""

    def run() -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(path))
            try:
                sock.sendall(data)
                if close_write:
                    sock.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass
            chunks = []
            try:
                while chunk := sock.recv(65536):
                    chunks.append(chunk)
            except ConnectionResetError:
                pass
            return b"".join(chunks)

    return await asyncio.to_thread(run)


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "control.sock"


@pytest.fixture
def q(tmp_path: Path) -> Iterator[Queue]:
    committer = Committer()
    committer.start()
    yield Queue(tmp_path, committer)
    committer.stop()


def test_request_and_answer(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            st = os.lstat(sock_path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
            answer = await ask(sock_path, "hold", {"ids": [QID1], "ü": "ñ"})
            assert answer == {"ok": True, "op": "hold", "args": {"ids": [QID1], "ü": "ñ"}}
            # one request per connection, many connections
            answers = await asyncio.gather(*(ask(sock_path, f"op{i}") for i in range(20)))
            assert [a["op"] for a in answers if a] == [f"op{i}" for i in range(20)]
        assert not await asyncio.to_thread(sock_path.exists)  # removed at stop

    asyncio.run(main())


def test_handler_failures_become_error_answers(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path):
            assert await ask(sock_path, "boom") == {
                "ok": False, "error": "internal error: RuntimeError: kaboom"
            }
            assert await ask(sock_path, "refuse") == {"ok": False, "error": "refused politely"}
            assert await ask(sock_path, "bad") == {"ok": False, "error": "internal error: bad answer"}
            assert await ask(sock_path, "unserialisable") == {
                "ok": False, "error": "internal error: bad answer"
            }
            assert (await ask(sock_path, "fine") or {})["ok"] is True  # still serving

    asyncio.run(main())


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"not json\n", "request is not JSON"),
        (b"\xff\xfe\n", "request is not JSON"),
        (b"[1, 2]\n", 'request must be an object with a string "op"'),
        (b'{"args": {}}\n', 'request must be an object with a string "op"'),
        (b'{"op": 5}\n', 'request must be an object with a string "op"'),
        (b'{"op": "x", "args": [1]}\n', '"args" must be an object'),
        (b'{"op": "x"}', "request without a final newline"),
        (b"[" * 30_000 + b"]" * 30_000 + b"\n", "request is nested too deeply"),
        (b'{"op": "' + b"x" * (control.MAX_REQUEST + 10) + b'"}\n', "request longer than"),
    ],
)
def test_malformed_requests_get_an_error_answer(sock_path: Path, data: bytes, error: str) -> None:
    async def main() -> None:
        async with serving(sock_path):
            answer = await raw_exchange(sock_path, data, close_write=True)
            assert answer.endswith(b"\n") and answer.count(b"\n") == 1
            parsed = json.loads(answer)
            assert parsed["ok"] is False and parsed["error"].startswith(error)
            assert (await ask(sock_path, "after"))["op"] == "after"  # type: ignore[index]

    asyncio.run(main())


def test_a_silent_client_times_out(sock_path: Path) -> None:
    async def main() -> None:
        async with serving(sock_path, request_timeout=0.2):
            answer = await raw_exchange(sock_path, b'{"op": "x"')  # no newline, no EOF
            assert json.loads(answer) == {"ok": False, "error": "request timed out"}

    asyncio.run(main())


def test_no_server_means_none(tmp_path: Path, sock_path: Path) -> None:
    assert call(sock_path, "list", {}) is None  # no socket file
    # a socket file left by a server that died: nobody accepts on it
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()
    assert sock_path.exists()
    assert call(sock_path, "list", {}) is None
    assert call(tmp_path / "missing-dir" / "control.sock", "list", {}) is None


def test_start_replaces_a_stale_socket_but_nothing_else(sock_path: Path) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()

    async def main() -> None:
        async with serving(sock_path):
            assert (await ask(sock_path, "x"))["ok"]  # type: ignore[index]

    asyncio.run(main())
    sock_path.write_text("not a socket")
    with pytest.raises(PostroomError, match="not a socket"):
        asyncio.run(ControlServer(sock_path, echo).start())
    assert sock_path.read_text() == "not a socket"


def test_stop_leaves_a_newer_servers_socket(sock_path: Path) -> None:
    async def main() -> None:
        first = ControlServer(sock_path, echo)
        await first.start()
        second = ControlServer(sock_path, echo)
        await second.start()  # replaces the first's socket file
        await first.stop()
        assert await asyncio.to_thread(sock_path.exists)
        assert (await ask(sock_path, "x"))["ok"]  # type: ignore[index]
        await second.stop()
        assert not await asyncio.to_thread(sock_path.exists)

    asyncio.run(main())


def test_a_long_socket_path_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100) / ("e" * 60)
    deep.mkdir(parents=True)
    path = deep / "control.sock"
    assert len(str(path)) > 108

    async def main() -> None:
        async with serving(path):
            assert path.exists()
            assert (await ask(path, "deep"))["op"] == "deep"  # type: ignore[index]

    asyncio.run(main())


def test_bad_answers_raise(sock_path: Path) -> None:
    """A server that answers garbage, or nothing, is an error, not a fallback."""

    async def main() -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readline()
                line = await answers.get()
                if line is None:
                    await asyncio.sleep(2)  # never answers
                else:
                    writer.write(line)
            finally:
                writer.close()

        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        server = await asyncio.start_unix_server(garbage, path=str(sock_path))
        try:
            cases: list[tuple[bytes | None, str]] = [
                (b"not json\n", "not JSON"),
                (b"[1]\n", "not an object"),
                (b"", "without an answer"),
                (None, "no answer within"),
            ]
            for line, message in cases:
                answers.put_nowait(line)
                with pytest.raises(ControlError, match=message):
                    await ask(sock_path, "x", timeout=0.5)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_a_request_too_long_to_send_is_refused_by_the_client(sock_path: Path) -> None:
    with pytest.raises(ControlError, match="request longer"):
        call(sock_path, "delete", {"ids": [QID1] * 10000})


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory another user can reach, for a socket made reachable on purpose."""
    path = Path(tempfile.mkdtemp(prefix="postroom-ctl-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def test_the_peer_uid_is_checked(nobody_dir: Path) -> None:
    """Even if the socket's mode were opened up, another user's request is refused."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    path = nobody_dir / "control.sock"
    go_read, go_write = os.pipe()
    out_read, out_write = os.pipe()
    pid = os.fork()  # before any thread or loop exists in this test
    if pid == 0:  # the client, as nobody
        try:
            os.setgid(65534)
            os.setuid(65534)
            os.read(go_read, 1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                with contextlib.suppress(BrokenPipeError):  # answered before it is read
                    sock.sendall(b'{"op": "list"}\n')
                os.write(out_write, sock.recv(4096))
        except BaseException as exc:
            os.write(out_write, f"client failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(go_read)
    os.close(out_write)

    async def main() -> bytes:
        async with serving(path):
            path.chmod(0o666)
            os.write(go_write, b"g")
            return await asyncio.to_thread(os.read, out_read, 4096)

    try:
        answer = asyncio.run(main())
    finally:
        os.close(go_write)
        os.close(out_read)
        os.waitpid(pid, 0)
    assert json.loads(answer) == {"ok": False, "error": "permission denied"}, answer


# ---- the queue handler ----------------------------------------------------------------------------


def test_queue_handler_locks_each_message_and_wakes_the_runner(q: Queue, sock_path: Path) -> None:
    q.add(QID1, deferred("bob@example.net"))
    q.add(QID2, deferred("carol@example.net"))
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lock(queue_id: str) -> AsyncIterator[None]:
        events.append(f"lock {queue_id}")
        yield
        events.append(f"unlock {queue_id}")

    handler = queue_handler(q.data, message_lock=lock, on_change=lambda: events.append("wake"))

    async def main() -> None:
        async with serving(sock_path, handler):
            answer = await ask(sock_path, "hold", {"ids": "ALL"})
            assert answer == {
                "ok": True,
                "results": [
                    {"queue_id": QID1, "result": "held", "detail": ""},
                    {"queue_id": QID2, "result": "held", "detail": ""},
                ],
            }
            assert events == [f"lock {QID1}", f"unlock {QID1}", f"lock {QID2}", f"unlock {QID2}",
                              "wake"]
            events.clear()
            listing = await ask(sock_path, "list")
            assert listing is not None and [m["queue"] for m in listing["messages"]] == ["hold"] * 2
            shown = await ask(sock_path, "show", {"id": QID2})
            assert shown is not None and shown["message"]["held"]
            assert events == []  # reading takes no lock and wakes nobody
            assert await ask(sock_path, "delete", {"ids": ["../../etc"]}) == {
                "ok": False, "error": "'../../etc' is not a queue id"
            }
            assert await ask(sock_path, "show", {"id": QID1 + "/x"}) == {
                "ok": False, "error": f"'{QID1}/x' is not a queue id"
            }
            assert events == []

    asyncio.run(main())
    assert sorted(os.listdir(q.hold)) == [QID1, QID2]


def test_stopping_waits_for_the_operation_under_way(
    q: Queue, sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock is not let go while a thread still works on the message's file."""
    q.add(QID1, deferred("bob@example.net"))
    held_during: list[bool] = []
    real_apply = admin.apply_safely

    def slow_apply(*args: Any, **kw: Any) -> admin.Outcome:
        time.sleep(0.3)
        return real_apply(*args, **kw)

    monkeypatch.setattr(admin, "apply_safely", slow_apply)

    async def main() -> None:
        gate = asyncio.Event()

        @contextlib.asynccontextmanager
        async def lock(queue_id: str) -> AsyncIterator[None]:
            gate.set()
            try:
                yield
            finally:
                held_during.append((q.hold / QID1).exists())

        server = ControlServer(sock_path, queue_handler(q.data, message_lock=lock))
        await server.start()
        asking = asyncio.ensure_future(ask(sock_path, "hold", {"ids": [QID1]}))
        await gate.wait()
        await server.stop()  # cancels the connection while the hold runs in its thread
        assert held_during == [True]  # the move had finished before the lock was let go
        with pytest.raises(ControlError, match="without an answer"):
            await asking

    asyncio.run(main())
