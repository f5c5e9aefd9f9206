"""The sans-I/O SMTP client: replies in, events out; calls in, commands out (RFC 5321, ESMTP).

The outbound twin of :mod:`.server`. It shares :class:`~postroom.smtp.codes.Reply`, DATA
encoding (:func:`~postroom.smtp.data.encode_data`) and path parsing with the server core, and
does no I/O: the transport (``postroom.delivery.remote``) writes what :meth:`data_to_send`
returns, feeds what it reads to :meth:`receive_data`, and acts on :meth:`next_event`::

    conn = ClientConnection(ClientSettings(helo_name="mx.example.org"))
    on bytes:   conn.receive_data(data)
    loop:       event = conn.next_event()
                Greeting        220 seen; EHLO is already queued (HELO follows a 5xx to EHLO)
                Ready           greeted; the caller may starttls(), authenticate(), reset(),
                                send_mail(envelope) or quit()
                TlsReady        220 to STARTTLS: do the handshake, then tls_established()
                                (which queues the new EHLO, RFC 3207 4.2)
                TlsRefused      STARTTLS was refused: the session goes on in plaintext
                ContentWanted   354 (or, for BDAT, a recipient accepted): stream the message
                                with send_content(chunk) ... end_content()
                TransactionDone per-recipient outcomes: the reply and the command it answered
                SessionFailed   the session is over; send data_to_send() (a QUIT) and close
    always:     send conn.data_to_send(); wait at most conn.timeout seconds for a reply

What it implements:

- Replies (RFC 5321 4.2): multi-line, the code of the last line, RFC 2034 enhanced codes taken
  off each line; bounded in line length and line count (:class:`ReplyParser`).
- EHLO with HELO fallback on a 5xx (RFC 5321 3.2); keywords (:class:`Extensions`).
- PIPELINING (RFC 2920 3.1): RSET, MAIL, every RCPT and DATA go out in one write; replies are
  matched in order. Without it, one command at a time.
- SIZE (RFC 1870): declared on MAIL; a message over the server's limit fails here with 552
  5.3.4 without being offered. 8BITMIME (RFC 6152): BODY= passed on when offered; without
  it, converting 8-bit content is the transport's (:mod:`postroom.message.downgrade`), and what
  cannot be converted is handed to :meth:`ClientConnection.send_mail` as a refusal (5.6.3).
  BODY=BINARYMIME (RFC 3030) only with BINARYMIME and CHUNKING, else 5.6.3.
- SMTPUTF8 (RFC 6531 3.4): requested when offered; a message that needs it (a non-ASCII
  address, or ``utf8_headers``) fails with 5.6.7 when it is not offered, as RFC 6531 3.5 wants.
- DSN (RFC 3461): NOTIFY, ORCPT, RET and ENVID passed on when the server offers DSN;
  ``TransactionResult.dsn_passed`` tells the queue when not (RFC 3461 4.1: "relayed").
- DATA (RFC 5321 4.5.2 dot-stuffing, streamed by line blocks) or BDAT (RFC 3030) when the server
  offers CHUNKING and PIPELINING; one BDAT per chunk handed in, the last one LAST.
- STARTTLS (RFC 3207), AUTH PLAIN (RFC 4616) and LOGIN for a smarthost, RSET between
  transactions on one connection, QUIT.
- The timeouts of RFC 5321 4.5.3.2, as :attr:`timeout` for whatever the client waits for now.

Outcomes: a reply to RCPT decides its recipient; a failed MAIL, DATA or end of data decides every
recipient still open, with the command it answered (:class:`Stage`), for the log's "(in reply to
RCPT TO command)". :func:`verdict` is the one place where 2xx means delivered, 5xx permanent and
everything else temporary. A session that fails before MAIL (greeting, EHLO, STARTTLS, AUTH) is
the transport's to judge (it tries the next host); its reply comes with :class:`SessionFailed`.

The values and events live in :mod:`.client_events`, reply reading and EHLO keywords in
:mod:`.replies`; everything is importable from here.
"""

from __future__ import annotations

import base64
from collections import deque
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final

