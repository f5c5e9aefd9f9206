"""The SMTP server's states and every transition between them, in one table.

States are named for what the machine waits for. The order of commands is RFC 5321 3.3 and 4.1.4
(HELO/EHLO, then MAIL, RCPT..., DATA) with RFC 3030's BDAT as the alternative to DATA::

    WAIT_HELO --HELLO--> WAIT_MAIL --MAIL--> WAIT_RCPT --RCPT--> WAIT_DATA --DATA--> IN_DATA
                            ^                                    |  ^  |RCPT            |
                            |                                    |  +--+                |
                            |                                   BDAT                    |
                            |                                    v                      |
                            |                   WAIT_BDAT <-CHUNK- IN_BDAT              |
                            |                        +---BDAT---->   |                  |
                            +--------------------END (answered or aborted)--------------+

AUTH (RFC 4954) is taken in WAIT_MAIL only; a 334 answer moves to IN_AUTH, where each line is a
SASL response, until the exchange ends (AUTH_END) back in WAIT_MAIL.

HELLO and RSET lead back to WAIT_MAIL from every state that reads commands (RFC 5321 4.1.4:
EHLO implies RSET); RSET before HELO stays in WAIT_HELO. MAIL, RCPT and HELLO move the machine
only when the transport answers 2xx; DATA and BDAT move it at once. CLOSED is reached from
anywhere (QUIT, EOF, timeout, shutdown, too many errors) and is final.

A command whose (state, input) pair is missing from :data:`TRANSITIONS` is out of sequence and
gets 503 5.5.1 with the text from :func:`sequence_error`.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final

from postroom.smtp.codes import BAD_SEQUENCE, Reply


class State(Enum):
    WAIT_HELO = auto()  # banner sent; HELO or EHLO expected
    WAIT_MAIL = auto()  # greeted, no transaction
    WAIT_RCPT = auto()  # MAIL accepted, no recipient yet
    WAIT_DATA = auto()  # one recipient or more: RCPT, DATA or BDAT
    IN_DATA = auto()  # reading DATA content up to <CRLF>.<CRLF>
    IN_BDAT = auto()  # reading the octets of a BDAT chunk
    WAIT_BDAT = auto()  # a BDAT chunk was read; the next BDAT (or RSET) expected
    WAIT_TLS = auto()  # 220 to STARTTLS sent; the transport does the TLS handshake (RFC 3207)
    IN_AUTH = auto()  # a 334 challenge was sent; a SASL response line expected (RFC 4954 4)
    CLOSED = auto()  # final


class Input(Enum):
    HELLO = auto()  # HELO/EHLO answered 2xx
    MAIL = auto()  # MAIL answered 2xx
    RCPT = auto()  # RCPT answered 2xx
    DATA = auto()  # DATA command taken
    BDAT = auto()  # BDAT command taken: its chunk follows
    CHUNK = auto()  # a BDAT chunk without LAST was read
    END = auto()  # end of message answered, or the content refused
    RSET = auto()  # RSET
    STARTTLS = auto()  # STARTTLS answered 220
    TLS_UP = auto()  # the transport finished the TLS handshake
    AUTH = auto()  # AUTH (or a response) answered 334: the exchange goes on
    AUTH_END = auto()  # the exchange ended: 235, or any failure


_S = State
_I = Input

#: (state, input) -> next state. Everything that moves the machine is here.
TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (_S.WAIT_HELO, _I.HELLO): _S.WAIT_MAIL,
    (_S.WAIT_HELO, _I.RSET): _S.WAIT_HELO,
    (_S.WAIT_HELO, _I.STARTTLS): _S.WAIT_TLS,
    (_S.WAIT_MAIL, _I.STARTTLS): _S.WAIT_TLS,
    # RFC 3207 4.2: after the handshake the session starts over: a new EHLO is needed.
    (_S.WAIT_TLS, _I.TLS_UP): _S.WAIT_HELO,
    (_S.WAIT_MAIL, _I.HELLO): _S.WAIT_MAIL,
    # RFC 4954 4: AUTH only outside a mail transaction; each 334 waits for one response line.
    (_S.WAIT_MAIL, _I.AUTH): _S.IN_AUTH,
    (_S.WAIT_MAIL, _I.AUTH_END): _S.WAIT_MAIL,
    (_S.IN_AUTH, _I.AUTH): _S.IN_AUTH,
    (_S.IN_AUTH, _I.AUTH_END): _S.WAIT_MAIL,
    (_S.WAIT_MAIL, _I.MAIL): _S.WAIT_RCPT,
    (_S.WAIT_MAIL, _I.RSET): _S.WAIT_MAIL,
    (_S.WAIT_RCPT, _I.HELLO): _S.WAIT_MAIL,
    (_S.WAIT_RCPT, _I.RCPT): _S.WAIT_DATA,
    (_S.WAIT_RCPT, _I.RSET): _S.WAIT_MAIL,
    (_S.WAIT_DATA, _I.HELLO): _S.WAIT_MAIL,
    (_S.WAIT_DATA, _I.RCPT): _S.WAIT_DATA,
    (_S.WAIT_DATA, _I.DATA): _S.IN_DATA,
    (_S.WAIT_DATA, _I.BDAT): _S.IN_BDAT,
    (_S.WAIT_DATA, _I.RSET): _S.WAIT_MAIL,
    (_S.IN_DATA, _I.END): _S.WAIT_MAIL,
    (_S.IN_BDAT, _I.CHUNK): _S.WAIT_BDAT,
    (_S.IN_BDAT, _I.END): _S.WAIT_MAIL,
    (_S.WAIT_BDAT, _I.HELLO): _S.WAIT_MAIL,
    (_S.WAIT_BDAT, _I.BDAT): _S.IN_BDAT,
    (_S.WAIT_BDAT, _I.RSET): _S.WAIT_MAIL,
}

#: States in which input is read as command lines.
COMMAND_STATES: Final = frozenset(
    {_S.WAIT_HELO, _S.WAIT_MAIL, _S.WAIT_RCPT, _S.WAIT_DATA, _S.WAIT_BDAT}
)
#: States between an accepted MAIL and the end of its message (RFC 5321 3.3 "mail transaction").
TRANSACTION_STATES: Final = frozenset(
    {_S.WAIT_RCPT, _S.WAIT_DATA, _S.IN_DATA, _S.IN_BDAT, _S.WAIT_BDAT}
)

_NEED_HELO = "Error: send HELO/EHLO first"
_NEED_MAIL = "Error: need MAIL command"
_NEED_RCPT = "Error: need RCPT command"
_NESTED = "Error: nested MAIL command"
_IN_BDAT = "Error: BDAT transaction in progress"

_SEQUENCE_TEXT: Final[dict[tuple[State, Input], str]] = {
    (_S.WAIT_HELO, _I.MAIL): _NEED_HELO,
    (_S.WAIT_HELO, _I.RCPT): _NEED_HELO,
    (_S.WAIT_HELO, _I.DATA): _NEED_HELO,
    (_S.WAIT_HELO, _I.BDAT): _NEED_HELO,
    (_S.WAIT_MAIL, _I.RCPT): _NEED_MAIL,
    (_S.WAIT_MAIL, _I.DATA): _NEED_MAIL,
    (_S.WAIT_MAIL, _I.BDAT): _NEED_MAIL,
    (_S.WAIT_RCPT, _I.MAIL): _NESTED,
    (_S.WAIT_RCPT, _I.DATA): _NEED_RCPT,
    (_S.WAIT_RCPT, _I.BDAT): _NEED_RCPT,
    (_S.WAIT_DATA, _I.MAIL): _NESTED,
    (_S.WAIT_BDAT, _I.MAIL): _NESTED,
    (_S.WAIT_BDAT, _I.RCPT): _IN_BDAT,
    (_S.WAIT_BDAT, _I.DATA): "Error: DATA after BDAT",
    (_S.WAIT_RCPT, _I.STARTTLS): "Error: MAIL transaction in progress",
    (_S.WAIT_DATA, _I.STARTTLS): "Error: MAIL transaction in progress",
    (_S.WAIT_BDAT, _I.STARTTLS): "Error: MAIL transaction in progress",
    (_S.WAIT_HELO, _I.AUTH): "Error: send EHLO first",
    (_S.WAIT_RCPT, _I.AUTH): "Error: MAIL transaction in progress",
    (_S.WAIT_DATA, _I.AUTH): "Error: MAIL transaction in progress",
    (_S.WAIT_BDAT, _I.AUTH): "Error: MAIL transaction in progress",
}


def allowed(state: State, step: Input) -> bool:
    return (state, step) in TRANSITIONS


def next_state(state: State, step: Input) -> State:
    """The state after ``step``; a KeyError means the core broke its own table (a bug)."""
    return TRANSITIONS[(state, step)]


def sequence_error(state: State, step: Input) -> Reply:
    """The 503 5.5.1 for a command that ``state`` does not allow (RFC 5321 4.3.2)."""
    text = _SEQUENCE_TEXT.get((state, step))
    return BAD_SEQUENCE if text is None else Reply(503, "5.5.1", text)
