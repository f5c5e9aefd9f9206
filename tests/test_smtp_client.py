"""The sans-I/O SMTP client core: byte scripts (commands out, replies in, results)."""

from __future__ import annotations

import base64

import pytest

from postroom.smtp.client import (
    Authenticated,
    ClientConnection,
    ClientEvent,
    ClientSettings,
    ClientState,
    Closed,
    ContentWanted,
    Greeting,
    LocalProtocolError,
    OutboundEnvelope,
    OutboundRecipient,
    Ready,
    ResetDone,
    SessionFailed,
    Stage,
    TlsReady,
    TlsRefused,
    TransactionDone,
    TransactionResult,
    Verdict,
    encode_utf8_addr_xtext,
    encode_xtext,
    parse_ehlo,
    verdict,
)
from postroom.smtp.codes import Reply

GREETING = b"220 mx.example.org ESMTP\r\n"
EHLO_ALL = (
    b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-8BITMIME\r\n"
    b"250-SMTPUTF8\r\n250-DSN\r\n250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
)
EHLO_PIPE = b"250-mx.example.org\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.example.org\r\n250 8BITMIME\r\n"


def envelope(*rcpts: str, sender: str = "alice@example.com", **kw: object) -> OutboundEnvelope:
    recipients = tuple(OutboundRecipient(r) for r in rcpts or ("bob@example.org",))
    return OutboundEnvelope(sender, recipients, **kw)  # type: ignore[arg-type]


def drain(conn: ClientConnection) -> list[ClientEvent]:
    out = []
    while (event := conn.next_event()) is not None:
        out.append(event)
    return out


def ready(ehlo: bytes = EHLO_PIPE, **settings: object) -> ClientConnection:
    conn = ClientConnection(ClientSettings(helo_name="client.example.com", **settings))  # type: ignore[arg-type]
    conn.receive_data(GREETING)
    assert conn.data_to_send() == b"EHLO client.example.com\r\n"
    conn.receive_data(ehlo)
    events = drain(conn)
    assert isinstance(events[0], Greeting) and isinstance(events[-1], Ready)
    assert conn.state is ClientState.READY
    return conn


def done(events: list[ClientEvent]) -> TransactionResult:
    results = [e.result for e in events if isinstance(e, TransactionDone)]
    assert len(results) == 1, events
    return results[0]


def summary(result: TransactionResult) -> list[tuple[str, int, Stage, bool]]:
    return [(o.recipient.address, o.reply.code, o.stage, o.local) for o in result.outcomes]


# -- verdicts -----------------------------------------------------------------------------------
def test_verdict_is_the_one_rule() -> None:
    assert verdict(250) is Verdict.DELIVERED
    assert verdict(451) is Verdict.TEMPORARY
    assert verdict(554) is Verdict.PERMANENT
    assert verdict(354) is Verdict.TEMPORARY  # unexpected: never a bounce, never delivered
    assert Stage.RCPT.in_reply_to == "in reply to RCPT TO command"
    assert Stage.END.in_reply_to == "in reply to end of DATA command"


def test_ehlo_keywords() -> None:
    ext = parse_ehlo(Reply(250, None, ("mx", "SIZE", "pipelining", "AUTH=LOGIN", "AUTH PLAIN LOGIN",
                                       "STARTTLS", "DSN", "SMTPUTF8", "CHUNKING")))
    assert ext.size == 0 and ext.pipelining and ext.starttls and ext.dsn and ext.chunking
    assert ext.smtputf8 and not ext.eightbitmime
    assert ext.auth == {"PLAIN", "LOGIN"}
    assert parse_ehlo(Reply(250, None, ("mx", "SIZE 52428800"))).size == 52428800
    assert parse_ehlo(Reply(250, None, "mx")).size is None


def test_xtext() -> None:
    assert encode_xtext("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+C3+A9"
    assert encode_utf8_addr_xtext("j\u00f6rg+x@b") == "j\\x{F6}rg\\x{2B}x@b"


# -- greeting and hello -----------------------------------------------------------------------
def test_refused_greeting_says_quit_and_fails() -> None:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    assert conn.timeout == 300.0  # RFC 5321 4.5.3.2.1
    conn.receive_data(b"554 5.7.1 go away\r\n")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed)
    assert event.stage is Stage.GREETING and event.reply.code == 554 and not event.local
    assert conn.data_to_send() == b"QUIT\r\n"
    assert conn.closed


