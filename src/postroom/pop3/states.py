"""The POP3 server's states and every transition between them, in one table.

RFC 1939 3 names three states: AUTHORIZATION, TRANSACTION and UPDATE. Here they are split by
what the machine waits for::

    AUTHORIZATION --USER--> WAIT_PASS --LOGIN--> TRANSACTION --QUIT--> UPDATE --> CLOSED
       |   ^  ^                 |                    ^
       |   |  +------FAIL-------+                    |
       |   |                                          |
       |   +--FAIL-- IN_AUTH --LOGIN------------------+
       +--AUTH------->  ^
       +--LOGIN (APOP) ------------------------------>+
       +--STLS--> WAIT_TLS --TLS_UP--> AUTHORIZATION

LOGIN happens when the transport has opened the maildrop (RFC 1939 4: "the POP3 server then
acquires an exclusive-access lock on the maildrop"), not when the password matched. FAIL is a
failed authentication, or a maildrop that could not be opened. CLOSED is reached from anywhere
(QUIT, EOF, timeout, shutdown, too many errors) and is final.
"""

from __future__ import annotations

from enum import Enum, auto
from typing import Final


class State(Enum):
    AUTHORIZATION = auto()  # greeting sent: USER, APOP, AUTH, STLS, CAPA or QUIT expected
    WAIT_PASS = auto()  # USER accepted: PASS expected
    IN_AUTH = auto()  # AUTH: a challenge is out, a response line expected (RFC 5034 4)
    WAIT_TLS = auto()  # +OK to STLS sent; the transport does the handshake (RFC 2595 4)
    TRANSACTION = auto()  # logged in, the maildrop locked (RFC 1939 5)
    UPDATE = auto()  # QUIT in TRANSACTION: the transport commits the deletions (RFC 1939 6)
    CLOSED = auto()  # final

    # Enum's own __hash__ is Python code (hash of the name), and the core tests a state's set
    # membership several times per command; the members are singletons compared by identity.
    __hash__ = object.__hash__

    @property
    def phase(self) -> str:
        """The RFC 1939 state this one belongs to."""
        return _PHASES[self]


class Input(Enum):
    USER = auto()  # USER accepted
    AUTH = auto()  # AUTH began an exchange
    LOGIN = auto()  # the maildrop was opened
    FAIL = auto()  # authentication failed, or the maildrop could not be opened
    STLS = auto()  # STLS answered +OK
    TLS_UP = auto()  # the TLS handshake succeeded
    QUIT = auto()  # QUIT in TRANSACTION


_S = State
_I = Input

#: (state, input) -> next state. Everything that moves the machine is here.
TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (_S.AUTHORIZATION, _I.USER): _S.WAIT_PASS,
    (_S.WAIT_PASS, _I.USER): _S.WAIT_PASS,  # a second USER replaces the first
    (_S.AUTHORIZATION, _I.AUTH): _S.IN_AUTH,
    (_S.WAIT_PASS, _I.AUTH): _S.IN_AUTH,
    (_S.AUTHORIZATION, _I.LOGIN): _S.TRANSACTION,  # APOP; AUTH decided without a challenge
    (_S.WAIT_PASS, _I.LOGIN): _S.TRANSACTION,
    (_S.IN_AUTH, _I.LOGIN): _S.TRANSACTION,
    (_S.AUTHORIZATION, _I.FAIL): _S.AUTHORIZATION,
    (_S.WAIT_PASS, _I.FAIL): _S.AUTHORIZATION,
    (_S.IN_AUTH, _I.FAIL): _S.AUTHORIZATION,
    (_S.AUTHORIZATION, _I.STLS): _S.WAIT_TLS,
    (_S.WAIT_PASS, _I.STLS): _S.WAIT_TLS,
    (_S.WAIT_TLS, _I.TLS_UP): _S.AUTHORIZATION,  # RFC 2595 4: start over, forget USER
    (_S.TRANSACTION, _I.QUIT): _S.UPDATE,
}

#: States that read command lines.
COMMAND_STATES: Final = frozenset({_S.AUTHORIZATION, _S.WAIT_PASS, _S.TRANSACTION})
#: States of RFC 1939's AUTHORIZATION state.
AUTHORIZATION_STATES: Final = frozenset({_S.AUTHORIZATION, _S.WAIT_PASS, _S.IN_AUTH, _S.WAIT_TLS})

_PHASES: Final[dict[State, str]] = {
    _S.AUTHORIZATION: "AUTHORIZATION",
    _S.WAIT_PASS: "AUTHORIZATION",
    _S.IN_AUTH: "AUTHORIZATION",
    _S.WAIT_TLS: "AUTHORIZATION",
    _S.TRANSACTION: "TRANSACTION",
    _S.UPDATE: "UPDATE",
    _S.CLOSED: "CLOSED",
}


def allowed(state: State, step: Input) -> bool:
    return (state, step) in TRANSITIONS


def next_state(state: State, step: Input) -> State:
    """The state after *step*; a KeyError means the core broke its own table (a bug)."""
    return TRANSITIONS[(state, step)]
