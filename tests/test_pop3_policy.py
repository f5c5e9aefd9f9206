"""RFC 2449's LOGIN-DELAY (6.5, the [LOGIN-DELAY] code of 8.1.1) and EXPIRE (6.7): advertised in
CAPA and enforced. The core's part as byte scripts; the records in the Maildir on their own; the
rest on real loopback sockets with poplib, across two servers on one Maildir and a restart."""

from __future__ import annotations

import os
import poplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.config import Config
from postroom.daemon import pop3_settings
from postroom.net.pop3 import LoginTooSoon, check_login_delay, expire_days
from postroom.pop3 import Commit
from postroom.pop3 import responses as r
from postroom.store.pop3records import (
    DAY,
    LOGIN_FILE,
    RETRIEVED_FILE,
    MaildirPop3Records,
    expired,
)
from tests.pop3_support import (
    LOGIN,
    Driver,
    Pop3TestServer,
    b64,
    client_context,
    deliver,
    run_dialog,
    settings,
)

ALICE = "alice@example.com"
PASSWORD = "alice-secret"
MESSAGES = [
    b"Subject: one\n\nfirst\n",
    b"Subject: two\n\nsecond\nline\n",
    b"Subject: three\n\nthird\n",
]
CAPA_COMMON = """
S: +OK Capability list follows.
S: CAPA
S: TOP
S: UIDL
S: RESP-CODES
S: AUTH-RESP-CODE
S: PIPELINING
"""


# --- the core ---------------------------------------------------------------------------------

def test_capa_says_the_same_before_and_after_login_without_a_user_suffix() -> None:
    run_dialog(f"""
S: +OK POP3 server ready
C: CAPA
{CAPA_COMMON}
S: USER
S: SASL SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5
S: EXPIRE 0
S: LOGIN-DELAY 60
S: .
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: +OK Logged in.
C: CAPA
{CAPA_COMMON}
S: EXPIRE 0
S: LOGIN-DELAY 60
S: .
""", config=settings(expire=0, login_delay=60, stls=False))


def test_expire_0_deletes_at_quit_what_retr_sent() -> None:
    _, driver, _ = run_dialog(f"""
{LOGIN}
C: RETR 2
S: +OK 46 octets
S: Subject: two
S: X: y
S:
S: line 1
S: line 2
S: line 3
S: .
C: TOP 1 0
S: +OK Top of message follows.
S: Subject: one
S:
S: .
C: RSET
S: +OK Maildrop has 3 messages (153 octets).
C: QUIT
S: +OK Logging out, 2 messages left.
""", config=settings(expire=0))
    # RETR counts, TOP (a preview) does not; RSET undoes DELEs, and the implicit one comes later.
    assert driver.commits == [Commit(deleted=(2,), retrieved=())]


@pytest.mark.parametrize("expire", [30, "NEVER", None])
def test_other_expire_values_keep_retrieved_messages_at_quit(expire: int | str | None) -> None:
    _, driver, _ = run_dialog(f"""
{LOGIN}
C: RETR 3
S: +OK 53 octets
S: Subject: three
S:
S: stored with CRLF
S: no final line end
S: .
C: DELE 1
S: +OK Message 1 deleted.
C: QUIT
S: +OK Logging out, 2 messages left.
""", config=settings(expire=expire))
    assert driver.commits == [Commit(deleted=(1,), retrieved=(3,))]


def test_a_login_refused_for_the_delay_goes_back_to_authorization() -> None:
    plain = b64(b"\0alice@example.com\0alice-secret")
    run_dialog(f"""
S: +OK POP3 server ready
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: -ERR [LOGIN-DELAY] Logged in less than 60 seconds ago; try again in 42 seconds.
C: STAT
S: -ERR Command not valid in this state.
C: AUTH PLAIN {plain}
S: -ERR [LOGIN-DELAY] Logged in less than 60 seconds ago; try again in 42 seconds.
C: QUIT
S: +OK Logging out.
""", make_driver=lambda: Driver(refuse_open=r.login_too_soon(60, 42)))


# --- the records ------------------------------------------------------------------------------