def test_multiline_greeting_and_421_greeting() -> None:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    conn.receive_data(b"220-mx.example.org\r\n220-welcome\r\n")
    assert drain(conn) == [] and conn.data_to_send() == b""
    conn.receive_data(b"220 more\r\n")
    assert isinstance(drain(conn)[0], Greeting)
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    conn.receive_data(b"421 4.3.2 busy\r\n")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed) and event.reply.code == 421
    assert conn.data_to_send() == b""  # the server is closing: no QUIT


@pytest.mark.parametrize("code", [b"500", b"502"])
def test_ehlo_falls_back_to_helo(code: bytes) -> None:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    conn.receive_data(GREETING)
    assert conn.data_to_send() == b"EHLO c.example\r\n"
    conn.receive_data(code + b" 5.5.1 command not recognized\r\n")
    assert conn.data_to_send() == b"HELO c.example\r\n"
    conn.receive_data(b"250 mx.example.org\r\n")
    events = drain(conn)
    assert isinstance(events[-1], Ready) and events[-1].esmtp is False
    conn.send_mail(envelope(size=100, body="8BITMIME"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.com>\r\n"  # no parameters after HELO


def test_helo_refused_is_session_failure() -> None:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    conn.receive_data(GREETING + b"502 no\r\n")
    conn.data_to_send()
    conn.receive_data(b"550 no helo either\r\n")
    events = drain(conn)
    assert isinstance(events[-1], SessionFailed) and events[-1].stage is Stage.HELO
    assert conn.data_to_send() == b"QUIT\r\n"


# -- transactions -------------------------------------------------------------------------------
def test_pipelined_group_is_one_write_and_results_per_recipient() -> None:
    conn = ready()
    env = envelope("a@example.org", "b@example.org", "c@example.org", size=500, body="8BITMIME")
    conn.send_mail(env)
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.com> SIZE=500 BODY=8BITMIME\r\n"
        b"RCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nRCPT TO:<c@example.org>\r\n"
        b"DATA\r\n"
    )
    assert conn.timeout == 300.0  # MAIL
    conn.receive_data(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n450 4.2.0 greylisted\r\n")
    assert drain(conn) == []
    conn.receive_data(b"550 5.1.1 unknown\r\n354 go ahead\r\n")
    assert drain(conn) == [ContentWanted("DATA")]
    assert conn.timeout == 180.0  # data block
    conn.send_content(b"Subject: x\r\n\r\n.hidden\r\n")
    conn.end_content()
    assert conn.data_to_send() == b"Subject: x\r\n\r\n..hidden\r\n.\r\n"
    assert conn.timeout == 600.0  # RFC 5321 4.5.3.2.6
    conn.receive_data(b"250 2.0.0 Ok: queued as ABC\r\n")
    result = done(drain(conn))
    assert summary(result) == [
        ("a@example.org", 250, Stage.END, False),
        ("b@example.org", 450, Stage.RCPT, False),
        ("c@example.org", 550, Stage.RCPT, False),
    ]
    assert [o.verdict for o in result.outcomes] == [Verdict.DELIVERED, Verdict.TEMPORARY,
                                                    Verdict.PERMANENT]
    assert result.outcomes[0].reply == Reply(250, "2.0.0", "Ok: queued as ABC")
    assert conn.state is ClientState.READY


def test_without_pipelining_one_command_at_a_time() -> None:
    conn = ready(EHLO_PLAIN)
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.com>\r\n"
    conn.receive_data(b"250 ok\r\n")
    assert conn.data_to_send() == b"RCPT TO:<a@example.org>\r\n"
    conn.receive_data(b"250 ok\r\n")
    assert conn.data_to_send() == b"RCPT TO:<b@example.org>\r\n"
    conn.receive_data(b"250 ok\r\n")
    assert conn.data_to_send() == b"DATA\r\n"
    assert conn.timeout == 120.0  # DATA initiation
    conn.receive_data(b"354 go\r\n")
    assert drain(conn) == [ContentWanted("DATA")]


def test_pipelining_can_be_turned_off() -> None:
    conn = ready(EHLO_PIPE, pipelining=False)
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    assert conn.data_to_send() == b"MAIL FROM:<alice@example.com>\r\n"


def test_every_recipient_refused_sends_no_data() -> None:
    conn = ready(EHLO_PLAIN)
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n")
    conn.data_to_send()
    conn.receive_data(b"550 5.1.1 no\r\n")
    conn.data_to_send()
    conn.receive_data(b"452 4.2.2 full\r\n")
    assert conn.data_to_send() == b""  # no DATA
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 550, Stage.RCPT, False),
                               ("b@example.org", 452, Stage.RCPT, False)]
    # the transaction is half open on the server: the next one starts with RSET
    conn.send_mail(envelope("c@example.org"))
    assert conn.data_to_send() == b"RSET\r\n"


