"""The SMTP server core's command dialogue, as byte scripts: client octets in, exact octets out.

Every script runs whole, in 7-octet segments and one octet at a time (``run_all_ways``), and the
three runs must agree.
"""

from __future__ import annotations

import pytest

from postroom.message.address import Address
from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import (
    DataStart,
    EndOfData,
    Hello,
    MailFrom,
    ProtocolViolation,
    Quit,
    RcptTo,
    Request,
    Reset,
    Vrfy,
)
from postroom.smtp.server import (
    COMMAND_LINE,
    COMMAND_LINE_WITH_PARAMS,
    LocalProtocolError,
    ServerConnection,
)
from postroom.smtp.states import State
from postroom.testing import DefaultPolicy, run_all_ways, run_script, settings

BANNER = b"220 mx.example.test ESMTP postroom\r\n"
EHLO = (
    b"250-mx.example.test\r\n250-SIZE 10240000\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250 DSN\r\n"
)
MAIL_OK = b"250 2.1.0 Ok\r\n"
RCPT_OK = b"250 2.1.5 Ok\r\n"
START = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 2.0.0 Bye\r\n"
OK = b"250 2.0.0 Ok\r\n"
TXN = b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"


def dialog(client: bytes, **options: object) -> bytes:
    """What the server sends after its banner; the same whole, chunked and octet by octet."""
    out = run_all_ways(client, **options).output
    assert out.startswith(BANNER)
    return out[len(BANNER) :]


# -- greeting, HELO, EHLO -------------------------------------------------------------------------
def test_banner_names_the_host_without_enhanced_code() -> None:
    assert dialog(b"") == b""
    assert run_script(b"").output == BANNER


def test_ehlo_lists_the_extensions_and_helo_greets() -> None:
    assert dialog(b"EHLO client.example\r\n") == EHLO
    assert dialog(b"HELO client.example\r\n") == b"250 mx.example.test\r\n"
    assert dialog(b"ehlo client.example\r\n") == EHLO  # verbs are case-insensitive


def test_ehlo_advertises_the_configured_size_and_extra_keywords() -> None:
    conn = ServerConnection(settings(max_message_size=1234))
    conn.extensions.append("STARTTLS")
    conn.receive_data(b"EHLO c\r\n")
    event = conn.next_event()
    assert event == Hello("EHLO", "c")
    conn.respond(Reply(250, None, "anything"))  # a 2xx answer becomes the greeting
    assert conn.data_to_send() == (
        b"250-mx.example.test\r\n250-SIZE 1234\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-DSN\r\n"
        b"250 STARTTLS\r\n"
    )


@pytest.mark.parametrize("line", [b"HELO\r\n", b"HELO \r\n", b"EHLO\r\n", b"EHLO   \r\n"])
def test_hello_needs_a_name(line: bytes) -> None:
    verb = line[:4].decode()
    assert dialog(line) == f"501 5.5.4 Syntax: {verb} hostname\r\n".encode()


def test_refused_hello_sends_the_policy_reply_and_stays_unGreeted() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, Hello):
            return Reply(550, "5.7.1", "Go away")
        return DefaultPolicy()(request)

    out = dialog(b"EHLO bad\r\nMAIL FROM:<a@b.example>\r\n", policy=policy)
    assert out == b"550 5.7.1 Go away\r\n503 5.5.1 Error: send HELO/EHLO first\r\n"


def test_second_ehlo_resets_the_transaction() -> None:
    t = run_all_ways(TXN + b"EHLO again.example\r\nRCPT TO:<c@example.net>\r\n")
    assert t.output[len(BANNER) :] == (
        EHLO + MAIL_OK + RCPT_OK + EHLO + b"503 5.5.1 Error: need MAIL command\r\n"
    )
    kinds = [type(e) for e in t.events]
    assert kinds == [Hello, MailFrom, RcptTo, Reset, Hello]


def test_helo_turns_off_esmtp_parameters() -> None:
    out = dialog(b"HELO c\r\nMAIL FROM:<a@b.example> SIZE=10\r\nMAIL FROM:<a@b.example>\r\n")
    assert out == (
        b"250 mx.example.test\r\n555 5.5.4 Error: parameters need EHLO\r\n" + MAIL_OK
    )


