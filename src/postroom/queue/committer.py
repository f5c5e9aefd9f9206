"""Group commit: one writer thread makes durable work durable in rounds, off the event loop.

The durability rule (RFC 5321 section 6.1: once a server answers 250 to the end of data it has
accepted responsibility for the message) is met by fsync of every file written AND of every
directory whose entries changed, before the 250. Done per message that is the whole budget on a
small box, so work is batched, and each round runs in two phases:

1. the event loop calls :meth:`Committer.submit` with a *job*, a plain function; the committer
   thread takes every job queued since its last round and runs them one after the other. A job
   creates and writes its new files and hands each one to the round with
   ``DurableFile.commit(final_path, dirsync)`` instead of syncing it; it names any other directory
   whose entries it changed (a ``mkdir``, an ``unlink``) with :meth:`DirSync.add`;
2. then the thread fsyncs every file handed over, renames each into place, and fsyncs each
   distinct directory once (twenty messages renamed into one ``new/`` cost one directory fsync,
   not twenty). On a journalling file system the first fsync commits the transaction that holds
   all of the round's creates, so the others find less left to do, and no create waits for a
   commit another job's fsync started. (Without a journal, as on the 2-core test VM's ext4, each
   fsync writes its own inode and flushes the disk cache either way.)

and last resolves all of the round's futures with ONE ``loop.call_soon_threadsafe`` per event
loop. Per file the order stays fsync(file), rename, fsync(directory), then the future.

Failures. A job that raises fails alone; an ``OSError`` from it becomes a :class:`StorageError`
(``disk_full`` for ENOSPC and EDQUOT), and the files it handed over are discarded, not committed.
A file whose fsync, close or rename fails in phase 2 fails the job that handed it over, as a
whole: that job's other files are discarded too where they are not yet renamed (a job is all or
nothing as far as it can be), and the temporary file is removed. A directory fsync that fails
fails every job of the round that renamed a file into, or registered, that directory. Other jobs
of the round are not affected. :attr:`DurableFile.durable` tells afterwards whether one file made
it (fsync, rename and directory fsync all done), for callers that report what a failed job left.

Everything runs in the one thread. A pool of workers for the jobs and the fsyncs (it once took
the test VM from 2,000 to 3,800 msg/s, when each job fsynced its own files) made the two-phase
round slower there, by the extra GIL hand-offs, and was removed; to use more cores, run more
worker processes. Every system call lets the event loop take the GIL, which this thread must then
wait for: a round makes one call per step and file and keeps its own Python work small.

:class:`Disk` is the seam for the system calls durable work makes, and :class:`DurableFile` the one
way a new file is written (create O_EXCL 0600, write, fsync, rename; removed again on any failure).
Tests subclass :class:`Disk` to make ``write`` or ``fsync`` fail with ENOSPC, or to stop the process
between two steps, and so check that nothing is left half-written.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import errno
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

from postroom.errors import StorageError
from postroom.fsync import fsync_dir

T = TypeVar("T")

#: errno values that mean "no room": the reply is 452 4.3.1 rather than 451 4.3.0.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

#: Writes smaller than this are gathered into one ``write(2)``.
_WRITE_BUFFER = 256 * 1024


def storage_error(exc: OSError, doing: str) -> StorageError:
    """A :class:`StorageError` for *exc*, raised while *doing* ("writing /x/y")."""
    reason = exc.strerror or str(exc)
    error = StorageError(f"{doing}: {reason}", disk_full=exc.errno in DISK_FULL_ERRNOS)
    error.__cause__ = exc
    return error


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
        written = os.write(fd, data)
        if written < len(data):
            view = memoryview(data)[written:]
            while view:
                view = view[os.write(fd, view) :]

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def link(self, src: str, dst: str) -> None:
        """A second name for *src*; fails with EEXIST rather than replace *dst*."""
        os.link(src, dst)

    def unlink(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def fsync_dir(self, path: str) -> None:
        """Make the entries of directory *path* (creates, renames, unlinks) durable."""
        fsync_dir(path)


#: The default, stateless :class:`Disk`.
DEFAULT_DISK = Disk()


class DurableFile:
    """A new file: created in a temporary place, written, fsynced, renamed into place.

    ::

        with DurableFile(disk, "/q/incoming/X.tmp") as f:
            f.write(b"...")
            f.commit("/q/active/X", dirsync)   # in a job: fsync, rename, fsync of /q/active
                                               # happen at the end of the round

    ``commit(final_path)`` without a :class:`DirSync` does it all at once (fsync, close, rename)
    and leaves the directory to the caller. Leaving the ``with`` block without :meth:`commit` (or
    :meth:`commit` failing) closes and unlinks the temporary file. ``OSError`` is raised as
    :class:`StorageError`.
    """

    __slots__ = (
        "_buffer", "_disk", "_fd", "_handed", "durable", "final_path", "no_replace", "placed", "size",
        "tmp_path",
    )

    def __init__(self, disk: Disk, tmp_path: str, *, no_replace: bool = False) -> None:
        self._disk = disk
        self.tmp_path = tmp_path
        #: Never replace an existing file at the final path (link, then unlink the temporary
        #: name): a queue file must not silently overwrite another message's.
        self.no_replace = no_replace
        #: True once the file is at its final path (a failed job must only remove its own).
        self.placed = False
        self.final_path: str | None = None
        self.size = 0
        self._buffer = bytearray()
        self._fd: int | None = None
        self._handed = False  # committed, or handed to a round: __exit__ leaves it alone
        #: True once the file is in place and its directory fsynced.
        self.durable = False
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
        if not self._handed:
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

    def commit(self, final_path: str, dirsync: DirSync | None = None, *,
               mtime: float | None = None) -> None:
        """Make the file durable under *final_path* (with *mtime* as its modification time,
        when given: the queue keeps a retry time there).

        With *dirsync* (in a job) the data is written now and the rest is left to the round:
        fsync, close, rename, then fsync of *final_path*'s directory, which the round registers
        itself; a failure there fails the job. Without, fsync, close and rename happen now and
        the caller registers the directory.
        """
        self._flush()
        assert self._fd is not None, "commit after close"
        if mtime is not None:
            try:
                os.utime(self._fd, (mtime, mtime))
            except OSError as exc:
                raise storage_error(exc, f"setting the time of {self.tmp_path}") from exc
        self.final_path = final_path
        if dirsync is not None:
            dirsync._files.append(self)
            self._handed = True
            return
        error = self._sync() or self._rename()
        if error is not None:
            raise error
        self._handed = True

    def _sync(self) -> StorageError | None:
        """fsync and close (phase 2); the error, if any. The fd is closed either way."""
        fd = self._fd
        assert fd is not None
        self._fd = None
        try:
            self._disk.fsync(fd)
        except OSError as exc:
            try:
                self._disk.close(fd)
            except OSError:
                pass
            return storage_error(exc, f"fsync of {self.tmp_path}")
        try:
            self._disk.close(fd)
        except OSError as exc:  # NFS reports late write errors at close
            return storage_error(exc, f"closing {self.tmp_path}")
        return None

    def _rename(self) -> StorageError | None:
        assert self.final_path is not None
        try:
            if self.no_replace:
                self._disk.link(self.tmp_path, self.final_path)
                with contextlib.suppress(OSError):  # a leftover in incoming/ is cleaned later
                    self._disk.unlink(self.tmp_path)
            else:
                self._disk.rename(self.tmp_path, self.final_path)
        except OSError as exc:
            return storage_error(exc, f"renaming {self.tmp_path} to {self.final_path}")
        self.placed = True
        return None

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


class Syncable(Protocol):
    """Something appended to in a job and made durable once per round (the attempt journal)."""

    def sync(self) -> None:
        """Make every append so far durable; raise ``OSError`` if that failed."""


class DirSync:
    """What one job leaves to the end of its round: files to commit, directories to fsync,
    appended files to fsync."""

    __slots__ = ("_files", "_paths", "_syncs")

    def __init__(self) -> None:
        self._paths: dict[str, None] = {}
        self._files: list[DurableFile] = []
        self._syncs: list[Syncable] = []

    def add(self, path: str | os.PathLike[str]) -> None:
        """Fsync directory *path* at the end of the round (the job changed its entries)."""
        self._paths[os.fspath(path)] = None

    def sync_later(self, target: Syncable) -> None:
        """Call ``target.sync()`` in the round's phase 2, once however many jobs ask."""
        if target not in self._syncs:
            self._syncs.append(target)

    @property
    def paths(self) -> list[str]:
        """The directories registered with :meth:`add`."""
        return list(self._paths)

    @property
    def files(self) -> list[DurableFile]:
        """The files handed to the round with ``DurableFile.commit(final, dirsync)``."""
        return list(self._files)

    def durable(self, final_path: str | os.PathLike[str]) -> bool:
        """Whether the file handed over for *final_path* made it (once the round is over)."""
        path = os.fspath(final_path)
        return any(f.durable and f.final_path == path for f in self._files)


