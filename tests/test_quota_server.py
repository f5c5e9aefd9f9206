"""Quota through ``postroom serve`` and beside other Maildir++ programs: the 552 5.2.2 comes
from ``maildirsize`` (no count of the Maildir), a POP3 deletion makes room at once, ``postroom user
quota`` rewrites the first line, and Dovecot and Courier read and write the same file."""

from __future__ import annotations

import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.delivery.maildir import MaildirUsage, ensure_maildir, write_message
from postroom.queue.committer import Committer
from postroom.store import quota
from postroom.store.quota import FILENAME, Definition
from tests.conftest import ServerHandle, free_port, make_server

QUOTA = 5000


def message(octets: int, subject: str = "q") -> bytes:
    return f"Subject: {subject}\r\n\r\n".encode() + b"z" * octets + b"\r\n"


def send(handle: ServerHandle, to: str, data: bytes) -> tuple[int, bytes]:
    """(code, text) of the first refusal (RCPT or end of data), or of the 250."""
    with smtplib.SMTP("127.0.0.1", handle.port, local_hostname="c.test", timeout=20) as client:
        client.ehlo()
        client.mail("a@remote.example")
        code, text = client.rcpt(to)
        if code != 250:
            return code, text
        return client.data(data)


@pytest.fixture
def full(tmp_path: Path) -> Iterator[tuple[ServerHandle, int]]:
    """A server whose user tiny@example.com has a quota of :data:`QUOTA` octets, and a POP3
    listener (plain logins allowed on loopback)."""
    pop3 = free_port()
    handle = make_server(tmp_path, f"""
[[listener]]
role = "pop3"
address = "127.0.0.1:{pop3}"

[pop3]
allow_plaintext = true
""")
    handle.cli("user", "add", "tiny@example.com", "--quota", str(QUOTA), "--password-stdin",
               stdin="tiny-secret\n")
    handle.start()
    try:
        yield handle, pop3
    finally:
        if handle.proc is not None:
            handle.stop()


def test_552_comes_from_maildirsize(full: tuple[ServerHandle, int]) -> None:
    """The Maildir is empty, but its maildirsize (as another process left it) says it is nearly
    full: the figure is believed as it is, without counting the Maildir."""
    handle, _ = full
    root = handle.maildir("tiny@example.com")
    (root / FILENAME).write_bytes(f"{QUOTA}S\n{QUOTA - 100} 7\n".encode())
    code, text = send(handle, "tiny@example.com", message(500))
    assert (code, text[:5]) == (552, b"5.2.2"), text
    (root / FILENAME).write_bytes(f"{QUOTA}S\n{QUOTA} 8\n".encode())
    code, text = send(handle, "tiny@example.com", message(10))
    assert (code, text[:5]) == (552, b"5.2.2"), text  # at RCPT: not one more octet fits
    assert b"Mailbox full" in text
    assert handle.messages("tiny@example.com") == []
    # Missing: counted again (nothing is there), written with the quota, and the mail fits.
    (root / FILENAME).unlink()
    assert send(handle, "tiny@example.com", message(500))[0] == 250
    [stored] = (root / "new").iterdir()
    size = stored.stat().st_size
    assert (root / FILENAME).read_bytes() == f"{QUOTA}S\n0 0\n{size} 1\n".encode()


def test_a_pop3_deletion_makes_room_at_once(full: tuple[ServerHandle, int]) -> None:
    handle, pop3 = full
    root = handle.maildir("tiny@example.com")
    assert send(handle, "tiny@example.com", message(3000, "first"))[0] == 250
    code, text = send(handle, "tiny@example.com", message(3000, "second"))
    assert (code, text[:5]) == (552, b"5.2.2")
    [stored] = (root / "new").iterdir()
    size = stored.stat().st_size
    client = poplib.POP3("127.0.0.1", pop3, timeout=10)
    client.user("tiny@example.com")
    client.pass_("tiny-secret")
    assert client.stat()[0] == 1
    client.dele(1)
    client.quit()  # the deletion is committed here (RFC 1939 UPDATE state)
    code, text = send(handle, "tiny@example.com", message(3000, "second"))
    assert code == 250, text
    assert f"\n-{size} -1\n".encode() in (root / FILENAME).read_bytes()  # no count needed
    assert len(handle.messages("tiny@example.com")) + len(list((root / "cur").iterdir())) == 1


def test_another_program_s_change_is_seen_at_once(full: tuple[ServerHandle, int]) -> None:
    """Dovecot, Courier or a second postroom worker removes a message and appends the delta: the
    next check reads it (there is no per-process cache to wait out)."""
    handle, _ = full
    root = handle.maildir("tiny@example.com")
    assert send(handle, "tiny@example.com", message(3000, "first"))[0] == 250
    assert send(handle, "tiny@example.com", message(3000, "second"))[0] == 552
    [stored] = (root / "new").iterdir()
    size = stored.stat().st_size
    stored.unlink()
    assert quota.add(root, -size, -1)
    assert send(handle, "tiny@example.com", message(3000, "second"))[0] == 250


