"""The sans-I/O POP3 core, by byte scripts: every command, every error reply, whole, in pieces
and octet by octet (RFC 1939, 2449, 2595, 5034, 3206)."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from postroom.pop3 import (
    CheckPassword,
    Commit,
    LocalProtocolError,
    LoginFailed,
    Maildrop,
    MaildropMessage,
    OpenMaildrop,
    Pop3Connection,
    ProtocolViolation,
    Retrieve,
    SizeMismatch,
    State,
)
from postroom.pop3 import responses as r
from postroom.pop3.server import OUTPUT_CHUNK
from postroom.sasl import FailureKind
from tests.pop3_support import LOGIN, Driver, b64, run_dialog, run_turns, settings

PLAIN_ALICE = "AGFsaWNlQGV4YW1wbGUuY29tAGFsaWNlLXNlY3JldA=="
GREETING = "S: +OK POP3 server ready"


# --- AUTHORIZATION: USER/PASS ------------------------------------------------------------------


def test_user_pass_login() -> None:
    _, driver, conn = run_dialog(LOGIN)
    assert conn.state is State.TRANSACTION and conn.user == "alice@example.com"
    assert [(o.user, o.mechanism) for o in driver.logins] == [("alice@example.com", "USER")]


def test_wrong_password_is_auth_coded_and_the_session_may_try_again() -> None:
    _, driver, conn = run_dialog(f"""
{GREETING}
C: USER alice@example.com
S: +OK Send your password.
C: PASS wrong
S: -ERR [AUTH] Authentication failed.
C: USER nobody@example.com
S: +OK Send your password.
C: PASS whatever
S: -ERR [AUTH] Authentication failed.
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: +OK Logged in.
""")
    assert [(f.user, f.mechanism, f.kind) for f in driver.failures] == [
        ("alice@example.com", "USER", FailureKind.REJECTED),
        ("nobody@example.com", "USER", FailureKind.REJECTED),
    ]
    assert conn.state is State.TRANSACTION


def test_password_with_spaces() -> None:
    run_dialog(f"""
{GREETING}
C: USER bob@example.com
S: +OK Send your password.
C: PASS bob secret with spaces
S: +OK Logged in.
""")


def test_user_and_pass_syntax_and_order() -> None:
    run_dialog(f"""
{GREETING}
C: PASS alice-secret
S: -ERR No user name given: send USER first.
C: USER
S: -ERR Syntax: USER <name>
C: USER two words
S: -ERR Syntax: USER <name>
C: USER alice@example.com
S: +OK Send your password.
C: PASS
S: -ERR Syntax: PASS <password>
C: PASS alice-secret
S: +OK Logged in.
""")


def test_three_failed_logins_close_the_session() -> None:
    _, driver, conn = run_dialog(f"""
{GREETING}
C: USER a@example.com
S: +OK Send your password.
C: PASS x
S: -ERR [AUTH] Authentication failed.
C: USER a@example.com
S: +OK Send your password.
C: PASS x
S: -ERR [AUTH] Authentication failed.
C: AUTH PLAIN AHdob0B4AHg=
S: -ERR [AUTH] Authentication failed.
C: USER alice@example.com
""")
    assert conn.closed and len(driver.failures) == 3


def test_the_transport_may_answer_a_failure_its_own_way() -> None:
    run_dialog(f"""
{GREETING}
C: USER alice@example.com
S: +OK Send your password.
C: PASS wrong
S: -ERR [SYS/TEMP] Too many failures from your address, try later.
""", make_driver=lambda: Driver(login_failed=r.err(
        "Too many failures from your address, try later.", r.SYS_TEMP)))


def test_plaintext_refused_before_tls() -> None:
    _, driver, conn = run_dialog(f"""
{GREETING}
C: USER alice@example.com
S: -ERR [AUTH] Plaintext authentication disallowed on non-secure connection.
C: PASS alice-secret
S: -ERR No user name given: send USER first.
C: AUTH PLAIN {PLAIN_ALICE}
S: -ERR [AUTH] Plaintext authentication disallowed on non-secure connection.
C: AUTH LOGIN
S: -ERR [AUTH] Plaintext authentication disallowed on non-secure connection.
C: CAPA
S: +OK Capability list follows.
S: CAPA
S: TOP
S: UIDL
S: RESP-CODES
S: AUTH-RESP-CODE
S: PIPELINING
S: SASL SCRAM-SHA-256 CRAM-MD5
S: STLS
S: .
""", tls=False)
    assert not driver.logins and conn.state is State.AUTHORIZATION


def test_plaintext_allowed_when_configured() -> None:
    run_dialog(LOGIN, tls=False, config=settings(allow_plaintext=True))


# --- STLS (RFC 2595 4) -------------------------------------------------------------------------


def test_stls_then_login_and_capa_changes() -> None:
    _, _, conn = run_dialog(f"""
{GREETING}
C: STLS
S: +OK Begin TLS negotiation.
C: CAPA
S: +OK Capability list follows.
S: CAPA
S: TOP
S: UIDL
S: RESP-CODES
S: AUTH-RESP-CODE
S: PIPELINING
S: USER
S: SASL SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5
S: .
C: STLS
S: -ERR TLS is already active.
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: +OK Logged in.
""", tls=False)
    assert conn.tls_active


def test_commands_pipelined_after_stls_are_dropped() -> None:
    conn = Pop3Connection(settings(), tls=False)
    conn.start()
    conn.data_to_send()
    conn.receive_data(b"STLS\r\nUSER alice@example.com\r\nPASS alice-secret\r\n")
    event = conn.next_event()
    assert event is not None and type(event).__name__ == "StartTls"
    conn.proceed()
    assert conn.state is State.WAIT_TLS
    conn.receive_data(b"USER sneaky\r\n")  # still plaintext: ignored
    assert conn.next_event() is None
    assert conn.data_to_send() == b"+OK Begin TLS negotiation.\r\n"
    conn.tls_established()
    assert conn.state is State.AUTHORIZATION and conn.buffered == 0


def test_stls_refused_by_the_transport_or_not_offered() -> None:
    conn = Pop3Connection(settings(), tls=False)
    conn.start()
    conn.receive_data(b"STLS\r\n")
    conn.next_event()
    conn.refuse(r.err("TLS is not available now.", r.SYS_TEMP))
    assert conn.data_to_send().endswith(b"-ERR [SYS/TEMP] TLS is not available now.\r\n")
    run_dialog(f"""
{GREETING}
C: STLS now
S: -ERR Syntax: STLS
C: STLS
S: -ERR TLS is not available.
""", tls=False, config=settings(stls=False))


# --- AUTH (RFC 5034) ---------------------------------------------------------------------------


def test_auth_plain_with_and_without_initial_response() -> None:
    run_dialog(f"""
{GREETING}
C: AUTH PLAIN {PLAIN_ALICE}
S: +OK Logged in.
""")
    run_dialog(f"""
{GREETING}
C: AUTH plain
S| + \\r\\n
C: {PLAIN_ALICE}
S: +OK Logged in.
""")


def test_auth_login_and_cancel() -> None:
    run_dialog(f"""
{GREETING}
C: AUTH LOGIN
S: + VXNlcm5hbWU6
C: *
S: -ERR Authentication cancelled.
C: AUTH LOGIN {b64(b"alice@example.com")}
S: + UGFzc3dvcmQ6
C: {b64(b"alice-secret")}
S: +OK Logged in.
""")


def test_auth_errors() -> None:
    _, driver, _ = run_dialog(f"""
{GREETING}
C: AUTH X-UNKNOWN
S: -ERR Unsupported authentication mechanism.
C: AUTH PLAIN not!base64
S: -ERR Malformed authentication response.
C: AUTH PLAIN a b
S: -ERR Syntax: AUTH <mechanism> [initial-response]
C: AUTH CRAM-MD5 {b64(b"x")}
S: -ERR This mechanism takes no initial response.
C: AUTH PLAIN {b64(bytes(12289))}
S: -ERR Line too long.
""", config=settings(max_auth_failures=0))
    kinds = [f.kind for f in driver.failures]
    assert kinds == [FailureKind.MALFORMED, FailureKind.INITIAL_RESPONSE_REFUSED]


def test_auth_response_too_long() -> None:
    _, driver, _ = run_dialog(f"""
{GREETING}
C: AUTH LOGIN
S: + VXNlcm5hbWU6
C: {"A" * 13000}
S: -ERR Authentication response too long.
C: QUIT
S: +OK Logging out.
""")
    assert [f.kind for f in driver.failures] == [FailureKind.TOO_LONG]


def test_auth_listing_form() -> None:
    run_dialog(f"""
{GREETING}
C: AUTH
S: +OK Supported mechanisms follow.
S: SCRAM-SHA-256
S: CRAM-MD5
S: .
""", tls=False)


def test_auth_cram_md5() -> None:
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    driver = Driver()
    driver.pump(conn)
    conn.receive_data(b"AUTH CRAM-MD5\r\n")
    out = driver.pump(conn)
    assert out.startswith(b"+ ")
    challenge = base64.b64decode(out[2:-2])
    digest = hmac.new(b"alice-secret", challenge, hashlib.md5).hexdigest()
    conn.receive_data(b64(f"alice@example.com {digest}".encode()).encode() + b"\r\n")
    assert driver.pump(conn) == b"+OK Logged in.\r\n"


def test_auth_scram_sha_256_sends_server_final_as_a_challenge() -> None:
    from tests.test_sasl_scram import ScramClient

    client = ScramClient("alice@example.com", "alice-secret", "clientNONCE")
    conn = Pop3Connection(settings(), tls=False)
    conn.start()
    driver = Driver()
    driver.pump(conn)
    conn.receive_data(f"AUTH SCRAM-SHA-256 {b64(client.first())}\r\n".encode())
    out = driver.pump(conn)
    assert out.startswith(b"+ ") and out.endswith(b"\r\n")
    final = client.final(base64.b64decode(out[2:-2]))
    conn.receive_data(b64(final).encode() + b"\r\n")
    out = driver.pump(conn)
    assert out == b"+ " + base64.b64encode(client.expected_final) + b"\r\n"
    conn.receive_data(b"\r\n")
    assert driver.pump(conn) == b"+OK Logged in.\r\n"
    assert driver.logins[0].mechanism == "SCRAM-SHA-256"


def test_unavailable_credentials_are_sys_temp() -> None:
    from tests.pop3_support import STORE

    STORE.broken = True
    try:
        run_dialog(f"""
{GREETING}
C: AUTH PLAIN {PLAIN_ALICE}
S: -ERR [SYS/TEMP] Temporary authentication failure.
""")
    finally:
        STORE.broken = False


# --- APOP (RFC 1939 7) -------------------------------------------------------------------------


def test_apop() -> None:
    digest = hashlib.md5(b"<1896.697170952@pop.example.test>alice-secret").hexdigest()
    _, driver, _conn = run_dialog(f"""