Job = Callable[[DirSync], T]


def finish_round(disk: Disk, syncs: list[DirSync], errors: list[BaseException | None]) -> None:
    """Phase 2 of a round: commit the files of job ``i`` (``syncs[i]``), sync the directories.

    ``errors[i]`` is job ``i``'s failure so far (None: it succeeded) and is updated in place.
    Files of a job that has failed are discarded (temporary file removed), never renamed.
    """
    pending: list[tuple[int, DurableFile]] = []
    for index, dirsync in enumerate(syncs):
        if dirsync._files:
            if errors[index] is None:
                pending.extend((index, f) for f in dirsync._files)
            else:
                for file in dirsync._files:
                    file.abort()
    for index, file in pending:
        if errors[index] is None:  # else it is closed and removed below, unsynced
            errors[index] = file._sync()
    _sync_appends(syncs, errors)
    users: dict[str, list[int]] = {}
    renamed: list[tuple[str, DurableFile]] = []
    for index, file in pending:
        if errors[index] is None:
            errors[index] = file._rename()
            if errors[index] is None:
                assert file.final_path is not None
                directory = os.path.dirname(file.final_path)
                users.setdefault(directory, []).append(index)
                renamed.append((directory, file))
                continue
        file.abort()  # this job failed: what is not in place yet never will be
    for index, dirsync in enumerate(syncs):
        # A job that failed may still have changed directories (a mkdir, an unlink):
        # what it registered is synced too, so what it did is durable.
        for path in dirsync._paths:
            users.setdefault(path, []).append(index)
    synced: set[str] = set()
    for path, indexes in users.items():
        try:
            disk.fsync_dir(path)
        except OSError as exc:
            for index in indexes:
                if errors[index] is None:  # a job that failed keeps its own error
                    errors[index] = storage_error(exc, f"fsync of directory {path}")
            continue
        synced.add(path)
    for directory, file in renamed:
        if directory in synced:
            file.durable = True


