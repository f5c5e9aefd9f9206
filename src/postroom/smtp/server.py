"""The sans-I/O SMTP server: bytes in, events out; replies in, bytes out (RFC 5321, ESMTP).

Commands: HELO, EHLO, MAIL, RCPT, DATA, BDAT (RFC 3030), RSET, NOOP, VRFY, HELP, QUIT, and
STARTTLS (RFC 3207) when the transport lists it in ``extensions``. EHLO offers SIZE (RFC 1870),
PIPELINING (RFC 2920), 8BITMIME (RFC 6152), ENHANCEDSTATUSCODES (RFC 2034), SMTPUTF8 (RFC 6531),
CHUNKING (RFC 3030) and DSN (RFC 3461), plus ``extensions`` (STARTTLS only before TLS) and AUTH
(RFC 4954) when the transport sets ``auth_mechanisms`` (listed only once TLS is up, unless
``auth_requires_tls`` is off). EXPN, ETRN and the like get 502 5.5.1; CONNECT, GET, POST, PUT
and HEAD (a web client or proxy pointed at us) end the session with 221 2.7.0, as Postfix does.

AUTH: the core checks the state (after EHLO, outside a transaction, not twice: 503 5.5.1), TLS
(538 5.7.11), the syntax (501 5.5.4) and the mechanism (504 5.5.4), then asks the transport with
an :class:`Auth` request, which runs the SASL exchange. A ``334`` answer puts the core in
IN_AUTH, where each line (up to :data:`AUTH_LINE` octets) is an :class:`AuthResponse`; ``235``
marks the session authenticated; any other answer ends the exchange. With ``require_auth`` set
(the submission ports) MAIL before AUTH gets 530 5.7.0.

How a transport drives it::

    conn = ServerConnection(settings); conn.start()
    on bytes:  conn.receive_data(data)
    loop:      event = conn.next_event()            # None: need more input, or a reply
               if isinstance(event, Request): conn.respond(policy(event))
    always:    send conn.data_to_send(); close when conn.closed

A :class:`~postroom.smtp.events.Request` is answered by exactly one :meth:`respond`; until then
no further input is parsed, which keeps replies to pipelined commands in order (RFC 2920 3.1).
The core applies what a 2xx answer implies (MAIL opens the transaction, RCPT counts a recipient).
For HELO/EHLO a 2xx answer is replaced by the core's own greeting: ``250 <hostname>`` for HELO,
and for EHLO the multi-line list of extensions. The transaction ends with the answer to
:class:`EndOfData`, whatever its code.

The core answers by itself: NOOP, RSET, HELP, QUIT, DATA's 354, BDAT chunks that are not LAST,
every syntax, sequence and limit error. Every 4xx/5xx sent (the transport's included) counts as
an error; at ``max_errors`` the core adds 421 4.7.0 and closes (0 disables this). Accepting a
message clears the count, as Postfix's "errors without delivering mail" does.

Command lines are read up to :data:`COMMAND_LINE` octets, :data:`COMMAND_LINE_WITH_PARAMS` for
MAIL and RCPT, or :data:`AUTH_LINE` for AUTH and SASL responses; longer ones are drained to their
LF, never buffered whole, and refused with 500 5.5.2 (500 5.5.6 in a SASL exchange). A command
line may end with a bare LF. A 421 answer from the transport closes the session.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from postroom.errors import PostroomError
from postroom.smtp import codes
from postroom.smtp.codes import Reply, with_host
from postroom.smtp.data import ChunkDecoder, DataDecoder
from postroom.smtp.events import (
    Auth,
    AuthAborted,
    AuthResponse,
    DataAborted,
    DataChunk,
    DataStart,
    EndOfData,
    Event,
    Hello,
    MailFrom,
    ProtocolViolation,
    Quit,
    RcptTo,
    Request,
    Reset,
    StartTls,
    Vrfy,
)
from postroom.smtp.params import ParamError, mail_from, rcpt_to
from postroom.smtp.states import (
    COMMAND_STATES,
    TRANSACTION_STATES,
    Input,
    State,
    allowed,
    next_state,
    sequence_error,
)

#: RFC 5321 4.5.3.1.4: a command line, verb and CRLF included, may be 512 octets.
COMMAND_LINE: Final = 512
#: MAIL and RCPT lines grow with their parameters (RFC 5321 4.5.3.1.4 allows it): RCPT gets up to
#: 535 for " NOTIFY=SUCCESS,FAILURE,DELAY ORCPT=" and a 500-character value (RFC 3461 4.1, 4.2);
#: MAIL up to 26 for SIZE (RFC 1870 3), 120 for RET and a 100-character ENVID (RFC 3461 4.3,
#: 4.4), 14 for BODY=8BITMIME and 9 for SMTPUTF8; a 256-character UTF-8 path may take 768 octets
#: more (RFC 6531 3.3); AUTH= 500 more (RFC 4954 5). 512 + 535 + 768 + 500 = 2,315 at most:
#: 2560 covers it.
COMMAND_LINE_WITH_PARAMS: Final = 2560
#: RFC 4954 4: a SASL response (and AUTH's initial response) may be 12288 octets of base64; the
#: line adds its CRLF and, for AUTH, the verb and a mechanism name of up to 20 characters (RFC
#: 4422 3.1). This bounds what one session buffers while it reads a line.
AUTH_LINE: Final = 12288 + len("AUTH ") + 20 + 1 + 2
#: RFC 1870 3: SIZE's value has at most 20 digits; BDAT's chunk size is read the same way.
_SIZE_DIGITS: Final = 20

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than TAB
#: Verbs we know but do not offer: 502 5.5.1 (RFC 5321 4.2.4). STARTTLS and AUTH move to the
#: command table when a transport offers them.
_NOT_IMPLEMENTED: Final = frozenset(
    {b"EXPN", b"ETRN", b"TURN", b"ATRN", b"SEND", b"SOML", b"SAML",
     b"XCLIENT", b"XFORWARD", b"BURL"}
)
#: A browser or proxy speaking HTTP at us: goodbye (Postfix's smtpd_forbidden_commands).
_FORBIDDEN: Final = frozenset({b"CONNECT", b"GET", b"POST", b"PUT", b"HEAD"})
_FORBIDDEN_REPLY: Final = Reply(221, "2.7.0", "Error: I can break rules, too. Goodbye.")
#: RFC 4422 3.1: a mechanism name is 1 to 20 of A-Z, 0-9, "-" and "_".
_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")


class LocalProtocolError(PostroomError):
    """The transport misused the core (a bug on our side), e.g. respond() with nothing pending."""


@dataclass(frozen=True, slots=True)
class ServerSettings:
    hostname: str
    banner: str = "ESMTP postroom"
    max_message_size: int = 10_240_000  # octets; 0 for no limit (advertised as SIZE 0)
    max_recipients: int = 1000  # accepted RCPTs per transaction; RFC 5321 4.5.3.1.8 wants >= 100
    max_line_length: int = 65536  # text octets per content line, CRLF not counted; >= 998
    reject_bare_lf: bool = False  # refuse content with bare LF instead of storing it as CRLF
    max_errors: int = 20  # 4xx/5xx replies before 421 4.7.0 and close; 0 for no limit


class ServerConnection:
    """One SMTP server session, without I/O. See the module docstring for the protocol."""

    __slots__ = (
        "_authenticated",
        "_bdat_last",
        "_bdat_left",
        "_bdat_size",
        "_decoder",
        "_eof",
        "_errors",
        "_esmtp",
        "_events",
        "_in",
        "_long_line",
        "_out",
        "_pending",
        "_rcpts",
        "_settings",
        "_skip",
        "_smtputf8",
        "_state",
        "_tls",
        "auth_mechanisms",
        "auth_requires_tls",
        "extensions",
        "require_auth",
    )

    def __init__(self, settings: ServerSettings) -> None:
        self._settings = settings
        self._state = State.WAIT_HELO
        self._in = bytearray()  # received, not yet consumed
        self._out = bytearray()  # replies not yet taken by data_to_send()
        self._events: list[Event] = []  # a few at a time: a list is smaller than a deque
        self._pending: Request | None = None  # the Request waiting for respond()
        self._errors = 0
        self._esmtp = False  # the greeting was EHLO
        self._smtputf8 = False  # MAIL of this transaction carried SMTPUTF8
        self._rcpts = 0  # recipients accepted in this transaction
        self._decoder: DataDecoder | ChunkDecoder | None = None
        self._bdat_size = 0  # octets in the current BDAT chunk
        self._bdat_left = 0  # octets of the current BDAT chunk still to read
        self._bdat_last = False  # the current BDAT chunk is the LAST
        self._skip = 0  # octets of a refused BDAT chunk still to throw away
        self._long_line: Reply | None = None  # throwing away an overlong line: its reply
        self._tls = False  # the session runs over TLS (STARTTLS done, or implicit TLS)
        self._eof = False  # the peer will send nothing more
        self._authenticated = False  # AUTH succeeded in this session (RFC 4954)
        #: Extra EHLO keywords for this session; the transport may add e.g. "STARTTLS".
        self.extensions: list[str] = []
        #: SASL mechanisms AUTH offers in this session; empty: AUTH gets 502 (not offered).
        self.auth_mechanisms: list[str] = []
        #: AUTH only inside TLS (RFC 8314 and the issue): before it, 538 5.7.11.
        self.auth_requires_tls = True
        #: MAIL needs a successful AUTH first (submission, RFC 6409 4.1): else 530 5.7.0.
        self.require_auth = False

    # -- properties ---------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """The transport closes the connection once it has sent :meth:`data_to_send`."""
        return self._state is State.CLOSED

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted and its message is not finished (answered or refused)."""
        return self._state in TRANSACTION_STATES

    @property
    def in_data(self) -> bool:
        """Reading message content (DATA or BDAT octets): the data timeout applies."""
        if self._skip:
            return True
        return self._pending is None and self._state in (State.IN_DATA, State.IN_BDAT)

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def authenticated(self) -> bool:
        return self._authenticated

    @property
    def buffered(self) -> int:
        """Octets received and not consumed yet (bounded unless a Request is pending)."""
        tail = self._decoder.buffered if isinstance(self._decoder, DataDecoder) else 0
        return len(self._in) + tail

    # -- the transport's verbs ----------------------------------------------------------------
    def start(self) -> None:
        """Queue the greeting banner (RFC 5321 4.2: 220 <domain>, no enhanced code)."""
        settings = self._settings
        self._out += Reply(220, None, f"{settings.hostname} {settings.banner}").to_bytes()

    def reject_connection(self, reply: Reply) -> None:
        """Queue ``reply`` (421 or 554, RFC 5321 3.1) instead of the banner, and close."""
        self._out += reply.to_bytes()
        self._close()

    def receive_data(self, data: bytes) -> None:
        if self._state is not State.CLOSED:
            self._in += data

    def tls_established(self) -> None:
        """The TLS handshake after our 220 to STARTTLS succeeded (RFC 3207 4.2): the session
        starts over, and EHLO must be sent again. Also call it at once for implicit TLS."""
        self._tls = True
        self._authenticated = False  # RFC 3207 4.2: nothing learnt before TLS is kept
        if self._state is State.WAIT_TLS:
            self._in.clear()  # nothing sent in plaintext may count after the handshake
            self._state = next_state(self._state, Input.TLS_UP)
            self._esmtp = False

    def receive_eof(self) -> None:
        """The peer will send nothing more. Commands it already sent are still answered (a
        client may half-close after a pipelined ``.`` and QUIT and wait for the replies);
        the session closes once nothing buffered can make progress."""
        self._eof = True

    @property
    def output_size(self) -> int:
        """Octets of replies not yet taken by :meth:`data_to_send`."""
        return len(self._out)

    def next_event(self) -> Event | None:
        """The next event, or None when more input (or an answer to a Request) is needed."""
        if not self._events and self._pending is None and self._state is not State.CLOSED:
            self._process()
            if self._eof and not self._events and self._pending is None:
                self._close()  # what is left can never be completed
        return self._events.pop(0) if self._events else None

    def respond(self, reply: Reply) -> None:
        """Answer the pending Request; a 2xx answer moves the state machine."""
        request = self._pending
        if request is None:
            if self._state is State.CLOSED:
                return  # the session ended while the transport was deciding
            raise LocalProtocolError("respond() without a pending request")
        self._pending = None
        accepted = 200 <= reply.code < 300
        if isinstance(request, Hello):
            if accepted:
                self._esmtp = request.verb == "EHLO"
                self._state = next_state(self._state, Input.HELLO)
                reply = self._greeting(request.verb)
        elif isinstance(request, MailFrom):
            if accepted:
                self._state = next_state(self._state, Input.MAIL)
                self._smtputf8 = request.smtputf8
                self._rcpts = 0
        elif isinstance(request, RcptTo):
            if accepted:
                self._state = next_state(self._state, Input.RCPT)
                self._rcpts += 1
        elif isinstance(request, EndOfData):
            self._end_transaction()
            if accepted:
                self._errors = 0
        elif isinstance(request, StartTls) and accepted:
            # CVE-2011-0411 class: commands pipelined after STARTTLS arrived in plaintext;
            # they are dropped, never run inside the TLS session.
            self._in.clear()
            self._state = next_state(self._state, Input.STARTTLS)
        elif isinstance(request, (Auth, AuthResponse)):
            if reply.code == 334:
                self._state = next_state(self._state, Input.AUTH)
            else:
                self._state = next_state(self._state, Input.AUTH_END)
                self._authenticated = self._authenticated or reply.code == 235
        self._reply(reply)
        if reply.code == 421 and self._state is not State.CLOSED:
            self._close()  # RFC 5321 3.8: 421 means the channel is closing

    def data_to_send(self) -> bytes:
        out = bytes(self._out)
        self._out.clear()
        return out

    def timeout(self) -> None:
        """The peer was silent too long (RFC 5321 4.5.3.2): 421 4.4.2 and close."""
        if self._state is not State.CLOSED:
            self._out += with_host(codes.TIMEOUT, self._settings.hostname).to_bytes()
            self._close()

    def shutdown(self, reply: Reply | None = None) -> None:
        """The server stops (RFC 5321 3.8): 421 4.3.2, or ``reply``, and close."""
        if self._state is not State.CLOSED:
            if reply is None:
                reply = with_host(codes.SHUTDOWN, self._settings.hostname)
            self._out += reply.to_bytes()
            self._close()

    # -- plumbing -----------------------------------------------------------------------------
    def _close(self) -> None:
        self._state = State.CLOSED
        self._in.clear()
        self._decoder = None
        self._skip = 0
        if self._pending is not None:
            try:
                self._events.remove(self._pending)
            except ValueError:
                pass
            self._pending = None

    def _request(self, request: Request) -> None:
        self._pending = request
        self._events.append(request)

    def _reply(self, reply: Reply) -> None:
        self._out += reply.to_bytes()
        if reply.code >= 400 and reply.code != 421:
            self._errors += 1
            limit = self._settings.max_errors
            if 0 < limit <= self._errors and self._state is not State.CLOSED:
                bye = with_host(codes.TOO_MANY_ERRORS, self._settings.hostname)
                self._out += bye.to_bytes()
                self._events.append(ProtocolViolation(bye))
                self._close()

    def _greeting(self, verb: str) -> Reply:
        settings = self._settings
        if verb == "HELO":
            return Reply(250, None, settings.hostname)
        size = max(settings.max_message_size, 0)
        return Reply(250, None, (
            settings.hostname, f"SIZE {size}", "PIPELINING", "8BITMIME",
            "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN",
            *(e for e in self.extensions if not (self._tls and e == "STARTTLS")),
            *self._auth_keyword(),
        ))

    def _auth_keyword(self) -> tuple[str, ...]:
        if self.auth_mechanisms and (self._tls or not self.auth_requires_tls):
            return ("AUTH " + " ".join(self.auth_mechanisms),)
        return ()

    def _reset_transaction(self, always: bool = False) -> None:
        """RSET, or HELO/EHLO (RFC 5321 4.1.1.1, 4.1.1.5): drop the transaction, if any.

        RSET always reports :class:`Reset`; HELO/EHLO only when a transaction was open.
        """
        if always or self._state in TRANSACTION_STATES:
            self._events.append(Reset())
        self._state = next_state(self._state, Input.RSET)
        self._decoder = None
        self._smtputf8 = False
        self._rcpts = 0

    def _end_transaction(self) -> None:
        self._state = next_state(self._state, Input.END)
        self._decoder = None
        self._smtputf8 = False
        self._rcpts = 0

    # -- input --------------------------------------------------------------------------------
    def _process(self) -> None:
        """Consume input until a Request waits, input runs out, or the session closes."""
        buf = self._in
        while buf and self._pending is None:
            state = self._state
            if self._skip:
                count = min(self._skip, len(buf))
                del buf[:count]
                self._skip -= count
            elif state is State.IN_DATA:
                self._read_data()
            elif state is State.IN_BDAT:
                self._read_chunk()
            elif state in COMMAND_STATES:
                if not self._read_command():
                    break
            elif state is State.IN_AUTH:
                if not self._read_auth_response():
                    break
            else:  # CLOSED
                break

    def _read_command(self) -> bool:
        """Handle one command line; False when no whole line is buffered."""
        buf = self._in
        newline = buf.find(b"\n")
        if self._long_line is not None:  # throwing away an overlong line
            if newline < 0:
                buf.clear()
                return False
            del buf[: newline + 1]
            reply, self._long_line = self._long_line, None
            self._refuse_long_line(reply)
            return True
        bound = AUTH_LINE if self.auth_mechanisms else COMMAND_LINE_WITH_PARAMS
        if newline < 0:
            if len(buf) > bound:
                buf.clear()
                self._long_line = codes.LINE_TOO_LONG
            return False
        line = bytes(buf[: newline + 1])
        del buf[: newline + 1]
        if len(line) > bound:
            self._refuse_long_line(codes.LINE_TOO_LONG)
        else:
            self._command(line)
        return True

    def _read_auth_response(self) -> bool:
        """One SASL response line (RFC 4954 4); False when no whole line is buffered."""
        buf = self._in
        newline = buf.find(b"\n")
        if newline < 0 and len(buf) <= AUTH_LINE:
            return False
        if newline < 0 or newline + 1 > AUTH_LINE:  # too long: the exchange is over
            if newline < 0:
                buf.clear()
                self._long_line = codes.AUTH_LINE_TOO_LONG  # the rest is drained as a command
            else:
                del buf[: newline + 1]
            self._state = next_state(self._state, Input.AUTH_END)
            self._events.append(AuthAborted(codes.AUTH_LINE_TOO_LONG))
            if self._long_line is None:
                self._refuse_long_line(codes.AUTH_LINE_TOO_LONG)
            return True
        line = bytes(buf[:newline])
        del buf[: newline + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        self._request(AuthResponse(line))
        return True

    def _refuse_long_line(self, reply: Reply) -> None:
        self._events.append(ProtocolViolation(reply))
        self._reply(reply)

    def _command(self, line: bytes) -> None:
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        verb, _, arg_bytes = text.partition(b" ")
        verb = verb.upper()
        handler = _COMMANDS.get(verb)
        if handler is None:
            if verb in _FORBIDDEN:
                self._out += _FORBIDDEN_REPLY.to_bytes()
                self._events.append(ProtocolViolation(_FORBIDDEN_REPLY))
                self._close()
            elif verb in _NOT_IMPLEMENTED:
                self._reply(codes.NOT_IMPLEMENTED)
            else:
                self._reply(codes.UNRECOGNIZED)
            return
        limit = _LINE_LIMITS.get(verb, COMMAND_LINE)
        if len(line) > limit:
            self._refuse_long_line(codes.LINE_TOO_LONG)
            return
        if _CONTROL.search(arg_bytes) is not None:
            self._reply(Reply(501, "5.5.4", "Syntax error: control character in command"))
            return
        try:
            arg = arg_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(Reply(501, "5.5.4", "Syntax error: invalid UTF-8"))
            return
        handler(self, arg)

    def _read_data(self) -> None:
        decoder = self._decoder
        assert isinstance(decoder, DataDecoder)
        data = bytes(self._in)
        self._in.clear()
        content, rest = decoder.feed(data)
        if content:
            self._events.append(DataChunk(content))
        if rest is None:
            return
        self._in += rest
        if decoder.error is not None:
            self._abort(decoder.error)
        else:
            self._request(EndOfData(decoder.size))

    def _read_chunk(self) -> None:
        decoder = self._decoder
        assert isinstance(decoder, ChunkDecoder)
        buf = self._in
        count = min(self._bdat_left, len(buf))
        content = decoder.decode(bytes(buf[:count]))
        del buf[:count]
        self._bdat_left -= count
        if content:
            self._events.append(DataChunk(content))
        if not self._bdat_left:
            self._end_chunk()

    def _end_chunk(self) -> None:
        decoder = self._decoder
        assert isinstance(decoder, ChunkDecoder)
        if self._bdat_last:
            content = decoder.finish()
            if content:
                self._events.append(DataChunk(content))
        if decoder.error is not None:
            self._abort(decoder.error)
        elif self._bdat_last:
            self._request(EndOfData(decoder.size))
        else:
            self._state = next_state(self._state, Input.CHUNK)
            self._reply(codes.octets_received(self._bdat_size))

    def _abort(self, reply: Reply) -> None:
        """Refuse the message just read: its reply, DataAborted, then the transaction is gone."""
        if reply.code == 554:  # bare CR/LF or NUL: the shape of a smuggling attempt
            self._events.append(ProtocolViolation(reply))
        self._events.append(DataAborted(reply))
        self._events.append(Reset())
        self._end_transaction()
        self._reply(reply)

    # -- commands -----------------------------------------------------------------------------
    def _hello(self, verb: str, arg: str) -> None:
        name = arg.strip()
        if not name:
            self._reply(Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
            return
        self._reset_transaction()
        self._request(Hello(verb, name))

    def _starttls(self, arg: str) -> None:
        if self._tls:
            self._reply(Reply(503, "5.5.1", "Error: TLS already active"))
        elif "STARTTLS" not in self.extensions:
            self._reply(codes.NOT_IMPLEMENTED)
        elif arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        elif not allowed(self._state, Input.STARTTLS):
            self._reply(sequence_error(self._state, Input.STARTTLS))
        else:
            self._request(StartTls())

    def _auth(self, arg: str) -> None:
        """AUTH mechanism [initial-response] (RFC 4954 4)."""
        if not self.auth_mechanisms:
            self._reply(codes.NOT_IMPLEMENTED)
        elif not allowed(self._state, Input.AUTH):
            self._reply(sequence_error(self._state, Input.AUTH))
        elif self._authenticated:
            self._reply(Reply(503, "5.5.1", "Error: already authenticated"))
        elif not self._esmtp:
            self._reply(Reply(503, "5.5.1", "Error: send EHLO first"))
        elif self.auth_requires_tls and not self._tls:
            self._reply(codes.ENCRYPTION_REQUIRED)
        else:
            words = arg.split(" ")
            mechanism = words[0].upper()
            if len(words) > 2 or _MECHANISM.fullmatch(mechanism) is None or words[-1] == "":
                self._reply(Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
            elif mechanism not in self.auth_mechanisms:
                self._reply(codes.AUTH_MECHANISM)
            else:
                self._request(Auth(mechanism, words[1] if len(words) == 2 else None))

    def _helo(self, arg: str) -> None:
        self._hello("HELO", arg)

    def _ehlo(self, arg: str) -> None:
        self._hello("EHLO", arg)

    def _mail(self, arg: str) -> None:
        if not allowed(self._state, Input.MAIL):
            self._reply(sequence_error(self._state, Input.MAIL))
            return
        if self.require_auth and not self._authenticated:
            if self.auth_requires_tls and not self._tls:
                self._reply(Reply(530, "5.7.0", "Must issue a STARTTLS command first"))
            else:
                self._reply(codes.AUTH_REQUIRED)
            return
        try:
            event = mail_from(arg, esmtp=self._esmtp, max_size=self._settings.max_message_size,
                              auth=bool(self.auth_mechanisms))
        except ParamError as exc:
            self._reply(exc.reply)
            return
        self._request(event)

    def _rcpt(self, arg: str) -> None:
        if not allowed(self._state, Input.RCPT):
            self._reply(sequence_error(self._state, Input.RCPT))
            return
        try:
            event = rcpt_to(arg, esmtp=self._esmtp, utf8=self._smtputf8)
        except ParamError as exc:
            self._reply(exc.reply)
            return
        if 0 < self._settings.max_recipients <= self._rcpts:
            self._reply(codes.TOO_MANY_RECIPIENTS)
            return
        self._request(event)

    def _data(self, arg: str) -> None:
        if arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if not allowed(self._state, Input.DATA):
            self._reply(sequence_error(self._state, Input.DATA))
            return
        settings = self._settings
        self._state = next_state(self._state, Input.DATA)
        self._decoder = DataDecoder(
            max_size=settings.max_message_size,
            max_line_length=settings.max_line_length,
            reject_bare_lf=settings.reject_bare_lf,
        )
        self._events.append(DataStart("DATA"))
        self._reply(codes.START_DATA)

    def _bdat(self, arg: str) -> None:
        words = arg.split()
        sized = (
            len(words) >= 1
            and words[0].isascii()
            and words[0].isdigit()
            and len(words[0]) <= _SIZE_DIGITS
        )
        if not sized:
            # Its octets follow, but how many is unknown: the stream cannot be put back in
            # step, and reading them as commands would be smuggling. End the session.
            bye = Reply(421, "4.5.4", f"{self._settings.hostname} Error: BDAT without a valid "
                        "chunk size; closing the connection")
            self._out += bye.to_bytes()
            self._events.append(ProtocolViolation(bye))
            self._close()
            return
        size = int(words[0])
        if not (len(words) == 1 or (len(words) == 2 and words[1].upper() == "LAST")):
            self._skip = size  # the size is known: its octets are thrown away, never parsed
            self._reply(Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"))
            return
        refusal: Reply | None = None
        if not self._esmtp:
            refusal = Reply(503, "5.5.1", "Error: send EHLO first")
        elif not allowed(self._state, Input.BDAT):
            refusal = sequence_error(self._state, Input.BDAT)
        if refusal is not None:  # the octets still follow: throw them away
            self._skip = size
            self._reply(refusal)
            return
        if self._state is State.WAIT_DATA:
            settings = self._settings
            self._decoder = ChunkDecoder(
                max_size=settings.max_message_size,
                max_line_length=settings.max_line_length,
                reject_bare_lf=settings.reject_bare_lf,
            )
            self._events.append(DataStart("BDAT"))
        decoder = self._decoder
        assert isinstance(decoder, ChunkDecoder)
        decoder.expect(size)
        self._state = next_state(self._state, Input.BDAT)
        self._bdat_size = self._bdat_left = size
        self._bdat_last = len(words) == 2
        if not size:
            self._end_chunk()

    def _rset(self, arg: str) -> None:
        if arg.strip():
            self._reply(Reply(501, "5.5.4", "Syntax: RSET"))
            return
        self._reset_transaction(always=True)
        self._reply(codes.OK)

    def _noop(self, arg: str) -> None:
        self._reply(codes.OK)

    def _vrfy(self, arg: str) -> None:
        argument = arg.strip()
        if not argument:
            self._reply(Reply(501, "5.5.4", "Syntax: VRFY address"))
            return
        self._request(Vrfy(argument))

    def _help(self, arg: str) -> None:
        self._reply(codes.HELP)

    def _quit(self, arg: str) -> None:
        self._out += codes.BYE.to_bytes()
        self._events.append(Quit())
        self._close()


_COMMANDS: Final[dict[bytes, Callable[[ServerConnection, str], None]]] = {
    b"HELO": ServerConnection._helo,
    b"EHLO": ServerConnection._ehlo,
    b"MAIL": ServerConnection._mail,
    b"RCPT": ServerConnection._rcpt,
    b"DATA": ServerConnection._data,
    b"BDAT": ServerConnection._bdat,
    b"RSET": ServerConnection._rset,
    b"NOOP": ServerConnection._noop,
    b"VRFY": ServerConnection._vrfy,
    b"HELP": ServerConnection._help,
    b"QUIT": ServerConnection._quit,
    b"STARTTLS": ServerConnection._starttls,
    b"AUTH": ServerConnection._auth,
}

#: Longest line per verb, CRLF included; every other verb gets :data:`COMMAND_LINE`.
_LINE_LIMITS: Final[dict[bytes, int]] = {
    b"MAIL": COMMAND_LINE_WITH_PARAMS,
    b"RCPT": COMMAND_LINE_WITH_PARAMS,
    b"AUTH": AUTH_LINE,
}