S: +OK POP3 server ready <1896.697170952@pop.example.test>
C: APOP alice@example.com {"0" * 32}
S: -ERR [AUTH] Authentication failed.
C: APOP alice@example.com nothex
S: -ERR Syntax: APOP <name> <digest>
C: APOP bob@example.com {digest}
S: -ERR [AUTH] Authentication failed.
C: APOP alice@example.com {digest.upper()}
S: +OK Logged in.
""", tls=False, config=settings(apop=True, max_auth_failures=0))
    assert driver.logins[0].mechanism == "APOP"


def test_apop_not_offered_unless_configured() -> None:
    run_dialog(f"""
{GREETING}
C: APOP alice@example.com {"0" * 32}
S: -ERR Unknown command.
""")


# --- opening the maildrop ----------------------------------------------------------------------


def test_maildrop_in_use() -> None:
    _, _, conn = run_dialog(f"""
{GREETING}
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: -ERR [IN-USE] Mailbox is locked by another POP3 session.
C: STAT
S: -ERR Command not valid in this state.
""", make_driver=lambda: Driver(refuse_open=r.IN_USE_REPLY))
    assert conn.state is State.AUTHORIZATION


def test_invalid_maildrop_listing_is_a_local_error() -> None:
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    conn.receive_data(b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n")
    event = conn.next_event()
    assert isinstance(event, CheckPassword)
    conn.password_checked(True)
    assert isinstance(conn.next_event(), OpenMaildrop)
    with pytest.raises(LocalProtocolError):
        conn.maildrop_opened([MaildropMessage(1, "bad uidl")])
    with pytest.raises(LocalProtocolError):
        conn.maildrop_opened([MaildropMessage(1, "a"), MaildropMessage(2, "a")])
    with pytest.raises(LocalProtocolError):
        conn.proceed()  # not how OpenMaildrop is answered
    conn.maildrop_opened([])
    with pytest.raises(LocalProtocolError):
        conn.proceed()  # nothing pending


@pytest.mark.parametrize(("sizes", "uidls"), [
    ([1], ["bad uidl"]),  # a space: joined, it would look like two good ones
    ([1, 2], ["a", "a"]),
    ([1, 2], ["a b", "c"]),
    ([-1], ["a"]),
    ([1, 2], ["a"]),
    ([1], ["x" * 71]),
    ([1], [""]),
    ([1], ["caf\u00e9"]),
    ([1, 2], ["a", "b\x7f"]),
])
def test_a_bad_maildrop_cannot_be_made(sizes: list[int], uidls: list[str]) -> None:
    with pytest.raises(ValueError):
        Maildrop(sizes, uidls)


def test_a_maildrop_made_once_serves_many_sessions() -> None:
    """A transport keeps one checked Maildrop for an unchanged mailbox and hands it to every
    session: STAT counts from its total until DELE, each session's deletions are its own."""
    maildrop = Maildrop([10, 20, 30], ["u1", "x" * 70, "u3"])
    assert (len(maildrop), maildrop.octets) == (3, 60)
    answers = []
    for script in (b"STAT\r\nDELE 2\r\nSTAT\r\nLIST\r\nRSET\r\nSTAT\r\nUIDL 3\r\n", b"STAT\r\n"):
        conn = Pop3Connection(settings(), tls=True)
        conn.start()
        conn.receive_data(b"AUTH PLAIN " + PLAIN_ALICE.encode() + b"\r\n")
        event = conn.next_event()
        assert isinstance(event, CheckPassword)
        conn.password_checked(True)
        assert isinstance(conn.next_event(), OpenMaildrop)
        conn.maildrop_opened(maildrop)
        conn.data_to_send()
        conn.receive_data(script)
        out = b""
        while (event := conn.next_event()) is not None or (piece := conn.data_to_send()):
            out += b"" if event is not None else piece
        answers.append(out)
    assert answers == [
        b"+OK 3 60\r\n+OK Message 2 deleted.\r\n+OK 2 40\r\n+OK 2 messages (40 octets)\r\n"
        b"1 10\r\n3 30\r\n.\r\n+OK Maildrop has 3 messages (60 octets).\r\n+OK 3 60\r\n"
        b"+OK 3 u3\r\n",
        b"+OK 3 60\r\n",
    ]


