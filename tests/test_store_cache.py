"""The mailbox state a process keeps between sessions (store/maildir.py's snapshots): used only
while the index's change counter, the folder's row and the mtimes of new/ and cur/ are as they
were, and never for a listing taken too close to a directory's mtime."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.store import maildir as maildir_module
from postroom.store import open_inbox, open_store
from postroom.store.maildir import MaildirMailbox
from tests.pop3_support import deliver


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


@pytest.fixture
def listings(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every directory the store lists."""
    seen: list[str] = []
    real = os.listdir

    def counting(path: str | os.PathLike[str] = ".") -> list[str]:
        seen.append(os.fspath(path))
        return real(path)

    monkeypatch.setattr(maildir_module.os, "listdir", counting)
    yield seen


def age(root: Path, seconds: float = 10.0) -> None:
    """Make new/ and cur/ look last changed *seconds* ago, as a mailbox nobody touched has (the
    tests cannot wait out the racy window)."""
    then = time.time_ns() - int(seconds * 1e9)
    for sub in ("new", "cur"):
        os.utime(root / sub, ns=(then, then))


def session(root: Path) -> tuple[list[tuple[int, str, frozenset[str]]], MaildirMailbox]:
    """A POP3-like session: open, lock, sync moving new mail, list, close."""
    box = open_inbox(root)
    lock = box.lock_exclusive("pop3")
    try:
        box.sync(move_new=True)
        return [(m.uid, m.key, m.flags) for m in box.messages()], box
    finally:
        lock.release()
        box.close()


def warm(root: Path, count: int = 3) -> list[tuple[int, str, frozenset[str]]]:
    for i in range(count):
        deliver(root, f"Subject: {i}\n\nbody {i}\n".encode())
    session(root)  # moves new/ to cur/: both directories just changed
    age(root)
    listed, _ = session(root)  # lists the aged directories: its state is kept
    return listed


def test_an_unchanged_mailbox_is_not_listed_again(root: Path, listings: list[str]) -> None:
    before = warm(root)
    listings.clear()
    for _ in range(3):
        listed, _box = session(root)
        assert listed == before
    assert listings == []  # neither new/ nor cur/, three sessions long


def test_a_delivery_between_two_sessions_is_seen(root: Path, listings: list[str]) -> None:
    before = warm(root)
    listings.clear()
    assert session(root)[0] == before and listings == []
    path = deliver(root, b"Subject: late\n\nlate\n")
    listed, _ = session(root)
    assert [key for _uid, key, _flags in listed] == [k for _u, k, _f in before] + [path.name]
    assert listed[-1][0] == before[-1][0] + 1
    assert listings  # listed for real


def test_a_rename_in_cur_by_another_program_is_seen(root: Path) -> None:
    warm(root)
    assert session(root)[0][0][2] == frozenset()
    (name,) = [n for n in os.listdir(root / "cur") if n.startswith(session(root)[0][0][1])]
    os.rename(root / "cur" / name, root / "cur" / (name.partition(":")[0] + ":2,F"))
    assert session(root)[0][0][2] == {"\\Flagged"}


def test_a_removal_by_another_program_is_seen(root: Path) -> None:
    before = warm(root)
    (name,) = [n for n in os.listdir(root / "cur") if n.startswith(before[1][1])]
    os.unlink(root / "cur" / name)
    assert [uid for uid, _k, _f in session(root)[0]] == [before[0][0], before[2][0]]


def test_another_process_changing_only_the_index_is_seen(root: Path) -> None:
    """A keyword lives in the index alone: no directory changes, the change counter does."""
    warm(root)
    script = ("import sys; from pathlib import Path; from postroom.store import open_store\n"
              "with open_store(Path(sys.argv[1])) as s:\n"
              "    box = s.mailbox(); box.sync(move_new=False)\n"
              "    box.store_flags([2], add={'$Important'})\n")
    subprocess.run([sys.executable, "-c", script, str(root)], check=True, timeout=60)
    listed, _ = session(root)
    assert listed[1][2] == {"$Important"}


def test_our_own_changes_are_seen_by_the_next_session(root: Path, listings: list[str]) -> None:
    warm(root)
    box = open_inbox(root)
    box.sync()
    box.store_flags([1], add={"$Work"})  # index only
    box.expunge([3])
    box.close()
    age(root)
    listings.clear()
    listed, _ = session(root)
    assert [(uid, flags) for uid, _k, flags in listed] == [(1, {"$Work"}), (2, frozenset())]
    assert listings  # the counter moved: a full sync


def test_a_racy_listing_is_not_trusted(root: Path, listings: list[str]) -> None:
    """A listing taken right after a directory changed may miss a change in the same clock
    tick, which leaves the mtime as it was: the next session lists again."""
    for i in range(2):
        deliver(root, f"Subject: {i}\n\n".encode())
    session(root)
    listings.clear()
    session(root)  # the directories changed just now
    assert listings
    listings.clear()
    session(root)
    assert listings  # still within the window: never trusted


