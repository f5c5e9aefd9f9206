"""The group-commit thread: rounds, per-job failures, directory fsync failures, draining."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Iterator
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


@pytest.fixture(params=[1, 4], ids=["one-thread", "4-workers"])
def committer(request: pytest.FixtureRequest) -> Iterator[Committer]:
    c = Committer(workers=request.param)
    c.start()
    yield c
    c.stop()


def write_job(directory: Path, name: str, data: bytes = b"x") -> Any:
    def job(dirsync: DirSync) -> Path:
        final = directory / name
        with DurableFile(Disk(), str(directory / f".{name}.tmp")) as out:
            out.write(data)
            out.commit(str(final))
        dirsync.add(directory)
        return final

    return job


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


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Committer(workers=0)


def test_submit_resolves(committer: Committer, tmp_path: Path) -> None:
    async def main() -> Path:
        return await committer.submit(write_job(tmp_path, "m"))

    assert asyncio.run(main()).read_bytes() == b"x"


@pytest.mark.parametrize("workers", [1, 4])
def test_one_round_one_dir_fsync_one_wakeup(tmp_path: Path, workers: int) -> None:
    disk = CountingDisk()
    c = Committer(disk=disk, workers=workers)
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


@pytest.mark.parametrize("workers", [1, 4])
def test_dir_fsync_failure_fails_its_jobs_only(tmp_path: Path, workers: int) -> None:
    bad_dir, good_dir = tmp_path / "bad", tmp_path / "good"
    bad_dir.mkdir()
    good_dir.mkdir()
    c = Committer(disk=CountingDisk(fail_dirs=frozenset({str(bad_dir)})), workers=workers)
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
