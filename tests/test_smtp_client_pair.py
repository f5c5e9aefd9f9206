"""The client core talking to the server core, no network in between (h11's "core pair").

Whatever content the client is handed, cut anywhere, the server core must decode exactly that
content (CRLF line ends), through DATA (dot-stuffing) and through BDAT, and the per-recipient
answers of the server's policy must come back as the client's outcomes.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.smtp import client as client_module
from postroom.smtp import codes
from postroom.smtp.client import (
    ClientConnection,
    ClientSettings,
    ContentWanted,
    OutboundEnvelope,
    OutboundRecipient,
    Ready,
    SessionFailed,
    Stage,
    TransactionDone,
    TransactionResult,
    Verdict,
)
from postroom.smtp.codes import Reply
from postroom.smtp.events import DataChunk, MailFrom, RcptTo, Request
from postroom.smtp.server import ServerConnection
from postroom.testing import DefaultPolicy
from postroom.testing import settings as server_settings


class Run:
    def __init__(self) -> None:
        self.content = b""
        self.mail: list[MailFrom] = []
        self.rcpts: list[RcptTo] = []
        self.result: TransactionResult | None = None


def converse(envelope: OutboundEnvelope, pieces: list[bytes], *, chunking: bool,
             policy: Callable[[Request], Reply] | None = None, **server: object) -> Run:
    run = Run()
    srv = ServerConnection(server_settings(**server))
    srv.start()
    cli = ClientConnection(ClientSettings(helo_name="client.example.com", chunking=chunking))
    answer = policy or DefaultPolicy()
    for _ in range(100):
        cli.receive_data(srv.data_to_send())
        while (event := cli.next_event()) is not None:
            if isinstance(event, Ready):
                cli.send_mail(envelope)
            elif isinstance(event, ContentWanted):
                for piece in pieces:
                    cli.send_content(piece)
                cli.end_content()
            elif isinstance(event, TransactionDone):
                run.result = event.result
                cli.quit()
            elif isinstance(event, SessionFailed):
                raise AssertionError(event)
        srv.receive_data(cli.data_to_send())
        while (sevent := srv.next_event()) is not None:
            if isinstance(sevent, DataChunk):
                run.content += sevent.data
            if isinstance(sevent, MailFrom):
                run.mail.append(sevent)
            if isinstance(sevent, RcptTo):
                run.rcpts.append(sevent)
            if isinstance(sevent, Request):
                srv.respond(answer(sevent))
        if srv.closed and cli.closed:
            return run
    raise AssertionError("the conversation did not end")


def _cuts(content: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(content) + 1) for c in cuts})
    out, start = [], 0
    for point in [*points, len(content)]:
        out.append(content[start:point])
        start = point
    return out


_LINE = st.lists(st.sampled_from([b"a", b".", b"..", b"\xc3\xa9", b" ", b"\r\n", b"x" * 30]),
                 max_size=12).map(b"".join)


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINE, max_size=8).map(b"".join), st.lists(st.integers(0, 400), max_size=6),
       st.booleans())
def test_any_content_arrives_intact(content: bytes, cuts: list[int], chunking: bool) -> None:
    env = OutboundEnvelope("a@example.com", (OutboundRecipient("b@example.net"),),
                           size=len(content))
    run = converse(env, _cuts(content, cuts), chunking=chunking)
    expected = content
    if chunking:
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"  # the server core ends an unfinished last line (RFC 3030)
    elif expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"  # DATA needs whole lines (RFC 5321 4.1.1.4)
    assert run.content == expected
    assert run.result is not None
    assert run.result.chunked is chunking
    assert run.result.outcomes[0].verdict is Verdict.DELIVERED


@settings(max_examples=150, deadline=None)
@given(st.lists(_LINE, max_size=8).map(b"".join), st.lists(st.integers(0, 400), max_size=6))
def test_long_lines_go_in_pieces_and_arrive_intact(content: bytes, cuts: list[int]) -> None:
    """With the long-line bound made tiny, every line is "long": pieces start mid-line and
    must not be dot-stuffed there, and a CR at a piece's end must wait for its LF."""
    original = client_module._LONG_LINE
    client_module._LONG_LINE = 3
    try:
        env = OutboundEnvelope("a@example.com", (OutboundRecipient("b@example.net"),))
        run = converse(env, _cuts(content, cuts), chunking=False)
    finally:
        client_module._LONG_LINE = original
    expected = content + (b"\r\n" if content and not content.endswith(b"\r\n") else b"")
    assert run.content == expected


def test_parameters_parse_on_the_server_side() -> None:
    rcpts = (
        OutboundRecipient("b@example.net", frozenset({"SUCCESS", "DELAY"}), "rfc822;B+1@x.example"),
        OutboundRecipient("j\u00f6rg@example.net", frozenset({"NEVER"}), "rfc822;j\u00f6rg@x.example"),
    )
    env = OutboundEnvelope("a@example.com", rcpts, size=3, body="8BITMIME", smtputf8=True,
                           ret="HDRS", envid="env+id=1")
    run = converse(env, [b"hi\r\n"], chunking=True)
    (mail,) = run.mail
    assert (mail.size, mail.body, mail.smtputf8, mail.ret, mail.envid) == (
        3, "8BITMIME", True, "HDRS", "env+id=1")
    assert run.rcpts[0].notify == {"SUCCESS", "DELAY"}
    assert run.rcpts[0].orcpt == "rfc822;B+1@x.example"
    assert run.rcpts[1].address.local == "j\u00f6rg"
    # RFC 6533 utf-8-addr-xtext is plain xtext to a server that does not decode it further
    assert run.rcpts[1].orcpt == "utf-8;j\\x{F6}rg@x.example"


def test_per_recipient_policy_answers_come_back() -> None:
    base = DefaultPolicy()

    def policy(request: Request) -> Reply:
        if isinstance(request, RcptTo) and request.address.local == "full":
            return Reply(452, "4.2.2", "Mailbox full")
        if isinstance(request, RcptTo) and request.address.local == "nobody":
            return codes.USER_UNKNOWN
        return base(request)

    env = OutboundEnvelope("a@example.com", tuple(
        OutboundRecipient(f"{name}@example.net") for name in ("ok", "full", "nobody")))
    for chunking in (False, True):
        run = converse(env, [b"x\r\n"], chunking=chunking, policy=policy)
        assert run.result is not None
        assert [(o.verdict, o.stage) for o in run.result.outcomes] == [
            (Verdict.DELIVERED, Stage.BDAT if chunking else Stage.END),
            (Verdict.TEMPORARY, Stage.RCPT),
            (Verdict.PERMANENT, Stage.RCPT),
        ]


def test_size_limit_of_the_server_core_is_respected() -> None:
    env = OutboundEnvelope("a@example.com", (OutboundRecipient("b@example.net"),), size=5000)
    run = converse(env, [b"x\r\n"], chunking=False, max_message_size=1000)
    assert run.result is not None
    (outcome,) = run.result.outcomes
    assert outcome.local and outcome.reply.enhanced == "5.3.4"
    assert run.mail == []  # never offered
