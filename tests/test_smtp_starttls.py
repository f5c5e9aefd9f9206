"""STARTTLS in the core (RFC 3207): offered only before TLS, plaintext pipelined after it is
dropped, the session starts over after the handshake."""

from __future__ import annotations

from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import Hello, Request, StartTls
from postroom.smtp.server import ServerConnection
from postroom.smtp.states import State
from postroom.testing import settings

READY = Reply(220, "2.0.0", "Ready to start TLS")


def answer(conn: ServerConnection, starttls: Reply = READY) -> list[Request]:
    """Drain events, answering Hello with 250 and StartTls with *starttls*."""
    seen: list[Request] = []
    while (event := conn.next_event()) is not None:
        if isinstance(event, Request):
            seen.append(event)
            conn.respond(starttls if isinstance(event, StartTls) else codes.OK)
    return seen


def new_conn(offer: bool = True) -> ServerConnection:
    conn = ServerConnection(settings())
    if offer:
        conn.extensions.append("STARTTLS")
    conn.start()
    conn.data_to_send()
    return conn


def test_plaintext_pipelined_after_starttls_is_never_executed() -> None:
    conn = new_conn()
    conn.receive_data(b"EHLO c.test\r\n")
    answer(conn)
    assert b"250 STARTTLS\r\n" in conn.data_to_send()
    conn.receive_data(b"STARTTLS\r\nRSET\r\nMAIL FROM:<a@b.example>\r\n")
    requests = answer(conn)
    assert [type(r) for r in requests] == [StartTls]
    assert conn.data_to_send() == b"220 2.0.0 Ready to start TLS\r\n"
    assert conn.state is State.WAIT_TLS
    conn.receive_data(b"NOOP\r\n")  # arrives before the handshake is over: never a command
    assert answer(conn) == []
    conn.tls_established()
    assert conn.tls_active and conn.state is State.WAIT_HELO
    assert answer(conn) == [] and conn.data_to_send() == b""
    conn.receive_data(b"MAIL FROM:<a@b.example>\r\n")  # the session started over
    answer(conn)
    assert conn.data_to_send() == b"503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_ehlo_lists_starttls_only_before_tls_and_a_second_one_is_503() -> None:
    conn = new_conn()
    conn.receive_data(b"EHLO c.test\r\n")
    answer(conn)
    assert b"250 STARTTLS\r\n" in conn.data_to_send()
    conn.receive_data(b"STARTTLS\r\n")
    answer(conn)
    conn.data_to_send()
    conn.tls_established()
    conn.receive_data(b"EHLO c.test\r\n")
    requests = answer(conn)
    assert isinstance(requests[0], Hello)
    greeting = conn.data_to_send()
    assert b"STARTTLS" not in greeting and greeting.endswith(b"250 DSN\r\n")
    conn.receive_data(b"STARTTLS\r\n")
    answer(conn)
    assert conn.data_to_send() == b"503 5.5.1 Error: TLS already active\r\n"


def test_starttls_refusals() -> None:
    conn = new_conn(offer=False)
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS\r\n")
    answer(conn)
    assert conn.data_to_send().endswith(b"502 5.5.1 Error: command not implemented\r\n")
    conn = new_conn()
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS now\r\n")
    answer(conn)
    assert conn.data_to_send().endswith(b"501 5.5.4 Syntax: STARTTLS\r\n")
    conn = new_conn()
    conn.receive_data(b"EHLO c.test\r\nMAIL FROM:<a@b.example>\r\nSTARTTLS\r\n")
    answer(conn)
    assert conn.data_to_send().endswith(b"503 5.5.1 Error: MAIL transaction in progress\r\n")
    conn = new_conn()
    conn.receive_data(b"EHLO c.test\r\nSTARTTLS\r\nNOOP\r\n")
    answer(conn, Reply(454, "4.7.0", "TLS not available due to temporary reason"))
    out = conn.data_to_send()
    assert out.endswith(b"454 4.7.0 TLS not available due to temporary reason\r\n"
                        b"250 2.0.0 Ok\r\n")  # refused: the session goes on in plaintext
    assert not conn.tls_active