# -- a whole transaction --------------------------------------------------------------------------
def test_a_message_from_start_to_quit() -> None:
    t = run_all_ways(TXN + b"DATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert t.output == (
        BANNER + EHLO + MAIL_OK + RCPT_OK + START
        + b"250 2.0.0 Ok: queued as TESTQUEUE001\r\n" + BYE
    )
    assert t.messages == [b"Subject: hi\r\n\r\nbody\r\n"]
    assert t.closed
    mail = t.events[1]
    assert mail == MailFrom(Address("a", "example.org"), None, None, False, None, None)
    assert t.events[2] == RcptTo(Address("b", "example.net"), None, None, False)
    assert t.events[3:] == [
        DataStart("DATA"),
        t.events[4],
        EndOfData(len(b"Subject: hi\r\n\r\nbody\r\n")),
        Quit(),
    ]


def test_two_messages_in_one_session() -> None:
    msg = b"DATA\r\nx\r\n.\r\n"
    t = run_all_ways(TXN + msg + b"MAIL FROM:<>\r\nRCPT TO:<c@d.example>\r\n" + msg)
    assert t.output.endswith(
        b"250 2.0.0 Ok: queued as TESTQUEUE001\r\n" + MAIL_OK + RCPT_OK + START
        + b"250 2.0.0 Ok: queued as TESTQUEUE002\r\n"
    )
    assert t.messages == [b"x\r\n", b"x\r\n"]


def test_pipelined_replies_keep_their_order() -> None:
    # RFC 2920: replies come in command order whatever the segmentation.
    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo) and request.address.local == "ghost":
            return codes.USER_UNKNOWN
        return DefaultPolicy()(request)

    script = (
        b"EHLO c.test\r\n"
        b"MAIL FROM:<a@remote.example>\r\nRCPT TO:<alice@example.com>\r\n"
        b"RCPT TO:<ghost@example.com>\r\nDATA\r\nSubject: p\r\n\r\none\r\n.\r\n"
        b"NOOP\r\nRSET\r\nMAIL FROM:<b@remote.example>\r\nRCPT TO:<bob@example.com>\r\n"
        b"BDAT 12 LAST\r\nSubject: b\r\nQUIT\r\n"
    )
    t = run_all_ways(script, policy=policy)
    assert t.reply_codes == [
        "220", "250", "250 2.1.0", "250 2.1.5", "550 5.1.1", "354", "250 2.0.0",
        "250 2.0.0", "250 2.0.0", "250 2.1.0", "250 2.1.5", "250 2.0.0", "221 2.0.0",
    ]
    assert t.messages == [b"Subject: p\r\n\r\none\r\n", b"Subject: b\r\n"]


def test_nothing_is_parsed_while_a_request_waits() -> None:
    conn = ServerConnection(settings())
    conn.start()
    conn.data_to_send()
    conn.receive_data(b"EHLO c\r\nNOOP\r\nNOOP\r\n")
    assert isinstance(conn.next_event(), Hello)
    assert conn.next_event() is None  # NOOPs wait behind the pending Hello
    assert conn.data_to_send() == b""
    assert conn.buffered == len(b"NOOP\r\nNOOP\r\n")
    conn.respond(codes.OK)
    assert conn.next_event() is None
    assert conn.data_to_send() == EHLO + OK + OK
    assert conn.buffered == 0


def test_respond_without_a_request_is_our_bug() -> None:
    conn = ServerConnection(settings())
    with pytest.raises(LocalProtocolError):
        conn.respond(codes.OK)


def test_respond_after_close_is_ignored() -> None:
    conn = ServerConnection(settings())
    conn.receive_data(b"EHLO c\r\n")
    assert isinstance(conn.next_event(), Hello)
    conn.timeout()
    conn.respond(codes.OK)  # the transport was still deciding when the session ended
    assert conn.data_to_send() == b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    assert conn.closed