from postroom.message.address import AddressError, parse_path
from postroom.smtp.client_events import (
    Authenticated,
    ClientEvent,
    ClientSettings,
    ClientTimeouts,
    Closed,
    ContentWanted,
    Greeting,
    OutboundEnvelope,
    OutboundRecipient,
    Ready,
    RecipientOutcome,
    ResetDone,
    SessionFailed,
    Stage,
    TlsReady,
    TlsRefused,
    TransactionDone,
    TransactionResult,
    Verdict,
    verdict,
)
from postroom.smtp.codes import Reply
from postroom.smtp.data import encode_data
from postroom.smtp.replies import (
    REPLY_LINE,
    REPLY_LINES,
    Extensions,
    RemoteProtocolError,
    ReplyParser,
    parse_ehlo,
)
from postroom.smtp.server import LocalProtocolError

__all__ = [
    "REPLY_LINE",
    "REPLY_LINES",
    "Authenticated",
    "ClientConnection",
    "ClientEvent",
    "ClientSettings",
    "ClientState",
    "ClientTimeouts",
    "Closed",
    "ContentWanted",
    "Extensions",
    "Greeting",
    "LocalProtocolError",
    "OutboundEnvelope",
    "OutboundRecipient",
    "Ready",
    "RecipientOutcome",
    "RemoteProtocolError",
    "ReplyParser",
    "ResetDone",
    "SessionFailed",
    "Stage",
    "TlsReady",
    "TlsRefused",
    "TransactionDone",
    "TransactionResult",
    "Verdict",
    "encode_utf8_addr_xtext",
    "encode_xtext",
    "parse_ehlo",
    "verdict",
]


# -- xtext ----------------------------------------------------------------------------------------
def encode_xtext(text: str) -> str:
    """RFC 3461 4: every octet outside ``!``..``~``, and ``+`` and ``=``, becomes ``+XX``."""
    out = []
    for octet in text.encode("utf-8"):
        out.append(chr(octet) if 0x21 <= octet <= 0x7E and octet not in (0x2B, 0x3D)
                   else f"+{octet:02X}")
    return "".join(out)


def encode_utf8_addr_xtext(address: str) -> str:
    """RFC 6533 3 ``utf-8-addr-xtext``: non-ASCII, ``+``, ``=``, ``\\`` and controls as
    ``\\x{HEX}`` (the ORCPT form of a non-ASCII address, with address type ``utf-8``)."""
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=\\" else f"\\x{{{ord(c):X}}}"
                   for c in address)


# -- states ---------------------------------------------------------------------------------------
class ClientState(Enum):
    WAIT_GREETING = auto()  # connected; the 220 is awaited
    WAIT_HELLO = auto()  # EHLO or HELO sent
    READY = auto()  # greeted, nothing in flight: a command may start
    WAIT_STARTTLS = auto()  # STARTTLS sent
    WAIT_TLS = auto()  # 220 to STARTTLS: the transport runs the handshake
    WAIT_AUTH = auto()  # AUTH (or a response to its challenge) sent
    WAIT_RSET = auto()  # a lone RSET sent
    WAIT_ENVELOPE = auto()  # MAIL, RCPT (and DATA) replies awaited
    SEND_CONTENT = auto()  # the transport streams the content
    WAIT_END = auto()  # content sent: the reply to the final dot or BDAT LAST awaited
    WAIT_QUIT = auto()  # QUIT sent
    CLOSED = auto()  # final


#: DATA content is held back at most this long while waiting for the end of its line.
_LONG_LINE: Final = 64 * 1024
#: States in which no command may be written: content is flowing, or TLS is being set up.
_NO_COMMANDS: Final = frozenset({ClientState.SEND_CONTENT, ClientState.WAIT_TLS})


class _Kind(Enum):
    GREETING = auto()
    EHLO = auto()
    HELO = auto()
    STARTTLS = auto()
    AUTH = auto()
    RSET = auto()
    MAIL = auto()
    RCPT = auto()
    DATA = auto()
    DOT = auto()  # the final dot of DATA content
    EMPTY_DOT = auto()  # a lone dot after 354 when every recipient was refused
    BDAT = auto()
    BDAT_LAST = auto()
    QUIT = auto()


_STAGE: Final = {
    _Kind.GREETING: Stage.GREETING, _Kind.EHLO: Stage.EHLO, _Kind.HELO: Stage.HELO,
    _Kind.STARTTLS: Stage.STARTTLS, _Kind.AUTH: Stage.AUTH, _Kind.RSET: Stage.RSET,
    _Kind.MAIL: Stage.MAIL, _Kind.RCPT: Stage.RCPT, _Kind.DATA: Stage.DATA,
    _Kind.DOT: Stage.END, _Kind.EMPTY_DOT: Stage.END, _Kind.BDAT: Stage.BDAT,
    _Kind.BDAT_LAST: Stage.BDAT, _Kind.QUIT: Stage.QUIT,
}