# --- TRANSACTION -------------------------------------------------------------------------------


def test_stat_list_uidl() -> None:
    run_dialog(LOGIN + """
C: STAT
S: +OK 3 153
C: LIST
S: +OK 3 messages (153 octets)
S: 1 54
S: 2 46
S: 3 53
S: .
C: LIST 2
S: +OK 2 46
C: UIDL
S: +OK Unique-ID listing follows.
S: 1 msg1.key,S=49
S: 2 msg2.key,S=40
S: 3 msg3.key,S=53
S: .
C: UIDL 3
S: +OK 3 msg3.key,S=53
C: LIST 0
S: -ERR No such message.
C: LIST 4
S: -ERR No such message.
C: LIST x
S: -ERR Invalid message number.
C: LIST -1
S: -ERR Invalid message number.
C: UIDL 1 2
S: -ERR Syntax: UIDL [message]
C: STAT 1
S: -ERR Syntax: STAT
""")


def test_retr_converts_line_ends_and_stuffs_dots() -> None:
    _, driver, conn = run_dialog(LOGIN + """
C: RETR 1
S: +OK 54 octets
S: Subject: one
S:
S: first body
S: ..leading dot
S: ...two dots
S: .
C: RETR 3
S: +OK 53 octets
S: Subject: three
S:
S: stored with CRLF
S: no final line end
S: .
C: RETR
S: -ERR Syntax: RETR <message>
C: RETR 9
S: -ERR No such message.
""")
    assert conn.retrieved == (1, 3)
    assert not [e for e in driver.events if isinstance(e, SizeMismatch)]