def test_pipelined_all_refused_data_refused() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n550 5.1.1 no\r\n554 5.5.1 no valid recipients\r\n")
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 550, Stage.RCPT, False)]
    assert conn.data_to_send() == b""


def test_pipelined_all_refused_but_354_gets_a_lone_dot() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n550 5.1.1 no\r\n354 go ahead anyway\r\n")
    assert drain(conn) == []
    assert conn.data_to_send() == b".\r\n"  # RFC 2920 3.1: end the empty message
    conn.receive_data(b"554 5.5.1 no recipients\r\n")
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 550, Stage.RCPT, False)]


def test_mail_refused_decides_everyone() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    conn.data_to_send()
    conn.receive_data(b"553 5.7.1 sender rejected\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                      b"503 5.5.1 need MAIL\r\n")
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 553, Stage.MAIL, False),
                               ("b@example.org", 553, Stage.MAIL, False)]


def test_mail_refused_without_pipelining() -> None:
    conn = ready(EHLO_PLAIN)
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"451 4.3.0 try later\r\n")
    assert conn.data_to_send() == b""
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 451, Stage.MAIL, False)]
    assert result.outcomes[0].verdict is Verdict.TEMPORARY


@pytest.mark.parametrize(("reply", "expected"), [
    (b"250 2.0.0 queued\r\n", Verdict.DELIVERED),
    (b"452 4.3.1 insufficient storage\r\n", Verdict.TEMPORARY),
    (b"554 5.6.0 content rejected\r\n", Verdict.PERMANENT),
])
def test_end_of_data_decides_accepted_recipients(reply: bytes, expected: Verdict) -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
    drain(conn)
    conn.send_content(b"hello\r\n")
    conn.end_content()
    conn.receive_data(reply)
    result = done(drain(conn))
    assert result.outcomes[0].verdict is expected and result.outcomes[0].stage is Stage.END
    assert result.outcomes[1].verdict is Verdict.PERMANENT
    assert result.outcomes[1].stage is Stage.RCPT


def test_data_command_refused() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n451 4.3.0 not now\r\n")
    result = done(drain(conn))
    assert summary(result) == [("a@example.org", 451, Stage.DATA, False)]


def test_421_mid_envelope_defers_everyone_open_and_ends_session() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org", "b@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n550 no\r\n421 4.3.2 shutting down\r\n")
    events = drain(conn)
    result = done(events)
    assert summary(result) == [("a@example.org", 550, Stage.RCPT, False),
                               ("b@example.org", 421, Stage.RCPT, False)]
    assert isinstance(events[-1], SessionFailed) and conn.closed
    assert conn.data_to_send() == b""


def test_lost_connection_while_sending_content() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    drain(conn)
    conn.send_content(b"x\r\n")
    conn.connection_lost()
    events = drain(conn)
    (outcome,) = done(events).outcomes
    assert outcome.local and outcome.stage is Stage.END and outcome.reply.code == 421
    assert outcome.verdict is Verdict.TEMPORARY
    assert "lost connection while sending message body" in outcome.reply.lines[0]


def test_timeout_waiting_for_end_of_data() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    drain(conn)
    conn.end_content()
    conn.timed_out()
    events = drain(conn)
    (outcome,) = done(events).outcomes
    assert outcome.local and outcome.verdict is Verdict.TEMPORARY
    assert "timed out while sending end of data" in outcome.reply.lines[0]
    assert isinstance(events[-1], SessionFailed) and conn.closed


def test_garbage_reply_is_a_local_protocol_failure() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"HTTP/1.1 400 Bad Request\r\n")
    events = drain(conn)
    (outcome,) = done(events).outcomes
    assert outcome.local and outcome.reply.enhanced == "4.5.0" and outcome.stage is Stage.MAIL


def test_unexpected_reply_when_nothing_was_asked() -> None:
    conn = ready()
    conn.receive_data(b"250 surprise\r\n")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed) and event.local and event.stage is Stage.CONNECT


