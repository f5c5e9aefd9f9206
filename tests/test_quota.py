"""Quota accounting in Maildir++ ``maildirsize``: the file format (ours, Dovecot's, Courier's,
Exim's), the spec's recalculation rules, appends from several processes, the checks the server
makes with it (:class:`MaildirUsage`), the store's expunge, and Maildir readers beside it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from postroom.delivery.maildir import MaildirUsage, UsageUnknown, ensure_maildir, write_message
from postroom.queue.committer import Committer
from postroom.store import open_inbox, quota
from postroom.store.folders import make_folder
from postroom.store.quota import FILENAME, Definition, Reading

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody line\r\n"


def maildir(tmp_path: Path) -> Path:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    return root


def deliver(root: Path, content: bytes = MESSAGE) -> Path:
    return Committer().run_now(lambda ds: write_message(root, [content], ds))


def put(root: Path, content: bytes) -> None:
    (root / FILENAME).write_bytes(content)


# --- the format -------------------------------------------------------------------------------


def test_definition_line() -> None:
    assert Definition.parse(b"1000000S,1000C") == Definition(1000000, 1000)
    assert Definition.parse(b"1000000S") == Definition(1000000, 0)
    assert Definition.parse(b"500C") == Definition(0, 500)
    assert Definition.parse(b"0S") == Definition()
    assert Definition.parse(b"") == Definition()  # no limits at all
    assert Definition.parse(b"5S,7X") == Definition(5, 0)  # a kind we do not know is passed over
    assert Definition.parse(b"1000000S,1000C\r") == Definition(1000000, 1000)
    for bad in (b"S", b"10", b"10 S", b"1000000S;1000C", b"12 3"):
        assert Definition.parse(bad) is None, bad
    assert str(Definition(1000)) == "1000S"  # Dovecot's form for a size limit alone
    assert str(Definition(1000, 20)) == "1000S,20C"
    assert str(Definition(0, 20)) == "20C"
    assert str(Definition()) == "0S"  # "no limit", never an empty line


def test_dovecot_file(tmp_path: Path) -> None:
    """As Dovecot's maildir quota backend writes it: recalculated line, then appended deltas."""
    root = maildir(tmp_path)
    put(root, b"1000000S\n12345 3\n2048 1\n-345 -1\n")
    reading = quota.read(root)
    assert reading is not None
    assert (reading.definition, reading.octets, reading.messages, reading.lines) == (
        Definition(1000000), 14048, 3, 3)


def test_courier_file(tmp_path: Path) -> None:
    """As Courier's maildirmake -q and deliverquota write it: padded columns, a count limit."""
    root = maildir(tmp_path)
    put(root, b"1000000S,1000C\n       12345            3\n         -45           -1\n")
    reading = quota.read(root)
    assert reading is not None
    assert (reading.definition, reading.octets, reading.messages) == (
        Definition(1000000, 1000), 12300, 2)


