"""The mailbox store: UIDs that survive re-opening, a lost or damaged index, other programs and
other sessions working on the same Maildir, durable expunge, folders and their roles."""

from __future__ import annotations

import mailbox
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postroom.store import (
    FolderError,
    MailboxInUse,
    MessageGone,
    create_default_folders,
    open_inbox,
    open_store,
)
from postroom.store import maildir as maildir_module
from postroom.store.folders import decode_mutf7, encode_mutf7
from postroom.store.index import INDEX_FILE, UIDVALIDITY_FILE
from postroom.store.names import apply_flags, crlf_size_of, parse_name
from tests.pop3_support import deliver


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "Maildir"
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True)
    return path


def keys(box: object) -> list[str]:
    return [m.key for m in box.messages()]  # type: ignore[attr-defined]


def uids(box: object) -> list[int]:
    return [m.uid for m in box.messages()]  # type: ignore[attr-defined]


def test_names() -> None:
    parsed = parse_name("1732900000.M123456P4321Q17.host,S=4096,W=4180:2,FRSa")
    assert (parsed.key, parsed.letters, parsed.size, parsed.crlf_size) == (
        "1732900000.M123456P4321Q17.host,S=4096,W=4180", "FRSa", 4096, 4180)
    assert (parsed.seconds, parsed.micros) == (1732900000, 123456)
    bare = parse_name("qmail-style.123.host")
    assert (bare.key, bare.letters, bare.size, bare.seconds) == ("qmail-style.123.host", "", None,
                                                                 None)
    assert apply_flags("RSa", add={"\\Flagged", "work"}, remove={"\\Seen"}) == "FRa"
    assert crlf_size_of(b"a\nb\r\nc\r") == 8


def test_uids_survive_reopening(root: Path) -> None:
    for i in range(3):
        deliver(root, f"Subject: {i}\n\nbody {i}\n".encode())
    with open_store(root) as store:
        box = store.mailbox()
        result = box.sync()
        assert result.added == (1, 2, 3) and not result.rebuilt
        first = [(m.uid, m.key) for m in box.messages()]
        validity = box.uidvalidity
    deliver(root, b"Subject: 3\n\nlater\n")
    with open_store(root) as store:
        box = store.mailbox()
        assert box.sync().added == (1, 2, 3, 4)  # all new to this view; only 4 is new on disk
        assert [(m.uid, m.key) for m in box.messages()][:3] == first
        assert box.uidvalidity == validity and box.uidnext == 5