# -- SIZE, SMTPUTF8, DSN ------------------------------------------------------------------------
def test_size_over_the_servers_limit_fails_before_mail() -> None:
    conn = ready()  # SIZE 1000
    conn.send_mail(envelope("a@example.org", size=1001))
    assert conn.data_to_send() == b""
    (outcome,) = done(drain(conn)).outcomes
    assert outcome.local and outcome.reply.code == 552 and outcome.reply.enhanced == "5.3.4"
    assert outcome.verdict is Verdict.PERMANENT
    assert conn.state is ClientState.READY


def test_smtputf8_needed_but_not_offered_fails_5_6_7() -> None:
    conn = ready()
    conn.send_mail(envelope("j\u00f6rg@example.org", smtputf8=True))
    assert conn.data_to_send() == b""
    (outcome,) = done(drain(conn)).outcomes
    assert outcome.local and outcome.reply.enhanced == "5.6.7"
    assert outcome.verdict is Verdict.PERMANENT
    conn.send_mail(envelope("a@example.org", smtputf8=True, utf8_headers=True))
    (outcome,) = done(drain(conn)).outcomes
    assert outcome.reply.enhanced == "5.6.7"


def test_smtputf8_downgrades_when_nothing_needs_it() -> None:
    conn = ready()
    conn.send_mail(envelope("a@example.org", smtputf8=True))
    assert conn.data_to_send().startswith(b"MAIL FROM:<alice@example.com>\r\n")


def test_smtputf8_offered_is_requested() -> None:
    conn = ready(EHLO_ALL, chunking=False)
    conn.send_mail(envelope("j\u00f6rg@example.org", smtputf8=True))
    assert conn.data_to_send() == (
        "MAIL FROM:<alice@example.com> SMTPUTF8\r\nRCPT TO:<j\u00f6rg@example.org>\r\nDATA\r\n"
    ).encode()


def test_non_ascii_without_smtputf8_flag_is_refused() -> None:
    conn = ready(EHLO_ALL)
    conn.send_mail(envelope("j\u00f6rg@example.org"))
    (outcome,) = done(drain(conn)).outcomes
    assert outcome.reply.enhanced == "5.6.7"