# -- sequence errors ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("script", "reply"),
    [
        (b"MAIL FROM:<a@b.example>\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"RCPT TO:<a@b.example>\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"DATA\r\n", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
        (b"EHLO c\r\nRCPT TO:<a@b.example>\r\n", EHLO + b"503 5.5.1 Error: need MAIL command\r\n"),
        (b"EHLO c\r\nDATA\r\n", EHLO + b"503 5.5.1 Error: need MAIL command\r\n"),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nDATA\r\n",
            EHLO + MAIL_OK + b"503 5.5.1 Error: need RCPT command\r\n",
        ),
        (
            b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nMAIL FROM:<a@b.example>\r\n",
            EHLO + MAIL_OK + b"503 5.5.1 Error: nested MAIL command\r\n",
        ),
        (TXN + b"MAIL FROM:<x@y.example>\r\n",
         EHLO + MAIL_OK + RCPT_OK + b"503 5.5.1 Error: nested MAIL command\r\n"),
    ],
)
def test_commands_out_of_sequence_get_503(script: bytes, reply: bytes) -> None:
    assert dialog(script) == reply


def test_data_with_every_recipient_refused_gets_503() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo):
            return codes.RELAY_DENIED
        return DefaultPolicy()(request)

    out = dialog(TXN + b"DATA\r\n", policy=policy)
    assert out == (
        EHLO + MAIL_OK + b"554 5.7.1 Relay access denied\r\n"
        + b"503 5.5.1 Error: need RCPT command\r\n"
    )


def test_refused_mail_leaves_no_transaction() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, MailFrom):
            return Reply(550, "5.7.1", "Sender refused")
        return DefaultPolicy()(request)

    out = dialog(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<x@y.example>\r\n", policy=policy)
    assert out == EHLO + b"550 5.7.1 Sender refused\r\n503 5.5.1 Error: need MAIL command\r\n"


# -- simple commands ------------------------------------------------------------------------------
def test_rset_discards_the_transaction() -> None:
    t = run_all_ways(TXN + b"RSET\r\nRCPT TO:<b@example.net>\r\nRSET\r\n")
    assert t.output[len(BANNER) :] == (
        EHLO + MAIL_OK + RCPT_OK + OK + b"503 5.5.1 Error: need MAIL command\r\n" + OK
    )
    assert [type(e) for e in t.events] == [Hello, MailFrom, RcptTo, Reset, Reset]


def test_rset_noop_help_before_hello() -> None:
    # RFC 5321 4.1.4: these may come at any time, even before HELO/EHLO.
    assert dialog(b"RSET\r\nNOOP\r\nNOOP anything\r\nHELP\r\nHELP MAIL\r\n") == (
        OK + OK + OK
        + b"214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT\r\n" * 2
    )


def test_policy_replies_pass_through_with_their_codes() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo) and request.address.local == "full":
            return codes.MAILBOX_FULL
        if isinstance(request, EndOfData):
            return codes.INSUFFICIENT_STORAGE
        return DefaultPolicy()(request)

    out = dialog(TXN + b"RCPT TO:<full@example.net>\r\nDATA\r\nx\r\n.\r\nDATA\r\n",
                 policy=policy)
    assert out == (
        EHLO + MAIL_OK + RCPT_OK + b"552 5.2.2 Mailbox full\r\n" + START
        + b"452 4.3.1 Error: insufficient system storage\r\n"
        + b"503 5.5.1 Error: need MAIL command\r\n"  # the transaction ended with the answer
    )


def test_rset_takes_no_argument() -> None:
    assert dialog(b"RSET x\r\n") == b"501 5.5.4 Syntax: RSET\r\n"


def test_data_takes_no_argument() -> None:
    assert dialog(TXN + b"DATA x\r\n").endswith(b"501 5.5.4 Syntax: DATA\r\n")


def test_vrfy_is_a_request_answered_252_by_default() -> None:
    t = run_all_ways(b"VRFY postmaster\r\nVRFY\r\n")
    assert t.output[len(BANNER) :] == (
        b"252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery\r\n"
        b"501 5.5.4 Syntax: VRFY address\r\n"
    )
    assert t.events == [Vrfy("postmaster")]


def test_quit_closes_and_nothing_after_it_is_read() -> None:
    t = run_all_ways(b"QUIT\r\nNOOP\r\nEHLO c\r\n")
    assert t.output == BANNER + BYE
    assert t.events == [Quit()]
    assert t.closed