def test_top() -> None:
    run_dialog(LOGIN + """
C: TOP 2 0
S: +OK Top of message follows.
S: Subject: two
S: X: y
S:
S: .
C: TOP 2 2
S: +OK Top of message follows.
S: Subject: two
S: X: y
S:
S: line 1
S: line 2
S: .
C: TOP 1 99999999999999
S: +OK Top of message follows.
S: Subject: one
S:
S: first body
S: ..leading dot
S: ...two dots
S: .
C: TOP 2
S: -ERR Syntax: TOP <message> <lines>
C: TOP 2 -1
S: -ERR Syntax: TOP <message> <lines>
""")


def test_dele_rset_and_quit_commit() -> None:
    _, driver, conn = run_dialog(LOGIN + """
C: DELE 2
S: +OK Message 2 deleted.
C: DELE 2
S: -ERR Message 2 already deleted.
C: RETR 2
S: -ERR Message 2 already deleted.
C: STAT
S: +OK 2 107
C: LIST
S: +OK 2 messages (107 octets)
S: 1 54
S: 3 53
S: .
C: RSET
S: +OK Maildrop has 3 messages (153 octets).
C: DELE 1
S: +OK Message 1 deleted.
C: RETR 3
S: +OK 53 octets
S: Subject: three
S:
S: stored with CRLF
S: no final line end
S: .
C: NOOP
S: +OK
C: NOOP x
S: -ERR Syntax: NOOP
C: QUIT
S: +OK Logging out, 2 messages left.
""")
    assert conn.closed
    assert driver.commits == [Commit(deleted=(1,), retrieved=(3,))]


