"""POP3's UPDATE state under SIGKILL (issue 5): deletions committed at QUIT are applied file by
file; a server killed in the middle leaves every message either gone or whole, and the next
session sees each remaining message exactly once, with the UIDL it had before."""

from __future__ import annotations

import poplib
import random
import time
from pathlib import Path

from tests.conftest import free_port, make_server

COUNT = 3000


def test_sigkill_during_update_loses_or_repeats_nothing(tmp_path: Path) -> None:
    pop3 = free_port()
    handle = make_server(tmp_path, f"""
[[listener]]
role = "pop3"
address = "127.0.0.1:{pop3}"

[pop3]
allow_plaintext = true
""")
    maildir = handle.maildir("alice@example.com")
    for n in range(COUNT):  # delivered by another program: the index picks them up
        name = f"{1_700_000_000 + n}.M{n}P1.test,S=40"
        (maildir / "new" / name).write_bytes(b"Subject: m %d\n\nbody of message %04d\n" % (n, n))
    rng = random.Random(1939)
    rounds = 0
    remaining = COUNT
    killed_mid_update = False
    try:
        while remaining and rounds < 6:
            rounds += 1
            handle.start()
            client = poplib.POP3("127.0.0.1", pop3, timeout=30)
            client.user("alice@example.com")
            client.pass_("alice-secret")
            count, _ = client.stat()
            assert count == remaining
            before = {line.decode().split()[1] for line in client.uidl()[1]}
            for number in range(1, count + 1):
                client.dele(number)
            client.sock.sendall(b"QUIT\r\n")  # UPDATE starts; kill the server somewhere in it
            time.sleep(rng.uniform(0.005, 0.05))
            handle.kill()  # every process of the server, at once
            client.close()
            files = [*maildir.glob("new/*"), *maildir.glob("cur/*")]
            for path in files:  # whatever is left is whole
                assert path.read_bytes().endswith(b"\n") and b"body of message" in path.read_bytes()
            cut_short = 0 < len(files) < remaining
            killed_mid_update = killed_mid_update or cut_short
            remaining = len(files)
            # the next session sees each remaining message once, with its old UIDL
            handle.start()
            check = poplib.POP3("127.0.0.1", pop3, timeout=30)
            check.user("alice@example.com")
            check.pass_("alice-secret")
            assert check.stat()[0] == remaining
            uidls = [line.decode().split()[1] for line in check.uidl()[1]]
            assert len(set(uidls)) == len(uidls) == remaining
            assert set(uidls) <= set(before)
            check.quit()
            handle.stop()
        print(f"rounds={rounds} left={remaining}")
        assert killed_mid_update, "no kill landed inside UPDATE: the test proved nothing"
    finally:
        if handle.proc is not None:
            handle.kill()