def test_dsn_parameters_only_when_offered() -> None:
    rcpt = OutboundRecipient("b@example.org", frozenset({"FAILURE", "SUCCESS"}),
                             "rfc822;B+x@example.org")
    env = OutboundEnvelope("a@example.com", (rcpt,), size=10, ret="HDRS", envid="id=1")
    conn = ready(EHLO_ALL, chunking=False)
    conn.send_mail(env)
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@example.com> SIZE=10 RET=HDRS ENVID=id+3D1\r\n"
        b"RCPT TO:<b@example.org> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B+2Bx@example.org\r\n"
        b"DATA\r\n"
    )
    conn.receive_data(b"250 ok\r\n250 ok\r\n554 no\r\n")
    assert done(drain(conn)).dsn_passed
    conn = ready()
    conn.send_mail(env)
    assert conn.data_to_send() == (
        b"MAIL FROM:<a@example.com> SIZE=10\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    conn.receive_data(b"250 ok\r\n250 ok\r\n554 no\r\n")
    assert not done(drain(conn)).dsn_passed


def test_non_ascii_orcpt_goes_as_utf8_type() -> None:
    rcpt = OutboundRecipient("b@example.org", frozenset({"NEVER"}), "rfc822;j\u00f6rg@example.org")
    conn = ready(EHLO_ALL, chunking=False)
    conn.send_mail(OutboundEnvelope("", (rcpt,)))
    assert conn.data_to_send().splitlines()[1] == (
        b"RCPT TO:<b@example.org> NOTIFY=NEVER ORCPT=utf-8;j\\x{F6}rg@example.org"
    )


def test_bad_addresses_never_reach_the_wire() -> None:
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send_mail(envelope("b@example.org\r\nRSET"))
    with pytest.raises(LocalProtocolError):
        conn.send_mail(envelope("b@example.org", sender="a b@example.com"))
    with pytest.raises(LocalProtocolError):
        conn.send_mail(OutboundEnvelope("a@example.com", ()))
    assert conn.data_to_send() == b""


# -- BDAT -----------------------------------------------------------------------------------------
def test_bdat_when_chunking_and_pipelining() -> None:
    conn = ready(EHLO_ALL)
    conn.send_mail(envelope("a@example.org", "b@example.org", size=12))
    assert conn.data_to_send() == (
        b"MAIL FROM:<alice@example.com> SIZE=12\r\nRCPT TO:<a@example.org>\r\n"
        b"RCPT TO:<b@example.org>\r\n"  # no DATA: the content goes as BDAT
    )
    conn.receive_data(b"250 ok\r\n250 ok\r\n")
    assert drain(conn) == []
    conn.receive_data(b"550 no\r\n")
    assert drain(conn) == [ContentWanted("BDAT")]
    conn.send_content(b".line\r\n")
    assert conn.data_to_send() == b""  # held until it is known whether it is the last
    conn.send_content(b"end\r\n")
    conn.end_content()
    assert conn.data_to_send() == b"BDAT 7\r\n.line\r\nBDAT 5 LAST\r\nend\r\n"  # no stuffing
    conn.receive_data(b"250 2.0.0 7 octets received\r\n")
    assert drain(conn) == []
    conn.receive_data(b"250 2.0.0 Ok: queued\r\n")
    result = done(drain(conn))
    assert result.chunked
    assert summary(result) == [("a@example.org", 250, Stage.BDAT, False),
                               ("b@example.org", 550, Stage.RCPT, False)]


def test_bdat_empty_message_and_failed_chunk() -> None:
    conn = ready(EHLO_ALL)
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n")
    drain(conn)
    conn.end_content()
    assert conn.data_to_send() == b"BDAT 0 LAST\r\n"
    conn.receive_data(b"250 ok\r\n")
    assert done(drain(conn)).outcomes[0].verdict is Verdict.DELIVERED

    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n")
    drain(conn)
    conn.send_content(b"a\r\n")
    conn.send_content(b"b\r\n")
    conn.end_content()
    assert conn.data_to_send() == b"BDAT 3\r\na\r\nBDAT 3 LAST\r\nb\r\n"
    conn.receive_data(b"552 5.3.4 too big\r\n503 5.5.1 no\r\n")
    (outcome,) = done(drain(conn)).outcomes
    assert outcome.reply.code == 552 and outcome.stage is Stage.BDAT
    conn.send_mail(envelope("a@example.org"))
    assert conn.data_to_send().startswith(b"RSET\r\nMAIL FROM:")


def test_bdat_all_refused() -> None:
    conn = ready(EHLO_ALL)
    conn.send_mail(envelope("a@example.org"))
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n550 no\r\n")
    assert summary(done(drain(conn))) == [("a@example.org", 550, Stage.RCPT, False)]
    assert conn.data_to_send() == b""


# -- STARTTLS, AUTH, RSET, QUIT ------------------------------------------------------------------
def test_starttls_then_ehlo_again() -> None:
    conn = ready(b"250-mx\r\n250-STARTTLS\r\n250 PIPELINING\r\n")
    assert conn.extensions.starttls
    conn.starttls()
    assert conn.data_to_send() == b"STARTTLS\r\n"
    conn.receive_data(b"220 2.0.0 Ready to start TLS\r\n")
    assert drain(conn) == [TlsReady(Reply(220, "2.0.0", "Ready to start TLS"))]
    assert conn.state is ClientState.WAIT_TLS
    conn.tls_established()
    assert conn.tls_active and not conn.extensions.starttls
    assert conn.data_to_send() == b"EHLO client.example.com\r\n"
    conn.receive_data(b"250-mx\r\n250 AUTH PLAIN\r\n")
    (event,) = drain(conn)
    assert isinstance(event, Ready) and event.extensions.auth == {"PLAIN"}
    with pytest.raises(LocalProtocolError):
        conn.starttls()


def test_starttls_refused_goes_on_in_plaintext() -> None:
    conn = ready(b"250-mx\r\n250 STARTTLS\r\n")
    conn.starttls()
    conn.data_to_send()
    conn.receive_data(b"454 4.7.0 TLS not available\r\n")
    (event,) = drain(conn)
    assert isinstance(event, TlsRefused) and conn.state is ClientState.READY
    with pytest.raises(LocalProtocolError):
        conn.tls_established()


def test_auth_plain() -> None:
    conn = ready(b"250-mx\r\n250 AUTH LOGIN PLAIN\r\n")
    conn.authenticate("user", "s\u00e9cret")
    token = base64.b64encode("\0user\0s\u00e9cret".encode())
    assert conn.data_to_send() == b"AUTH PLAIN " + token + b"\r\n"
    conn.receive_data(b"235 2.7.0 Authentication successful\r\n")
    assert isinstance(drain(conn)[0], Authenticated)
    assert conn.state is ClientState.READY


def test_auth_login_and_failure() -> None:
    conn = ready(b"250-mx\r\n250 AUTH LOGIN\r\n")
    conn.authenticate("user", "pw")
    assert conn.data_to_send() == b"AUTH LOGIN\r\n"
    conn.receive_data(b"334 VXNlcm5hbWU6\r\n")
    assert conn.data_to_send() == base64.b64encode(b"user") + b"\r\n"
    conn.receive_data(b"334 UGFzc3dvcmQ6\r\n")
    assert conn.data_to_send() == base64.b64encode(b"pw") + b"\r\n"
    conn.receive_data(b"535 5.7.8 Authentication credentials invalid\r\n")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed) and event.stage is Stage.AUTH
    assert conn.data_to_send() == b"QUIT\r\n"