def test_sessions_do_not_share_rows(root: Path) -> None:
    """A mailbox that finds a message renamed keeps the new path to itself; the kept state is
    copied into each mailbox."""
    warm(root)
    with open_store(root) as store:
        one = store.mailbox()
        one.sync(move_new=False)
        (name,) = [n for n in os.listdir(root / "cur") if n.startswith(one.messages()[0].key)]
        os.rename(root / "cur" / name, root / "cur" / (name + "S"))
        assert one.read_message(1, 100).startswith(b"Subject: 0")
        assert one.message_path(1).name == name + "S"
    kept = maildir_module.SNAPSHOTS.get((str(root), "INBOX"))
    assert kept is not None and kept.rows[1].path == "cur/" + name


def test_the_kept_rows_are_bounded(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snapshots = maildir_module._Snapshots(limit=4)
    monkeypatch.setattr(maildir_module, "SNAPSHOTS", snapshots)
    warm(root, count=3)
    assert snapshots.get((str(root), "INBOX")) is not None
    other = root.parent / "Other"
    for sub in ("tmp", "new", "cur"):
        (other / sub).mkdir(parents=True)
    warm(other, count=2)  # 3 + 2 rows > 4: the older mailbox goes
    assert snapshots.get((str(root), "INBOX")) is None
    assert snapshots.get((str(other), "INBOX")) is not None


def test_any_index_write_elsewhere_is_seen(root: Path, listings: list[str]) -> None:
    """Every write transaction that changes a row moves the change counter, even one that
    leaves the folder's own counters (UIDNEXT, HIGHESTMODSEQ) alone."""
    from postroom.store.index import Index

    warm(root)
    index = Index(root)
    try:
        with index.write() as db:
            db.execute("UPDATE messages SET keywords = 'Elsewhere' WHERE uid = 2")
    finally:
        index.close()
    listings.clear()
    listed, _ = session(root)
    assert listed[1][2] == {"Elsewhere"}
    assert listings


def test_storing_flags_that_are_already_set_changes_nothing(tmp_path: Path) -> None:
    """A POP3 session that retrieves mail already marked seen must not make the next login
    miss the cache: an update that changes no row leaves the index's change counter alone."""
    maildir = tmp_path / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "cur" / "1700000000.M1P1.test,S=4:2,S").write_bytes(b"x\n\nb\n")
    with open_store(maildir) as store:
        box = store.mailbox("INBOX")
        box.sync()
        uids = [info.uid for info in box.messages()]
        before = store._index.committed_changes
        assert box.store_flags(uids, add={"\\Seen"}) == []
        assert box.store_flags([], add={"\\Seen"}) == []
        assert store._index.committed_changes == before


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Every load of a folder's rows from the index."""
    seen: list[int] = []
    real = MaildirMailbox._load

    def counting(self: MaildirMailbox, db: object) -> object:
        seen.append(1)
        return real(self, db)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirMailbox, "_load", counting)
    yield seen


def pop3_session(root: Path) -> list[tuple[int, str, frozenset[str]]]:
    """What the benchmark's POP3 session does: log in, retrieve all, QUIT marks them seen."""
    box = open_inbox(root)
    lock = box.lock_exclusive("pop3")
    try:
        box.sync(move_new=True)
        listed = box.messages()
        box.store_flags([m.uid for m in listed], add={"\\Seen"})
        return [(m.uid, m.key, m.flags) for m in box.messages()]
    finally:
        lock.release()
        box.close()


def test_right_after_a_session_that_changed_flags_nothing_is_loaded(
        root: Path, listings: list[str], loads: list[int]) -> None:
    """Its QUIT renamed files a moment ago (racy mtimes): the next session lists the two
    directories once, finds the names this process left, and loads nothing."""
    for i in range(5):
        deliver(root, f"Subject: {i}\n\n".encode())
    maildir_module.SNAPSHOTS.clear()
    pop3_session(root)
    listings.clear()
    loads.clear()
    listed, _box = session(root)
    assert [flags for _uid, _key, flags in listed] == [{"\\Seen"}] * 5
    assert loads == [] and sorted(os.path.basename(p) for p in listings) == ["cur", "new"]


def test_new_mail_after_the_kept_state_starts_from_it(root: Path, loads: list[int]) -> None:
    before = warm(root)
    loads.clear()
    path = deliver(root, b"Subject: late\n\n")
    listed, _box = session(root)
    assert [key for _uid, key, _flags in listed] == [k for _u, k, _f in before] + [path.name]
    assert listed[-1][0] == before[-1][0] + 1
    assert loads == []  # only the new file was looked at


