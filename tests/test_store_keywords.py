"""Keywords in Maildir file names, as Dovecot keeps them (store/keywords.py): lowercase letters after
the system flags, the folder's dovecot-keywords file saying which letter is which, so that a lost
index gets every keyword back, and Dovecot and we see each other's keywords."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from postroom.store import keywords, open_store
from postroom.store import maildir as maildir_module
from postroom.store.index import INDEX_FILE
from tests.pop3_support import deliver


@pytest.fixture(autouse=True)
def _no_kept_state() -> None:
    maildir_module.SNAPSHOTS.clear()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


def names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "cur").iterdir())


def flags_by_uid(root: Path) -> dict[int, frozenset[str]]:
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        return {m.uid: m.flags for m in box.messages()}


def drop_index(root: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / INDEX_FILE}{suffix}").unlink(missing_ok=True)
    maildir_module.SNAPSHOTS.clear()


def test_keywords_survive_a_lost_index(root: Path) -> None:
    for i in range(3):
        deliver(root, f"Subject: {i}\n\n".encode())
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([1, 2], add={"$Junk"})
        box.store_flags([2], add={"work", "\\Seen"})
        box.store_flags([3], add={"$Label1"})
        box.store_flags([3], remove={"$Label1"})
    assert (root / keywords.KEYWORDS_FILE).read_text() == "0 $Junk\n1 work\n2 $Label1\n"
    drop_index(root)
    with open_store(root) as store:
        box = store.mailbox()
        assert box.sync().rebuilt
        assert [m.flags for m in box.messages()] == [
            {"$Junk"}, {"$Junk", "work", "\\Seen"}, frozenset()]


def test_the_letters_follow_the_system_flags(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([1], add={"zz", "\\Answered", "\\Seen", "aa"})
    # "aa" and "zz" got a and b in the order given (sorted); ASCII order puts them last
    assert names(root)[0].endswith(":2,RSab")


def test_names_are_matched_without_regard_to_case(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    deliver(root, b"Subject: y\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([1], add={"Work"})
        (info,) = box.store_flags([2], add={"WORK"})
        assert info.flags == {"Work"}  # the spelling the table has
        box.store_flags([1], remove={"work"})
        assert [m.flags for m in box.messages()] == [frozenset(), {"Work"}]
    assert (root / keywords.KEYWORDS_FILE).read_text() == "0 Work\n"


def test_a_table_written_by_dovecot_is_read(root: Path) -> None:
    (root / keywords.KEYWORDS_FILE).write_text("0 $Junk\n1 NonJunk\nnot a line\n30 too-far\n3 gap\n")
    (root / "cur" / "1700000000.M1P1.h,S=2,W=3:2,Sad").write_bytes(b"x\n")
    (root / "cur" / "1700000001.M1P1.h,S=2,W=3:2,bc").write_bytes(b"y\n")
    assert flags_by_uid(root) == {1: {"\\Seen", "$Junk", "gap"}, 2: {"NonJunk"}}  # c: unknown


def test_a_letter_without_a_name_is_never_given_again(root: Path) -> None:
    """Whoever wrote "a" into a name meant something by it; a new keyword gets "b"."""
    (root / "cur" / "1700000000.M1P1.h,S=2,W=3:2,a").write_bytes(b"x\n")
    deliver(root, b"Subject: y\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([2], add={"fresh"})
        box.store_flags([1], add={"\\Seen"})
    assert (root / keywords.KEYWORDS_FILE).read_text() == "1 fresh\n"
    assert [n.rpartition(",")[2] for n in names(root)] == ["Sa", "b"]  # the unknown "a" is kept


def test_past_26_keywords_the_index_keeps_them(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    many = {f"kw{i:02}" for i in range(30)}
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        (info,) = box.store_flags([1], add=many | {"bad\x01name"})
        assert info.flags == many | {"bad\x01name"}
    assert names(root)[0].endswith(":2," + "abcdefghijklmnopqrstuvwxyz")
    table = (root / keywords.KEYWORDS_FILE).read_text().splitlines()
    assert len(table) == 26 and "bad" not in "".join(table)
    assert flags_by_uid(root)[1] == many | {"bad\x01name"}  # the other four: in the index alone


def test_keywords_kept_in_the_index_by_an_older_version_move_into_the_name(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        with store._index.write() as db:
            db.execute("UPDATE messages SET keywords = 'old' WHERE uid = 1")
        maildir_module.SNAPSHOTS.clear()
        box.sync()
        assert box.messages()[0].flags == {"old"}
        box.store_flags([1], add={"\\Seen"})  # any change writes the keyword's letter too
    drop_index(root)
    assert flags_by_uid(root)[1] == {"old", "\\Seen"}


def test_append_with_keywords(root: Path) -> None:
    with open_store(root) as store:
        box = store.mailbox()
        info = box.append(b"Subject: a\r\n\r\n", flags={"\\Draft", "$Forwarded", "todo"})
        assert info.flags == {"\\Draft", "$Forwarded", "todo"}
    assert names(root)[0].endswith(":2,DPa")
    drop_index(root)
    assert flags_by_uid(root)[1] == {"\\Draft", "$Forwarded", "todo"}


def test_another_writer_holding_the_table_leaves_the_keyword_in_the_index(
        root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keywords, "LOCK_WAIT_SECONDS", 0.05)
    lock = root / (keywords.KEYWORDS_FILE + keywords.LOCK_SUFFIX)
    lock.write_text("")  # fresh: not stale yet
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        (info,) = box.store_flags([1], add={"later"})
        assert info.flags == {"later"}
    assert names(root)[0].endswith(":2,") and not (root / keywords.KEYWORDS_FILE).exists()
    old = time.time() - keywords.STALE_LOCK_SECONDS - 10
    os.utime(lock, (old, old))  # a crashed writer's: taken over
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([1], add={"\\Seen"})
    assert names(root)[0].endswith(":2,Sa") and not lock.exists()
    assert (root / keywords.KEYWORDS_FILE).read_text() == "0 later\n"


def test_the_table_is_replaced_with_a_later_mtime(root: Path) -> None:
    """Dovecot rereads the table only when its mtime in seconds moved on."""
    table = keywords.KeywordMap()
    table.add("one")
    assert keywords.write(str(root), table)
    first = (root / keywords.KEYWORDS_FILE).stat()
    table.add("two")
    assert keywords.write(str(root), table)
    second = (root / keywords.KEYWORDS_FILE).stat()
    assert int(second.st_mtime) > int(first.st_mtime) and second.st_ino != first.st_ino
    assert keywords.load(str(root)).names[:3] == ["one", "two", None]


def test_a_keyword_set_by_another_program_is_seen_by_the_next_session(root: Path) -> None:
    """The kept state of a session whose names had no keyword letters does not hide one that
    another program adds (a rename in cur/ and a new table)."""
    deliver(root, b"Subject: x\n\n")
    assert flags_by_uid(root)[1] == frozenset()
    (name,) = names(root)
    (root / keywords.KEYWORDS_FILE).write_text("0 $Important\n")
    os.rename(root / "cur" / name, root / "cur" / (name + "a"))
    assert flags_by_uid(root)[1] == {"$Important"}


def test_a_changed_table_is_seen_by_the_next_session(root: Path) -> None:
    """Names unchanged, table rewritten (as after a restore): the kept state is not used."""
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.store_flags([1], add={"first"})
    assert flags_by_uid(root)[1] == {"first"}
    (root / keywords.KEYWORDS_FILE).write_text("0 second\n")
    assert flags_by_uid(root)[1] == {"second"}


# -- with Dovecot ------------------------------------------------------------------------------
DOVECOT_CONF = """
protocols =
listen = 127.0.0.1
ssl = no
base_dir = {work}/run
log_path = {work}/dovecot.log
mail_location = maildir:{root}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={work}
}}
"""


@pytest.mark.interop
@pytest.mark.skipif(
    not Path("/usr/sbin/dovecot").exists() or os.geteuid() != 0,
    reason="needs Debian's dovecot-core and root",
)
def test_dovecot_and_we_see_each_others_keywords() -> None:
    import pwd

    work = Path(tempfile.mkdtemp(prefix="postroom-keywords-dovecot-", dir="/tmp"))
    nobody = pwd.getpwnam("nobody")
    try:
        os.chmod(work, 0o755)
        root = work / "Maildir"
        deliver(root, b"Subject: one\n\nbody\n")
        deliver(root, b"Subject: two\n\nbody\n")
        with open_store(root, owner=(nobody.pw_uid, nobody.pw_gid)) as store:
            box = store.mailbox()
            box.sync()
            box.store_flags([1], add={"$Junk", "work", "\\Seen"})
        for path in [work, *work.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        for suffix in ("", "-wal", "-shm"):  # nothing from our index: only the Maildir tells
            Path(f"{root / INDEX_FILE}{suffix}").unlink(missing_ok=True)
        conf = work / "dovecot.conf"
        conf.write_text(DOVECOT_CONF.format(work=work, root=root, uid=nobody.pw_uid,
                                            gid=nobody.pw_gid))
        proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not (work / "run" / "auth-userdb").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            doveadm = ["doveadm", "-c", str(conf)]
            fetch = subprocess.run([*doveadm, "fetch", "-u", "u", "uid flags", "mailbox", "INBOX",
                                    "all"], capture_output=True, text=True, timeout=30)
            added = subprocess.run([*doveadm, "flags", "add", "-u", "u", "$Label1 \\Flagged",
                                    "mailbox", "INBOX", "uid", "2"],
                                   capture_output=True, text=True, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        assert fetch.returncode == 0, fetch.stderr
        first, second = (set(part.split()[2:]) - {"\\Recent"}
                         for part in fetch.stdout.split("uid: ")[1:3])
        assert first == {"\\Seen", "$Junk", "work"} and second == set(), fetch.stdout
        assert added.returncode == 0, added.stderr
        drop_index(root)
        assert flags_by_uid(root) == {1: {"\\Seen", "$Junk", "work"}, 2: {"\\Flagged", "$Label1"}}
    finally:
        shutil.rmtree(work, ignore_errors=True)
