"""Group commit: one writer thread makes durable work durable in rounds, off the event loop.

The durability rule (RFC 5321 section 6.1: once a server answers 250 to the end of data it has
accepted responsibility for the message) is met by fsync of every file written AND of every
directory whose entries changed, before the 250. Done per message that is the whole budget on a
small box, so work is batched:

* the event loop calls :meth:`Committer.submit` with a *job*, a plain function that writes its
  files and fsyncs them, then names each directory whose entries it changed with
  :meth:`DirSync.add`;
* the committer thread takes every job queued since its last round, runs them one after the other,
  then fsyncs each distinct directory once (twenty messages renamed into one ``new/`` cost one
  directory fsync, not twenty), then resolves all of the round's futures with ONE
  ``loop.call_soon_threadsafe`` per event loop.

With ``workers`` > 1 the jobs of a round (and then its directory fsyncs) run side by side on a
small pool: ext4 folds concurrent fsyncs into fewer journal commits. On the 2-core test VM, 4 KB
messages through :meth:`postroom.queue.spool.Spool.accept` from 20 sessions went from about
2,000 msg/s with one thread to about 3,800 with four workers. Jobs must then be safe to run
concurrently (the spool's are: unique names, one envelope each).

A job that raises fails alone; an ``OSError`` from it becomes a :class:`StorageError` (``disk_full``
for ENOSPC and EDQUOT). A directory fsync that fails fails every job of the round that registered
that directory. The event loop never blocks on the disk.

:class:`Disk` is the seam for the system calls durable work makes, and :class:`DurableFile` the one
way a new file is written (create O_EXCL 0600, write, fsync, rename; removed again on any failure).
Tests subclass :class:`Disk` to make ``write`` fail with ENOSPC, or to stop the process between two
steps, and so check that nothing is left half-written.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from postroom.errors import StorageError

T = TypeVar("T")

#: errno values that mean "no room": the reply is 452 4.3.1 rather than 451 4.3.0.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Writes smaller than this are gathered into one ``write(2)``.
_WRITE_BUFFER = 256 * 1024


def storage_error(exc: OSError, doing: str) -> StorageError:
    """A :class:`StorageError` for *exc*, raised while *doing* ("writing /x/y")."""
    reason = exc.strerror or str(exc)
    return StorageError(f"{doing}: {reason}", disk_full=exc.errno in DISK_FULL_ERRNOS)


class Disk:
    """The system calls durable work makes. Subclass it to inject faults in tests.

    Every method raises ``OSError`` as the call it wraps does; callers turn that into
    :class:`StorageError`. One instance is shared by threads; it keeps no state.
    """

    def create(self, path: str) -> int:
        """Create *path* exclusively (never reuse a name), mode 0600; return the fd."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        """Write all of *data* (``os.write`` may write less than asked)."""
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory *path* (creates, renames, unlinks) durable."""
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: The default, stateless :class:`Disk`.
DEFAULT_DISK = Disk()