def test_a_racy_state_is_checked_by_names_not_mtimes(root: Path) -> None:
    """Another program renames a file in the same clock tick (the mtime of cur/ stays as it
    was): a state kept from a racy moment is compared by names, so the change is seen."""
    for i in range(2):
        deliver(root, f"Subject: {i}\n\n".encode())
    pop3_session(root)
    mark = os.stat(root / "cur").st_mtime_ns
    (name,) = [n for n in os.listdir(root / "cur") if n.startswith(session(root)[0][0][1])]
    os.rename(root / "cur" / name, root / "cur" / (name.partition(":")[0] + ":2,FS"))
    os.utime(root / "cur", ns=(mark, mark))
    assert session(root)[0][0][2] == {"\\Flagged", "\\Seen"}


def test_a_state_confirmed_by_names_long_after_the_mtimes_is_trusted(
        root: Path, listings: list[str]) -> None:
    for i in range(2):
        deliver(root, f"Subject: {i}\n\n".encode())
    pop3_session(root)  # kept without mtimes: the next sync lists
    age(root)
    listings.clear()
    session(root)
    assert len(listings) == 2  # compared by names, found the same, long after the mtimes ...
    listings.clear()
    session(root)
    assert listings == []  # ... so now the mtimes alone tell


def test_a_flag_change_or_expunge_carries_the_message_list_forward(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What messages() says after store_flags or expunge is what a fresh build says; only the
    changed messages are made again, and the next session gets the list made: QUIT's \\Seen on
    every message does not cost the next login a rebuild of each."""
    made: list[int] = []
    real = MaildirMailbox._info

    def counting(self: MaildirMailbox, row: object) -> object:
        made.append(1)
        return real(self, row)  # type: ignore[arg-type]

    monkeypatch.setattr(MaildirMailbox, "_info", counting)
    for i in range(6):
        deliver(root, f"Subject: {i}\n\n".encode())
    box = open_inbox(root)
    box.sync()
    box.store_flags([1, 3, 5], add={"todo"})  # a new keyword letter: built again below
    box.messages()
    made.clear()
    box.store_flags([1, 3, 5], add={"\\Seen"})
    box.store_flags([2, 3], add={"\\Flagged"}, remove={"todo"})
    box.expunge([4])
    carried = box.messages()
    assert len(made) == 3 + 2  # the changed ones, once each
    box._infos = None
    assert box.messages() == carried
    assert [(m.uid, m.flags) for m in carried] == [
        (1, {"\\Seen", "todo"}), (2, {"\\Flagged"}), (3, {"\\Seen", "\\Flagged"}),
        (5, {"\\Seen", "todo"}), (6, frozenset())]
    box.close()
    made.clear()
    again = open_inbox(root)
    again.sync()
    assert again.messages() == carried and made == []
    again.close()


def test_a_list_view_is_made_once_and_kept_while_the_messages_stay(root: Path) -> None:
    """list_view(): made once for a message list, kept through flag changes (QUIT's \\Seen) and
    for the next session of this process; made again when a message comes or goes."""
    made: list[int] = []

    def keys(infos: object) -> tuple[str, ...]:
        made.append(1)
        return tuple(m.key for m in infos)  # type: ignore[attr-defined]

    for i in range(4):
        deliver(root, f"Subject: {i}\n\n".encode())
    maildir_module.SNAPSHOTS.clear()
    box = open_inbox(root)
    box.sync()
    first = box.list_view("keys", keys)
    assert box.list_view("keys", keys) is first and len(made) == 1
    box.store_flags([1, 2, 3, 4], add={"\\Seen"})
    assert box.list_view("keys", keys) is first and len(made) == 1
    box.close()
    again = open_inbox(root)
    again.sync()  # right after the renames: compared by names, the kept state holds
    assert again.list_view("keys", keys) is first and len(made) == 1
    again.close()
    late = deliver(root, b"Subject: late\n\n")
    third = open_inbox(root)
    third.sync()
    assert third.list_view("keys", keys) == (*first, late.name) and len(made) == 2
    third.expunge([1])
    assert third.list_view("keys", keys) == (*first[1:], late.name) and len(made) == 3
    third.close()


def test_a_list_view_is_not_shared_with_a_changed_mailbox(root: Path) -> None:
    """Another program removes a file between two sessions: the next session's view is new."""
    for i in range(3):
        deliver(root, f"Subject: {i}\n\n".encode())
    box = open_inbox(root)
    box.sync()
    before = box.list_view("keys", lambda infos: tuple(m.key for m in infos))
    box.close()
    (gone,) = [n for n in os.listdir(root / "cur") if n.startswith(before[0])]
    os.unlink(root / "cur" / gone)
    again = open_inbox(root)
    again.sync()
    assert again.list_view("keys", lambda infos: tuple(m.key for m in infos)) == before[1:]
    again.close()