def test_auth_without_a_common_mechanism() -> None:
    conn = ready(b"250-mx\r\n250 AUTH CRAM-MD5\r\n")
    conn.authenticate("user", "pw")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed) and event.local and event.reply.code == 530


def test_reset_and_quit() -> None:
    conn = ready()
    conn.reset()
    assert conn.data_to_send() == b"RSET\r\n"
    conn.receive_data(b"250 2.0.0 Ok\r\n")
    assert isinstance(drain(conn)[0], ResetDone)
    conn.quit()
    assert conn.data_to_send() == b"QUIT\r\n"
    conn.receive_data(b"221 2.0.0 Bye\r\n")
    assert drain(conn) == [Closed()] and conn.closed


def test_reset_refused_ends_the_session() -> None:
    conn = ready()
    conn.reset()
    conn.data_to_send()
    conn.receive_data(b"500 what\r\n")
    (event,) = drain(conn)
    assert isinstance(event, SessionFailed) and event.stage is Stage.RSET


def test_connection_reuse_after_a_clean_transaction_needs_no_rset() -> None:
    conn = ready()
    for n in range(2):
        conn.send_mail(envelope("a@example.org"))
        assert conn.data_to_send().startswith(b"MAIL FROM:")
        conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
        drain(conn)
        conn.send_content(b"msg %d\r\n" % n)
        conn.end_content()
        assert conn.data_to_send() == b"msg %d\r\n.\r\n" % n
        conn.receive_data(b"250 ok\r\n")
        assert done(drain(conn)).outcomes[0].verdict is Verdict.DELIVERED
    assert conn.transactions == 2


def test_no_quit_inside_content_or_before_tls() -> None:
    conn = ready()
    conn.send_mail(envelope())
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    drain(conn)
    with pytest.raises(LocalProtocolError):
        conn.quit()  # "QUIT" would become a line of the message
    conn = ready(b"250-mx\r\n250 STARTTLS\r\n")
    conn.starttls()
    conn.receive_data(b"220 go\r\n")
    with pytest.raises(LocalProtocolError):
        conn.quit()


def test_calls_out_of_order_are_local_errors() -> None:
    conn = ClientConnection(ClientSettings(helo_name="c.example"))
    with pytest.raises(LocalProtocolError):
        conn.send_mail(envelope())
    conn = ready()
    with pytest.raises(LocalProtocolError):
        conn.send_content(b"x")
    conn.send_mail(envelope())
    with pytest.raises(LocalProtocolError):
        conn.send_mail(envelope())


# -- DATA encoding ------------------------------------------------------------------------------
@pytest.mark.parametrize("cut", range(1, 12))
def test_dot_stuffing_across_chunk_boundaries(cut: int) -> None:
    content = b"a\r\n.b\r\n..\r\n.\r\nend"
    conn = ready()
    conn.send_mail(envelope())
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    drain(conn)
    conn.send_content(content[:cut])
    conn.send_content(content[cut:])
    conn.end_content()
    assert conn.data_to_send() == b"a\r\n..b\r\n...\r\n..\r\nend\r\n.\r\n"


def test_bare_lf_in_content_goes_as_crlf() -> None:
    conn = ready()
    conn.send_mail(envelope())
    conn.data_to_send()
    conn.receive_data(b"250 ok\r\n250 ok\r\n354 go\r\n")
    drain(conn)
    conn.send_content(b"a\n.\nb\r\n")
    conn.end_content()
    assert conn.data_to_send() == b"a\r\n..\r\nb\r\n.\r\n"
