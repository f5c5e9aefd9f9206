"""The control socket: the ``postroom`` command asks the running server to act on the queue.

Like Postfix's ``postqueue`` talking to its master, a queue operation made while the server runs
must go through the server, so that it is serialised with the deliveries of the same message
(see :mod:`postroom.queue.admin`). The server listens on a Unix stream socket,
``data_dir/control.sock``, mode 0600 (owner only; root may connect too, and the peer's uid is
checked again with ``SO_PEERCRED``).

Protocol: one request per connection. The client sends one line of JSON, an object
``{"op": OP, "args": {...}}`` of at most :data:`MAX_REQUEST` octets, ending in ``\\n``; the server
answers one line of JSON, an object, and closes. Every answer has ``"ok"``: true, with the
operation's data, or false with ``"error"``. A malformed, oversized or late request gets an error
answer, never a crash. The operations and their answers are those of
:func:`postroom.queue.admin.dispatch`:

========  =============================================  ===============================
op        args                                           answer (besides ``"ok": true``)
========  =============================================  ===============================
list      {}                                             ``messages``: [entry, ...]
show      {"id": ID}                                     ``message``: entry + envelope + headers
hold      {"ids": [ID, ...] | "ALL"}                     ``results``: [{queue_id, result, detail}]
release   {"ids": [ID, ...] | "ALL"}                     ``results``
delete    {"ids": [ID, ...] | "ALL"}                     ``results``
flush     {"ids": [ID, ...] | "ALL"} | {"domain": D} | {}  ``results``
retry     {"ids": [ID, ...] | "ALL"}                     ``results``
========  =============================================  ===============================

:func:`call` is the client side, blocking (the CLI has no event loop). It returns None when no
server listens (no socket file, or nobody accepting on it), so the CLI can fall back to doing the
operation itself with the server stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from postroom.errors import PostroomError
from postroom.queue import admin

logger = logging.getLogger("postroom.control")

#: Longest request line, newline included.
MAX_REQUEST = 64 * 1024
#: Longest answer the client reads (a listing of a big queue).
MAX_RESPONSE = 256 * 1024 * 1024
#: Seconds a client may take to send its request line.
REQUEST_TIMEOUT = 10.0
#: Longest path ``bind``/``connect`` take (``sun_path`` is 108 octets with its NUL).
_SUN_PATH_MAX = 107

SOCKET_NAME = "control.sock"

Handler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(PostroomError):
    """The server's control socket answered badly, or not in time."""


def socket_path(data_dir: Path) -> Path:
    return data_dir / SOCKET_NAME


@contextlib.contextmanager
def _sun_path(path: Path) -> Iterator[str]:
    """A name for *path* that fits ``sun_path``: itself, or for a long one, the same file through
    ``/proc/self/fd`` of its directory (Linux), which is short whatever the directory's depth."""
    name = os.fspath(path)
    if len(os.fsencode(name)) <= _SUN_PATH_MAX:
        yield name
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _peer_uid(sock: socket.socket | None) -> int | None:
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", raw)
    return int(uid)


