"""Maildir delivery: names, LF content, sizes, what readers see, failures (quota usage is in
test_quota.py)."""

from __future__ import annotations

import errno
import mailbox
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.delivery.maildir import (
    crlf_to_lf,
    delivery_headers,
    ensure_maildir,
    size_from_name,
    unique_name,
    write_message,
)
from postroom.errors import StorageError
from postroom.queue.committer import Committer, DirSync, Disk

MESSAGE = (
    b"From: a@example.org\r\n"
    b"To: b@example.com\r\n"
    b"Subject: hi\r\n"
    b"\r\n"
    b"line one\r\n"
    b"\r\n"
    b"From the start of a line\r\n"
    b"bare\rCR stays\r\n"
)
MESSAGE_LF = MESSAGE.replace(b"\r\n", b"\n")

NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.(.+),S=(\d+),W=(\d+)$")


class NoSpaceDisk(Disk):
    def write(self, fd: int, data: bytes | bytearray | memoryview) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class BadFsyncDisk(Disk):
    def __init__(self, err: int = errno.EIO) -> None:
        self.err = err

    def fsync(self, fd: int) -> None:
        raise OSError(self.err, os.strerror(self.err))


def deliver(root: Path, chunks: list[bytes], disk: Disk | None = None) -> Path:
    return Committer().run_now(lambda ds: write_message(root, chunks, ds, disk=disk or Disk()))


def test_ensure_maildir_modes(tmp_path: Path) -> None:
    root = tmp_path / "users" / "alice" / "Maildir"
    dirsync = DirSync()
    ensure_maildir(root, dirsync)
    for sub in ("tmp", "new", "cur"):
        assert (root / sub).is_dir()
        assert (root / sub).stat().st_mode & 0o777 == 0o700
    assert root.stat().st_mode & 0o777 == 0o700
    # every directory that gained an entry is to be synced
    assert set(dirsync.paths) == {
        str(tmp_path),
        str(tmp_path / "users"),
        str(tmp_path / "users" / "alice"),
        str(root),
    }
    again = DirSync()
    ensure_maildir(root, again)
    assert again.paths == []


def test_unique_name_shape() -> None:
    name = unique_name(4096, 4180)
    match = NAME.match(name)
    assert match, name
    assert int(match.group(3)) == os.getpid()
    assert (match.group(6), match.group(7)) == ("4096", "4180")
    assert ":" not in name and "/" not in name


def test_unique_name_escapes_host() -> None:
    name = unique_name(1, 2, host="a/b:c,d")
    assert ".a\\057b\\072c\\054d,S=1,W=2" in name
    assert name.count("/") == 0 and name.count(":") == 0


def test_unique_names_differ() -> None:
    names = {unique_name(1, 1) for _ in range(2000)}
    assert len(names) == 2000


def test_write_message_content_and_sizes(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    path = deliver(root, [MESSAGE[:7], MESSAGE[7:30], MESSAGE[30:]])
    assert path.parent == root / "new"
    assert path.read_bytes() == MESSAGE_LF
    assert path.stat().st_mode & 0o777 == 0o600
    match = NAME.match(path.name)
    assert match
    assert int(match.group(6)) == len(MESSAGE_LF)  # S= is the size on disk
    assert int(match.group(7)) == len(MESSAGE)  # W= is the size with CRLF line ends
    assert os.listdir(root / "tmp") == []


def test_python_mailbox_reads_it(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    first = deliver(root, [MESSAGE])
    second = deliver(root, [b"Subject: two\r\n\r\nbody\r\n"])
    box = mailbox.Maildir(str(root), factory=None, create=False)
    by_key = {key: box.get_bytes(key) for key in box.iterkeys()}
    assert sorted(by_key.values()) == sorted([MESSAGE_LF, b"Subject: two\n\nbody\n"])
    assert {first.name, second.name} == set(by_key)
    message = box[first.name]
    assert message.get_subdir() == "new"
    assert message["Subject"] == "hi"
    # (the email parser reads a bare CR as a line end; get_bytes above checked the exact bytes)
    payload = message.get_payload()
    assert isinstance(payload, str)
    assert payload.startswith("line one\n\nFrom the start of a line\n")


def test_delivery_headers() -> None:
    assert delivery_headers("a@example.org", "b@example.com") == (
        b"Return-Path: <a@example.org>\r\nDelivered-To: b@example.com\r\n"
    )
    assert delivery_headers("", "b@example.com").startswith(b"Return-Path: <>\r\n")


def test_write_message_creates_missing_maildir(tmp_path: Path) -> None:
    root = tmp_path / "new-user" / "Maildir"
    path = deliver(root, [MESSAGE])
    assert path.read_bytes() == MESSAGE_LF
    assert sorted(os.listdir(root)) == ["cur", "new", "tmp"]


def test_disk_full_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    with pytest.raises(StorageError) as info:
        deliver(root, [MESSAGE], NoSpaceDisk())
    assert info.value.disk_full
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []


def test_fsync_error_is_not_disk_full(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    with pytest.raises(StorageError) as info:
        deliver(root, [MESSAGE], BadFsyncDisk())
    assert not info.value.disk_full
    assert "fsync" in str(info.value)
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []


def test_fsync_enospc_is_disk_full(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    with pytest.raises(StorageError) as info:
        deliver(root, [MESSAGE], BadFsyncDisk(errno.ENOSPC))
    assert info.value.disk_full
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == []


def test_message_waits_in_tmp_until_the_round_commits(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    during: list[tuple[list[str], list[str]]] = []

    def job(dirsync: DirSync) -> Path:
        path = write_message(root, [MESSAGE], dirsync)
        during.append((os.listdir(root / "tmp"), os.listdir(root / "new")))
        assert [f.final_path for f in dirsync.files] == [str(path)]
        return path

    path = Committer().run_now(job)
    [(in_tmp, in_new)] = during
    assert len(in_tmp) == 1 and in_new == []  # written, not yet fsynced nor renamed
    assert path.name.startswith(in_tmp[0] + ",S=")
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "new") == [path.name]


def test_unwritable_location(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError) as info:
        deliver(tmp_path / "file" / "Maildir", [MESSAGE])
    assert not info.value.disk_full


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.sampled_from([b"a", b"\r", b"\n", b"\r\n"]), max_size=60).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8),
)
def test_crlf_to_lf_across_chunk_boundaries(data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces = [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]
    assert b"".join(crlf_to_lf(pieces)) == data.replace(b"\r\n", b"\n")


@settings(max_examples=30, deadline=None)
@given(data=st.lists(st.sampled_from([b"ab", b"\r", b"\n", b"\r\n"]), max_size=40).map(b"".join))
def test_w_size_is_what_a_crlf_reader_counts(
    tmp_path_factory: pytest.TempPathFactory, data: bytes
) -> None:
    root = tmp_path_factory.mktemp("w") / "Maildir"
    path = deliver(root, [data])
    stored = path.read_bytes()
    match = NAME.match(path.name)
    assert match
    # Dovecot turns each LF not already preceded by CR into CRLF when it counts the W= size.
    expected = len(re.sub(rb"(?<!\r)\n", b"\r\n", stored))
    assert (int(match.group(6)), int(match.group(7))) == (len(stored), expected)


def test_size_from_name() -> None:
    assert size_from_name("1.M2P3Q4.host,S=4096,W=4180") == 4096
    assert size_from_name("1.M2P3Q4.host,S=12,W=13:2,S") == 12
    assert size_from_name("1.M2P3Q4.host:2,S=12") is None  # flags, not a size
    assert size_from_name("1.M2P3Q4.host") is None
