"""The sans-I/O POP3 server: bytes in, events out; answers in, bytes out.

RFC 1939 (POP3), with RFC 2449 (CAPA, response codes, PIPELINING), RFC 2595 (STLS), RFC 5034
(AUTH with SASL) and RFC 3206 (the [SYS/*] and [AUTH] codes).

Commands: in AUTHORIZATION USER, PASS, APOP (when configured), AUTH, STLS (when offered); in
TRANSACTION STAT, LIST, RETR, DELE, NOOP, RSET, TOP, UIDL; CAPA and QUIT anywhere.

How a transport drives it::

    conn = Pop3Connection(settings, apop_timestamp=...); conn.start()
    on bytes:  conn.receive_data(data)
    loop:      event = conn.next_event()       # None: need more input, an answer, or a write
               if isinstance(event, Request): answer it (see events.py), now or later
               out = conn.data_to_send()       # send it; stop when both are empty
    always:    close the connection once conn.closed and the output is sent
    idle:      n = conn.read_ahead_wanted()    # optional: read message n, conn.prepare(n, data)

Each :class:`~postroom.pop3.events.Request` has one answer; until it comes no further input is
parsed, so the responses to pipelined commands stay in order (RFC 2449 6.6).

Password checks go out as :class:`CheckPassword` (argon2 belongs off the event loop); the SASL
mechanisms are :mod:`postroom.sasl`'s, and USER/PASS runs through its PLAIN mechanism, so every
way in looks the password up the same way. Plaintext passwords (USER/PASS, PLAIN, LOGIN) are
refused before TLS unless ``allow_plaintext`` (RFC 2595 2.3 and 4; ``-ERR [AUTH]``).

Output stays bounded: LIST and UIDL of a large maildrop are produced in pieces of about
:data:`OUTPUT_CHUNK` octets as the transport takes them, and a message is fed in chunks by the
transport, which watches :attr:`Pop3Connection.output_size` and its socket's flow control. The
core does the CRLF conversion, byte-stuffing and terminator (:mod:`postroom.pop3.content`).
A message read ahead (:meth:`Pop3Connection.prepare`) is held encoded, one at a time, until
the next RETR; its size is the transport's to bound.

Input is read in lines ending with LF (a CR before it is dropped). RFC 2449 4 bounds command
lines at 255 octets; PASS may take :data:`PASS_LINE` (long passwords), AUTH
:data:`AUTH_LINE` (an initial response, RFC 5034 4) and the response lines of an exchange
:data:`SASL_LINE`. Longer lines are drained to their LF, never buffered, and refused.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from postroom.errors import PostroomError, StorageError
from postroom.pop3 import responses as r
from postroom.pop3.content import ContentEncoder
from postroom.pop3.events import (
    CheckPassword,
    Commit,
    Event,
    LoginFailed,
    Maildrop,
    MaildropMessage,
    OpenMaildrop,
    ProtocolViolation,
    Request,
    Retrieve,
    SizeMismatch,
    StartTls,
)
from postroom.pop3.responses import Response
from postroom.pop3.states import (
    AUTHORIZATION_STATES,
    COMMAND_STATES,
    Input,
    State,
    next_state,
)
from postroom.sasl import (
    DEFAULT_MECHANISMS,
    MAX_RESPONSE_OCTETS,
    Challenge,
    Exchange,
    Failure,
    FailureKind,
    Outcome,
    PasswordCheck,
    Plain,
    SaslSettings,
    Success,
    open_exchange,
)

#: RFC 2449 4: "Commands ... MUST NOT exceed 255 octets, including the terminating CRLF".
COMMAND_LINE: Final = 255
#: PASS carries a password as typed; RFC 1939 sets no bound, so a long one gets twice the room.
PASS_LINE: Final = 512
#: AUTH with an initial response (RFC 5034 4): a response of MAX_RESPONSE_OCTETS in base64 plus
#: "AUTH " and a mechanism name (RFC 4422 3.1: at most 20 characters) and CRLF.
AUTH_LINE: Final = MAX_RESPONSE_OCTETS + 32
#: A response line inside an exchange: MAX_RESPONSE_OCTETS of base64 and CRLF.
SASL_LINE: Final = MAX_RESPONSE_OCTETS + 2
#: Listings are produced, and parsing of pipelined commands pauses, past this much output.
OUTPUT_CHUNK: Final = 64 * 1024
#: Lines per piece of a LIST or UIDL listing.
_LISTING_PIECE: Final = 512
#: Mechanisms that carry the password itself: not before TLS unless allowed (RFC 2595 2.3).
PLAINTEXT_MECHANISMS: Final = frozenset({"PLAIN", "LOGIN"})

_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # control characters other than TAB
_APOP_DIGEST = re.compile(r"[0-9a-fA-F]{32}")


class LocalProtocolError(PostroomError):
    """The transport misused the core (a bug on our side): an answer with nothing pending,
    the wrong answer for the pending request, an invalid maildrop listing."""


@dataclass(frozen=True, slots=True)
class Pop3Settings:
    """What a POP3 session needs from the configuration.

    - *sasl*: the credential store and SASL settings; USER/PASS and APOP use them too.
    - *mechanisms*: SASL mechanisms to offer (PLAIN and LOGIN only over TLS unless
      *allow_plaintext*).
    - *stls*: offer STLS (the transport has a certificate, the listener is not implicit TLS).
    - *apop*: offer APOP (RFC 1939 7); needs accounts with a plaintext-equivalent secret (the
      CRAM-MD5 secret), so it is off unless an operator asks for it.
    - *expire*: RFC 2449 6.7, days a retrieved message stays at least, or "NEVER"; advertised
      in CAPA when set. 0 is enforced here: a message retrieved by RETR goes at QUIT as if
      DELE had been given (TOP previews a message and does not count). The transport removes
      messages retrieved more than *expire* days ago when a later session logs in.
    - *login_delay*: RFC 2449 6.5, seconds between logins to one mailbox; advertised in CAPA
      when set, enforced by the transport (``-ERR [LOGIN-DELAY]`` to a login too soon, once
      the credentials were right). Both values are the same for every user, so CAPA never
      carries RFC 2449's "USER" suffix and says the same before and after login.
    """

    hostname: str
    sasl: SaslSettings
    mechanisms: tuple[str, ...] = DEFAULT_MECHANISMS
    allow_plaintext: bool = False
    stls: bool = False
    apop: bool = False
    expire: int | Literal["NEVER"] | None = None
    login_delay: int | None = None
    greeting: str = r.GREETING_TEXT
    max_errors: int = 10  # bad commands before the session is closed; 0: no limit
    max_auth_failures: int = 3  # failed logins in one session before it is closed; 0: no limit


class Pop3Connection:
    """One POP3 server session, without I/O. See the module docstring for the protocol."""

    __slots__ = (
        "_apop_timestamp",
        "_auth_failures",
        "_checker",
        "_content",
        "_content_started",
        "_deleted",
        "_eof",
        "_errors",
        "_events",
        "_exchange",
        "_in",
        "_last_retr",
        "_long_line",
        "_mechanism",
        "_octets",
        "_out",
        "_out_size",
        "_pending",
        "_prepared",
        "_retrieved",
        "_retrieved_octets",
        "_settings",
        "_sizes",
        "_state",
        "_stream",
        "_tls",
        "_uidls",
        "_user",
        "_user_name",
    )

    def __init__(self, settings: Pop3Settings, *, apop_timestamp: str | None = None,
                 tls: bool = False) -> None:
        """*apop_timestamp* is this session's ``<process-id.clock@hostname>`` (RFC 1939 7),
        unique per connection, made by the transport; *tls* is True on an implicit-TLS port."""
        self._settings = settings
        self._apop_timestamp = apop_timestamp if settings.apop else None
        self._tls = tls
        self._state = State.AUTHORIZATION
        self._in = bytearray()
        #: Output waiting for data_to_send(): pieces joined once there, so a message body is
        #: copied once on its way out, not into a buffer and out of it again.
        self._out: list[bytes] = []
        self._out_size = 0
        self._events: list[Event] = []
        self._pending: Request | None = None
        self._stream: Iterator[bytes] | None = None  # a listing being produced
        self._content: ContentEncoder | None = None  # a message being sent
        self._content_started = False
        self._long_line = False
        self._eof = False
        self._errors = 0
        self._auth_failures = 0
        self._user_name: str | None = None  # from USER, waiting for PASS
        self._user: str | None = None  # logged in as
        self._exchange: Exchange | None = None
        self._checker: Callable[[bool], Outcome] | None = None
        self._mechanism = ""
        self._sizes: tuple[int, ...] = ()
        self._uidls: tuple[str, ...] = ()
        self._octets = 0  # the sum of _sizes
        self._deleted = bytearray()
        self._retrieved = bytearray()
        self._retrieved_octets = 0
        self._last_retr = 0  # the message the last whole RETR sent
        #: A message read ahead (see prepare()): its number, the whole response (status line,
        #: body, terminator), and its octets in CRLF form.
        self._prepared: tuple[int, bytes, int] | None = None

    # -- properties ---------------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def closed(self) -> bool:
        """The transport closes the connection once it has sent :meth:`data_to_send`."""
        return self._state is State.CLOSED

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def user(self) -> str | None:
        """The user logged in, from TRANSACTION on."""
        return self._user

    @property
    def logged_in(self) -> bool:
        return self._user is not None

    @property
    def output_size(self) -> int:
        """Octets queued and not yet taken by :meth:`data_to_send`."""
        return self._out_size

    @property
    def buffered(self) -> int:
        """Octets received and not consumed yet."""
        return len(self._in)

    @property
    def deleted(self) -> tuple[int, ...]:
        """Message numbers marked with DELE (and not undone by RSET)."""
        return tuple(i + 1 for i, d in enumerate(self._deleted) if d)

    @property
    def retrieved(self) -> tuple[int, ...]:
        """Message numbers sent whole by RETR: what a client has seen, even without QUIT."""
        return tuple(i + 1 for i, d in enumerate(self._retrieved) if d)

    @property
    def retrieved_octets(self) -> int:
        """Octets of message sent by RETR, in CRLF form (stuffing and terminators left out)."""
        return self._retrieved_octets

    @property
    def plaintext_allowed(self) -> bool:
        return self._tls or self._settings.allow_plaintext

    def offered_mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms offered now: the plaintext ones only when allowed."""
        plain_ok = self.plaintext_allowed
        return tuple(m for m in self._settings.mechanisms
                     if plain_ok or m.upper() not in PLAINTEXT_MECHANISMS)

    # -- the transport's verbs ----------------------------------------------------------------
    def start(self) -> None:
        """Queue the greeting (RFC 1939 4), with the APOP timestamp when APOP is offered."""
        text = self._settings.greeting
        if self._apop_timestamp is not None:
            text = f"{text} {self._apop_timestamp}"
        self._reply(r.ok(text))

    def reject_connection(self, response: Response) -> None:
        """Queue *response* (a -ERR, e.g. too many connections) instead of the greeting; close."""
        self._reply(response)
        self._close()

    def receive_data(self, data: bytes) -> None:
        if self._state is not State.CLOSED and self._state is not State.WAIT_TLS:
            self._in += data

    def receive_eof(self) -> None:
        """The peer will send nothing more. What it sent before is still answered; the
        session closes, without entering UPDATE (RFC 1939 6), once nothing can progress."""
        self._eof = True

    def tls_established(self) -> None:
        """The TLS handshake after our +OK to STLS succeeded (RFC 2595 4), or the port is
        implicit TLS: the session goes on in AUTHORIZATION, any USER forgotten."""
        self._tls = True
        if self._state is State.WAIT_TLS:
            self._in.clear()
            self._user_name = None
            self._state = next_state(self._state, Input.TLS_UP)

    def next_event(self) -> Event | None:
        """The next event, or None when more input, an answer, or a write is needed."""
        if not self._events and self._pending is None and self._stream is None:
            self._process()
            if (self._eof and not self._events and self._pending is None and self._stream is None
                    and self._content is None and b"\n" not in self._in):
                self._close()  # what is left can never be completed
        return self._events.pop(0) if self._events else None

    def data_to_send(self) -> bytes:
        """Everything queued, plus the next piece of a listing in progress."""
        stream = self._stream
        while stream is not None and self._out_size < OUTPUT_CHUNK:
            piece = next(stream, None)
            if piece is None:
                self._stream = stream = None
            else:
                self._send(piece)
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._out_size = 0
        return data

    def timeout(self) -> None:
        """The client was silent too long (RFC 1939 3: the autologout timer): -ERR and close,
        without entering UPDATE."""
        if self._state is not State.CLOSED:
            self._reply(r.TIMEOUT)
            self._close()

    def shutdown(self, response: Response | None = None) -> None:
        """The server stops: -ERR [SYS/TEMP] (or *response*) and close, without UPDATE."""
        if self._state is not State.CLOSED:
            self._reply(response or r.SHUTDOWN)
            self._close()

    # -- answers to requests ------------------------------------------------------------------
    def _take(self, *kinds: type[Request]) -> Request | None:
        request = self._pending
        if request is None:
            if self._state is State.CLOSED:
                return None  # the session ended while the transport was deciding
            raise LocalProtocolError("answer without a pending request")
        if not isinstance(request, kinds):
            raise LocalProtocolError(f"wrong answer for {type(request).__name__}")
        return request

    def proceed(self) -> None:
        """Go ahead with a :class:`StartTls`, :class:`LoginFailed` or :class:`Commit`."""
        request = self._take(StartTls, LoginFailed, Commit)
        if request is None:
            return
        self._pending = None
        if isinstance(request, StartTls):
            self._in.clear()  # pipelined after STLS in plaintext: never run inside TLS
            self._reply(r.ok("Begin TLS negotiation."))
            self._state = next_state(self._state, Input.STLS)
        elif isinstance(request, LoginFailed):
            self._login_failed(_failure_response(request.kind))
        elif isinstance(request, Commit):
            left = len(self._deleted) - self._deleted.count(1)
            self._reply(r.ok(f"Logging out, {left} message{'s' if left != 1 else ''} left."))
            self._close()

    def refuse(self, response: Response) -> None:
        """Answer the pending request with *response* (a -ERR). For a :class:`Retrieve` whose
        data has started nothing can be said any more: the session is closed."""
        request = self._pending
        if request is None:
            if self._state is State.CLOSED:
                return
            raise LocalProtocolError("refuse() without a pending request")
        self._pending = None
        if isinstance(request, StartTls):
            self._reply(response)
        elif isinstance(request, LoginFailed):
            self._login_failed(response)
        elif isinstance(request, (CheckPassword, OpenMaildrop)):
            self._end_auth()
            self._reply(response)
            self._state = next_state(self._state, Input.FAIL)
        elif isinstance(request, Retrieve):
            if self._content_started:
                self._content = None
                self._events.append(ProtocolViolation(response))
                self._close()
            else:
                self._content = None
                self._reply(response)
        elif isinstance(request, Commit):
            self._reply(response)
            self._close()

    def password_checked(self, ok: bool) -> None:
        """The result of the :class:`CheckPassword` request."""
        if self._take(CheckPassword) is None:
            return
        self._pending = None
        checker, self._checker = self._checker, None
        assert checker is not None
        self._outcome(checker(ok))

    def maildrop_opened(self, messages: Maildrop | Sequence[MaildropMessage]) -> None:
        """The maildrop is locked and listed (RFC 1939 4): the session enters TRANSACTION.
        A :class:`Maildrop` was checked when it was made; a list of entries is checked here."""
        request = self._take(OpenMaildrop)
        if request is None:
            return
        assert isinstance(request, OpenMaildrop)
        if isinstance(messages, Maildrop):
            maildrop = messages
        else:
            try:
                maildrop = Maildrop.of(messages)
            except ValueError as exc:
                raise LocalProtocolError(f"bad maildrop: {exc}") from None
        self._pending = None
        self._end_auth()
        self._sizes = maildrop.sizes
        self._uidls = maildrop.uidls
        self._octets = maildrop.octets
        self._deleted = bytearray(len(maildrop))
        self._retrieved = bytearray(len(maildrop))
        self._user = request.user
        self._state = next_state(self._state, Input.LOGIN)
        self._reply(r.ok("Logged in."))

    def message_data(self, chunk: bytes) -> bool:
        """The next piece of the message a :class:`Retrieve` asked for, as stored. Returns False
        when no more is wanted (TOP has its lines): skip to :meth:`message_end`."""
        request = self._take(Retrieve)
        if request is None:
            return False
        assert isinstance(request, Retrieve)
        if not self._content_started:
            self._start_content(request)
        content = self._content
        assert content is not None
        self._send(content.feed(chunk))
        return not content.done

    def message_end(self) -> None:
        """The message is complete: the terminator goes out and parsing goes on."""
        request = self._take(Retrieve)
        if request is None:
            return
        assert isinstance(request, Retrieve)
        if not self._content_started:
            self._start_content(request)
        content = self._content
        assert content is not None
        self._send(content.finish())
        self._pending = None
        self._content = None
        self._content_started = False
        if request.lines is None:
            self._retrieved_whole(request.number, content.octets)

    def read_ahead_wanted(self) -> int | None:
        """The message worth reading ahead now, or None.

        POP3 clients download a maildrop in order (RFC 1939 gives them nothing else to go by):
        after RETR of message n, RETR of n+1 is the likely next command. A transport that reads
        that message while the client is still taking in the last one, and hands it to
        :meth:`prepare`, takes the file read and the encoding off the time between the client's
        command and the answer. Asked when the core is idle: a message in TRANSACTION, not
        deleted, not prepared yet, and no input buffered (a command that is waiting goes first).
        """
        number = self._last_retr + 1
        if (self._state is not State.TRANSACTION or self._in or self._pending is not None
                or self._stream is not None or self._eof or self._last_retr == 0
                or number > len(self._sizes) or self._deleted[number - 1]):
            return None
        prepared = self._prepared
        if prepared is not None and prepared[0] == number:
            return None
        return number

    def prepare(self, number: int, data: bytes) -> None:
        """Message *number*, whole and as stored, read ahead (see :meth:`read_ahead_wanted`).
        It is encoded now and kept until the next RETR: a RETR of *number* sends it without a
        :class:`Retrieve` request, any other RETR drops it. One message is kept at a time; the
        transport bounds its size, and may :meth:`drop_prepared` it (an idle client)."""
        if (self._state is not State.TRANSACTION or not 1 <= number <= len(self._sizes)
                or self._deleted[number - 1]):
            return
        content = ContentEncoder()
        body = content.feed(data)
        # Joined now, while the client is busy, so the answer leaves in one piece, uncopied.
        response = b"".join((b"+OK %d octets\r\n" % self._sizes[number - 1], body, content.finish()))
        self._prepared = (number, response, content.octets)

    def drop_prepared(self) -> None:
        """Forget the message read ahead (its memory, and a copy that may go stale)."""
        self._prepared = None

    def _retrieved_whole(self, number: int, octets: int) -> None:
        self._retrieved[number - 1] = 1
        self._retrieved_octets += octets
        self._last_retr = number
        size = self._sizes[number - 1]
        if octets != size:
            self._events.append(SizeMismatch(number, size, octets))

    def _start_content(self, request: Retrieve) -> None:
        self._content_started = True
        if request.lines is None:
            self._send(b"+OK %d octets\r\n" % request.size)  # r.ok(f"{size} octets"), per RETR
        else:
            self._reply(r.ok("Top of message follows."))

    # -- plumbing -----------------------------------------------------------------------------
    def _close(self) -> None:
        self._state = State.CLOSED
        self._in.clear()
        self._stream = None
        self._content = None
        self._prepared = None
        self._exchange = None
        self._checker = None
        if self._pending is not None:
            try:
                self._events.remove(self._pending)
            except ValueError:
                pass
            self._pending = None

    def _request(self, request: Request) -> None:
        self._pending = request
        self._events.append(request)

    def _send(self, data: bytes) -> None:
        if data:
            self._out.append(data)
            self._out_size += len(data)

    def _reply(self, response: Response) -> None:
        self._send(response.to_bytes())

    def _error(self, response: Response) -> None:
        """A bad command: reply, and count it (RFC 2449 gives no limit; Dovecot closes at 10)."""
        self._reply(response)
        self._errors += 1
        limit = self._settings.max_errors
        if 0 < limit <= self._errors and self._state is not State.CLOSED:
            self._reply(r.TOO_MANY_ERRORS)
            self._events.append(ProtocolViolation(r.TOO_MANY_ERRORS))
            self._close()

    def _end_auth(self) -> None:
        self._exchange = None
        self._checker = None
        self._user_name = None

    # -- input --------------------------------------------------------------------------------
    def _process(self) -> None:
        """Consume input until a request waits, input runs out, or output should be taken."""
        buf = self._in
        while (buf and self._pending is None and self._stream is None
               and self._out_size < OUTPUT_CHUNK):
            state = self._state
            if state in COMMAND_STATES or state is State.IN_AUTH:
                if not self._read_line():
                    break
            else:  # WAIT_TLS, UPDATE waits for an answer, CLOSED
                break

    def _read_line(self) -> bool:
        """Handle one line; False when no whole line is buffered."""
        buf = self._in
        limit = SASL_LINE if self._state is State.IN_AUTH else AUTH_LINE
        newline = buf.find(b"\n")
        if self._long_line:
            if newline < 0:
                buf.clear()
                return False
            del buf[: newline + 1]
            self._long_line = False
            self._too_long()
            return True
        if newline < 0:
            if len(buf) > limit:
                buf.clear()
                self._long_line = True
            return False
        line = bytes(buf[: newline + 1])
        del buf[: newline + 1]
        if len(line) > limit:
            self._too_long()
        elif self._state is State.IN_AUTH:
            self._auth_line(line)
        else:
            self._command(line)
        return True

    def _too_long(self) -> None:
        if self._state is State.IN_AUTH:
            mechanism = self._exchange.mechanism if self._exchange is not None else None
            authcid = mechanism.authcid if mechanism is not None else None
            self._outcome(Failure(FailureKind.TOO_LONG, FailureKind.TOO_LONG.value, authcid))
            return
        self._events.append(ProtocolViolation(r.LINE_TOO_LONG))
        self._error(r.LINE_TOO_LONG)

    def _command(self, line: bytes) -> None:
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        verb, _, arg_bytes = text.partition(b" ")
        entry = _COMMANDS.get(verb.upper())
        if entry is None:
            self._error(r.UNKNOWN_COMMAND)
            return
        states, handler, limit = entry
        if len(line) > limit:
            self._events.append(ProtocolViolation(r.LINE_TOO_LONG))
            self._error(r.LINE_TOO_LONG)
            return
        if _CONTROL.search(arg_bytes) is not None:
            self._error(r.BAD_CHARACTERS)
            return
        try:
            arg = arg_bytes.decode("utf-8")
        except UnicodeDecodeError:
            self._error(r.BAD_CHARACTERS)
            return
        if self._state not in states:
            self._error(r.BAD_STATE)
            return
        handler(self, arg)

    # -- authentication -----------------------------------------------------------------------
    def _outcome(self, outcome: Outcome) -> None:
        """Act on what the mechanism (or exchange) answered."""
        if isinstance(outcome, Challenge):
            self._send(b"+ " + outcome.text.encode("ascii") + b"\r\n")
        elif isinstance(outcome, PasswordCheck):
            exchange = self._exchange
            if exchange is not None:
                self._checker = exchange.password_checked
            self._request(CheckPassword(self._mechanism, outcome))
        elif isinstance(outcome, Success):
            self._request(OpenMaildrop(outcome.authcid, self._mechanism))
        else:
            self._request(LoginFailed(outcome.authcid, self._mechanism, outcome.kind, outcome.reason))

    def _login_failed(self, response: Response) -> None:
        self._end_auth()
        self._state = next_state(self._state, Input.FAIL)
        self._reply(response)
        self._auth_failures += 1
        limit = self._settings.max_auth_failures
        if 0 < limit <= self._auth_failures:
            self._events.append(ProtocolViolation(response))
            self._close()

    def _auth_line(self, line: bytes) -> None:
        exchange = self._exchange
        assert exchange is not None
        text = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        self._outcome(exchange.receive(text))

    def _user_cmd(self, arg: str) -> None:
        name = arg.strip()
        if not name or " " in name:
            self._error(r.err("Syntax: USER <name>"))
        elif not self.plaintext_allowed:
            self._reply(r.PLAINTEXT_REFUSED)
        else:
            self._user_name = name
            self._state = next_state(self._state, Input.USER)
            self._reply(r.ok("Send your password."))

    def _pass_cmd(self, arg: str) -> None:
        if self._state is not State.WAIT_PASS or self._user_name is None:
            self._error(r.err("No user name given: send USER first."))
            return
        if not arg:
            self._error(r.err("Syntax: PASS <password>"))
            return
        if not self.plaintext_allowed:  # only reachable if TLS went away; be safe
            self._reply(r.PLAINTEXT_REFUSED)
            return
        mechanism = Plain(self._settings.sasl)
        self._mechanism = "USER"
        self._checker = mechanism.password_checked
        user = self._user_name
        self._user_name = None
        message = b"\0" + user.encode("utf-8") + b"\0" + arg.encode("utf-8")
        self._outcome(mechanism.start(message))

    def _apop_cmd(self, arg: str) -> None:
        timestamp = self._apop_timestamp
        if timestamp is None:
            self._error(r.UNKNOWN_COMMAND)
            return
        name, _, digest = arg.strip().rpartition(" ")
        if not name or " " in name or not _APOP_DIGEST.fullmatch(digest):
            self._error(r.err("Syntax: APOP <name> <digest>"))
            return
        self._mechanism = "APOP"
        self._user_name = None
        try:
            secret = self._settings.sasl.credentials.cram_secret(name)
        except StorageError:
            self._outcome(Failure(FailureKind.UNAVAILABLE, FailureKind.UNAVAILABLE.value, name))
            return
        # RFC 1939 7: digest = MD5(timestamp + shared secret), in lowercase hex.
        expected = hashlib.md5((timestamp + (secret or "")).encode("utf-8")).hexdigest()
        if secret is not None and hmac.compare_digest(expected, digest.lower()):
            self._outcome(Success(name))
        else:
            self._outcome(Failure(FailureKind.REJECTED, FailureKind.REJECTED.value, name))

    def _auth_cmd(self, arg: str) -> None:
        words = arg.split(" ")
        if not arg.strip():
            # RFC 1734's listing form, which some clients still send to learn the mechanisms.
            lines = "".join(f"{m}\r\n" for m in self.offered_mechanisms())
            self._reply(r.ok("Supported mechanisms follow."))
            self._send(lines.encode("ascii") + b".\r\n")
            return
        if len(words) > 2 or not words[0]:
            self._error(r.err("Syntax: AUTH <mechanism> [initial-response]"))
            return
        name = words[0].upper()
        initial = words[1] if len(words) == 2 else None
        if name in PLAINTEXT_MECHANISMS and not self.plaintext_allowed and name in {
                m.upper() for m in self._settings.mechanisms}:
            self._reply(r.PLAINTEXT_REFUSED)
            return
        exchange = open_exchange(name, self._settings.sasl, offered=self.offered_mechanisms())
        if exchange is None:
            self._reply(r.err("Unsupported authentication mechanism."))
            return
        self._exchange = exchange
        self._mechanism = name
        self._user_name = None
        self._state = next_state(self._state, Input.AUTH)
        self._outcome(exchange.begin(initial))

    def _stls_cmd(self, arg: str) -> None:
        if arg.strip():
            self._error(r.err("Syntax: STLS"))
        elif self._tls:
            self._reply(r.err("TLS is already active."))
        elif not self._settings.stls:
            self._reply(r.err("TLS is not available."))
        else:
            self._request(StartTls())

    def _capa_cmd(self, arg: str) -> None:
        settings = self._settings
        lines = ["CAPA", "TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self._state in AUTHORIZATION_STATES:
            if self.plaintext_allowed:
                lines.append("USER")
            mechanisms = self.offered_mechanisms()
            if mechanisms:
                lines.append("SASL " + " ".join(mechanisms))
            if settings.stls and not self._tls:
                lines.append("STLS")
        if settings.expire is not None:
            lines.append(f"EXPIRE {settings.expire}")
        if settings.login_delay is not None:
            lines.append(f"LOGIN-DELAY {settings.login_delay}")
        self._reply(r.ok("Capability list follows."))
        self._send("".join(f"{line}\r\n" for line in lines).encode("ascii") + b".\r\n")

    def _quit_cmd(self, arg: str) -> None:
        if self._state is State.TRANSACTION:
            self._state = next_state(self._state, Input.QUIT)
            if self._settings.expire == 0:
                # RFC 2449 6.7: no mail may stay on the server, so what the client retrieved
                # in this session is deleted in the UPDATE state as if it had said DELE.
                for i, got in enumerate(self._retrieved):
                    if got:
                        self._deleted[i] = 1
            retrieved = tuple(i + 1 for i, (got, gone) in enumerate(
                zip(self._retrieved, self._deleted, strict=True)) if got and not gone)
            self._request(Commit(self.deleted, retrieved))
        else:
            self._reply(r.ok("Logging out."))
            self._close()

    # -- transaction --------------------------------------------------------------------------
    def _live(self) -> tuple[int, int]:
        if not self._deleted.count(1):
            return len(self._sizes), self._octets
        count = octets = 0
        for size, gone in zip(self._sizes, self._deleted, strict=True):
            if not gone:
                count += 1
                octets += size
        return count, octets

    def _number(self, text: str) -> int | None:
        """A message number that names a message not deleted; else replies and None."""
        if not (text.isascii() and text.isdigit()) or len(text) > 10:
            self._error(r.err("Invalid message number."))
            return None
        number = int(text)
        if not 1 <= number <= len(self._sizes):
            self._reply(r.NO_SUCH_MESSAGE)
            return None
        if self._deleted[number - 1]:
            self._reply(r.err(f"Message {number} already deleted."))
            return None
        return number

    def _stat_cmd(self, arg: str) -> None:
        if arg.strip():
            self._error(r.err("Syntax: STAT"))
            return
        count, octets = self._live()
        self._reply(r.ok(f"{count} {octets}"))

    def _listing(self, kind: str) -> Iterator[bytes]:
        piece: list[str] = []
        values = self._sizes if kind == "LIST" else self._uidls
        for i, (value, gone) in enumerate(zip(values, self._deleted, strict=True)):
            if not gone:
                piece.append(f"{i + 1} {value}\r\n")
                if len(piece) >= _LISTING_PIECE:
                    yield "".join(piece).encode("ascii")
                    piece.clear()
        piece.append(".\r\n")
        yield "".join(piece).encode("ascii")

    def _list_cmd(self, arg: str) -> None:
        self._scan_listing("LIST", arg)

    def _uidl_cmd(self, arg: str) -> None:
        self._scan_listing("UIDL", arg)

    def _scan_listing(self, kind: str, arg: str) -> None:
        words = arg.split()
        if len(words) > 1:
            self._error(r.err(f"Syntax: {kind} [message]"))
        elif words:
            number = self._number(words[0])
            if number is not None:
                value = self._sizes[number - 1] if kind == "LIST" else self._uidls[number - 1]
                self._reply(r.ok(f"{number} {value}"))
        else:
            if kind == "LIST":
                count, octets = self._live()
                self._reply(r.ok(f"{count} messages ({octets} octets)"))
            else:
                self._reply(r.ok("Unique-ID listing follows."))
            self._stream = self._listing(kind)

    def _retr_cmd(self, arg: str) -> None:
        words = arg.split()
        prepared, self._prepared = self._prepared, None
        if len(words) != 1:
            self._error(r.err("Syntax: RETR <message>"))
            return
        number = self._number(words[0])
        if number is not None and prepared is not None and prepared[0] == number:
            self._send(prepared[1])
            self._retrieved_whole(number, prepared[2])
        elif number is not None:
            self._content = ContentEncoder()
            self._content_started = False
            self._request(Retrieve(number, self._uidls[number - 1], self._sizes[number - 1], None))

    def _top_cmd(self, arg: str) -> None:
        words = arg.split()
        if len(words) != 2 or not (words[1].isascii() and words[1].isdigit()):
            self._error(r.err("Syntax: TOP <message> <lines>"))
            return
        number = self._number(words[0])
        if number is not None:
            lines = int(words[1][:12])  # more lines than any message has are all of them
            self._content = ContentEncoder(lines)
            self._content_started = False
            self._request(Retrieve(number, self._uidls[number - 1], self._sizes[number - 1], lines))

    def _dele_cmd(self, arg: str) -> None:
        words = arg.split()
        if len(words) != 1:
            self._error(r.err("Syntax: DELE <message>"))
            return
        number = self._number(words[0])
        if number is not None:
            self._deleted[number - 1] = 1
            self._reply(r.ok(f"Message {number} deleted."))

    def _noop_cmd(self, arg: str) -> None:
        if arg.strip():
            self._error(r.err("Syntax: NOOP"))
        else:
            self._reply(r.ok())

    def _rset_cmd(self, arg: str) -> None:
        if arg.strip():
            self._error(r.err("Syntax: RSET"))
            return
        self._deleted = bytearray(len(self._sizes))
        count, octets = self._live()
        self._reply(r.ok(f"Maildrop has {count} messages ({octets} octets)."))


def _failure_response(kind: FailureKind) -> Response:
    """The -ERR for a failed authentication (RFC 3206: [AUTH] only for bad credentials)."""
    if kind is FailureKind.REJECTED:
        return r.AUTH_FAILED
    if kind is FailureKind.UNAVAILABLE:
        return r.AUTH_UNAVAILABLE
    if kind is FailureKind.CANCELLED:
        return r.err("Authentication cancelled.")
    if kind is FailureKind.TOO_LONG:
        return r.err("Authentication response too long.")
    if kind is FailureKind.INITIAL_RESPONSE_REFUSED:
        return r.err("This mechanism takes no initial response.")
    return r.err("Malformed authentication response.")


_AUTHZ = frozenset({State.AUTHORIZATION, State.WAIT_PASS})
_TRANS = frozenset({State.TRANSACTION})
_ANY = frozenset(COMMAND_STATES)
_Handler = Callable[[Pop3Connection, str], None]

#: verb -> (states it is valid in, handler, longest line).
_COMMANDS: Final[dict[bytes, tuple[frozenset[State], _Handler, int]]] = {
    b"USER": (_AUTHZ, Pop3Connection._user_cmd, COMMAND_LINE),
    b"PASS": (_AUTHZ, Pop3Connection._pass_cmd, PASS_LINE),
    b"APOP": (_AUTHZ, Pop3Connection._apop_cmd, COMMAND_LINE),
    b"AUTH": (_AUTHZ, Pop3Connection._auth_cmd, AUTH_LINE),
    b"STLS": (_AUTHZ, Pop3Connection._stls_cmd, COMMAND_LINE),
    b"CAPA": (_ANY, Pop3Connection._capa_cmd, COMMAND_LINE),
    b"QUIT": (_ANY, Pop3Connection._quit_cmd, COMMAND_LINE),
    b"STAT": (_TRANS, Pop3Connection._stat_cmd, COMMAND_LINE),
    b"LIST": (_TRANS, Pop3Connection._list_cmd, COMMAND_LINE),
    b"UIDL": (_TRANS, Pop3Connection._uidl_cmd, COMMAND_LINE),
    b"RETR": (_TRANS, Pop3Connection._retr_cmd, COMMAND_LINE),
    b"TOP": (_TRANS, Pop3Connection._top_cmd, COMMAND_LINE),
    b"DELE": (_TRANS, Pop3Connection._dele_cmd, COMMAND_LINE),
    b"NOOP": (_TRANS, Pop3Connection._noop_cmd, COMMAND_LINE),
    b"RSET": (_TRANS, Pop3Connection._rset_cmd, COMMAND_LINE),
}