@pytest.mark.parametrize("verb", [b"STARTTLS", b"AUTH PLAIN", b"EXPN list", b"ETRN x", b"TURN"])
def test_known_but_unoffered_commands_get_502(verb: bytes) -> None:
    assert dialog(b"EHLO c\r\n" + verb + b"\r\n") == (
        EHLO + b"502 5.5.1 Error: command not implemented\r\n"
    )


@pytest.mark.parametrize("line", [b"FOO\r\n", b"MAILFROM:<a@b>\r\n", b"\r\n", b" HELO x\r\n"])
def test_unknown_commands_get_500(line: bytes) -> None:
    assert dialog(line) == b"500 5.5.2 Error: command not recognized\r\n"


def test_http_request_ends_the_session() -> None:
    t = run_all_ways(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert t.output == BANNER + b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
    assert t.closed
    assert isinstance(t.events[0], ProtocolViolation)


def test_command_lines_may_end_with_bare_lf() -> None:
    assert dialog(b"EHLO c\nNOOP\n") == EHLO + OK


def test_control_characters_and_bad_utf8_in_arguments() -> None:
    assert dialog(b"HELO a\x00b\r\n") == (
        b"501 5.5.4 Syntax error: control character in command\r\n"
    )
    assert dialog(b"HELO a\rb\r\n") == b"501 5.5.4 Syntax error: control character in command\r\n"
    assert dialog(b"HELO \xff\r\n") == b"501 5.5.4 Syntax error: invalid UTF-8\r\n"


# -- MAIL and RCPT --------------------------------------------------------------------------------
def test_mail_and_rcpt_parameters_reach_the_events() -> None:
    t = run_all_ways(
        b"EHLO c\r\nMAIL FROM:<a@b.example> SIZE=4000 BODY=8bitmime RET=hdrs ENVID=QQ+2B1\r\n"
        b"RCPT TO:<x@y.example> NOTIFY=success,delay ORCPT=rfc822;x+2Bz@y.example\r\n"
        b"RCPT TO:<Postmaster> NOTIFY=NEVER\r\n"
    )
    assert t.output.endswith(MAIL_OK + RCPT_OK + RCPT_OK)
    assert t.events[1:] == [
        MailFrom(Address("a", "b.example"), 4000, "8BITMIME", False, "HDRS", "QQ+1"),
        RcptTo(Address("x", "y.example"), frozenset({"SUCCESS", "DELAY"}),
               "rfc822;x+z@y.example", False),
        RcptTo(Address("Postmaster", ""), frozenset({"NEVER"}), None, True),
    ]


def test_sloppy_but_common_address_forms_are_accepted() -> None:
    t = run_all_ways(
        b"EHLO c\r\nMAIL FROM: <a@b.example>\r\nRCPT TO:x@y.example\r\n"
        b"RCPT TO: <@r1.example,@r2.example:z@y.example>\r\nrcpt to:<postMaster>\r\n"
    )
    assert t.output.endswith(MAIL_OK + RCPT_OK * 3)
    addresses = [e.address for e in t.events if isinstance(e, (MailFrom, RcptTo))]
    assert addresses == [
        Address("a", "b.example"),
        Address("x", "y.example"),
        Address("z", "y.example"),
        Address("Postmaster", ""),
    ]


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"MAIL FROM:<a@b.example\r\n", b"501 5.1.7 Missing '>' after the address\r\n"),
        (b"MAIL FROM:<a b@c.example>\r\n", b"501 5.1.7 Bad local part\r\n"),
        (b"MAIL FROM:<a@b..example>\r\n", b"501 5.1.7 Bad domain\r\n"),
        (b"MAIL FROM:<Postmaster>\r\n", b"501 5.1.7 Sender address needs a domain\r\n"),
        (b"MAIL FROM:<a@b.example>x\r\n", b"501 5.1.7 Bad address syntax\r\n"),
        (b"MAIL FROM:\r\n", b"501 5.1.7 Bad address syntax\r\n"),
        (b"MAIL TO:<a@b.example>\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (b"MAIL\r\n", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n"),
        (
            b"MAIL FROM:<\xc3\xa9@b.example>\r\n",
            b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n",
        ),
        (
            b"MAIL FROM:<" + b"l" * 65 + b"@b.example>\r\n",
            b"501 5.1.7 Local part too long\r\n",
        ),
        (b"MAIL FROM:<a@b.example> SIZE=10241000\r\n",
         b"552 5.3.4 Error: message file too big\r\n"),
        (b"MAIL FROM:<a@b.example> SIZE=x\r\n", b"501 5.5.4 Bad SIZE value\r\n"),
        (b"MAIL FROM:<a@b.example> BODY=9BIT\r\n", b"501 5.5.4 Bad BODY value\r\n"),
        (b"MAIL FROM:<a@b.example> BODY=BINARYMIME\r\n",
         b"504 5.5.4 BODY=BINARYMIME is not supported\r\n"),
        (b"MAIL FROM:<a@b.example> AUTH=<>\r\n",
         b"504 5.5.4 Error: parameter not implemented: AUTH\r\n"),
        (b"MAIL FROM:<a@b.example> FOO=bar\r\n",
         b"555 5.5.4 Error: unsupported MAIL FROM or RCPT TO parameter: FOO\r\n"),
        (b"MAIL FROM:<a@b.example> RET=ALL\r\n", b"501 5.5.4 Bad RET value\r\n"),
        (b"MAIL FROM:<a@b.example> ENVID=a+zz\r\n", b"501 5.5.4 Bad xtext\r\n"),
        (b"MAIL FROM:<a@b.example> SMTPUTF8=yes\r\n", b"501 5.5.4 SMTPUTF8 takes no value\r\n"),
        (b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2\r\n", b"501 5.5.4 Duplicate parameter SIZE\r\n"),
    ],
)
def test_mail_refusals(line: bytes, reply: bytes) -> None:
    assert dialog(b"EHLO c\r\n" + line) == EHLO + reply