def test_quit_update_failure() -> None:
    _, _, conn = run_dialog(LOGIN + """
C: DELE 1
S: +OK Message 1 deleted.
C: QUIT
S: -ERR [SYS/TEMP] Some deleted messages were not removed.
""", make_driver=lambda: Driver(commit_error=r.UPDATE_FAILED))
    assert conn.closed


def test_quit_in_authorization_commits_nothing() -> None:
    _, driver, conn = run_dialog(f"""
{GREETING}
C: QUIT
S: +OK Logging out.
""")
    assert conn.closed and not driver.commits


def test_retrieved_but_deleted_is_not_marked_seen() -> None:
    _, driver, _ = run_dialog(LOGIN + """
C: RETR 2
C: DELE 2
C: TOP 1 0
C: QUIT
S: +OK 46 octets
S: Subject: two
S: X: y
S:
S: line 1
S: line 2
S: line 3
S: .
S: +OK Message 2 deleted.
S: +OK Top of message follows.
S: Subject: one
S:
S: .
S: +OK Logging out, 2 messages left.
""")
    assert driver.commits == [Commit(deleted=(2,), retrieved=())]


def test_state_errors_unknown_commands_and_capa_after_login() -> None:
    run_dialog(f"""
{GREETING}
C: STAT
S: -ERR Command not valid in this state.
C: LAST
S: -ERR Unknown command.
C: USER alice@example.com
S: +OK Send your password.
C: PASS alice-secret
S: +OK Logged in.
C: USER alice@example.com
S: -ERR Command not valid in this state.
C: AUTH PLAIN
S: -ERR Command not valid in this state.
C: STLS
S: -ERR Command not valid in this state.
C: capa
S: +OK Capability list follows.
S: CAPA
S: TOP
S: UIDL
S: RESP-CODES
S: AUTH-RESP-CODE
S: PIPELINING
S: EXPIRE NEVER
S: LOGIN-DELAY 900
S: .
""", config=settings(expire="NEVER", login_delay=900))