#: What the client is doing when it waits for the reply to each kind, for lost-connection texts.
_WHILE: Final = {
    _Kind.GREETING: "receiving the initial server greeting",
    _Kind.DOT: "sending end of data -- message may be sent more than once",
    _Kind.BDAT_LAST: "sending end of data -- message may be sent more than once",
}


@dataclass(slots=True)
class _Cmd:
    kind: _Kind
    line: bytes = b""  # what goes on the wire
    index: int = -1  # the recipient of a RCPT


class _Transaction:
    """The bookkeeping of one mail transaction."""

    __slots__ = ("accepted", "chunked", "dsn", "envelope", "failure", "mail_ok", "replies",
                 "smtputf8", "stuffer")

    def __init__(self, envelope: OutboundEnvelope, *, dsn: bool, smtputf8: bool,
                 chunked: bool) -> None:
        self.envelope = envelope
        self.replies: list[Reply | None] = [None] * len(envelope.recipients)
        self.accepted = 0
        self.mail_ok: bool | None = None  # None: MAIL not answered yet
        #: decides every recipient not decided by its own RCPT reply
        self.failure: tuple[Reply, Stage, bool] | None = None
        self.dsn = dsn
        self.smtputf8 = smtputf8
        self.chunked = chunked
        self.stuffer = _DotStuffer()

    def fail(self, reply: Reply, stage: Stage, local: bool = False) -> None:
        if self.failure is None:
            self.failure = (reply, stage, local)

    def result(self, last: tuple[Reply, Stage, bool] | None) -> TransactionResult:
        """Outcomes, with ``last`` (the end-of-data reply) for the accepted recipients."""
        decided = self.failure or last
        outcomes = []
        for recipient, reply in zip(self.envelope.recipients, self.replies, strict=True):
            if self.mail_ok is not False and reply is not None and not 200 <= reply.code < 300:
                outcomes.append(RecipientOutcome(recipient, reply, Stage.RCPT))
            else:
                assert decided is not None
                outcomes.append(RecipientOutcome(recipient, *decided))
        return TransactionResult(tuple(outcomes), self.dsn, self.smtputf8, self.chunked)


class _DotStuffer:
    """DATA content by blocks of whole lines through :func:`encode_data` (RFC 5321 4.5.2), so a
    line cut between two chunks is stuffed right. A bare LF becomes CRLF, as the server core
    stores it, so no receiver can see an end of data we did not mean. A line longer than
    :data:`_LONG_LINE` goes out in pieces (only a line's first octet can need a dot), so
    memory and copying stay bounded whatever the content."""

    __slots__ = ("_mid", "_tail")

    def __init__(self) -> None:
        self._tail = b""  # the unfinished last line (or a CR that may precede an LF)
        self._mid = False  # the tail continues a line whose start was already sent

    @staticmethod
    def _clean(block: bytes) -> bytes:
        if block.count(b"\n") != block.count(b"\r\n"):
            block = block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return block

    def _encode(self, block: bytes, *, final: bool = False) -> bytes:
        """``block`` stuffed; a block that starts mid-line keeps its first octet as is."""
        if not block and not final:
            return b""
        block = self._clean(block)
        out = encode_data(b"x" + block)[1:] if self._mid else encode_data(block)
        if final:
            return out
        # encode_data ended the last line (when unfinished) and added the terminator
        return out[:-3] if block.endswith(b"\r\n") else out[:-5]

    def feed(self, chunk: bytes) -> bytes:
        data = self._tail + chunk
        last = data.rfind(b"\n") + 1
        if last == 0:
            if len(data) <= _LONG_LINE:
                self._tail = data
                return b""
            keep = 1 if data.endswith(b"\r") else 0  # its LF may come next
            block, self._tail = data[: len(data) - keep], data[len(data) - keep :]
            out = self._encode(block)
            self._mid = True
            return out
        block, self._tail = data[:last], data[last:]
        out = self._encode(block)
        self._mid = False
        return out

    def finish(self) -> bytes:
        tail, self._tail = self._tail, b""
        out = self._encode(tail, final=True)
        self._mid = False
        return out