class DurableFile:
    """A new file: created in a temporary place, written, fsynced, renamed into place.

    ::

        with DurableFile(disk, "/q/incoming/X.tmp") as f:
            f.write(b"...")
            f.commit("/q/active/X")   # fsync, close, rename
        dirsync.add("/q/active")     # the caller registers the directory the name went into

    Leaving the ``with`` block without :meth:`commit` (or :meth:`commit` failing) closes and
    unlinks the temporary file. ``OSError`` is raised as :class:`StorageError`.
    """

    def __init__(self, disk: Disk, tmp_path: str) -> None:
        self._disk = disk
        self.tmp_path = tmp_path
        self.size = 0
        self._buffer = bytearray()
        self._fd: int | None = None
        self._committed = False
        try:
            self._fd = disk.create(tmp_path)
        except OSError as exc:
            raise storage_error(exc, f"creating {tmp_path}") from exc

    def __enter__(self) -> DurableFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._committed:
            self.abort()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.size += len(data)
        if len(data) >= _WRITE_BUFFER:
            self._flush()
            self._write_now(data)
            return
        self._buffer += data
        if len(self._buffer) >= _WRITE_BUFFER:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:
            self._write_now(self._buffer)
            self._buffer = bytearray()

    def _write_now(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after close"
        try:
            self._disk.write(self._fd, data)
        except OSError as exc:
            raise storage_error(exc, f"writing {self.tmp_path}") from exc

    def commit(self, final_path: str) -> None:
        """Flush, fsync, close, then rename to *final_path*. The caller registers its directory."""
        self._flush()
        fd = self._fd
        assert fd is not None, "commit after close"
        try:
            self._disk.fsync(fd)
        except OSError as exc:
            raise storage_error(exc, f"fsync of {self.tmp_path}") from exc
        self._fd = None
        try:
            self._disk.close(fd)
        except OSError as exc:  # NFS reports late write errors at close
            raise storage_error(exc, f"closing {self.tmp_path}") from exc
        try:
            self._disk.rename(self.tmp_path, final_path)
        except OSError as exc:
            raise storage_error(exc, f"renaming {self.tmp_path} to {final_path}") from exc
        self._committed = True

    def abort(self) -> None:
        """Close and remove the temporary file; never raises."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                self._disk.close(fd)
            except OSError:
                pass
        try:
            self._disk.unlink(self.tmp_path)
        except OSError:
            pass


class DirSync:
    """The directories one job changed (created or renamed entries in); fsynced after the job."""

    __slots__ = ("_paths",)

    def __init__(self) -> None:
        self._paths: dict[str, None] = {}

    def add(self, path: str | os.PathLike[str]) -> None:
        self._paths[os.fspath(path)] = None

    @property
    def paths(self) -> list[str]:
        return list(self._paths)


Job = Callable[[DirSync], T]


@dataclass(slots=True)
class _Item(Generic[T]):
    job: Job[T]
    loop: asyncio.AbstractEventLoop | None  # None: a run_now() waiter in another thread
    future: asyncio.Future[T] | concurrent.futures.Future[T]


# Set while a thread runs a job: run_now() from inside a job must not wait for a later round.
_in_job = threading.local()

# (future, ok, value or exception) for one job of a round.
_Outcome = tuple["asyncio.Future[Any]", bool, Any]


def _settle(outcomes: list[_Outcome]) -> None:
    """On the event loop: resolve a whole round's futures at once."""
    for future, ok, value in outcomes:
        if future.cancelled():
            continue  # the session went away; the work is done and durable anyway
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class Committer:
    """One background thread that runs durable jobs in rounds (group commit).

    ``submit`` is for the event loop thread; ``run_now`` for tools and tests without a loop.
    ``rounds`` and ``jobs_done`` count the work done, so a test can see the batching.
    """

    def __init__(
        self, *, disk: Disk = DEFAULT_DISK, name: str = "postroom-committer", workers: int = 1
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._disk = disk
        self._name = name
        self._workers = workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._pending: collections.deque[_Item[Any]] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.rounds = 0
        self.jobs_done = 0

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._stopping

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("committer already started")
            self._stopping = False
            if self._workers > 1:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._workers, thread_name_prefix=f"{self._name}-worker"
                )
            self._thread = threading.Thread(target=self._main, name=self._name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Run every job already submitted, then end the thread. Blocks until it has ended.

        From a coroutine, call it as ``await asyncio.to_thread(committer.stop)``.
        """
        with self._cond:
            thread = self._thread
            if thread is None:
                return
            self._stopping = True
            self._cond.notify()
        thread.join()
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        with self._cond:
            self._thread = None
            self._stopping = False

    def submit(self, job: Job[T]) -> asyncio.Future[T]:
        """Queue *job* for the next round; the future resolves once its directories are synced."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Item(job, loop, future))
        return future

    def run_now(self, job: Job[T]) -> T:
        """Run *job* durably and return its value; blocks. Never call it from a coroutine.

        While the thread runs, the job goes through it (so durable work stays in one thread);
        otherwise, or from a job itself, it runs in the calling thread.
        """
        if self._thread is None or getattr(_in_job, "active", False):
            dirsync = DirSync()
            try:
                value = _run_job(job, dirsync)
            except Exception:
                try:
                    sync_dirs(self._disk, dirsync.paths)
                except StorageError:
                    pass  # the job's own error says more
                raise
            sync_dirs(self._disk, dirsync.paths)
            return value
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._enqueue(_Item(job, None, future))
        return future.result()

    def _enqueue(self, item: _Item[Any]) -> None:
        with self._cond:
            if self._thread is None or self._stopping:
                raise RuntimeError("committer is not running")
            self._pending.append(item)
            if len(self._pending) == 1:
                self._cond.notify()

    def _main(self) -> None:
        batch: list[_Item[Any]] = []
        try:
            while True:
                with self._cond:
                    while not self._pending and not self._stopping:
                        self._cond.wait()
                    if not self._pending:
                        return  # stopping, and drained
                    batch = list(self._pending)
                    self._pending.clear()
                self._round(batch)
                batch = []
        finally:
            # Only reached with work left if the thread itself died: never leave a waiter hanging.
            with self._cond:
                leftovers = batch + list(self._pending)
                self._pending.clear()
                self._stopping = True
            for item in leftovers:
                _deliver(item, False, StorageError("the committer thread stopped"))

    def _round(self, batch: list[_Item[Any]]) -> None:
        # With workers, the round's jobs (and then its directory fsyncs) run side by side: the
        # file system merges concurrent fsyncs into fewer journal commits.
        pool = self._pool if len(batch) > 1 else None
        done = list(pool.map(_run_item, batch) if pool else map(_run_item, batch))
        users: dict[str, list[int]] = {}
        for index, (_, _, paths) in enumerate(done):
            # A job that failed may still have made files (say, Maildir copies before its queue
            # file failed): what it registered is synced too, so what it reports is true.
            for path in paths:
                users.setdefault(path, []).append(index)
        results = [(ok, value) for ok, value, _ in done]
        dirs = list(users)
        pool = self._pool if len(dirs) > 1 else None
        failures = list(pool.map(self._sync_dir, dirs) if pool else map(self._sync_dir, dirs))
        for path, failure in zip(dirs, failures, strict=True):
            if failure is None:
                continue
            for index in users[path]:
                if results[index][0]:  # a job that failed keeps its own error
                    error = storage_error(failure, f"fsync of directory {path}")
                    error.__cause__ = failure
                    results[index] = (False, error)
        self.rounds += 1
        self.jobs_done += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for item, (ok, value) in zip(batch, results, strict=True):
            if item.loop is None:
                _deliver(item, ok, value)
            else:
                assert isinstance(item.future, asyncio.Future)
                by_loop.setdefault(item.loop, []).append((item.future, ok, value))
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more

    def _sync_dir(self, path: str) -> OSError | None:
        try:
            self._disk.fsync_dir(path)
        except OSError as exc:
            return exc
        return None


def _run_item(item: _Item[Any]) -> tuple[bool, Any, list[str]]:
    dirsync = DirSync()
    _in_job.active = True
    try:
        return True, _run_job(item.job, dirsync), dirsync.paths
    except Exception as exc:
        return False, exc, dirsync.paths
    finally:
        _in_job.active = False


def _run_job(job: Job[T], dirsync: DirSync) -> T:
    try:
        return job(dirsync)
    except OSError as exc:
        raise storage_error(exc, "durable write") from exc


def _deliver(item: _Item[Any], ok: bool, value: Any) -> None:
    future = item.future
    if isinstance(future, concurrent.futures.Future):
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    elif item.loop is not None:
        try:
            item.loop.call_soon_threadsafe(_settle, [(future, ok, value)])
        except RuntimeError:
            pass


def sync_dirs(disk: Disk, paths: Iterable[str]) -> None:
    """fsync each directory in *paths* now (for start-up work outside any round)."""
    for path in paths:
        try:
            disk.fsync_dir(path)
        except OSError as exc:
            raise storage_error(exc, f"fsync of directory {path}") from exc
