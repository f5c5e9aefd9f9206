"""Read-ahead: after RETR n the transport may hand the core message n+1 before the client asks
(``Pop3Connection.prepare``). Whatever the client does next, the bytes it gets must be those it
would have got without it."""

from __future__ import annotations

import poplib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.net import pop3 as net_pop3
from postroom.pop3 import Pop3Connection, Retrieve, SizeMismatch, State
from tests.pop3_support import MESSAGES, Driver, Pop3TestServer, client_context, run_turns
from tests.pop3_support import settings as pop3_settings
from tests.test_pop3_net import ALICE, files, fill, inbox, login, wire
from tests.test_pop3_net import MESSAGES as STORED


def _logged_in(messages: list[bytes] | None = None) -> tuple[Pop3Connection, Driver]:
    driver = Driver(messages=list(messages if messages is not None else MESSAGES), chunk=1 << 20)
    conn = Pop3Connection(pop3_settings(), tls=True)
    conn.start()
    run_turns([b"USER alice@example.com\r\nPASS alice-secret\r\n"], conn=conn, driver=driver)
    assert conn.state is State.TRANSACTION
    return conn, driver


def _say(conn: Pop3Connection, driver: Driver, line: bytes) -> bytes:
    conn.receive_data(line)
    return driver.pump(conn)


def test_the_next_message_is_wanted_after_a_retr_and_sent_without_a_request() -> None:
    conn, driver = _logged_in()
    assert conn.read_ahead_wanted() is None  # nothing retrieved yet: no guess
    normal = _say(conn, driver, b"RETR 1\r\n")
    assert conn.read_ahead_wanted() == 2
    conn.prepare(2, MESSAGES[1])
    assert conn.read_ahead_wanted() is None  # already there
    requests = len(driver.events)
    conn.receive_data(b"RETR 2\r\n")
    assert conn.next_event() is None  # answered from the prepared copy, no Retrieve
    out = conn.data_to_send()
    assert len(driver.events) == requests
    assert out == b"+OK 46 octets\r\nSubject: two\r\nX: y\r\n\r\nline 1\r\nline 2\r\nline 3\r\n.\r\n"
    assert normal.startswith(b"+OK 54 octets\r\nSubject: one\r\n")
    assert conn.retrieved == (1, 2)
    assert conn.retrieved_octets == 54 + 46
    assert conn.read_ahead_wanted() == 3
    _say(conn, driver, b"RETR 3\r\n")
    assert conn.read_ahead_wanted() is None  # the last message


def test_another_retr_drops_the_prepared_message_and_deleted_ones_are_not_wanted() -> None:
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, b"not what the file says\n")
    _say(conn, driver, b"RETR 3\r\n")  # not the one read ahead: dropped
    assert [e.number for e in driver.events if isinstance(e, Retrieve)] == [1, 3]
    assert b"not what" not in _say(conn, driver, b"RETR 2\r\n")
    assert [e.number for e in driver.events if isinstance(e, Retrieve)] == [1, 3, 2]

    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, MESSAGES[1])
    assert _say(conn, driver, b"DELE 2\r\nRETR 2\r\n") == (
        b"+OK Message 2 deleted.\r\n-ERR Message 2 already deleted.\r\n")
    _say(conn, driver, b"RETR 1\r\n")
    assert conn.read_ahead_wanted() is None  # 2 is deleted
    conn.prepare(2, MESSAGES[1])  # ignored for a deleted message
    assert _say(conn, driver, b"RSET\r\nRETR 2\r\n").count(b"Subject: two") == 1
    assert isinstance(driver.events[-1], Retrieve)  # read from the store, not prepared


def test_other_commands_keep_it_and_drop_prepared_forgets_it() -> None:
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, MESSAGES[1])
    _say(conn, driver, b"STAT\r\nLIST\r\nUIDL 2\r\nTOP 2 0\r\nNOOP\r\n")
    before = len(driver.events)
    _say(conn, driver, b"RETR 2\r\n")
    assert len(driver.events) == before  # TOP 2 went to the store; RETR 2 used the copy
    conn.prepare(3, MESSAGES[2])
    conn.drop_prepared()
    _say(conn, driver, b"RETR 3\r\n")
    last = driver.events[-1]
    assert isinstance(last, Retrieve) and last.number == 3


def test_not_wanted_while_input_waits_or_after_eof() -> None:
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.receive_data(b"NOO")  # part of a command: it goes first
    assert conn.read_ahead_wanted() is None
    _say(conn, driver, b"P\r\n")
    assert conn.read_ahead_wanted() == 2
    conn.receive_eof()
    assert conn.read_ahead_wanted() is None


def test_a_prepared_message_of_another_size_is_reported() -> None:
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, b"short\n")
    conn.receive_data(b"RETR 2\r\n")
    assert conn.next_event() == SizeMismatch(2, 46, 7)
    assert conn.data_to_send() == b"+OK 46 octets\r\nshort\r\n.\r\n"


def test_not_prepared_outside_transaction() -> None:
    conn = Pop3Connection(pop3_settings(), tls=True)
    conn.start()
    conn.prepare(1, b"x\n")
    assert conn.read_ahead_wanted() is None
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, MESSAGES[1])
    _say(conn, driver, b"QUIT\r\n")
    assert conn.state is State.CLOSED or conn.state is State.UPDATE
    assert conn.read_ahead_wanted() is None