def test_sizes_come_from_the_name_without_reading(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(200):
        deliver(root, f"Subject: {i}\n\n{'x' * i}\n".encode())
    opened: list[object] = []
    stats: list[object] = []
    real_stat = os.stat
    real_open = open

    def counting_open(*args: object, **kwargs: object) -> object:
        opened.append(args)
        return real_open(*args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(maildir_module, "open", counting_open, raising=False)
    real_os_open = os.open

    def counting_os_open(path: object, *args: object, **kwargs: object) -> int:
        if "/cur/" in str(path) or "/new/" in str(path):
            opened.append(path)
        return real_os_open(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_os_open)

    def counting_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        stats.append(path)
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", counting_stat)
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        assert len(box.messages()) == 200
    assert opened == [] and not [p for p in stats if str(root) in str(p) and "/cur/" in str(p)]
    infos = {m.key: m for m in box.messages()}
    for path in (root / "cur").iterdir():
        info = infos[path.name.partition(":")[0]]
        assert (info.size, info.crlf_size) == (path.stat().st_size, crlf_size_of(path.read_bytes()))


def test_new_moves_to_cur_only_when_asked(root: Path) -> None:
    path = deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync(move_new=False)
        assert path.exists() and uids(box) == [1]
        assert box.sync().added == ()  # moved now, same UID
        assert not path.exists()
        assert [p.name for p in (root / "cur").iterdir()] == [path.name + ":2,"]
        assert uids(box) == [1]


def test_delivery_order_decides_the_uids(root: Path) -> None:
    for name in ("1000.M10P1.h", "1000.M2P1.h", "999.M500000P1.h", "zzz-no-time"):
        (root / "new" / name).write_bytes(b"Subject: x\n\n")
    os.utime(root / "new" / "zzz-no-time", (5, 5))  # an mtime before all the others
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        assert keys(box) == ["zzz-no-time", "999.M500000P1.h", "1000.M2P1.h", "1000.M10P1.h"]
        assert box.messages()[0].internal_date == 5


def test_a_lost_index_means_a_new_uidvalidity(root: Path) -> None:
    for i in range(3):
        deliver(root, f"Subject: {i}\n\n".encode())
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        box.expunge([2])
        old = box.uidvalidity
        old_keys = keys(box)
    for suffix in ("", "-wal", "-shm"):
        Path(f"{root / INDEX_FILE}{suffix}").unlink(missing_ok=True)
    with open_store(root) as store:  # within the same second: the counter file still moves it
        box = store.mailbox()
        result = box.sync()
        assert result.rebuilt and result.added == (1, 2)
        assert box.uidvalidity > old
        assert keys(box) == old_keys  # same messages, same order; POP3 UIDLs stay the same
    assert int((root / UIDVALIDITY_FILE).read_text()) == box.uidvalidity


def test_a_damaged_index_is_moved_aside_and_rebuilt(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        old = box.uidvalidity
    (root / INDEX_FILE).write_bytes(b"this is not a database " * 200)
    with open_store(root) as store:
        box = store.mailbox()
        assert box.sync().rebuilt and uids(box) == [1] and box.uidvalidity > old
    assert list(root.glob(INDEX_FILE + ".corrupt-*"))


def test_damage_found_during_a_sync_rebuilds(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deliver(root, b"Subject: x\n\n")
    store = open_store(root)
    box = store.mailbox()
    box.sync()
    old = box.uidvalidity
    real_load = maildir_module.MaildirMailbox._load
    calls = []

    def damaged(self: maildir_module.MaildirMailbox, db: sqlite3.Connection) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("database disk image is malformed")
        return real_load(self, db)

    monkeypatch.setattr(maildir_module.MaildirMailbox, "_load", damaged)
    maildir_module.SNAPSHOTS.clear()  # the kept state would spare the sync its load
    result = box.sync()
    assert result.rebuilt and uids(box) == [1] and box.uidvalidity > old
    store.close()


def test_files_from_other_programs(root: Path) -> None:
    md = mailbox.Maildir(str(root))
    with open_store(root) as store:
        box = store.mailbox()
        key = md.add(b"Subject: a\n\nfrom mailbox.Maildir\n")
        result = box.sync()
        assert result.added == (1,)
        info = box.messages()[0]
        assert info.key == key and info.size == 33 and info.crlf_size == 36
        # mutt marks it answered and seen by renaming it.
        (current,) = (root / "cur").iterdir()
        current.rename(root / "cur" / f"{key}:2,RS")
        before = box.highest_modseq
        assert box.sync().changed == (1,)
        info = box.messages()[0]
        assert info.flags == {"\\Answered", "\\Seen"} and info.modseq > before
        # ... and deletes it.
        (root / "cur" / f"{key}:2,RS").unlink()
        assert box.sync().vanished == (1,)
        assert box.messages() == []
        with pytest.raises(MessageGone):
            box.open_message(1)


def test_a_file_placed_but_never_indexed_is_picked_up(root: Path) -> None:
    """A crash between writing a file and indexing it: the file is simply found."""
    with open_store(root) as store:
        box = store.mailbox()
        box.append(b"Subject: a\r\n\r\n")
        (root / "cur" / "1700000000.M1P2Q3.h,S=12,W=14:2,S").write_bytes(b"Subject: b\n\n")
        result = box.sync()
        assert result.added == (2,)
        assert box.messages()[1].flags == {"\\Seen"}
        assert box.messages()[1].crlf_size == 14


def test_flags_and_keywords_rename_the_file(root: Path) -> None:
    deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        start = box.highest_modseq
        (changed,) = box.store_flags([1], add={"\\Seen", "\\Flagged", "$Forwarded", "work"})
        assert changed.flags == {"\\Seen", "\\Flagged", "$Forwarded", "work"}
        assert changed.modseq == box.highest_modseq == start + 1
        (path,) = (root / "cur").iterdir()
        assert path.name.endswith(":2,FPSa")  # the keyword's letter, as Dovecot writes it
        assert box.store_flags([1], add={"\\Seen"}) == []  # no change, no new modseq
        box.store_flags([1], remove={"\\Flagged", "work"})
        assert next((root / "cur").iterdir()).name.endswith(":2,PS")
        assert box.store_flags([99], add={"\\Seen"}) == []
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        assert box.messages()[0].flags == {"\\Seen", "$Forwarded"}


def test_two_sessions_on_one_mailbox(root: Path) -> None:
    for i in range(3):
        deliver(root, f"Subject: {i}\n\n".encode())
    with open_store(root) as one, open_store(root) as two:
        a, b = one.mailbox(), two.mailbox()
        a.sync()
        b.sync()
        assert uids(a) == uids(b) == [1, 2, 3]
        a.store_flags([2], add={"\\Seen"})
        b.store_flags([2], add={"\\Answered"})  # b's idea of the file name is stale
        a.expunge([1])
        assert b.sync().vanished == (1,)
        assert {m.uid: m.flags for m in b.messages()}[2] == {"\\Seen", "\\Answered"}
        deliver(root, b"Subject: late\n\n")
        assert a.sync().added == (4,) and b.sync().added == (4,)
        assert uids(b) == [2, 3, 4]  # one UID per message, whoever indexed it first


def test_concurrent_syncs_and_deliveries_never_lose_or_repeat(root: Path) -> None:
    delivered: list[str] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def deliverer() -> None:
        for i in range(150):
            delivered.append(deliver(root, f"Subject: {i}\n\n".encode()).name)
        stop.set()

    def session() -> None:
        try:
            with open_store(root) as store:
                box = store.mailbox()
                while not stop.is_set():
                    box.sync()
                    found = uids(box)
                    assert found == sorted(set(found))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=session) for _ in range(3)]
    threads.append(threading.Thread(target=deliverer))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        assert sorted(keys(box)) == sorted(delivered)
        assert uids(box) == list(range(1, 151))


def test_expunge_is_durable(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(3):
        deliver(root, f"Subject: {i}\n\n".encode())
    synced: list[Path] = []
    real = maildir_module.fsync_dir
    def recording(path: Path) -> None:
        synced.append(path)
        real(path)

    monkeypatch.setattr(maildir_module, "fsync_dir", recording)
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        synced.clear()
        assert box.expunge([1, 3, 42]) == [1, 3]
        assert synced == [root / "cur"]
        assert len(list((root / "cur").iterdir())) == 1
    with open_store(root) as store:
        box = store.mailbox()
        assert box.sync().vanished == ()
        assert uids(box) == [2]
        db = sqlite3.connect(root / INDEX_FILE)
        assert sorted(r[0] for r in db.execute("SELECT uid FROM expunged")) == [1, 3]
        db.close()


def test_expunge_finds_a_renamed_file(root: Path) -> None:
    path = deliver(root, b"Subject: x\n\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        (current,) = (root / "cur").iterdir()
        current.rename(root / "cur" / f"{path.name}:2,T")  # another client marked it
        assert box.expunge([1]) == [1]
        assert list((root / "cur").iterdir()) == []


def test_open_message_follows_a_rename(root: Path) -> None:
    path = deliver(root, b"Subject: x\n\nbody\n")
    with open_store(root) as store:
        box = store.mailbox()
        box.sync()
        (current,) = (root / "cur").iterdir()
        current.rename(root / "cur" / f"{path.name}:2,S")
        with box.open_message(1) as fh:
            assert fh.read() == b"Subject: x\n\nbody\n"
        with pytest.raises(MessageGone):
            box.open_message(7)


def test_append(root: Path) -> None:
    with open_store(root) as store:
        box = store.mailbox()
        info = box.append(b"Subject: a\r\n\r\nbody\r\n", flags={"\\Seen", "\\Draft", "kw"},
                          internal_date=1_600_000_000)
        assert info.uid == 1 and info.flags == {"\\Seen", "\\Draft", "kw"}
        assert (info.size, info.crlf_size, info.internal_date) == (17, 20, 1_600_000_000)
        (path,) = (root / "cur").iterdir()
        assert path.name.endswith(":2,DSa") and path.read_bytes() == b"Subject: a\n\nbody\n"
        assert (root / "dovecot-keywords").read_text() == "0 kw\n"  # "a" is kw
        assert int(path.stat().st_mtime) == 1_600_000_000
        assert list((root / "tmp").iterdir()) == []


def test_pop3_lock(root: Path) -> None:
    box = open_inbox(root)
    other = open_inbox(root)
    lock = box.lock_exclusive("pop3")
    with pytest.raises(MailboxInUse):
        other.lock_exclusive("pop3")
    other.lock_exclusive("imap").release()  # another purpose is another lock
    code = (
        "import sys; from pathlib import Path; from postroom.store import open_inbox, MailboxInUse\n"
        "try:\n    open_inbox(Path(sys.argv[1])).lock_exclusive('pop3')\n"
        "except MailboxInUse:\n    sys.exit(3)\n"
    )
    assert subprocess.run([sys.executable, "-c", code, str(root)], timeout=30).returncode == 3
    lock.release()
    other.lock_exclusive("pop3").release()
    with pytest.raises(ValueError):
        box.lock_exclusive("../x")
    box.close()
    other.close()


def test_usage_counts_every_folder(root: Path) -> None:
    create_default_folders(root)
    deliver(root, b"12345\n")
    deliver(root / ".Sent", b"123\n")
    with open_store(root) as store:
        usage = store.usage()
        assert (usage.messages, usage.octets) == (2, 10)
        assert (root / "new").iterdir()  # usage does not mark mail as seen
        assert len(list((root / "new").iterdir())) == 1


# --- folders -------------------------------------------------------------------------------


def test_default_folders_and_roles(root: Path) -> None:
    assert create_default_folders(root) == ["Drafts", "Sent", "Trash", "Junk"]
    assert create_default_folders(root) == []
    for name in ("Drafts", "Sent", "Trash", "Junk"):
        folder = root / f".{name}"
        assert (folder / "maildirfolder").is_file()
        assert all((folder / sub).is_dir() for sub in ("tmp", "new", "cur"))
    with open_store(root) as store:
        store.create_folder("Archive", "\\Archive")
        store.create_folder("Entw\u00fcrfe")
        store.create_folder("Archive.2024")
        assert [(f.name, f.special_use) for f in store.folders()] == [
            ("INBOX", None), ("Archive", "\\Archive"), ("Archive.2024", None),
            ("Drafts", "\\Drafts"), ("Entw\u00fcrfe", None), ("Junk", "\\Junk"),
            ("Sent", "\\Sent"), ("Trash", "\\Trash"),
        ]
        assert (root / ".Entw&APw-rfe").is_dir()
        with pytest.raises(FolderError):
            store.create_folder("Sent")
        for bad in ("", "INBOX", "inbox.x", "a..b", ".a", "a/b", "a\x01"):
            with pytest.raises(FolderError):
                store.create_folder(bad)
        with pytest.raises(FolderError):
            store.create_folder("X", "\\Bogus")
        sent = store.mailbox("Sent")
        sent.append(b"Subject: sent\r\n\r\n", flags={"\\Seen"})
        assert uids(sent) == [1]
        assert sent.uidvalidity != store.mailbox().uidvalidity
        store.delete_folder("Archive")
        assert not (root / ".Archive").exists() and (root / ".Archive.2024").is_dir()
        with pytest.raises(FolderError):
            store.mailbox("Archive")
        with pytest.raises(FolderError):
            store.delete_folder("Archive")
    folders = mailbox.Maildir(str(root)).list_folders()
    assert sorted(folders) == sorted(["Archive.2024", "Drafts", "Entw&APw-rfe", "Junk", "Sent",
                                      "Trash"])  # the index file is no folder to it


@given(st.text(max_size=30))
def test_modified_utf7_round_trip(name: str) -> None:
    encoded = encode_mutf7(name)
    assert encoded.isascii() and decode_mutf7(encoded) == name


def test_modified_utf7_known_forms() -> None:
    assert encode_mutf7("~peter/mail/\u53f0\u5317/\u65e5\u672c\u8a9e") == \
        "~peter/mail/&U,BTFw-/&ZeVnLIqe-"  # RFC 3501 5.1.3's example
    assert encode_mutf7("a&b") == "a&-b"
    with pytest.raises(ValueError):
        decode_mutf7("&AAA")


@pytest.mark.interop
@pytest.mark.skipif(
    not Path("/usr/sbin/dovecot").exists() or os.geteuid() != 0,
    reason="needs Debian's dovecot-core and root",
)
def test_dovecot_sees_our_folders_and_messages(tmp_path: Path) -> None:
    import pwd
    import shutil
    import signal
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="postroom-store-dovecot-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        root = work / "Maildir"
        with open_store(root) as store:
            create_default_folders(root)
            store.create_folder("Entw\u00fcrfe")
            box = store.mailbox()
            deliver(root, b"Subject: one\n\nbody\n")
            box.sync()
            box.store_flags([1], add={"\\Seen", "\\Flagged"})
            box.lock_exclusive("pop3").release()  # the lock file stays: no folder either
        assert (root / "postroom-pop3.lock").exists() and (root / INDEX_FILE).exists()
        nobody = pwd.getpwnam("nobody")
        for path in [work, *work.rglob("*")]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        conf = work / "dovecot.conf"
        conf.write_text(f"""
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
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={work}
}}
""")
        proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 10
            while not (work / "run" / "auth-userdb").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            listing = subprocess.run(["doveadm", "-c", str(conf), "mailbox", "list", "-u", "u"],
                                     capture_output=True, text=True, timeout=30)
            fetch = subprocess.run(["doveadm", "-c", str(conf), "fetch", "-u", "u", "flags",
                                    "mailbox", "INBOX", "all"],
                                   capture_output=True, text=True, timeout=30)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        assert listing.returncode == 0, listing.stderr
        assert sorted(listing.stdout.split()) == sorted(
            ["INBOX", "Drafts", "Sent", "Trash", "Junk", "Entw\u00fcrfe"])
        assert fetch.returncode == 0, fetch.stderr
        assert "\\Flagged" in fetch.stdout and "\\Seen" in fetch.stdout
    finally:
        shutil.rmtree(work, ignore_errors=True)
