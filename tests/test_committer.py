"""The group-commit thread: rounds in two phases, per-job failures in either phase, draining."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from postroom.errors import StorageError
from postroom.queue.committer import Committer, DirSync, Disk, DurableFile


class CountingDisk(Disk):
    """The real system calls, counted; ``fail_dirs`` makes fsync of those directories fail."""

    def __init__(self, fail_dirs: frozenset[str] = frozenset()) -> None:
        self.dir_syncs: list[str] = []
        self.fail_dirs = fail_dirs

    def fsync_dir(self, path: str) -> None:
        self.dir_syncs.append(path)
        if path in self.fail_dirs:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        super().fsync_dir(path)


class FullDisk(Disk):
    """Every write fails as on a full file system."""

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class CountingLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        super().__init__()
        self.threadsafe_calls = 0

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> Any:
        self.threadsafe_calls += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


@pytest.fixture
def committer() -> Iterator[Committer]:
    c = Committer()
    c.start()
    yield c
    c.stop()


def write_job(
    directory: Path, name: str, data: bytes = b"x", disk: Disk | None = None
) -> Callable[[DirSync], Path]:
    """A job that writes one file and leaves its fsync, rename and directory fsync to the round."""

    def job(dirsync: DirSync) -> Path:
        final = directory / name
        with DurableFile(disk or Disk(), str(directory / f".{name}.tmp")) as out:
            out.write(data)
            out.commit(str(final), dirsync)
        return final

    return job


def immediate_job(directory: Path, name: str) -> Callable[[DirSync], Path]:
    """The old way: the job fsyncs and renames itself and registers the directory."""

    def job(dirsync: DirSync) -> Path:
        final = directory / name
        with DurableFile(Disk(), str(directory / f".{name}.tmp")) as out:
            out.write(b"now")
            out.commit(str(final))
        dirsync.add(directory)
        return final

    return job


class RecordingDisk(Disk):
    """The real calls, logged by path; ``fail`` maps (call, file name) to the errno to raise."""

    def __init__(self, fail: dict[tuple[str, str], int] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.paths: dict[int, str] = {}
        self.fail = fail or {}
        self._lock = threading.Lock()

    def _log(self, call: str, path: str) -> None:
        with self._lock:
            self.calls.append((call, os.path.basename(path)))
        err = self.fail.get((call, os.path.basename(path)))
        if err is not None:
            raise OSError(err, os.strerror(err))

    def create(self, path: str) -> int:
        self._log("create", path)
        fd = super().create(path)
        self.paths[fd] = path
        return fd

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        self._log("write", self.paths[fd])
        super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._log("fsync", self.paths[fd])
        super().fsync(fd)

    def close(self, fd: int) -> None:
        path = self.paths.pop(fd)
        try:
            self._log("close", path)
        finally:
            super().close(fd)

    def rename(self, src: str, dst: str) -> None:
        self._log("rename", src)
        super().rename(src, dst)

    def fsync_dir(self, path: str) -> None:
        self._log("fsync_dir", path)
        super().fsync_dir(path)


def one_round(c: Committer, jobs: list[Any]) -> list[Any]:
    """Submit *jobs* while the thread is held in a round of its own, so they share the next."""
    gate, started = threading.Event(), threading.Event()

    def blocker(dirsync: DirSync) -> None:
        started.set()
        gate.wait(10)

    async def main() -> list[Any]:
        first = c.submit(blocker)
        await asyncio.to_thread(started.wait, 10)
        futures = [c.submit(job) for job in jobs]
        gate.set()
        await first
        return await asyncio.gather(*futures, return_exceptions=True)

    rounds = c.rounds
    results = asyncio.run(main())
    assert c.rounds == rounds + 2
    return results


def test_run_now_without_thread(tmp_path: Path) -> None:
    disk = CountingDisk()
    c = Committer(disk=disk)
    path = c.run_now(write_job(tmp_path, "a", b"hello"))
    assert path.read_bytes() == b"hello"
    assert disk.dir_syncs == [str(tmp_path)]
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_run_now_goes_through_the_thread(committer: Committer) -> None:
    name = committer.run_now(lambda ds: threading.current_thread().name)
    assert name.startswith("postroom-committer")


def test_run_now_inside_a_job_runs_inline(committer: Committer, tmp_path: Path) -> None:
    def outer(dirsync: DirSync) -> Path:
        return committer.run_now(write_job(tmp_path, "inner"))  # must not wait for a round

    assert committer.run_now(outer).read_bytes() == b"x"


def test_submit_resolves(committer: Committer, tmp_path: Path) -> None:
    async def main() -> Path:
        return await committer.submit(write_job(tmp_path, "m"))

    assert asyncio.run(main()).read_bytes() == b"x"


def test_one_round_one_dir_fsync_one_wakeup(tmp_path: Path) -> None:
    disk = CountingDisk()
    c = Committer(disk=disk)
    c.start()
    gate, started = threading.Event(), threading.Event()

    def blocker(dirsync: DirSync) -> str:
        started.set()
        gate.wait(10)
        return "first"

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, CountingLoop)
        first = c.submit(blocker)
        await asyncio.to_thread(started.wait, 10)  # the thread is inside round 1
        rest = [c.submit(write_job(tmp_path, f"f{i}")) for i in range(20)]
        before = loop.threadsafe_calls
        gate.set()
        results = await asyncio.gather(first, *rest)
        assert loop.threadsafe_calls - before == 2  # one per round, not one per job
        return results

    try:
        with asyncio.Runner(loop_factory=CountingLoop) as runner:
            results = runner.run(main())
    finally:
        c.stop()
    assert results[0] == "first"
    assert sorted(p.name for p in results[1:]) == sorted(f"f{i}" for i in range(20))
    assert c.rounds == 2 and c.jobs_done == 21
    assert disk.dir_syncs == [str(tmp_path)]  # twenty renames, one directory fsync


def test_failing_job_fails_alone(committer: Committer, tmp_path: Path) -> None:
    def bad(dirsync: DirSync) -> None:
        raise ValueError("bug")

    async def main() -> list[Any]:
        return await asyncio.gather(
            committer.submit(write_job(tmp_path, "ok1")),
            committer.submit(bad),
            committer.submit(write_job(tmp_path, "ok2")),
            return_exceptions=True,
        )

    ok1, err, ok2 = asyncio.run(main())
    assert isinstance(err, ValueError)
    assert isinstance(ok1, Path) and isinstance(ok2, Path)


def test_oserror_becomes_storage_error(committer: Committer) -> None:
    def full(dirsync: DirSync) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    def quota(dirsync: DirSync) -> None:
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    def io(dirsync: DirSync) -> None:
        raise OSError(errno.EIO, "Input/output error")

    async def main() -> list[Any]:
        futures = [committer.submit(job) for job in (full, quota, io)]
        return await asyncio.gather(*futures, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, StorageError) for r in results)
    assert [r.disk_full for r in results] == [True, True, False]


def test_dir_fsync_failure_fails_its_jobs_only(tmp_path: Path) -> None:
    bad_dir, good_dir = tmp_path / "bad", tmp_path / "good"
    bad_dir.mkdir()
    good_dir.mkdir()
    c = Committer(disk=CountingDisk(fail_dirs=frozenset({str(bad_dir)})))
    c.start()

    async def main() -> list[Any]:
        futures = [
            c.submit(write_job(bad_dir, "a")),
            c.submit(write_job(good_dir, "b")),
            c.submit(write_job(bad_dir, "c")),
        ]
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        a, b, cc = asyncio.run(main())
    finally:
        c.stop()
    assert isinstance(a, StorageError) and not a.disk_full
    assert f"fsync of directory {bad_dir}" in str(a)
    assert isinstance(cc, StorageError)
    assert b == good_dir / "b"
    # The files were renamed before the directory fsync failed: they stay, not known durable.
    assert sorted(os.listdir(bad_dir)) == ["a", "c"]


def test_stop_drains_pending_jobs(tmp_path: Path) -> None:
    c = Committer()
    c.start()

    async def main() -> list[Path]:
        futures = [c.submit(write_job(tmp_path, f"d{i}")) for i in range(50)]
        await asyncio.to_thread(c.stop)
        with pytest.raises(RuntimeError):
            c.submit(write_job(tmp_path, "late"))
        return await asyncio.gather(*futures)

    paths = asyncio.run(main())
    assert len(paths) == 50 and all(p.exists() for p in paths)
    assert not (tmp_path / "late").exists()


def test_submit_before_start_is_refused() -> None:
    async def main() -> None:
        Committer().submit(lambda ds: None)

    with pytest.raises(RuntimeError, match="not running"):
        asyncio.run(main())


def test_durable_file_disk_full_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info, DurableFile(FullDisk(), str(tmp_path / "t")) as f:
        f.write(b"x" * (1 << 20))  # large: written at once, so it fails here
        f.commit(str(tmp_path / "final"))
    assert info.value.disk_full
    assert os.listdir(tmp_path) == []


def test_durable_file_abandoned_is_removed(tmp_path: Path) -> None:
    with pytest.raises(KeyError), DurableFile(Disk(), str(tmp_path / "t")) as f:
        f.write(b"partial")
        raise KeyError("caller failed")
    assert os.listdir(tmp_path) == []


def test_durable_file_mode_and_exclusive(tmp_path: Path) -> None:
    with DurableFile(Disk(), str(tmp_path / "t")) as f:
        f.write(b"abc")
        f.commit(str(tmp_path / "final"))
    assert (tmp_path / "final").stat().st_mode & 0o777 == 0o600
    (tmp_path / "t").write_bytes(b"someone else's")
    with pytest.raises(StorageError):
        DurableFile(Disk(), str(tmp_path / "t"))
    assert (tmp_path / "t").read_bytes() == b"someone else's"


# ---- two phases -----------------------------------------------------------------------------


def test_round_writes_everything_before_the_first_fsync(tmp_path: Path) -> None:
    disk = RecordingDisk()
    c = Committer(disk=disk)
    c.start()
    try:
        results = one_round(c, [write_job(tmp_path, f"m{i}", disk=disk) for i in range(5)])
    finally:
        c.stop()
    assert sorted(p.name for p in results) == [f"m{i}" for i in range(5)]
    calls = [call for call, _ in disk.calls]
    # Phase 1: each job creates and writes; phase 2: fsync + close each, rename each, one dir fsync.
    assert calls == ["create", "write"] * 5 + ["fsync", "close"] * 5 + ["rename"] * 5 + [
        "fsync_dir"
    ]
    assert disk.calls[-1] == ("fsync_dir", tmp_path.name)
    for i in range(5):
        tmp = f".m{i}.tmp"
        assert disk.calls.index(("fsync", tmp)) < disk.calls.index(("rename", tmp))
        assert (tmp_path / f"m{i}").read_bytes() == b"x"
    assert sorted(os.listdir(tmp_path)) == [f"m{i}" for i in range(5)]


def test_file_is_in_place_only_after_the_round(committer: Committer, tmp_path: Path) -> None:
    seen: list[bool] = []

    def job(dirsync: DirSync) -> Path:
        final = write_job(tmp_path, "late")(dirsync)
        seen.append(final.exists())  # still in its temporary place
        return final

    async def main() -> Path:
        return await committer.submit(job)

    assert asyncio.run(main()).read_bytes() == b"x"
    assert seen == [False]


@pytest.mark.parametrize(("err", "disk_full"), [(errno.EIO, False), (errno.ENOSPC, True)])
def test_fsync_failure_in_phase_two_fails_only_its_job(
    tmp_path: Path, err: int, disk_full: bool
) -> None:
    disk = RecordingDisk(fail={("fsync", ".bad.tmp"): err})
    c = Committer(disk=disk)
    c.start()
    try:
        ok1, bad, ok2 = one_round(
            c,
            [
                write_job(tmp_path, "ok1", disk=disk),
                write_job(tmp_path, "bad", disk=disk),
                write_job(tmp_path, "ok2", disk=disk),
            ],
        )
    finally:
        c.stop()
    assert isinstance(bad, StorageError) and bad.disk_full is disk_full
    assert "fsync of" in str(bad) and ".bad.tmp" in str(bad)
    assert (ok1, ok2) == (tmp_path / "ok1", tmp_path / "ok2")
    assert sorted(os.listdir(tmp_path)) == ["ok1", "ok2"]  # no temporary file left behind
    assert ("rename", ".bad.tmp") not in disk.calls
    assert disk.paths == {}  # every fd closed


@pytest.mark.parametrize("call", ["close", "rename"])
def test_close_or_rename_failure_fails_its_job(tmp_path: Path, call: str) -> None:
    disk = RecordingDisk(fail={(call, ".bad.tmp"): errno.EIO})
    c = Committer(disk=disk)
    c.start()
    try:
        ok, bad = one_round(
            c, [write_job(tmp_path, "ok", disk=disk), write_job(tmp_path, "bad", disk=disk)]
        )
    finally:
        c.stop()
    assert isinstance(bad, StorageError) and not bad.disk_full
    assert ok == tmp_path / "ok"
    assert sorted(os.listdir(tmp_path)) == ["ok"]


def test_job_with_two_files_is_all_or_nothing(tmp_path: Path) -> None:
    disk = RecordingDisk(fail={("fsync", ".second.tmp"): errno.EIO})

    def two(dirsync: DirSync) -> None:
        write_job(tmp_path, "first", disk=disk)(dirsync)
        write_job(tmp_path, "second", disk=disk)(dirsync)

    c = Committer(disk=disk)
    c.start()
    try:
        bad, ok = one_round(c, [two, write_job(tmp_path, "other", disk=disk)])
    finally:
        c.stop()
    assert isinstance(bad, StorageError)
    assert ok == tmp_path / "other"
    # "first" was fsynced fine but is not renamed: its job failed as a whole.
    assert sorted(os.listdir(tmp_path)) == ["other"]


def test_job_raising_after_handing_a_file_over_commits_nothing(
    committer: Committer, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()

    def job(dirsync: DirSync) -> None:
        write_job(tmp_path, "handed")(dirsync)
        dirsync.add(tmp_path / "sub")  # still synced: it may have made directories
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> None:
        await committer.submit(job)

    with pytest.raises(StorageError) as info:
        asyncio.run(main())
    assert info.value.disk_full
    assert sorted(os.listdir(tmp_path)) == ["sub"]


def test_durable_flags(tmp_path: Path) -> None:
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    disk = CountingDisk(fail_dirs=frozenset({str(bad_dir)}))
    c = Committer(disk=disk)
    syncs: list[DirSync] = []

    def job(directory: Path) -> Callable[[DirSync], Path]:
        def run(dirsync: DirSync) -> Path:
            syncs.append(dirsync)
            return write_job(directory, "f")(dirsync)

        return run

    assert c.run_now(job(tmp_path)) == tmp_path / "f"
    with pytest.raises(StorageError, match="fsync of directory"):
        c.run_now(job(bad_dir))
    good, bad = syncs
    assert [f.durable for f in good.files] == [True] and good.durable(tmp_path / "f")
    assert [f.durable for f in bad.files] == [False] and not bad.durable(bad_dir / "f")
    assert (bad_dir / "f").exists()  # renamed, but its directory could not be synced


def test_run_now_inline_defers_and_fails_like_a_round(tmp_path: Path) -> None:
    disk = RecordingDisk(fail={("fsync", ".bad.tmp"): errno.ENOSPC})
    c = Committer(disk=disk)  # not started: runs in this thread
    assert c.run_now(write_job(tmp_path, "good", disk=disk)) == tmp_path / "good"
    with pytest.raises(StorageError) as info:
        c.run_now(write_job(tmp_path, "bad", disk=disk))
    assert info.value.disk_full
    assert os.listdir(tmp_path) == ["good"]


def test_immediate_commit_still_works(committer: Committer, tmp_path: Path) -> None:
    async def main() -> list[Path]:
        return list(
            await asyncio.gather(
                committer.submit(immediate_job(tmp_path, "a")),
                committer.submit(write_job(tmp_path, "b")),
            )
        )

    assert [p.name for p in asyncio.run(main())] == ["a", "b"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