_numbers = st.integers(min_value=0, max_value=5)
_command = st.one_of(
    st.builds(lambda n: b"RETR %d\r\n" % n, _numbers),
    st.builds(lambda n: b"DELE %d\r\n" % n, _numbers),
    st.builds(lambda n, k: b"TOP %d %d\r\n" % (n, k), _numbers, st.integers(0, 3)),
    st.sampled_from([b"RSET\r\n", b"STAT\r\n", b"LIST\r\n", b"NOOP\r\n", b"UIDL 1\r\n", b"RETR\r\n"]),
)
_maildrop = st.lists(
    st.lists(st.sampled_from([b"a", b".", b"\n", b"\r\n", b"\n.", b"Subject: s\n\n"]), max_size=12)
    .map(b"".join), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(messages=_maildrop, commands=st.lists(_command, max_size=14), pipelined=st.booleans())
def test_read_ahead_never_changes_what_the_client_gets(
        messages: list[bytes], commands: list[bytes], pipelined: bool) -> None:
    """The same session twice, once with a transport that reads ahead whenever the core wants
    it: the same bytes, the same messages marked retrieved and deleted."""
    def session(read_ahead: bool) -> tuple[bytes, tuple[int, ...], tuple[int, ...]]:
        conn, driver = _logged_in(messages)
        out = bytearray()
        turns = [b"".join(commands)] if pipelined else commands
        for turn in turns:
            out += _say(conn, driver, turn)
            number = conn.read_ahead_wanted()
            if read_ahead and number is not None:
                conn.prepare(number, messages[number - 1])
        return bytes(out), conn.retrieved, conn.deleted

    assert session(True) == session(False)


# --- the transport -----------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Pop3TestServer]:
    with Pop3TestServer(tmp_path) as srv:
        yield srv


def test_a_client_retrieving_in_order_gets_read_ahead_messages(
        server: Pop3TestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared: list[int] = []
    original = Pop3Connection.prepare

    def spy(self: Pop3Connection, number: int, data: bytes) -> None:
        prepared.append(number)
        original(self, number, data)

    monkeypatch.setattr(Pop3Connection, "prepare", spy)
    messages = [*STORED, b".dot first\n.\nlast\n"]
    fill(server, messages)
    client = login(server)
    for number, message in enumerate(messages, 1):
        assert b"\r\n".join(client.retr(number)[1]) + b"\r\n" == wire(message)
    assert prepared == [2, 3, 4]
    assert client.quit().startswith(b"+OK Logging out, 4 messages left")
    assert all(p.name.endswith(":2,S") for p in files(inbox(server)))  # all marked seen


def test_read_ahead_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prepared: list[int] = []
    monkeypatch.setattr(Pop3Connection, "prepare", lambda self, n, data: prepared.append(n))
    with Pop3TestServer(tmp_path, read_ahead=False) as srv:
        fill(srv)
        client = login(srv)
        for number, message in enumerate(STORED, 1):
            assert b"\r\n".join(client.retr(number)[1]) + b"\r\n" == wire(message)
        client.quit()
    assert prepared == []


def test_a_file_gone_before_the_read_ahead_is_reported_at_retr(server: Pop3TestServer) -> None:
    fill(server)
    client = login(server)
    (second,) = [p for p in files(inbox(server)) if p.read_bytes() == STORED[1]]
    second.unlink()  # another program removed it while the session was open
    client.retr(1)
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Message is no longer available"):
        client.retr(2)
    assert b"\r\n".join(client.retr(3)[1]) + b"\r\n" == wire(STORED[2])
    client.quit()


def test_an_idle_session_drops_what_it_read_ahead(
        server: Pop3TestServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(net_pop3, "READ_AHEAD_HOLD", 0.0)
    fill(server)
    client = login(server)
    client.retr(1)

    async def wanted() -> int | None:
        (session,) = server.server.sessions
        return session.conn.read_ahead_wanted()

    assert server.call(wanted()) is None  # message 2 is held
    deadline = time.monotonic() + 5
    while server.call(wanted()) is None and time.monotonic() < deadline:
        time.sleep(0.1)  # the sweep runs once a second
    assert server.call(wanted()) == 2  # dropped: it would be read again
    assert b"\r\n".join(client.retr(2)[1]) + b"\r\n" == wire(STORED[1])
    client.quit()


def test_read_ahead_over_tls_and_stls(server: Pop3TestServer) -> None:
    fill(server)
    client = poplib.POP3_SSL("127.0.0.1", server.tls_port, context=client_context(server.cert),
                             timeout=10)
    client.user(ALICE)
    client.pass_("alice-secret")
    assert [b"\r\n".join(client.retr(n)[1]) + b"\r\n" for n in (1, 2, 3)] == [
        wire(m) for m in STORED]
    client.quit()


def test_request_kinds_are_unchanged_for_top() -> None:
    """TOP is never answered from a read-ahead copy (it would need the stored octets)."""
    conn, driver = _logged_in()
    _say(conn, driver, b"RETR 1\r\n")
    conn.prepare(2, STORED[1])
    out = _say(conn, driver, b"TOP 2 1\r\n")
    assert out == b"+OK Top of message follows.\r\nSubject: two\r\nX: y\r\n\r\nline 1\r\n.\r\n"
    last = driver.events[-1]
    assert isinstance(last, Retrieve) and (last.number, last.lines) == (2, 1)