def test_too_many_bad_commands() -> None:
    _, driver, conn = run_dialog(f"""
{GREETING}
C: XXX
S: -ERR Unknown command.
C: YYY
S: -ERR Unknown command.
C: ZZZ
S: -ERR Unknown command.
S: -ERR Too many bad commands, closing the connection.
""", config=settings(max_errors=3))
    assert conn.closed
    assert any(isinstance(e, ProtocolViolation) for e in driver.events)


# --- line handling ----------------------------------------------------------------------------


def test_overlong_lines_are_drained_and_refused() -> None:
    long = "NOOP " + "x" * 300
    huge = "X" * 20000
    run_dialog(LOGIN + f"""
C: {long}
S: -ERR Line too long.
C: {huge}
S: -ERR Line too long.
C: NOOP
S: +OK
""")


def test_bare_lf_control_characters_and_bad_utf8() -> None:
    run_dialog(LOGIN + """
C| NOOP\\n
S: +OK
C| LIST \\x001\\r\\n
S: -ERR Invalid characters in command.
C| LIST 1\\rX\\r\\n
S: -ERR Invalid characters in command.
C| USER \\xff\\r\\n
S: -ERR Invalid characters in command.
C| stat\\r\\n
S: +OK 3 153
""")


def test_pipelined_commands_answered_in_order() -> None:
    run_dialog(f"""
{GREETING}
C: CAPA
C: USER alice@example.com
C: PASS alice-secret
C: STAT
C: RETR 2
C: LIST 1
S: +OK Capability list follows.
S: CAPA
S: TOP
S: UIDL
S: RESP-CODES
S: AUTH-RESP-CODE
S: PIPELINING
S: USER
S: SASL SCRAM-SHA-256 PLAIN LOGIN CRAM-MD5
S: .
S: +OK Send your password.
S: +OK Logged in.
S: +OK 3 153
S: +OK 46 octets
S: Subject: two
S: X: y
S:
S: line 1
S: line 2
S: line 3
S: .
S: +OK 1 54
""")


def test_eof_answers_what_was_sent_then_closes_without_update() -> None:
    conn = Pop3Connection(settings(), tls=True)
    driver = Driver()
    conn.start()
    out = run_turns([b"USER alice@example.com\r\nPASS alice-secret\r\nDELE 1\r\nSTAT\r\n"],
                    conn=conn, driver=driver)
    conn.receive_eof()
    out += driver.pump(conn)
    assert out.endswith(b"+OK Message 1 deleted.\r\n+OK 2 99\r\n")
    assert conn.closed and not driver.commits  # RFC 1939 6: no QUIT, no UPDATE
    assert conn.deleted == (1,)


def test_timeout_and_shutdown() -> None:
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    conn.data_to_send()
    conn.timeout()
    assert conn.data_to_send() == b"-ERR Disconnected for inactivity.\r\n" and conn.closed
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    conn.data_to_send()
    conn.shutdown()
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Server shutting down.\r\n" and conn.closed
    conn = Pop3Connection(settings(), tls=True)
    conn.reject_connection(r.err("Too many connections.", r.SYS_TEMP))
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Too many connections.\r\n" and conn.closed


# --- requests answered by the transport ----------------------------------------------------


def _logged_in(messages: list[bytes] | None = None) -> tuple[Pop3Connection, Driver]:
    driver = Driver(messages=messages) if messages is not None else Driver()
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    run_turns([b"USER alice@example.com\r\nPASS alice-secret\r\n"], conn=conn, driver=driver)
    assert conn.state is State.TRANSACTION
    return conn, driver