def test_login_record(tmp_path: Path) -> None:
    records = MaildirPop3Records(tmp_path)
    assert records.last_login() is None
    records.record_login(1_700_000_000.25)
    assert records.last_login() == pytest.approx(1_700_000_000.25)
    assert (tmp_path / LOGIN_FILE).stat().st_size == 0
    check_login_delay(records, 60, 1_700_000_060.5)  # over: allowed
    with pytest.raises(LoginTooSoon) as caught:
        check_login_delay(records, 60, 1_700_000_010.25)
    assert caught.value.left == 50
    with pytest.raises(LoginTooSoon):  # a little in the future: another host's clock ahead
        check_login_delay(records, 60, 1_699_999_990.0)
    check_login_delay(records, 60, 1_699_990_000.0)  # far in the future: the clock went back


def test_retrieval_log(tmp_path: Path) -> None:
    records = MaildirPop3Records(tmp_path)
    assert records.retrieved() == {}
    records.record_retrieved(["a", "b", "bad\nkey"], 1000.0)
    records.record_retrieved(["b", "c"], 2000.0)  # b keeps its first time
    assert records.retrieved() == {"a": 1000.0, "b": 1000.0, "c": 2000.0}
    with open(tmp_path / RETRIEVED_FILE, "ab") as fh:
        fh.write(b"17")  # a line torn by a crash
    assert records.retrieved() == {"a": 1000.0, "b": 1000.0, "c": 2000.0}
    records.record_retrieved(["d"], 3000.0)
    assert records.retrieved() == {"a": 1000.0, "b": 1000.0, "c": 2000.0, "d": 3000.0}
    records.keep_only({"b", "d", "zzz"})
    assert records.retrieved() == {"b": 1000.0, "d": 3000.0}
    assert sorted(p.name for p in tmp_path.iterdir()) == [RETRIEVED_FILE]
    assert expired(records.retrieved(), 1000.0 + 2 * DAY + 1, 2) == {"b"}
    assert expired(records.retrieved(), 1000.0 + 2 * DAY, 2) == set()  # "more than" n days


def test_config_reaches_the_pop3_settings() -> None:
    config = Config.model_validate({"pop3": {"expire": "never", "login_delay": 900}})
    settings = pop3_settings(config)
    assert (settings.expire, settings.login_delay) == ("NEVER", 900)
    assert pop3_settings(Config.model_validate({"pop3": {"expire": 0}})).expire == 0
    assert pop3_settings(Config()).expire is None
    assert expire_days(0) is None and expire_days("NEVER") is None and expire_days(7) == 7
    for bad in ({"expire": -1}, {"expire": "soon"}, {"expire": True}, {"login_delay": 0}):
        with pytest.raises(Exception, match="pop3"):
            Config.model_validate({"pop3": bad})


# --- on the wire ------------------------------------------------------------------------------

def inbox(srv: Pop3TestServer) -> Path:
    return srv.root / ALICE / "Maildir"


def fill(srv: Pop3TestServer) -> list[Path]:
    return [deliver(inbox(srv), m) for m in MESSAGES]


def names(srv: Pop3TestServer) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") for p in (inbox(srv) / sub).iterdir())


def connect(srv: Pop3TestServer) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", srv.port, timeout=10)
    client.stls(client_context(srv.cert))
    return client


def login(srv: Pop3TestServer) -> poplib.POP3:
    client = connect(srv)
    client.user(ALICE)
    client.pass_(PASSWORD)
    return client


def set_last_login(srv: Pop3TestServer, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(inbox(srv) / LOGIN_FILE, (when, when))


@pytest.fixture
def delayed(tmp_path: Path) -> Iterator[Pop3TestServer]:
    with Pop3TestServer(tmp_path, login_delay=60, apop=True) as srv:
        yield srv


def test_login_delay_refuses_a_second_login_after_checking_the_password(
        delayed: Pop3TestServer) -> None:
    fill(delayed)
    client = login(delayed)
    assert "LOGIN-DELAY" in client.capa() and client.capa()["LOGIN-DELAY"] == ["60"]
    client.quit()
    marker = inbox(delayed) / LOGIN_FILE
    stamp = marker.stat().st_mtime_ns

    client = connect(delayed)
    assert client.capa()["LOGIN-DELAY"] == ["60"]  # no USER suffix: one value for everyone
    client.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[AUTH\] Authentication failed"):
        client.pass_("wrong")  # a wrong password learns nothing about the delay
    client.user(ALICE)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\] .* try again in \d+ seconds"):
        client.pass_(PASSWORD)
    with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\]"):
        client._shortcmd("AUTH PLAIN " + b64(f"\0{ALICE}\0{PASSWORD}".encode()))
    with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\]"):
        client.apop(ALICE, PASSWORD)
    with pytest.raises(poplib.error_proto, match=r"-ERR Command not valid in this state"):
        client.stat()
    client.quit()
    assert marker.stat().st_mtime_ns == stamp  # refused logins do not restart the delay

    set_last_login(delayed, 61)
    client = connect(delayed)
    client.apop(ALICE, PASSWORD)
    assert client.stat()[0] == 3
    client.quit()