def test_exim_file(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    put(root, b"5000000S,0C\n4000 2\n")
    reading = quota.read(root)
    assert reading is not None
    assert (reading.definition, reading.octets, reading.messages) == (Definition(5000000), 4000, 2)


def test_a_line_still_being_written_is_not_counted(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    put(root, b"100S\n10 1\n20")
    reading = quota.read(root)
    assert reading is not None and (reading.octets, reading.lines) == (10, 1)


@pytest.mark.parametrize("content", [
    b"",
    b"garbage\n",
    b"100S\n1 2 3\n",
    b"100S\nx 1\n",
    b"100S\n1_000 1\n",
    b"100S\n\n",
    b"100S\n5 1\n-10 -2\n",  # negative totals: lines were lost
    b"100S\n1\x00 1\n",
    b"12 3\n",  # no definition line
])
def test_unusable_files(tmp_path: Path, content: bytes) -> None:
    root = maildir(tmp_path)
    put(root, content)
    assert quota.read(root) is None


# --- the rules --------------------------------------------------------------------------------


def test_when_a_figure_is_counted_again() -> None:
    now = 1_800_000_000.0
    limit = Definition(1000)
    fresh = Reading(limit, 900, 3, 1, now, 20)
    assert not quota.needs_recalc(fresh, limit, 100, now)  # fits
    assert not quota.needs_recalc(fresh, limit, 101, now)  # over, on a fresh one-line count
    appended = Reading(limit, 900, 3, 2, now, 30)
    assert quota.needs_recalc(appended, limit, 101, now)  # over, with deltas appended
    assert not quota.needs_recalc(appended, limit, 100, now)  # deltas are fine while it fits
    assert quota.needs_recalc(fresh, limit, 101, now + 15 * 60 + 1)  # over and older than 15 min
    assert not quota.needs_recalc(fresh, limit, 100, now + 86400)  # old, but it fits
    assert quota.needs_recalc(fresh, Definition(2000), 0, now)  # another quota now
    assert quota.needs_recalc(None, limit, 0, now)  # missing or unparseable
    assert quota.needs_recalc(Reading(limit, 0, 0, 0, now, 5120), limit, 0, now)  # too long
    counted = Reading(Definition(0, 3), 10, 3, 1, now - 3600, 20)  # a count limit, reached
    assert quota.needs_recalc(counted, None, 1, now)
    assert not quota.needs_recalc(counted, None, 0, now)  # nothing arriving: not over


def test_append_never_creates_the_file(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    assert not quota.add(root, 10, 1)
    assert not (root / FILENAME).exists()
    quota.recalc(root, Definition(1000))
    assert quota.add(root, 10, 1) and quota.add(root, -4, -1)
    assert (root / FILENAME).read_bytes() == b"1000S\n0 0\n10 1\n-4 -1\n"
    assert quota.usage(root) == (6, 0)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    assert not quota.add(not_a_dir, 10, 1)  # never raises: a delivery must not fail over it


def test_recalculation_counts_every_folder(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    (root / "new" / "1.M1P1Q1.h,S=100,W=104").write_bytes(b"x" * 3)  # S= is trusted
    (root / "cur" / "2.M1P1Q1.h,S=50,W=52:2,S").write_bytes(b"x")
    (root / "cur" / "3.M1P1Q1.h:2,").write_bytes(b"y" * 7)  # no S=: its size
    (root / "cur" / ".hidden").write_bytes(b"z" * 1000)  # not a message
    (root / "tmp" / "4.M1P1Q1.h,S=999").write_bytes(b"")  # tmp/ does not count
    (root / "postroom-index.sqlite").write_bytes(b"i" * 500)  # files in the root do not count
    make_folder(root, "Sent", None)
    make_folder(root, "Trash", None)
    (root / ".Sent" / "cur" / "5.M1P1Q1.h,S=20,W=21:2,S").write_bytes(b"")
    (root / ".Trash" / "new" / "6.M1P1Q1.h,S=30,W=31").write_bytes(b"")  # as Dovecot counts
    reading = quota.recalc(root, Definition(10_000))
    assert (reading.octets, reading.messages) == (207, 5)
    assert (root / FILENAME).read_bytes() == b"10000S\n207 5\n"
    assert [p.name for p in (root / "tmp").iterdir()] == ["4.M1P1Q1.h,S=999"]  # nothing left
    assert quota.scan(tmp_path / "missing") == (0, 0)


def test_missing_file_is_counted_and_written(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    path = deliver(root)
    size = path.stat().st_size
    assert quota.usage(root, Definition(5000)) == (size, 1)
    assert (root / FILENAME).read_bytes() == f"5000S\n{size} 1\n".encode()
    assert quota.usage(maildir(tmp_path / "empty")) == (0, 0)  # no definition: counted only
    assert not (tmp_path / "empty" / "Maildir" / FILENAME).exists()


def test_a_file_grown_past_5120_octets_is_rewritten(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    path = deliver(root)
    size = path.stat().st_size
    put(root, b"7000S\n" + b"1 0\n" * 1300)  # the deltas piled up, and are wrong besides
    assert (root / FILENAME).stat().st_size > 5120
    assert quota.usage(root) == (size, 1)  # the definition it had is kept
    assert (root / FILENAME).read_bytes() == f"7000S\n{size} 1\n".encode()


def test_an_unparseable_file_is_rewritten(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    put(root, b"this is not a maildirsize\n")
    assert quota.usage(root, Definition(100)) == (0, 0)
    assert (root / FILENAME).read_bytes() == b"100S\n0 0\n"


def test_over_quota_only_on_a_recent_count(tmp_path: Path) -> None:
    root = maildir(tmp_path)  # empty: a count says 0
    limit = Definition(1000)
    put(root, b"1000S\n950 2\n")  # one line, just written: trusted, no count
    assert quota.usage(root, limit, 100) == (950, 2)
    put(root, b"1000S\n900 1\n50 1\n")  # deltas appended since the count: counted again
    assert quota.usage(root, limit, 100) == (0, 0)
    assert (root / FILENAME).read_bytes() == b"1000S\n0 0\n"
    put(root, b"1000S\n950 2\n")
    old = time.time() - 15 * 60 - 5
    os.utime(root / FILENAME, (old, old))  # counted over 15 minutes ago: counted again
    assert quota.usage(root, limit, 100) == (0, 0)


def test_appends_from_many_processes_all_count(tmp_path: Path) -> None:
    """O_APPEND and one write() per line: concurrent writers never tear each other's lines."""
    root = maildir(tmp_path)
    quota.recalc(root, Definition(10**12))
    script = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from postroom.store import quota
        n = int(sys.argv[1])
        for i in range(400):
            quota.add(Path({str(root)!r}), n * 1000 + i, 1)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(1, 5)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    data = (root / FILENAME).read_bytes()
    reading = quota.parse(data)  # past 5120 octets: read() would only ask for a count
    assert reading is not None
    expected = sum(n * 1000 + i for n in range(1, 5) for i in range(400))
    assert (reading.octets, reading.messages, reading.lines) == (expected, 1600, 1601)


# --- the server's checks ------------------------------------------------------------------------


def test_cached_reads_the_file_and_never_counts(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """On the event loop the figure is read from maildirsize, every time (another process may
    have changed it); when it has to be counted, the check says so instead."""
    root = maildir(tmp_path)
    deliver(root)  # a count would see this message: it must not happen here

    def no_count(root: Path) -> tuple[int, int]:
        raise AssertionError("counted the Maildir")

    monkeypatch.setattr(quota, "scan", no_count)
    usage = MaildirUsage()
    with pytest.raises(UsageUnknown) as info:
        usage.cached(root, 1000, 0)  # no file yet
    assert info.value.root == root
    put(root, b"1000S\n400 2\n")
    assert usage.cached(root, 1000, 0) == 400
    quota.add(root, 100, 1)  # another process delivered
    assert usage.cached(root, 1000, 0) == 500  # seen at once
    with pytest.raises(UsageUnknown):
        usage.cached(root, 1000, 600)  # would be over, on a figure with deltas: count first
    with pytest.raises(UsageUnknown):
        usage.cached(root, 2000, 0)  # the quota changed: rewrite the first line


def test_the_count_asked_for_is_made_off_the_loop(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    size = deliver(root).stat().st_size + deliver(root).stat().st_size
    put(root, b"1000S\n900 3\n100 1\n")  # wrong, and 1000 + 200 would not fit
    usage = MaildirUsage()
    with pytest.raises(UsageUnknown) as info:
        usage.cached(root, 1000, 200)
    assert usage.usage(info.value.root) == size  # as the server does: root only, in a thread
    assert (root / FILENAME).read_bytes() == f"1000S\n{size} 2\n".encode()
    assert usage.cached(root, 1000, 200) == size


def test_a_count_just_made_answers_the_check_that_follows(tmp_path: Path) -> None:
    root = maildir(tmp_path)
    size = deliver(root).stat().st_size
    now = [100.0]
    usage = MaildirUsage(clock=lambda: now[0])
    quota_limit = size + 10
    assert usage.usage(root, quota_limit, 0) == size  # no file: counted and written
    usage.add(root, 5)  # another delivery meanwhile: two lines now
    assert usage.cached(root, quota_limit, 20) == size + 5  # over, but counted moments ago
    now[0] += usage.grace
    with pytest.raises(UsageUnknown):
        usage.cached(root, quota_limit, 20)


def test_a_maildir_not_made_yet_holds_nothing(tmp_path: Path) -> None:
    """The first delivery makes the Maildir; until then its count (0) cannot be written down,
    and the check repeated after it must not ask for another."""
    root = tmp_path / "never-delivered"
    usage = MaildirUsage()
    with pytest.raises(UsageUnknown):
        usage.cached(root, 1000, 1)
    assert usage.usage(root) == 0
    assert usage.cached(root, 1000, 1) == 0
    assert not root.exists()


def test_store_expunge_takes_the_messages_off(tmp_path: Path) -> None:
    """POP3 DELE and IMAP EXPUNGE go through the store's expunge: it appends the removal."""
    root = maildir(tmp_path)
    deliver(root)
    deliver(root, MESSAGE + b"a longer second message\r\n")
    quota.recalc(root, Definition(10**6))
    before = quota.read(root)
    assert before is not None and before.messages == 2
    box = open_inbox(root)
    try:
        box.sync(move_new=False)
        first = box.messages()[0]
        assert box.expunge([first.uid]) == [first.uid]
    finally:
        box.close()
    after = quota.read(root)
    assert after is not None
    assert (after.octets, after.messages) == (before.octets - first.size, 1)
    assert (root / FILENAME).read_bytes().endswith(f"-{first.size} -1\n".encode())
    assert quota.usage(root, Definition(10**6)) == quota.scan(root)  # agrees with a count


def test_maildir_readers_ignore_maildirsize(tmp_path: Path) -> None:
    """Python's mailbox.Maildir (and mutt, Dovecot) still read the Maildir as before."""
    root = maildir(tmp_path)
    deliver(root)
    deliver(root)
    make_folder(root, "Sent", None)
    quota.recalc(root, Definition(10**6))
    quota.add(root, 10, 1)
    script = ("import mailbox, sys; box = mailbox.Maildir(sys.argv[1], create=False); "
              "print(len(box), sorted(box.list_folders()), "
              "sorted(m['Subject'] for m in box))")
    result = subprocess.run([sys.executable, "-c", script, str(root)], capture_output=True,
                            text=True, timeout=30, check=True)
    assert result.stdout.strip() == "2 ['Sent'] ['hi', 'hi']"
    reading = quota.read(root)
    assert reading is not None and reading.messages == 3  # left as it was


def test_store_append_and_folder_removal_keep_the_figure(tmp_path: Path) -> None:
    """A message stored by the store itself (IMAP APPEND, a Sent copy) is counted, and a removed
    folder takes its messages off: the figure agrees with a count after each."""
    from postroom.store.maildir import open_store

    root = maildir(tmp_path)
    deliver(root)
    quota.recalc(root, Definition(10**6))
    store = open_store(root)
    try:
        store.create_folder("Archive")
        box = store.mailbox("Archive")
        try:
            box.append(MESSAGE + b"kept in the archive\r\n")
            box.append(MESSAGE)
        finally:
            box.close()
        reading = quota.read(root)
        assert reading is not None and reading.messages == 3
        assert (reading.octets, reading.messages) == quota.scan(root)
        store.delete_folder("Archive")
    finally:
        store.close()
    reading = quota.read(root)
    assert reading is not None and (reading.octets, reading.messages) == quota.scan(root)
    assert reading.messages == 1