def test_message_gone_before_data_and_failure_after_data() -> None:
    conn, _ = _logged_in()
    conn.receive_data(b"RETR 1\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    conn.refuse(r.MESSAGE_UNAVAILABLE)
    assert conn.data_to_send() == b"-ERR [SYS/TEMP] Message is no longer available.\r\n"
    conn.receive_data(b"RETR 1\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    conn.message_data(b"Subject: one\n")
    conn.refuse(r.MESSAGE_UNAVAILABLE)  # an I/O error mid-message: nothing can be said
    assert conn.closed
    assert conn.data_to_send() == b"+OK 54 octets\r\nSubject: one\r\n"


def test_size_mismatch_is_reported() -> None:
    conn, _driver = _logged_in()
    conn.receive_data(b"RETR 2\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    conn.message_data(b"short\n")
    conn.message_end()
    assert conn.next_event() == SizeMismatch(2, 46, 7)


def test_answers_after_close_are_ignored() -> None:
    conn, _ = _logged_in()
    conn.receive_data(b"RETR 1\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    conn.shutdown()
    assert conn.message_data(b"x") is False
    conn.message_end()
    conn.refuse(r.MESSAGE_UNAVAILABLE)
    assert conn.closed


def test_listing_of_a_large_maildrop_is_produced_in_bounded_pieces() -> None:
    conn, _ = _logged_in([b"x\n"] * 20000)
    conn.receive_data(b"UIDL\r\nNOOP\r\n")
    assert conn.next_event() is None
    pieces = []
    while True:
        assert conn.next_event() is None
        data = conn.data_to_send()
        if not data:
            break
        pieces.append(data)
    assert len(pieces) > 3 and max(map(len, pieces)) < OUTPUT_CHUNK + 20000
    lines = b"".join(pieces).split(b"\r\n")
    assert lines[0] == b"+OK Unique-ID listing follows."
    assert lines[1] == b"1 msg1.key,S=2" and lines[20000] == b"20000 msg20000.key,S=2"
    assert lines[20001:] == [b".", b"+OK", b""]


def test_message_output_is_as_large_as_the_chunks_fed() -> None:
    big = b"Subject: big\n\n" + b"0123456789abcdef" * 65536 + b"\n"  # 1 MiB
    conn, _ = _logged_in([big])
    conn.receive_data(b"RETR 1\r\n")
    assert isinstance(conn.next_event(), Retrieve)
    total = 0
    for start in range(0, len(big), 65536):
        conn.message_data(big[start : start + 65536])
        assert conn.output_size <= 65536 + 64
        total += len(conn.data_to_send())
    conn.message_end()
    total += len(conn.data_to_send())
    # Three LFs become CRLFs; the terminator is ".", CRLF.
    assert total == len(b"+OK 1048594 octets\r\n") + len(big) + 3 + 3


def test_login_failed_request_carries_the_identity() -> None:
    conn = Pop3Connection(settings(), tls=True)
    conn.start()
    conn.receive_data(b"USER carol@example.com\r\nPASS nope\r\n")
    check = conn.next_event()
    assert isinstance(check, CheckPassword) and check.user == "carol@example.com"
    assert check.mechanism == "USER" and check.check.password_hash is None
    conn.password_checked(False)
    failed = conn.next_event()
    assert isinstance(failed, LoginFailed)
    assert (failed.user, failed.mechanism, failed.kind) == ("carol@example.com", "USER",
                                                            FailureKind.REJECTED)


# --- responses -------------------------------------------------------------------------------


def test_response_lines() -> None:
    assert r.ok().to_bytes() == b"+OK\r\n"
    assert r.err("x", r.IN_USE).to_bytes() == b"-ERR [IN-USE] x\r\n"
    assert r.err("", r.AUTH).to_bytes() == b"-ERR [AUTH]\r\n"
    assert r.ok("a\r\nb").to_bytes() == b"+OK a  b\r\n"
    long = r.ok("\u00e9" * 400).to_bytes()
    assert len(long) <= 512 and long.endswith(b"\r\n")
    long.decode("utf-8")