class ClientConnection:
    """One SMTP client session, without I/O. See the module docstring for the protocol."""

    def __init__(self, settings: ClientSettings) -> None:
        self._settings = settings
        self._state = ClientState.WAIT_GREETING
        self._parser = ReplyParser()
        self._out = bytearray()
        self._events: deque[ClientEvent] = deque()
        self._script: deque[_Cmd] = deque()  # commands to send (one at a time w/o PIPELINING)
        self._pending: deque[_Cmd] = deque([_Cmd(_Kind.GREETING)])  # replies awaited, in order
        self._extensions = Extensions()
        self._esmtp = False
        self._tls = False
        self._dirty = False  # a transaction failed half-way: RSET before the next MAIL
        self._txn: _Transaction | None = None
        self._auth: list[bytes] = []  # responses to send to AUTH challenges (LOGIN)
        self._held: bytes | None = None  # BDAT: the last chunk, held back to go out as LAST
        self.transactions = 0  # transactions finished on this connection

    # -- properties -------------------------------------------------------------------------
    @property
    def state(self) -> ClientState:
        return self._state

    @property
    def extensions(self) -> Extensions:
        return self._extensions

    @property
    def esmtp(self) -> bool:
        return self._esmtp

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def closed(self) -> bool:
        return self._state is ClientState.CLOSED

    @property
    def timeout(self) -> float | None:
        """Seconds the transport may wait for the next reply (or, while content is being
        sent, for each write to drain); None when nothing is awaited."""
        t = self._settings.timeouts
        if self._state is ClientState.SEND_CONTENT:
            return t.data_block
        if not self._pending:
            return None
        kind = self._pending[0].kind
        return {
            _Kind.GREETING: t.greeting, _Kind.MAIL: t.mail, _Kind.RCPT: t.rcpt,
            _Kind.DATA: t.data_init, _Kind.DOT: t.data_end, _Kind.EMPTY_DOT: t.data_end,
            _Kind.BDAT: t.data_block, _Kind.BDAT_LAST: t.data_end, _Kind.RSET: t.rset,
            _Kind.QUIT: t.quit,
        }.get(kind, t.helo)

    @property
    def awaiting_reply(self) -> bool:
        return bool(self._pending)

    # -- the transport's verbs --------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        if self._state is ClientState.CLOSED:
            return
        try:
            self._parser.feed(data)
        except RemoteProtocolError as exc:
            self._local_failure(421, "4.5.0", f"protocol error: {exc}")
            return
        while not self.closed:  # a reply may close the session
            reply = self._parser.next_reply()
            if reply is None:
                break
            self._on_reply(reply)

    def next_event(self) -> ClientEvent | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def connection_lost(self) -> None:
        """The server closed the connection (or it broke) before we were done."""
        if self._state is ClientState.CLOSED:
            return
        if self._state is ClientState.WAIT_QUIT:
            self._close()
            return
        doing = self._doing()
        self._local_failure(421, "4.4.2", f"lost connection while {doing}")

    def timed_out(self) -> None:
        """No reply within :attr:`timeout` (RFC 5321 4.5.3.2)."""
        if self._state is ClientState.CLOSED:
            return
        doing = self._doing()
        self._local_failure(421, "4.4.2", f"conversation timed out while {doing}")

    def tls_established(self) -> None:
        """The handshake after 220 to STARTTLS is done: forget what the server said and greet
        again (RFC 3207 4.2)."""
        self._require(ClientState.WAIT_TLS, "tls_established")
        self._tls = True
        self._extensions = Extensions()
        self._parser = ReplyParser()  # nothing read before the handshake counts after it
        self._hello(_Kind.EHLO)

    def starttls(self) -> None:
        self._require(ClientState.READY, "starttls")
        if self._tls:
            raise LocalProtocolError("TLS is already active")
        self._state = ClientState.WAIT_STARTTLS
        self._command(_Cmd(_Kind.STARTTLS, b"STARTTLS\r\n"))

    def authenticate(self, username: str, password: str) -> None:
        """AUTH PLAIN with an initial response (RFC 4954 4, RFC 4616), or LOGIN when only that
        is offered. :class:`Authenticated` or :class:`SessionFailed` (stage AUTH) follows."""
        self._require(ClientState.READY, "authenticate")
        mechanisms = self._extensions.auth
        self._state = ClientState.WAIT_AUTH
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + username.encode() + b"\0" + password.encode())
            self._auth = [token]  # sent again if the server asks with an empty 334
            self._command(_Cmd(_Kind.AUTH, b"AUTH PLAIN " + token + b"\r\n"))
        elif "LOGIN" in mechanisms:
            self._auth = [base64.b64encode(username.encode()), base64.b64encode(password.encode())]
            self._command(_Cmd(_Kind.AUTH, b"AUTH LOGIN\r\n"))
        else:
            offered = " ".join(sorted(mechanisms)) or "none"
            reply = Reply(530, "5.7.0", f"no common SASL mechanism (server offers: {offered})")
            self._fail(reply, Stage.AUTH, quit=True, local=True)

    def reset(self) -> None:
        """RSET (RFC 5321 4.1.1.5): before a reused connection's next message, to clear state
        and prove the connection alive. :class:`ResetDone` or :class:`SessionFailed` follows."""
        self._require(ClientState.READY, "reset")
        self._state = ClientState.WAIT_RSET
        self._command(_Cmd(_Kind.RSET, b"RSET\r\n"))

    def quit(self) -> None:
        """QUIT (RFC 5321 4.1.1.10); the transport may close without waiting for the 221."""
        if self._state is ClientState.CLOSED:
            return
        if self._state in _NO_COMMANDS:  # it would be message content, or sent before TLS
            raise LocalProtocolError(f"quit() in state {self._state.name}: close instead")
        self._state = ClientState.WAIT_QUIT
        self._script.clear()
        self._out += b"QUIT\r\n"
        self._pending.append(_Cmd(_Kind.QUIT))

    def send_mail(self, envelope: OutboundEnvelope, refusal: Reply | None = None) -> None:
        """Start a transaction. Its :class:`TransactionDone` may come at once (SIZE, SMTPUTF8,
        BINARYMIME), or with ``refusal``: a reason the transport found to fail the message
        without offering it (8-bit content that cannot be converted for a server without
        8BITMIME, RFC 6152 3); every recipient then gets it, as a local reply to MAIL."""
        self._require(ClientState.READY, "send_mail")
        if not envelope.recipients:
            raise LocalProtocolError("a transaction needs a recipient")
        ext = self._extensions
        chunked = (self._settings.chunking and self._settings.pipelining
                   and ext.chunking and ext.pipelining)
        utf8 = envelope.smtputf8 and ext.smtputf8
        txn = _Transaction(envelope, dsn=ext.dsn, smtputf8=utf8, chunked=chunked)
        mail = self._mail_line(envelope, utf8)
        rcpts = [self._rcpt_line(r) for r in envelope.recipients]
        self._txn = txn
        self._state = ClientState.WAIT_ENVELOPE
        refusal = refusal or self._refusal(envelope, chunked)
        if refusal is not None:
            txn.mail_ok = False
            txn.fail(refusal, Stage.MAIL, True)
            self._finish_transaction()
            return
        if self._dirty:
            self._script.append(_Cmd(_Kind.RSET, b"RSET\r\n"))
        self._script.append(_Cmd(_Kind.MAIL, mail))
        self._script.extend(_Cmd(_Kind.RCPT, line, i) for i, line in enumerate(rcpts))
        if not chunked:
            self._script.append(_Cmd(_Kind.DATA, b"DATA\r\n"))
        self._dirty = True  # until the transaction ends cleanly
        self._flush()

    def send_content(self, chunk: bytes) -> None:
        """A piece of the message (CRLF line ends), after :class:`ContentWanted`."""
        self._require(ClientState.SEND_CONTENT, "send_content")
        txn = self._txn
        assert txn is not None
        if not chunk:
            return
        if txn.chunked:
            if self._held is not None:
                self._bdat(self._held, last=False)
            self._held = chunk
        else:
            self._out += txn.stuffer.feed(chunk)

    def end_content(self) -> None:
        """The message is complete: the final dot, or the held chunk as BDAT LAST."""
        self._require(ClientState.SEND_CONTENT, "end_content")
        txn = self._txn
        assert txn is not None
        self._state = ClientState.WAIT_END
        if txn.chunked:
            held, self._held = self._held or b"", None
            self._bdat(held, last=True)
        else:
            self._out += txn.stuffer.finish()
            self._pending.append(_Cmd(_Kind.DOT))

    # -- building commands ------------------------------------------------------------------
    def _require(self, state: ClientState, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{call}() in state {self._state.name}")

    def _command(self, cmd: _Cmd) -> None:
        self._script.append(cmd)
        self._flush()

    def _flush(self) -> None:
        """Send what may go now: the whole script with PIPELINING (RFC 2920 3.1: DATA is last in
        its group because the script ends there), else one command once nothing is in flight."""
        pipelining = self._settings.pipelining and self._extensions.pipelining
        while self._script and (pipelining or not self._pending):
            cmd = self._script.popleft()
            self._out += cmd.line
            self._pending.append(cmd)

    def _hello(self, kind: _Kind) -> None:
        self._state = ClientState.WAIT_HELLO
        verb = b"EHLO " if kind is _Kind.EHLO else b"HELO "
        self._command(_Cmd(kind, verb + self._settings.helo_name.encode("ascii") + b"\r\n"))

    @staticmethod
    def _path(address: str, role: str) -> bytes:
        """``<address>``, checked with the server's own path grammar so nothing odd (a CR, a
        space, a ``>``) can reach the wire from a queue file."""
        try:
            parse_path(f"<{address}>", utf8=True)
        except AddressError as exc:
            raise LocalProtocolError(f"bad {role} address {address!r}: {exc.text}") from None
        return f"<{address}>".encode()

    def _mail_line(self, envelope: OutboundEnvelope, utf8: bool) -> bytes:
        path = self._path(envelope.sender, "sender")
        if not self._esmtp:
            return b"MAIL FROM:" + path + b"\r\n"
        ext = self._extensions
        params = []
        if ext.size is not None and envelope.size is not None:
            params.append(f"SIZE={envelope.size}")
        if envelope.body == "BINARYMIME" or (envelope.body and ext.eightbitmime):
            params.append(f"BODY={envelope.body}")  # BINARYMIME: only when offered (_refusal)
        if utf8:
            params.append("SMTPUTF8")
        if ext.dsn:
            if envelope.ret:
                params.append(f"RET={envelope.ret}")
            if envelope.envid:
                params.append(f"ENVID={encode_xtext(envelope.envid)}")
        return b"MAIL FROM:" + path + "".join(" " + p for p in params).encode() + b"\r\n"

    def _rcpt_line(self, recipient: OutboundRecipient) -> bytes:
        path = self._path(recipient.address, "recipient")
        params = []
        if self._esmtp and self._extensions.dsn:
            if recipient.notify:
                order = ("NEVER", "SUCCESS", "FAILURE", "DELAY")
                params.append("NOTIFY=" + ",".join(w for w in order if w in recipient.notify))
            if recipient.orcpt:
                addr_type, _, address = recipient.orcpt.partition(";")
                if address.isascii():
                    params.append(f"ORCPT={addr_type};{encode_xtext(address)}")
                else:  # RFC 6533 3: non-ASCII original recipients travel as utf-8 type
                    params.append(f"ORCPT=utf-8;{encode_utf8_addr_xtext(address)}")
        return b"RCPT TO:" + path + "".join(" " + p for p in params).encode() + b"\r\n"

    def _refusal(self, envelope: OutboundEnvelope, chunked: bool) -> Reply | None:
        """A reason to fail the message here, without offering it (RFC 1870 6, RFC 6531 3.5,
        RFC 3030 3: binary content needs BINARYMIME, and BDAT to carry it)."""
        ext = self._extensions
        if envelope.body == "BINARYMIME" and not (chunked and ext.offers("BINARYMIME")):
            return Reply(554, "5.6.3", "Conversion required but not supported: binary content, "
                                       "and the server does not offer BINARYMIME with CHUNKING")
        if envelope.needs_smtputf8 and not ext.smtputf8:
            return Reply(553, "5.6.7", "SMTPUTF8 is required, but was not offered by the server")
        addresses = (envelope.sender, *(r.address for r in envelope.recipients))
        if not envelope.smtputf8 and not all(a.isascii() for a in addresses):
            return Reply(553, "5.6.7", "non-ASCII address in a message without SMTPUTF8")
        limit = ext.size
        if limit and envelope.size is not None and envelope.size > limit:
            return Reply(552, "5.3.4", f"message size {envelope.size} exceeds size limit {limit} "
                                       "of the server")
        return None

    def _bdat(self, chunk: bytes, *, last: bool) -> None:
        kind = _Kind.BDAT_LAST if last else _Kind.BDAT
        head = f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode()
        self._out += head + chunk
        self._pending.append(_Cmd(kind))

    # -- replies ------------------------------------------------------------------------------
    def _on_reply(self, reply: Reply) -> None:
        if not self._pending:
            self._local_failure(421, "4.5.0", f"protocol error: unexpected reply {reply.code} "
                                              f"{reply.lines[0][:80]!r}")
            return
        cmd = self._pending.popleft()
        if reply.code == 421 and cmd.kind is not _Kind.QUIT:
            self._server_closing(reply, cmd)  # RFC 5321 3.8: the server is going away
            return
        handler = _HANDLERS[cmd.kind]
        handler(self, cmd, reply)
        self._flush()

    def _greeting(self, cmd: _Cmd, reply: Reply) -> None:
        if reply.code == 220:
            self._events.append(Greeting(reply))
            self._hello(_Kind.EHLO)
        else:  # RFC 5321 3.1: 554 (or 4xx) instead of 220: say QUIT and go
            self._fail(reply, Stage.GREETING, quit=True)

    def _hello_reply(self, cmd: _Cmd, reply: Reply) -> None:
        if 200 <= reply.code < 300:
            self._esmtp = cmd.kind is _Kind.EHLO
            self._extensions = parse_ehlo(reply) if self._esmtp else Extensions()
            self._state = ClientState.READY
            self._events.append(Ready(reply, self._extensions, self._esmtp))
        elif cmd.kind is _Kind.EHLO and 500 <= reply.code < 600:
            self._hello(_Kind.HELO)  # RFC 5321 3.2: a server without EHLO gets HELO
        else:
            self._fail(reply, _STAGE[cmd.kind], quit=True)

    def _starttls_reply(self, cmd: _Cmd, reply: Reply) -> None:
        if reply.code == 220:
            self._state = ClientState.WAIT_TLS
            self._events.append(TlsReady(reply))
        else:  # RFC 3207 4: the session goes on as before
            self._state = ClientState.READY
            self._events.append(TlsRefused(reply))

    def _auth_reply(self, cmd: _Cmd, reply: Reply) -> None:
        if reply.code == 235:
            self._auth = []
            self._state = ClientState.READY
            self._events.append(Authenticated(reply))
        elif reply.code == 334 and self._auth:
            response = self._auth.pop(0)
            self._command(_Cmd(_Kind.AUTH, response + b"\r\n"))
        elif reply.code == 334:  # a challenge we cannot answer: cancel (RFC 4954 4)
            self._command(_Cmd(_Kind.AUTH, b"*\r\n"))
        else:
            self._auth = []
            self._fail(reply, Stage.AUTH, quit=True)

    def _rset_reply(self, cmd: _Cmd, reply: Reply) -> None:
        if self._txn is not None:  # the RSET that opens a transaction: MAIL's reply decides
            return
        if 200 <= reply.code < 300:
            self._dirty = False
            self._state = ClientState.READY
            self._events.append(ResetDone(reply))
        else:
            self._fail(reply, Stage.RSET, quit=True)

    def _mail_reply(self, cmd: _Cmd, reply: Reply) -> None:
        txn = self._txn
        assert txn is not None
        txn.mail_ok = 200 <= reply.code < 300
        if not txn.mail_ok:
            txn.fail(reply, Stage.MAIL)
            self._drop_script()
            if not self._pending:  # nothing was pipelined after it
                self._finish_transaction()

    def _rcpt_reply(self, cmd: _Cmd, reply: Reply) -> None:
        txn = self._txn
        assert txn is not None
        txn.replies[cmd.index] = reply
        if txn.mail_ok and 200 <= reply.code < 300:
            txn.accepted += 1
        if cmd.index == len(txn.replies) - 1:  # the last RCPT
            if not txn.accepted or not txn.mail_ok:
                self._drop_script()  # no DATA when nobody was accepted
                if not self._pending:
                    self._finish_transaction()
            elif txn.chunked:
                self._want_content("BDAT")

    def _data_reply(self, cmd: _Cmd, reply: Reply) -> None:
        txn = self._txn
        assert txn is not None
        usable = bool(txn.mail_ok and txn.accepted)
        if reply.code == 354 and usable:
            self._want_content("DATA")
        elif reply.code == 354:  # RFC 2920 3.1: nobody to deliver to, but DATA went ahead
            self._out += b".\r\n"
            self._pending.append(_Cmd(_Kind.EMPTY_DOT))
        else:
            txn.fail(reply, Stage.DATA)
            self._finish_transaction()

    def _want_content(self, kind: str) -> None:
        self._state = ClientState.SEND_CONTENT
        self._events.append(ContentWanted(kind))

    def _end_reply(self, cmd: _Cmd, reply: Reply) -> None:
        txn = self._txn
        assert txn is not None
        if cmd.kind is _Kind.EMPTY_DOT:
            self._finish_transaction()
            return
        if cmd.kind is _Kind.BDAT:
            if not 200 <= reply.code < 300:
                txn.fail(reply, Stage.BDAT)  # later chunks' replies add nothing
            return
        stage = Stage.BDAT if cmd.kind is _Kind.BDAT_LAST else Stage.END
        clean = 200 <= reply.code < 300 and txn.failure is None
        self._finish_transaction((reply, stage, False))
        if clean:
            self._dirty = False

    def _quit_reply(self, cmd: _Cmd, reply: Reply) -> None:
        self._events.append(Closed())
        self._close()

    # -- endings ------------------------------------------------------------------------------
    def _drop_script(self) -> None:
        self._script.clear()

    def _finish_transaction(self, last: tuple[Reply, Stage, bool] | None = None) -> None:
        txn = self._txn
        assert txn is not None
        self._txn = None
        self._held = None
        self.transactions += 1
        self._events.append(TransactionDone(txn.result(last)))
        if self._state is not ClientState.CLOSED:
            self._state = ClientState.READY

    def _doing(self) -> str:
        if self._state is ClientState.SEND_CONTENT:
            return "sending message body"
        if not self._pending:
            return "idle"
        kind = self._pending[0].kind
        return _WHILE.get(kind, f"sending {_STAGE[kind].value}")

    def _fail(self, reply: Reply, stage: Stage, *, quit: bool, local: bool = False) -> None:
        """End the session: any open transaction's undecided recipients take ``reply``."""
        txn = self._txn
        if txn is not None:
            txn.fail(reply, stage, local)
            self._finish_transaction()
        self._events.append(SessionFailed(reply, stage, local))
        if quit and self._state not in _NO_COMMANDS:
            self._script.clear()
            self._pending.clear()
            self._out += b"QUIT\r\n"
        self._close()

    def _server_closing(self, reply: Reply, cmd: _Cmd) -> None:
        self._fail(reply, _STAGE[cmd.kind], quit=False)

    def _local_failure(self, code: int, enhanced: str, text: str) -> None:
        """A failure seen here (timeout, lost connection, garbage): no QUIT, just close."""
        if self._state is ClientState.SEND_CONTENT:
            stage = Stage.END
        elif self._pending:
            stage = _STAGE[self._pending[0].kind]
        else:
            stage = Stage.CONNECT
        self._fail(Reply(code, enhanced, text), stage, quit=False, local=True)

    def _close(self) -> None:
        self._state = ClientState.CLOSED
        self._script.clear()
        self._pending.clear()
        self._txn = None


_HANDLERS: Final = {
    _Kind.GREETING: ClientConnection._greeting,
    _Kind.EHLO: ClientConnection._hello_reply,
    _Kind.HELO: ClientConnection._hello_reply,
    _Kind.STARTTLS: ClientConnection._starttls_reply,
    _Kind.AUTH: ClientConnection._auth_reply,
    _Kind.RSET: ClientConnection._rset_reply,
    _Kind.MAIL: ClientConnection._mail_reply,
    _Kind.RCPT: ClientConnection._rcpt_reply,
    _Kind.DATA: ClientConnection._data_reply,
    _Kind.DOT: ClientConnection._end_reply,
    _Kind.EMPTY_DOT: ClientConnection._end_reply,
    _Kind.BDAT: ClientConnection._end_reply,
    _Kind.BDAT_LAST: ClientConnection._end_reply,
    _Kind.QUIT: ClientConnection._quit_reply,
}

