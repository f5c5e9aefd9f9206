"""AUTH in the SMTP core (RFC 4954): where it is offered and taken, the 334 loop, the end of an
exchange, 530 before MAIL on the submission ports, and the line bounds of a SASL exchange."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import Auth, AuthAborted, AuthResponse, Event, MailFrom, Request
from postroom.smtp.server import AUTH_LINE, ServerConnection
from postroom.smtp.states import State
from postroom.testing import settings

Answer = Callable[[Request], Reply]


def default_answer(request: Request) -> Reply:
    return codes.OK


def drain(conn: ServerConnection, answer: Answer = default_answer) -> list[Event]:
    seen: list[Event] = []
    while (event := conn.next_event()) is not None:
        seen.append(event)
        if isinstance(event, Request):
            conn.respond(answer(event))
    return seen


def new_conn(*, tls: bool = True, requires_tls: bool = True, require_auth: bool = False,
             mechanisms: tuple[str, ...] = ("SCRAM-SHA-256", "PLAIN", "LOGIN")) -> ServerConnection:
    conn = ServerConnection(settings())
    conn.auth_mechanisms = list(mechanisms)
    conn.auth_requires_tls = requires_tls
    conn.require_auth = require_auth
    if tls:
        conn.tls_established()  # implicit TLS: the session is in TLS from the start
    conn.start()
    conn.data_to_send()
    return conn


def ehlo(conn: ServerConnection) -> bytes:
    conn.receive_data(b"EHLO c.test\r\n")
    drain(conn)
    return conn.data_to_send()


def test_ehlo_lists_auth_only_inside_tls_by_default() -> None:
    assert b"250 AUTH SCRAM-SHA-256 PLAIN LOGIN\r\n" in ehlo(new_conn())
    assert b"AUTH" not in ehlo(new_conn(tls=False))
    assert b"250 AUTH PLAIN\r\n" in ehlo(new_conn(tls=False, requires_tls=False,
                                                    mechanisms=("PLAIN",)))
    assert b"AUTH" not in ehlo(new_conn(mechanisms=()))


def test_auth_before_tls_is_538_and_not_offered_is_502() -> None:
    conn = new_conn(tls=False)
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    assert drain(conn) == []
    assert conn.data_to_send() == (
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n")
    conn = new_conn(mechanisms=())
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN\r\n")
    drain(conn)
    assert conn.data_to_send() == b"502 5.5.1 Error: command not implemented\r\n"


def test_plain_with_initial_response_succeeds_in_one_step() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH plain AGFsaWNlAHNlY3JldA==\r\n")
    events = drain(conn, lambda r: codes.AUTH_OK)
    assert events == [Auth("PLAIN", "AGFsaWNlAHNlY3JldA==")]
    assert conn.data_to_send() == b"235 2.7.0 Authentication successful\r\n"
    assert conn.authenticated and conn.state is State.WAIT_MAIL


def test_challenge_loop_reads_response_lines_as_responses_not_commands() -> None:
    conn = new_conn()
    ehlo(conn)
    answers = iter([codes.challenge("VXNlcm5hbWU6"), codes.challenge("UGFzc3dvcmQ6"),
                    codes.AUTH_OK])
    # pipelined: the client sends its responses without waiting (they are still lines)
    conn.receive_data(b"AUTH LOGIN\r\nYWxpY2U=\r\nUVVJVA==\r\nQUIT\r\n")
    events = drain(conn, lambda r: next(answers))
    assert events[:3] == [Auth("LOGIN", None), AuthResponse(b"YWxpY2U="), AuthResponse(b"UVVJVA==")]
    assert conn.data_to_send() == (b"334 VXNlcm5hbWU6\r\n334 UGFzc3dvcmQ6\r\n"
                                   b"235 2.7.0 Authentication successful\r\n221 2.0.0 Bye\r\n")
    assert conn.closed


def test_empty_challenge_keeps_its_space() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN\r\n")
    drain(conn, lambda r: codes.challenge(""))
    assert conn.data_to_send() == b"334 \r\n"
    assert conn.state is State.IN_AUTH
    conn.receive_data(b"*\r\n")  # the transport's exchange sees the cancel and answers 501
    events = drain(conn, lambda r: codes.AUTH_CANCELLED)
    assert events == [AuthResponse(b"*")]
    assert conn.data_to_send() == b"501 5.7.0 Authentication cancelled\r\n"
    assert conn.state is State.WAIT_MAIL and not conn.authenticated


def test_failure_ends_the_exchange_and_a_retry_is_allowed() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\nAUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")
    answers = iter([codes.AUTH_FAILED, codes.AUTH_OK])
    drain(conn, lambda r: next(answers))
    assert conn.data_to_send() == (b"535 5.7.8 Authentication credentials invalid\r\n"
                                   b"235 2.7.0 Authentication successful\r\n")
    assert conn.authenticated


@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"AUTH\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH PLAIN a b\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH PLAIN \r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH P\xc3\xa9\r\n", b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
        (b"AUTH CRAM-MD5\r\n", b"504 5.5.4 Unrecognized authentication type\r\n"),
        (b"AUTH A23456789012345678901\r\n",
         b"501 5.5.4 Syntax: AUTH mechanism [initial-response]\r\n"),
    ],
)
def test_auth_syntax_and_mechanism_refusals(script: bytes, reply: bytes) -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(script)
    assert drain(conn) == []
    assert conn.data_to_send() == reply


def test_auth_sequence_refusals() -> None:
    conn = new_conn()
    conn.receive_data(b"AUTH PLAIN\r\n")
    drain(conn)
    assert conn.data_to_send() == b"503 5.5.1 Error: send EHLO first\r\n"
    conn.receive_data(b"HELO c.test\r\nAUTH PLAIN\r\n")  # RFC 4954 needs EHLO
    drain(conn)
    assert conn.data_to_send().endswith(b"503 5.5.1 Error: send EHLO first\r\n")
    ehlo(conn)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\nAUTH PLAIN\r\n")
    drain(conn)
    assert conn.data_to_send().endswith(b"503 5.5.1 Error: MAIL transaction in progress\r\n")
    conn.receive_data(b"RSET\r\nAUTH PLAIN =\r\nAUTH PLAIN =\r\n")
    drain(conn, lambda r: codes.AUTH_OK if isinstance(r, Auth) else codes.OK)
    assert conn.data_to_send() == (b"250 2.0.0 Ok\r\n235 2.7.0 Authentication successful\r\n"
                                   b"503 5.5.1 Error: already authenticated\r\n")


def test_submission_needs_auth_before_mail() -> None:
    conn = new_conn(tls=False, require_auth=True)
    ehlo(conn)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert drain(conn) == []
    assert conn.data_to_send() == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    conn = new_conn(require_auth=True)
    ehlo(conn)
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")
    assert drain(conn) == []
    assert conn.data_to_send() == b"530 5.7.0 Authentication required\r\n"
    conn.receive_data(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\nMAIL FROM:<a@b.example>\r\n")
    events = drain(conn, lambda r: codes.AUTH_OK if isinstance(r, Auth) else codes.OK_MAIL)
    assert isinstance(events[-1], MailFrom)
    assert conn.data_to_send().endswith(b"250 2.1.0 Ok\r\n")


def test_tls_forgets_a_plaintext_authentication() -> None:
    conn = new_conn(tls=False, requires_tls=False)
    conn.extensions.append("STARTTLS")
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN =\r\n")
    drain(conn, lambda r: codes.AUTH_OK)
    assert conn.authenticated
    conn.receive_data(b"STARTTLS\r\n")
    drain(conn, lambda r: Reply(220, "2.0.0", "Ready to start TLS"))
    conn.tls_established()
    assert not conn.authenticated


def test_a_421_answer_closes_the_session() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN =\r\nNOOP\r\n")
    drain(conn, lambda r: Reply(421, "4.7.0", "mx.test Error: too many failed authentications"))
    assert conn.data_to_send() == b"421 4.7.0 mx.test Error: too many failed authentications\r\n"
    assert conn.closed


def test_a_response_line_up_to_the_limit_is_taken_and_a_longer_one_ends_the_exchange() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN\r\n")
    drain(conn, lambda r: codes.challenge(""))
    conn.data_to_send()
    conn.receive_data(b"A" * 12288 + b"\r\n")  # RFC 4954 4: 12288 octets must be taken
    events = drain(conn, lambda r: codes.challenge(""))
    assert events == [AuthResponse(b"A" * 12288)]
    conn.data_to_send()
    for piece in range(4):  # far past the bound, in pieces: never buffered whole
        conn.receive_data(b"B" * 8000)
        events = drain(conn)
        assert conn.buffered <= AUTH_LINE
        if piece == 1:
            assert events == [AuthAborted(codes.AUTH_LINE_TOO_LONG)]
    conn.receive_data(b"BBB\r\nNOOP\r\n")
    drain(conn)
    assert conn.data_to_send() == (b"500 5.5.6 Authentication Exchange line is too long\r\n"
                                   b"250 2.0.0 Ok\r\n")
    assert conn.state is State.WAIT_MAIL


def test_auth_line_bound_applies_only_where_auth_is_offered() -> None:
    conn = new_conn(mechanisms=())
    ehlo(conn)
    conn.receive_data(b"NOOP " + b"x" * 3000)
    drain(conn)
    assert conn.buffered <= 2048
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN " + b"QUFB" * 3000 + b"\r\n")
    events = drain(conn, lambda r: codes.AUTH_FAILED)
    assert events == [Auth("PLAIN", "QUFB" * 3000)]
    conn.receive_data(b"NOOP " + b"x" * 600 + b"\r\n")  # other verbs keep RFC 5321's 512
    drain(conn)
    assert conn.data_to_send().endswith(b"500 5.5.2 Line too long\r\n")


def test_mail_takes_rfc_4954_auth_parameter_only_where_auth_is_offered() -> None:
    conn = new_conn()
    ehlo(conn)
    conn.receive_data(b"AUTH PLAIN =\r\nMAIL FROM:<a@b.example> AUTH=<>\r\n"
                      b"RSET\r\nMAIL FROM:<a@b.example> AUTH=a+2Bb@c.example\r\n"
                      b"RSET\r\nMAIL FROM:<a@b.example> AUTH=bad+zz\r\n")
    events = drain(conn, lambda r: codes.AUTH_OK if isinstance(r, Auth) else codes.OK_MAIL)
    assert sum(isinstance(e, MailFrom) for e in events) == 2
    out = conn.data_to_send()
    assert out.count(b"250 2.1.0 Ok\r\n") == 2
    assert out.splitlines()[-1].startswith(b"501 5.5.4 ")  # not xtext
    conn = new_conn(mechanisms=())
    ehlo(conn)
    conn.receive_data(b"MAIL FROM:<a@b.example> AUTH=<>\r\n")
    drain(conn)
    assert conn.data_to_send() == b"504 5.5.4 Error: parameter not implemented: AUTH\r\n"