@pytest.mark.parametrize(
    ("line", "reply"),
    [
        (b"RCPT TO:<>\r\n", b"501 5.1.3 Recipient address needs a mailbox\r\n"),
        (b"RCPT TO:<x@>\r\n", b"501 5.1.3 Bad domain\r\n"),
        (b"RCPT TO:<x>\r\n", b"501 5.1.3 Address needs a domain\r\n"),
        (b"RCPT FROM:<x@y.example>\r\n", b"501 5.5.4 Syntax: RCPT TO:<address>\r\n"),
        (b"RCPT TO:<\xc3\xa9@y.example>\r\n", b"553 5.6.7 Non-ASCII address requires SMTPUTF8\r\n"),
        (b"RCPT TO:<x@y.example> NOTIFY=NEVER,SUCCESS\r\n", b"501 5.5.4 Bad NOTIFY value\r\n"),
        (b"RCPT TO:<x@y.example> NOTIFY=\r\n", b"501 5.5.4 Bad parameter value: NOTIFY=\r\n"),
        (b"RCPT TO:<x@y.example> ORCPT=x@y\r\n", b"501 5.5.4 Bad ORCPT value\r\n"),
        (b"RCPT TO:<x@y.example> SIZE=1\r\n",
         b"555 5.5.4 Error: unsupported MAIL FROM or RCPT TO parameter: SIZE\r\n"),
    ],
)
def test_rcpt_refusals(line: bytes, reply: bytes) -> None:
    assert dialog(b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + line) == EHLO + MAIL_OK + reply


def test_smtputf8_allows_utf8_addresses() -> None:
    t = run_all_ways(
        "EHLO c\r\nMAIL FROM:<jöran@bücher.example> SMTPUTF8\r\nRCPT TO:<ólafur@Dæmi.is>\r\n"
        .encode()
    )
    assert t.output.endswith(MAIL_OK + RCPT_OK)
    mail, rcpt = t.events[1], t.events[2]
    assert isinstance(mail, MailFrom) and isinstance(rcpt, RcptTo)
    assert mail.smtputf8 and mail.address == Address("jöran", "bücher.example")
    assert rcpt.address == Address("ólafur", "dæmi.is")