def test_login_delay_holds_across_servers_and_a_restart(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, login_delay=60) as first, \
            Pop3TestServer(tmp_path, login_delay=60) as second:  # two workers, one Maildir
        fill(first)
        login(first).quit()
        client = connect(second)
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\]"):
            client.pass_(PASSWORD)
        client.quit()
    with Pop3TestServer(tmp_path, login_delay=60) as restarted:
        client = connect(restarted)
        client.user(ALICE)
        with pytest.raises(poplib.error_proto, match=r"-ERR \[LOGIN-DELAY\]"):
            client.pass_(PASSWORD)
        client.quit()
        set_last_login(restarted, 60.5)
        login(restarted).quit()


def test_without_login_delay_nothing_is_recorded(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path) as srv:
        fill(srv)
        login(srv).quit()
        login(srv).quit()
        assert not (inbox(srv) / LOGIN_FILE).exists()
        assert not (inbox(srv) / RETRIEVED_FILE).exists()


def test_expire_0_removes_retrieved_messages_at_quit(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, expire=0) as srv:
        paths = fill(srv)
        client = connect(srv)
        assert client.capa()["EXPIRE"] == ["0"]
        client.user(ALICE)
        client.pass_(PASSWORD)
        client.retr(1)
        client.top(2, 0)
        assert client.quit().startswith(b"+OK Logging out, 2 messages left")
        left = names(srv)
        assert [n.partition(":")[0] for n in left] == [paths[1].name, paths[2].name]
        assert not any(n.endswith("S") for n in left)  # TOP marks nothing

        client = login(srv)
        client.retr(1)
        client.close()  # no QUIT, no UPDATE: nothing is deleted (RFC 1939 6)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any(n.endswith(":2,S") for n in names(srv)):
            time.sleep(0.02)
        assert len(names(srv)) == 2 and names(srv)[0].endswith(":2,S")


def test_expire_days_removes_what_was_retrieved_longer_ago(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, expire=7) as srv:
        paths = fill(srv)
        keys = [p.name for p in paths]
        client = login(srv)
        assert client.capa()["EXPIRE"] == ["7"]
        client.retr(1)
        client.retr(2)
        client.top(3, 1)
        client.quit()
        records = MaildirPop3Records(inbox(srv))
        logged = records.retrieved()
        assert sorted(logged) == keys[:2] and all(abs(t - time.time()) < 60 for t in logged.values())

        # Message 1 was retrieved eight days ago, message 2 six; message 3 was read elsewhere
        # (mutt set S) but never retrieved over POP3.
        log = inbox(srv) / RETRIEVED_FILE
        now = int(time.time())
        log.write_bytes(f"{now - 8 * DAY} {keys[0]}\n{now - 6 * DAY} {keys[1]}\n".encode())
        third = next(p for p in (inbox(srv) / "cur").iterdir() if p.name.startswith(keys[2]))
        third.rename(third.with_name(keys[2] + ":2,S"))

        client = login(srv)
        assert client.stat()[0] == 2
        assert [line.split()[1].decode() for line in client.uidl()[1]] == keys[1:]
        client.retr(1)  # retrieved again: its first retrieval still counts
        client.quit()
        assert [n.partition(":")[0] for n in names(srv)] == keys[1:]
        assert records.retrieved() == {keys[1]: float(now - 6 * DAY)}


def test_expire_days_counts_a_retrieval_without_quit(tmp_path: Path) -> None:
    with Pop3TestServer(tmp_path, expire=1) as srv:
        paths = fill(srv)
        client = login(srv)
        client.retr(3)
        client.close()
        records = MaildirPop3Records(inbox(srv))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not records.retrieved():
            time.sleep(0.02)
        assert list(records.retrieved()) == [paths[2].name]
        when = time.time() - DAY - 5
        (inbox(srv) / RETRIEVED_FILE).write_bytes(f"{int(when)} {paths[2].name}\n".encode())
        client = login(srv)
        assert client.stat()[0] == 2
        client.quit()
        assert records.retrieved() == {}
