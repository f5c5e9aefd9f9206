"""Durability of accepted mail: syscall order under strace, and SIGKILL in the middle of a burst.

A SIGKILL keeps the page cache, so the crash test alone cannot see a missing fsync; the strace
test proves the order: fsync of the message file, rename into place, fsync of the directory, and
only then the ``250`` on the socket.
"""

from __future__ import annotations

import os
import poplib
import random
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, free_port, make_server, wait_port

pytestmark = pytest.mark.slow

_CALL = re.compile(r"^(\d+)\s+(\w+)\((.*)$")
_RESUMED = re.compile(r"^(\d+)\s+<\.\.\. (\w+) resumed>(.*)$")


def completed_calls(trace: str) -> list[tuple[str, str]]:
    """(syscall, arguments) in the order the calls *completed*, joining unfinished/resumed."""
    pending: dict[str, tuple[str, str]] = {}
    done: list[tuple[str, str]] = []
    for line in trace.splitlines():
        if m := _RESUMED.match(line):
            pid, name, rest = m.groups()
            call = pending.pop(pid, (name, ""))
            if rest.rstrip().endswith("= 0") or "= " in rest:
                done.append((call[0], call[1] + rest))
            continue
        if m := _CALL.match(line):
            pid, name, rest = m.groups()
            if rest.endswith("<unfinished ...>"):
                pending[pid] = (name, rest)
            else:
                done.append((name, rest))
    return done


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_fsync_of_file_and_directory_precede_the_250(tmp_path: Path) -> None:
    handle = make_server(tmp_path)
    trace_file = tmp_path / "strace.txt"
    handle.proc = subprocess.Popen(
        ["strace", "-f", "-y", "-s", "80", "-o", str(trace_file),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,write,writev,sendto,sendmsg",
         sys.executable, "-m", "postroom", "-c", str(handle.config_path), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(handle.port, handle.proc, timeout=60)
        with smtplib.SMTP("127.0.0.1", handle.port, local_hostname="c.test", timeout=30) as c:
            c.sendmail("a@remote.example", ["alice@example.com"], b"Subject: t\r\n\r\nfsync me\r\n")
    finally:
        # Stop the traced server itself; strace exits when its tracee does.
        tracer = handle.proc
        children = Path(f"/proc/{tracer.pid}/task/{tracer.pid}/children").read_text().split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        tracer.wait(30)
        handle.proc = None
    calls = completed_calls(trace_file.read_text())
    reply_at = next(i for i, (name, args) in enumerate(calls)
                    if name in ("write", "writev", "sendto", "sendmsg") and "250 2.0.0 Ok: queued" in args)
    maildir = str(handle.maildir("alice@example.com"))
    rename_at = next(i for i, (name, args) in enumerate(calls)
                     if name.startswith("rename") and f"{maildir}/new/" in args)
    tmp_name = re.search(rf"{re.escape(maildir)}/tmp/([^\"]+)\"", calls[rename_at][1])
    assert tmp_name, calls[rename_at]
    file_fsync_at = next(i for i, (name, args) in enumerate(calls)
                         if name in ("fsync", "fdatasync") and tmp_name.group(1) in args)
    dir_fsync_at = next(i for i, (name, args) in enumerate(calls)
                        if name == "fsync" and i > rename_at and f"<{maildir}/new>" in args)
    assert file_fsync_at < rename_at < dir_fsync_at < reply_at, (
        file_fsync_at, rename_at, dir_fsync_at, reply_at)


def _burst(port: int, start: int, count: int, acked: list[int], stop: threading.Event) -> None:
    """Send numbered messages; record the number of each one answered 250."""
    n = start
    while n < start + count and not stop.is_set():
        try:
            with smtplib.SMTP("127.0.0.1", port, local_hostname="c.test", timeout=10) as c:
                while n < start + count and not stop.is_set():
                    # Every third message goes to another domain: it is queued, not delivered.
                    rcpt = "far@remote.example" if n % 3 == 0 else "alice@example.com"
                    c.sendmail("a@remote.example", [rcpt],
                               b"Subject: crash %d\r\nX-Seq: %d\r\n\r\nbody %d\r\n" % (n, n, n))
                    acked.append(n)
                    n += 1
        except (OSError, smtplib.SMTPException):
            time.sleep(0.05)
            n += 1  # the message in flight may or may not have landed; it was not acked


def test_sigkill_mid_burst_loses_nothing_answered_250(tmp_path: Path) -> None:
    handle = make_server(tmp_path, '[relay]\ntrusted_networks = ["127.0.0.0/8"]\n')
    acked: list[int] = []
    rng = random.Random(5321)
    rounds, per_thread, threads_n = 5, 400, 4
    base = 0
    for _ in range(rounds):
        handle.start()
        stop = threading.Event()
        threads = [threading.Thread(target=_burst,
                                    args=(handle.port, base + t * per_thread, per_thread, acked, stop))
                   for t in range(threads_n)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.2))
        handle.kill()
        stop.set()
        for t in threads:
            t.join(30)
        base += threads_n * per_thread
    handle.start()  # the restarted server delivers whatever was still queued
    time.sleep(1.0)
    handle.stop()
    seen: dict[int, int] = {}
    for path in (handle.maildir("alice@example.com") / "new").iterdir():
        m = re.search(rb"X-Seq: (\d+)", path.read_bytes())
        assert m, path
        seen[int(m.group(1))] = seen.get(int(m.group(1)), 0) + 1
    queued = list((handle.data_dir / "queue" / "active").glob("*"))
    for path in queued:
        m = re.search(rb"X-Seq: (\d+)", path.read_bytes())
        assert m, path
        seen[int(m.group(1))] = seen.get(int(m.group(1)), 0) + 1
    lost = [n for n in acked if n not in seen]
    duplicates = {n: c for n, c in seen.items() if c > 1}
    print(f"acked={len(acked)} delivered={len(seen)} duplicates={len(duplicates)} "
          f"queued={len(queued)}")
    assert len(acked) > 100
    assert len(queued) >= len([n for n in acked if n % 3 == 0]) > 10
    assert lost == []
    assert not duplicates


@pytest.mark.parametrize("processes", ["", "queue_process = true\nworkers = 2"])
def test_server_as_root_drops_privileges(tmp_path: Path, processes: str) -> None:
    """Also with a supervisor and several processes: their shared counts' lock is imported
    before the drop (a lazy import of it failed as nobody when Python lives under /root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to test the privilege drop")
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    root = Path(tempfile_dir())
    handle: ServerHandle | None = None
    try:
        pop3, sub = free_port(), free_port()
        handle = make_server(root, f"""
[[listener]]
role = "pop3"
address = "127.0.0.1:{pop3}"

[[listener]]
role = "submission"
address = "127.0.0.1:{sub}"

[pop3]
allow_plaintext = true

[auth]
allow_plaintext_on_loopback = true
""")
        handle.config_path.write_text(handle.config_path.read_text()
                                      .replace('run_as = ""', f'run_as = "nobody"\n{processes}'))
        handle.start()
        assert handle.proc is not None
        status = Path(f"/proc/{handle.proc.pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(nobody.pw_uid)] * 4
        with smtplib.SMTP("127.0.0.1", handle.port, local_hostname="c.test", timeout=10) as c:
            c.sendmail("a@remote.example", ["alice@example.com"], b"Subject: p\r\n\r\npriv\r\n")
        [path] = list((handle.maildir("alice@example.com") / "new").iterdir())
        st = path.stat()
        assert (st.st_uid, st.st_mode & 0o777) == (nobody.pw_uid, 0o600)
        assert handle.data_dir.stat().st_mode & 0o777 == 0o700
        # The CLI run as root acts as the data owner, so the server can still write the DB.
        handle.cli("user", "add", "carol@example.com", "--password-stdin", stdin="carol-pw\n")
        assert (handle.data_dir / "accounts.db").stat().st_uid == nobody.pw_uid
        # Logins run argon2 in a thread pool that Python imports on first use: after the drop
        # its files may be unreadable (an interpreter under /root), so it was imported before.
        with smtplib.SMTP("127.0.0.1", sub, local_hostname="c.test", timeout=10) as c:
            c.login("alice@example.com", "alice-secret")
        box = poplib.POP3("127.0.0.1", pop3, timeout=10)
        box.user("alice@example.com")
        box.pass_("alice-secret")
        assert box.stat()[0] == 1
        box.quit()
        handle.stop()
    finally:
        if handle is not None and handle.proc is not None:
            handle.kill()  # a failed assertion must not leave a server running as nobody
        shutil.rmtree(root, ignore_errors=True)


def tempfile_dir() -> str:
    """A directory every user may traverse (pytest's tmp_path is private to root)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="postroom-priv-", dir="/tmp")
    os.chmod(path, 0o755)
    return path