def test_user_quota_rewrites_the_first_line(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    root = handle.maildir("alice@example.com")
    Committer().run_now(lambda ds: write_message(root, [message(100)], ds))
    [stored] = (root / "new").iterdir()
    size = stored.stat().st_size
    handle.cli("user", "quota", "alice@example.com", "2K")
    assert (root / FILENAME).read_bytes() == f"2048S\n{size} 1\n".encode()
    handle.cli("user", "quota", "alice@example.com", "1M")
    assert (root / FILENAME).read_bytes() == f"1048576S\n{size} 1\n".encode()
    handle.cli("user", "quota", "alice@example.com", "0")
    assert not (root / FILENAME).exists()  # no quota: no file for anyone to keep appending to


# --- other Maildir++ programs -----------------------------------------------------------------


courier = pytest.mark.skipif(
    shutil.which("deliverquota") is None or shutil.which("maildirmake") is None,
    reason="needs Debian's maildrop (Courier's deliverquota and maildirmake)",
)


@courier
def test_courier_reads_and_writes_our_maildirsize(tmp_path: Path) -> None:
    root = tmp_path / "Maildir"
    ensure_maildir(root)
    Committer().run_now(lambda ds: write_message(root, [message(1000)], ds))
    quota.recalc(root, Definition(3000))

    def deliverquota(data: bytes) -> int:
        return subprocess.run(["deliverquota", str(root)], input=data, capture_output=True,
                              timeout=30).returncode

    assert deliverquota(b"Subject: courier\n\nsmall\n") == 0  # fits: Courier appends a line
    reading = quota.read(root)
    assert reading is not None and reading.lines == 2 and reading.messages == 2
    assert re.search(rb"\n +\d+ +1\n$", (root / FILENAME).read_bytes())  # its padded columns
    assert (reading.octets, reading.messages) == quota.scan(root)
    assert deliverquota(b"Subject: courier\n\n" + b"y" * 3000 + b"\n") == 77  # full, by our file
    assert MaildirUsage().usage(root, 3000, 0) == quota.scan(root)[0]
    # A maildirsize made by Courier's maildirmake -q is ours to read and keep.
    other = tmp_path / "Other"
    ensure_maildir(other)  # -q adds the file to a Maildir that exists
    subprocess.run(["maildirmake", "-q", "10000S,20C", str(other)], check=True,
                   stdin=subprocess.DEVNULL, timeout=30)
    made = quota.read(other)
    assert made is not None and (made.definition, made.octets, made.messages) == (
        Definition(10000, 20), 0, 0)


dovecot = pytest.mark.skipif(
    shutil.which("dovecot") is None or shutil.which("doveadm") is None or os.geteuid() != 0,
    reason="needs Debian's dovecot-core and root (Dovecot will not serve uid 0's mail)",
)


@dovecot
def test_dovecot_reads_and_writes_our_maildirsize() -> None:
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="postroom-quota-", dir="/tmp"))
    os.chmod(base, 0o755)
    root = base / "Maildir"
    ensure_maildir(root)
    for n in range(3):
        Committer().run_now(lambda ds, n=n: write_message(root, [message(1500 + n)], ds))
    for path in [root, *root.rglob("*")]:
        os.chown(path, nobody.pw_uid, nobody.pw_gid)
    quota.recalc(root, Definition(100 * 1024))  # as root: the file gets the Maildir's owner
    assert (root / FILENAME).stat().st_uid == nobody.pw_uid
    octets, count = quota.scan(root)
    conf = base / "dovecot.conf"
    conf.write_text(f"""
protocols =
listen = 127.0.0.1
ssl = no
base_dir = {base}/run
log_path = {base}/dovecot.log
mail_location = maildir:{root}
mail_plugins = quota
plugin {{
  quota = maildir:User quota
}}
passdb {{
  driver = static
  args = nopassword=y
}}
userdb {{
  driver = static
  args = uid={nobody.pw_uid} gid={nobody.pw_gid} home={base}
}}
""")

    def doveadm(*args: str) -> str:
        result = subprocess.run(["doveadm", "-c", str(conf), *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def dovecot_quota() -> tuple[int, int, int]:
        out = doveadm("quota", "get", "-u", "alice")
        storage = re.search(r"STORAGE\s+(\d+)\s+(\d+)", out)
        messages = re.search(r"MESSAGE\s+(\d+)", out)
        assert storage and messages, out
        return int(storage[1]), int(storage[2]), int(messages[1])

    proc = subprocess.Popen(["dovecot", "-F", "-c", str(conf)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not (base / "run" / "auth-userdb").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Dovecot takes the limit and the usage from our file (it reports kilobytes, rounded up).
        assert dovecot_quota() == (-(-octets // 1024), 100, count)
        # Its expunge appends the removal; our check reads it at once.
        usage = MaildirUsage()
        doveadm("expunge", "-u", "alice", "mailbox", "INBOX", "uid", "1")
        left = quota.scan(root)
        assert left[1] == count - 1
        assert usage.cached(root, 100 * 1024, 0) == left[0]
        # Its recalculation writes the file in its own hand; we read that too.
        doveadm("quota", "recalc", "-u", "alice")
        reading = quota.read(root)
        assert reading is not None and reading.lines == 1
        assert (reading.definition, reading.octets, reading.messages) == (
            Definition(100 * 1024), *left)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)
