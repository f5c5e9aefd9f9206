"""The first access to a Maildir the index does not know (store/maildir.py's _prepare): files
whose names carry no W= are read once, into one reused buffer, for their CRLF size (a CRLF split
between two reads counts once), new/ moves to cur/; files that move or vanish meanwhile are found
or forgotten, and a read that fails fails the sync and indexes nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from postroom.errors import StorageError
from postroom.store import maildir as maildir_module
from postroom.store import open_store
from postroom.store.names import crlf_size_of

#: Line ends of every kind, CRLF pairs split at every offset of a 7-octet read, a CR at the end.
BODIES = [
    b"Subject: a\n\nlf only\n",
    b"Subject: b\r\n\r\ncrlf\r\n",
    b"a\rb\r\n\r\r\n\n\r",
    b"x" * 6 + b"\r\n" + b"y" * 5 + b"\r\n",
    b"\r\n" * 20,
    b"",
    b"no line end at all",
] + [b"z" * n + b"\r\n" + b"\n" * n for n in range(1, 16)]


@pytest.fixture(autouse=True)
def _no_kept_state() -> None:
    maildir_module.SNAPSHOTS.clear()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads of 7 octets: every file but the smallest takes several."""
    monkeypatch.setattr(maildir_module, "_READ_CHUNK", 7)


def place(root: Path) -> dict[str, bytes]:
    """BODIES as another program delivers them: no S= or W= in the names, half in new/."""
    files = {}
    for i, body in enumerate(BODIES):
        key = f"{1_700_000_000 + i}.M{i}P1.other"
        sub = "new" if i % 2 else "cur"
        (root / sub / (key if sub == "new" else key + ":2,S")).write_bytes(body)
        files[key] = body
    return files


def test_sizes_of_files_read_in_pieces(root: Path, small_reads: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    files = place(root)
    reads: list[int] = []
    real = os.readv

    def counting(fd: int, buffers: list[bytearray]) -> int:
        reads.append(fd)
        return real(fd, buffers)

    monkeypatch.setattr(os, "readv", counting)
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        infos = box.messages()
    assert [info.key for info in infos] == list(files)  # delivery order
    assert [(info.size, info.crlf_size) for info in infos] == [
        (len(body), crlf_size_of(body)) for body in files.values()]
    assert len(reads) == sum(len(body) // 7 + 1 for body in files.values())  # no read after a short one
    assert os.listdir(root / "new") == []
    assert sorted(os.listdir(root / "cur")) == sorted(
        k + (":2,S" if i % 2 == 0 else ":2,") for i, k in enumerate(files))


def test_files_moved_or_removed_by_another_program_meanwhile(
        root: Path, small_reads: None, monkeypatch: pytest.MonkeyPatch) -> None:
    files = place(root)
    keys = list(files)
    moved_away, removed, removed_unread = keys[1], keys[3], keys[5]  # all three in new/
    real_measure, real_rename = maildir_module._measure_file, os.rename

    def measure(name: str, *args: object) -> object:
        if name == removed_unread:
            os.unlink(root / "new" / name)  # gone before we read it
        return real_measure(name, *args)  # type: ignore[arg-type]

    def rename(src: str, dst: str, **dir_fds: int) -> None:
        if src == moved_away:  # another session took it to cur/ and flagged it
            real_rename(root / "new" / src, root / "cur" / (src + ":2,F"))
        elif src == removed:
            os.unlink(root / "new" / src)
        real_rename(src, dst, **dir_fds)

    monkeypatch.setattr(maildir_module, "_measure_file", measure)
    monkeypatch.setattr(maildir_module.os, "rename", rename)
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        infos = {info.key: info for info in box.messages()}
    assert set(infos) == set(keys) - {removed, removed_unread}
    assert infos[moved_away].flags == {"\\Flagged"}
    assert infos[moved_away].crlf_size == crlf_size_of(files[moved_away])


def test_a_read_that_fails_fails_the_sync_and_indexes_nothing(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = place(root)
    real = maildir_module._measure_file
    calls: list[object] = []

    def measure(*args: object) -> object:
        calls.append(args)
        if len(calls) == 5:
            raise PermissionError(13, "Permission denied")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(maildir_module, "_measure_file", measure)
    with open_store(root) as store:
        box = store.mailbox()
        with pytest.raises(StorageError, match="Permission denied"):
            box.sync()
        assert box.messages() == []
        monkeypatch.setattr(maildir_module, "_measure_file", real)
        box.sync()
        assert [info.uid for info in box.messages()] == list(range(1, len(files) + 1))


def test_read_message_reads_once_and_never_stops_short(root: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    body = b"Subject: x\n\n" + b"y" * 100 + b"\n"
    (root / "cur" / f"1700000000.M1P1.h,S={len(body)},W=999:2,S").write_bytes(body)
    (root / "cur" / "1700000001.M1P1.h,S=3,W=4:2,S").write_bytes(body)  # S= says less than there is
    (root / "cur" / "1700000002.M1P1.h,S=0,W=0:2,S").write_bytes(b"")
    reads: list[int] = []
    real = os.read

    def counting(fd: int, n: int) -> bytes:
        reads.append(n)
        return real(fd, n)

    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        monkeypatch.setattr(os, "read", counting)
        assert box.read_message(1, 65536) == body and reads == [len(body) + 1]
        reads.clear()
        assert box.read_message(1, 10) == body[:10] and reads == [10]
        assert box.read_message(2, 65536) == body  # more reads, but all of it
        assert box.read_message(3, 65536) == b""