def _encode(response: dict[str, Any]) -> bytes:
    return json.dumps(response, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class ControlServer:
    """Serves the control socket at *path*; every request goes to ``await handler(op, args)``.

    ``start`` removes a stale socket left by a crash and listens; ``stop`` closes, ends the
    connections still open and removes the socket (unless another server has replaced it).
    """

    def __init__(
        self,
        path: Path,
        handler: Handler,
        *,
        max_request: int = MAX_REQUEST,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.path = path
        self._handler = handler
        self._max_request = max_request
        self._timeout = request_timeout
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("control server already started")
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise PostroomError(f"{self.path} exists and is not a socket; not replacing it")
            os.unlink(self.path)  # left by a server that did not stop cleanly
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            # On Linux the mode of the socket's inode before bind() is the file's mode: never
            # reachable by others, not even for a moment (umask alone might allow it).
            os.fchmod(sock.fileno(), 0o600)
            with _sun_path(self.path) as name:
                sock.bind(name)
            bound = True
            os.chmod(self.path, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(
                self._serve, sock=sock, limit=self._max_request
            )
        except BaseException:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)
            raise

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await server.wait_closed()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            response = await self._answer(reader, writer)
            writer.write(_encode(response))
            await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self._timeout):
                line = await reader.readuntil(b"\n")
        except TimeoutError:
            return admin.error_response("request timed out")
        except asyncio.LimitOverrunError:
            return admin.error_response(f"request longer than {self._max_request} octets")
        except asyncio.IncompleteReadError:
            return admin.error_response("request without a final newline")
        # Checked after reading, so that the refusal reaches the client (closing with its request
        # unread would reset the connection).
        uid = _peer_uid(writer.get_extra_info("socket"))
        if uid is not None and uid not in (0, os.geteuid()):
            logger.warning("control socket: refused a client with uid %d", uid)
            return admin.error_response("permission denied")
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return admin.error_response("request is not JSON")
        except RecursionError:  # thousands of nested brackets: no request of ours is like that
            return admin.error_response("request is nested too deeply")
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return admin.error_response('request must be an object with a string "op"')
        args = request.get("args", {})
        if not isinstance(args, dict):
            return admin.error_response('"args" must be an object')
        op: str = request["op"]
        try:
            response = await self._handler(op, args)
        except PostroomError as exc:
            return admin.error_response(str(exc))
        except Exception as exc:
            logger.exception("control socket: %s failed", op)
            return admin.error_response(f"internal error: {type(exc).__name__}: {exc}")
        if not isinstance(response, dict):
            logger.error("control socket: handler answered %s to %s", type(response).__name__, op)
            return admin.error_response("internal error: bad answer")
        try:
            _encode(response)
        except (TypeError, ValueError) as exc:
            logger.error("control socket: answer to %s is not JSON: %s", op, exc)
            return admin.error_response("internal error: bad answer")
        return response


def call(path: Path, op: str, args: dict[str, Any], timeout: float = 60.0) -> dict[str, Any] | None:
    """Send one request to the server at *path*; its answer, or None when no server listens.

    Blocking. ControlError when the server answers badly or not within *timeout* seconds;
    PermissionError when the socket is not ours to use (do NOT fall back to acting on the
    queue files then: the server is running).
    """
    request = _encode({"op": op, "args": args})
    if len(request) > MAX_REQUEST:
        raise ControlError(f"request longer than {MAX_REQUEST} octets")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            with _sun_path(path) as name:
                sock.connect(name)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        except TimeoutError:
            raise ControlError(f"{path}: the server did not accept within {timeout:g} s") from None
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(request)  # a refusal may be answered before the request is read
            answer = _read_line(sock)
        except TimeoutError:
            raise ControlError(f"{path}: no answer within {timeout:g} s") from None
        except ConnectionError as exc:
            raise ControlError(f"{path}: {exc.strerror or exc}") from None
    try:
        response = json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        raise ControlError(f"{path}: the answer is not JSON") from None
    if not isinstance(response, dict):
        raise ControlError(f"{path}: the answer is not an object")
    return response


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ControlError("the server closed the connection without an answer")
        chunks.append(chunk)
        total += len(chunk)
        if b"\n" in chunk:
            return b"".join(chunks).partition(b"\n")[0]
        if total > MAX_RESPONSE:
            raise ControlError(f"answer longer than {MAX_RESPONSE} octets")


# ---- the queue handler the server runs ----------------------------------------------------------

MessageLock = Callable[[str], AbstractAsyncContextManager[object]]


@contextlib.asynccontextmanager
async def _no_lock(queue_id: str) -> AsyncIterator[None]:
    yield


def queue_handler(
    data_dir: Path,
    *,
    message_lock: MessageLock | None = None,
    on_change: Callable[[], None] | None = None,
) -> Handler:
    """The handler for :class:`ControlServer` that serves the queue operations.

    ``message_lock(queue_id)`` is an async context manager held around each message's operation
    (the queue runner's per-message lock, so an operation never runs during a delivery attempt on
    the same file). The file work runs in a thread. ``on_change`` (the runner's ``wake``) is called
    after every changing operation, so a flush or release is acted on at once.
    """
    lock = message_lock or _no_lock

    async def handle(op: str, args: dict[str, Any]) -> dict[str, Any]:
        try:
            if op not in admin.CHANGING_OPS:
                return await asyncio.to_thread(admin.read_op, data_dir, op, args)
            ids = await asyncio.to_thread(admin.targets, data_dir, op, args)
            outcomes: list[admin.Outcome] = []
            try:
                for queue_id in ids:
                    async with lock(queue_id):
                        outcomes.append(await _finish(admin.apply_safely, data_dir, op, queue_id, args))
            finally:
                if on_change is not None and ids:
                    on_change()
            return admin.outcome_response(outcomes)
        except admin.AdminError as exc:
            return admin.error_response(str(exc))

    return handle


async def _finish(fn: Callable[..., admin.Outcome], *args: Any) -> admin.Outcome:
    """Run *fn* in a thread and wait for it even when cancelled (the server stopping): the
    message's lock must not be let go while the thread still works on its file."""
    work = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        await work
        raise