def _sync_appends(syncs: list[DirSync], errors: list[BaseException | None]) -> None:
    """One ``sync()`` per appended file of the round; its failure fails every job that appended."""
    users: dict[int, tuple[Syncable, list[int]]] = {}
    for index, dirsync in enumerate(syncs):
        for target in dirsync._syncs:
            users.setdefault(id(target), (target, []))[1].append(index)
    for target, indexes in users.values():
        try:
            target.sync()
        except OSError as exc:
            for index in indexes:
                if errors[index] is None:
                    errors[index] = storage_error(exc, "fsync of an appended file")


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

    def __init__(self, *, disk: Disk = DEFAULT_DISK, name: str = "postroom-committer") -> None:
        self._disk = disk
        self._name = name
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
        with self._cond:
            self._thread = None
            self._stopping = False

    def submit(self, job: Job[T]) -> asyncio.Future[T]:
        """Queue *job* for the next round; the future resolves once its work is durable."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._enqueue(_Item(job, loop, future))
        return future

    def run_now(self, job: Job[T]) -> T:
        """Run *job* durably and return its value; blocks. Never call it from a coroutine.

        While the thread runs, the job goes through it (so durable work stays in one thread);
        otherwise, or from a job itself, it runs in the calling thread as a round of its own.
        """
        if self._thread is None or getattr(_in_job, "active", False):
            ok, value, dirsync = _run_job(job)
            errors: list[BaseException | None] = [None if ok else value]
            finish_round(self._disk, [dirsync], errors)
            if errors[0] is not None:
                raise errors[0]
            return value  # type: ignore[no-any-return]
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
        # Phase 1: every job creates and writes its files, one after the other.
        done = [_run_job(item.job) for item in batch]
        errors: list[BaseException | None] = [None if ok else value for ok, value, _ in done]
        # Phase 2: fsync every file, rename each into place, fsync each directory once.
        finish_round(self._disk, [dirsync for _, _, dirsync in done], errors)
        self.rounds += 1
        self.jobs_done += len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for item, (_, value, _), error in zip(batch, done, errors, strict=True):
            ok = error is None
            if item.loop is None:
                _deliver(item, ok, value if ok else error)
            else:
                assert isinstance(item.future, asyncio.Future)
                by_loop.setdefault(item.loop, []).append(
                    (item.future, ok, value if ok else error)
                )
        for loop, outcomes in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle, outcomes)
            except RuntimeError:
                pass  # that loop is closed: nobody is waiting any more


def _run_job(job: Job[T]) -> tuple[bool, Any, DirSync]:
    """Phase 1 of one job: (True, value, dirsync) or (False, exception, dirsync)."""
    dirsync = DirSync()
    active = getattr(_in_job, "active", False)
    _in_job.active = True
    try:
        return True, job(dirsync), dirsync
    except OSError as exc:
        return False, storage_error(exc, "durable write"), dirsync
    except Exception as exc:
        return False, exc, dirsync
    finally:
        _in_job.active = active


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
