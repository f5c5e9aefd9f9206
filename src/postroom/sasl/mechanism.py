"""The shape every SASL mechanism shares: settings, states and the one transition table.

A mechanism is a small state machine for one authentication exchange (RFC 4422 3). The caller
(normally an :class:`~postroom.sasl.exchange.Exchange`, which does the base64 and "*") drives it:

- :meth:`Mechanism.start` with the initial response (decoded), or None when the client sent none;
- :meth:`Mechanism.respond` with each later client response (decoded);
- :meth:`Mechanism.password_checked` with the result of a :class:`PasswordCheck`.

Each returns one :class:`~postroom.sasl.outcomes.Outcome`, and the outcome alone moves the machine::

    WAIT_START --start--> WAIT_RESPONSE --respond--> ... --> DONE
                  |            ^    |
                  |      Challenge  PasswordCheck
                  |            |    v
                  +--------> WAIT_CHECK --password_checked--> DONE

A mechanism never raises on what the client sends: every malformed input is a
:class:`~postroom.sasl.outcomes.Failure`. Calling a method in the wrong state is our bug and raises
:class:`~postroom.sasl.outcomes.LocalProtocolError`. DONE is final.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import ClassVar, Final

from postroom.errors import StorageError
from postroom.sasl.credentials import MIN_ITERATIONS, CredentialStore
from postroom.sasl.outcomes import (
    Challenge,
    Failure,
    FailureKind,
    LocalProtocolError,
    Outcome,
    PasswordCheck,
    Success,
)


class State(Enum):
    WAIT_START = auto()  # created; start() expected
    WAIT_RESPONSE = auto()  # a challenge is out; respond() expected
    WAIT_CHECK = auto()  # a PasswordCheck is out; password_checked() expected
    DONE = auto()  # Success or Failure returned; final


class Call(Enum):
    START = auto()
    RESPOND = auto()
    CHECKED = auto()


#: The state each kind of outcome leads to.
AFTER: Final[dict[type[Outcome], State]] = {
    Challenge: State.WAIT_RESPONSE,
    PasswordCheck: State.WAIT_CHECK,
    Success: State.DONE,
    Failure: State.DONE,
}

#: The state in which each call is allowed.
ALLOWED: Final[dict[Call, State]] = {
    Call.START: State.WAIT_START,
    Call.RESPOND: State.WAIT_RESPONSE,
    Call.CHECKED: State.WAIT_CHECK,
}


@dataclass(frozen=True, slots=True)
class SaslSettings:
    """What the mechanisms need from outside, injected so that nothing here does I/O.

    - *credentials*: the store to look identities up in.
    - *hostname*: the server's name, in CRAM-MD5's challenge (RFC 2195 2).
    - *nonce*: a fresh unpredictable string of printable ASCII without "," (RFC 5802 5.1
      ``printable``) on every call, e.g. ``lambda: secrets.token_urlsafe(18)``; SCRAM's server
      nonce and the random part of CRAM-MD5's challenge.
    - *clock*: seconds since the epoch, e.g. ``time.time``; CRAM-MD5's timestamp.
    - *decoy_secret*: a server secret of 16 octets or more, the same in every process and across
      restarts. SCRAM derives the salt it shows for an unknown user from it: a real user's salt
      never changes, so a made-up one must not either, or asking twice would tell them apart.
    - *scram_iterations*: the iteration count new SCRAM keys are derived with; also the count
      shown to an unknown user, who should look like everyone else.
    - *decoy_hash*: an argon2 hash at the configured cost, of no one's password; PLAIN and LOGIN
      verify against it for unknown users so the time taken does not tell. None skips that.
    """

    credentials: CredentialStore
    hostname: str
    nonce: Callable[[], str]
    clock: Callable[[], float]
    decoy_secret: bytes = field(repr=False)
    scram_iterations: int = MIN_ITERATIONS
    decoy_hash: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if len(self.decoy_secret) < 16:
            raise ValueError("decoy_secret must be 16 octets or more")

    def fresh_nonce(self) -> str:
        """A nonce from *nonce*, checked: LocalProtocolError if the source breaks its contract."""
        value = self.nonce()
        if not value or not all(0x21 <= ord(ch) <= 0x7E and ch != "," for ch in value):
            raise LocalProtocolError("the nonce source returned something other than printable ASCII")
        return value


class Mechanism(ABC):
    """Base of the server side of every mechanism; see the module docstring."""

    #: The registered SASL name (RFC 4422 3.1), upper case.
    name: ClassVar[str]
    #: RFC 4422 5: may the client send an initial response? (False: server-first mechanisms.)
    client_first: ClassVar[bool] = True

    def __init__(self, settings: SaslSettings) -> None:
        self._settings = settings
        self._state = State.WAIT_START
        self._authcid: str | None = None  # once known, for the log

    @property
    def state(self) -> State:
        return self._state

    @property
    def authcid(self) -> str | None:
        """The identity the client claimed, once the mechanism has read it (for the log)."""
        return self._authcid

    @property
    def done(self) -> bool:
        return self._state is State.DONE

    def start(self, initial: bytes | None) -> Outcome:
        """Begin, with the decoded initial response (None: the client sent none)."""
        self._enter(Call.START)
        if initial is not None and not self.client_first:
            return self._leave(self.failure(FailureKind.INITIAL_RESPONSE_REFUSED))
        return self._leave(self._guarded(lambda: self._start(initial)))

    def respond(self, response: bytes) -> Outcome:
        """The client's decoded answer to the last challenge."""
        self._enter(Call.RESPOND)
        return self._leave(self._guarded(lambda: self._respond(response)))

    def password_checked(self, ok: bool) -> Outcome:
        """The result of the :class:`PasswordCheck` this mechanism returned."""
        self._enter(Call.CHECKED)
        return self._leave(self._checked(ok))

    # --- for subclasses ---

    @abstractmethod
    def _start(self, initial: bytes | None) -> Outcome: ...

    @abstractmethod
    def _respond(self, response: bytes) -> Outcome: ...

    def _checked(self, ok: bool) -> Outcome:
        raise LocalProtocolError(f"{self.name} never asks for a password check")

    def failure(self, kind: FailureKind, detail: str = "") -> Failure:
        """A Failure with the general reason for *kind*, plus *detail* when it reveals nothing."""
        reason = f"{kind.value}: {detail}" if detail else kind.value
        return Failure(kind, reason, self._authcid)

    # --- plumbing ---

    def _enter(self, call: Call) -> None:
        if ALLOWED[call] is not self._state:
            raise LocalProtocolError(f"{self.name}: {call.name} while in {self._state.name}")

    def _leave(self, outcome: Outcome) -> Outcome:
        self._state = AFTER[type(outcome)]
        return outcome

    def _guarded(self, step: Callable[[], Outcome]) -> Outcome:
        try:
            return step()
        except StorageError:
            return self.failure(FailureKind.UNAVAILABLE)