def test_recipients_over_the_limit_get_452() -> None:
    t = run_all_ways(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\n" + b"RCPT TO:<x@y.example>\r\n" * 3
        + b"DATA\r\nx\r\n.\r\n",
        config=settings(max_recipients=2),
    )
    assert t.output[len(BANNER) :] == (
        EHLO + MAIL_OK + RCPT_OK + RCPT_OK + b"452 4.5.3 Error: too many recipients\r\n"
        + START + b"250 2.0.0 Ok: queued as TESTQUEUE001\r\n"
    )
    assert sum(isinstance(e, RcptTo) for e in t.events) == 2


def test_refused_recipients_do_not_count_toward_the_limit() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo) and request.address.local == "no":
            return codes.USER_UNKNOWN
        return DefaultPolicy()(request)

    out = dialog(
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<no@y.example>\r\n"
        b"RCPT TO:<x@y.example>\r\nRCPT TO:<z@y.example>\r\n",
        config=settings(max_recipients=2), policy=policy,
    )
    assert out == EHLO + MAIL_OK + b"550 5.1.1 User unknown\r\n" + RCPT_OK + RCPT_OK


# -- limits and errors ----------------------------------------------------------------------------
def test_command_line_limits() -> None:
    long_helo = b"HELO " + b"h" * (COMMAND_LINE - 7) + b"\r\n"  # exactly 512 octets
    assert len(long_helo) == COMMAND_LINE
    assert dialog(long_helo).startswith(b"250 ")
    too_long = b"HELO " + b"h" * (COMMAND_LINE - 6) + b"\r\n"
    assert dialog(too_long) == b"500 5.5.2 Line too long\r\n"
    # MAIL and RCPT get room for their parameters
    path = b"<" + b"l" * 64 + b"@" + (b"d" * 59 + b".") * 3 + b"example>"  # 254 octets
    params = b" ENVID=" + b"e" * 100 + b" RET=FULL SIZE=1000 BODY=8BITMIME SMTPUTF8"
    mail = b"MAIL FROM:" + path + params + b"\r\n"
    rcpt = b"RCPT TO:" + path + b" NOTIFY=FAILURE ORCPT=rfc822;" + b"o" * 480 + b"\r\n"
    assert COMMAND_LINE < len(rcpt) < COMMAND_LINE_WITH_PARAMS
    assert dialog(b"EHLO c\r\n" + mail + rcpt) == EHLO + MAIL_OK + RCPT_OK


def test_overlong_command_line_is_drained_not_buffered() -> None:
    huge = b"NOOP " + b"x" * 100_000 + b"\r\nNOOP\r\n"
    t = run_script(huge, segment=4096)
    assert t.output == BANNER + b"500 5.5.2 Line too long\r\n" + OK
    assert t.max_buffered <= COMMAND_LINE_WITH_PARAMS
    assert t.events == [ProtocolViolation(codes.LINE_TOO_LONG)]
    # whole or octet by octet: the same
    assert run_all_ways(huge[:5000] + b"\r\nNOOP\r\n").output == t.output


def test_too_many_errors_closes_with_421() -> None:
    t = run_all_ways(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n", config=settings(max_errors=3))
    assert t.output == BANNER + (
        b"500 5.5.2 Error: command not recognized\r\n" * 3
        + b"421 4.7.0 mx.example.test Error: too many errors\r\n"
    )
    assert t.closed
    assert t.events == [
        ProtocolViolation(Reply(421, "4.7.0", "mx.example.test Error: too many errors"))
    ]


def test_policy_refusals_count_as_errors_and_a_delivery_clears_them() -> None:
    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo) and request.address.local == "no":
            return codes.USER_UNKNOWN
        return DefaultPolicy()(request)

    script = (
        b"EHLO c\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<no@y.example>\r\n"
        b"RCPT TO:<x@y.example>\r\nDATA\r\nx\r\n.\r\n"  # one error, then a delivery: back to 0
        b"MAIL FROM:<a@b.example>\r\nRCPT TO:<no@y.example>\r\nRCPT TO:<no@y.example>\r\n"
        b"RCPT TO:<no@y.example>\r\n"
    )
    t = run_all_ways(script, config=settings(max_errors=3), policy=policy)
    assert t.output.endswith(
        b"550 5.1.1 User unknown\r\n" * 3 + b"421 4.7.0 mx.example.test Error: too many errors\r\n"
    )
    assert t.output.count(b"550 5.1.1") == 4


def test_timeout_and_shutdown_and_reject_connection() -> None:
    conn = ServerConnection(settings())
    conn.start()
    conn.timeout()
    assert conn.data_to_send() == BANNER + b"421 4.4.2 mx.example.test Error: timeout exceeded\r\n"
    assert conn.closed and conn.state is State.CLOSED
    conn.timeout()  # a second time does nothing
    assert conn.data_to_send() == b""

    conn = ServerConnection(settings())
    conn.shutdown()
    assert conn.data_to_send() == (
        b"421 4.3.2 mx.example.test Service shutting down, closing transmission channel\r\n"
    )
    assert conn.closed

    conn = ServerConnection(settings())
    conn.shutdown(codes.LOCAL_ERROR)
    assert conn.data_to_send() == b"451 4.3.0 Error: local error in processing\r\n"

    conn = ServerConnection(settings())
    conn.reject_connection(Reply(421, "4.7.0", "mx.example.test Too many connections"))
    assert conn.data_to_send() == b"421 4.7.0 mx.example.test Too many connections\r\n"
    assert conn.closed
    conn.receive_data(b"EHLO c\r\n")
    assert conn.next_event() is None
    assert conn.data_to_send() == b""


@pytest.mark.parametrize(
    "client",
    [
        b"",
        b"EHL",
        b"EHLO c\r\n",
        TXN,
        TXN + b"DATA\r\nhalf a mess",
        TXN + b"BDAT 100\r\nhalf",
        b"EHLO c\r\nBDAT 100\r\nskipped",
        b"NOOP " + b"x" * 5000,
    ],
)
def test_eof_anywhere_closes_quietly(client: bytes) -> None:
    t = run_all_ways(client, eof=True)
    assert t.closed
    assert b"421" not in t.output


def test_properties_follow_the_session() -> None:
    conn = ServerConnection(settings())
    conn.start()

    def state() -> State:  # a call, so that mypy does not narrow the property between steps
        return conn.state

    assert state() is State.WAIT_HELO
    assert not conn.in_transaction and not conn.in_data and not conn.closed

    def step(data: bytes) -> None:
        conn.receive_data(data)
        while (event := conn.next_event()) is not None:
            if isinstance(event, Request) and not isinstance(event, EndOfData):
                conn.respond(DefaultPolicy()(event))

    step(b"EHLO c\r\n")
    assert state() is State.WAIT_MAIL
    step(b"MAIL FROM:<a@b.example>\r\n")
    assert state() is State.WAIT_RCPT and conn.in_transaction
    step(b"RCPT TO:<x@y.example>\r\n")
    assert state() is State.WAIT_DATA
    step(b"DATA\r\npartial line")
    assert state() is State.IN_DATA and conn.in_data
    assert conn.buffered == len(b"partial line")
    step(b"\r\n.\r\n")  # EndOfData is left pending, as while the spool writes
    assert conn.in_transaction and not conn.in_data
    conn.respond(codes.ok_queued("Q1"))
    assert state() is State.WAIT_MAIL and not conn.in_transaction
    step(b"QUIT\r\n")
    assert conn.closed


def test_tls_client_hello_on_the_plain_port() -> None:
    hello = bytes.fromhex("1603010200010001fc0303") + bytes(range(11, 250)) * 2  # no LF in it
    t = run_all_ways(hello, eof=True)
    assert t.output == BANNER  # nothing to answer until a line ends; then the peer gives up
    assert t.closed and t.max_buffered <= len(hello)


def test_ten_megabyte_line() -> None:
    t = run_script(b"x" * 10_000_000 + b"\r\nQUIT\r\n", segment=65536)
    assert t.output == BANNER + b"500 5.5.2 Line too long\r\n" + BYE
    assert t.max_buffered <= COMMAND_LINE_WITH_PARAMS
