"""One SASL exchange as a protocol carries it: base64, "*", the initial response, final data.

Every protocol that offers SASL (SMTP AUTH, RFC 4954 4; POP3 AUTH, RFC 5034 4; IMAP
AUTHENTICATE, RFC 9051 6.2.2) frames an exchange the same way, so :class:`Exchange` does it once:

- Challenges go out in base64 (RFC 4648 4) and responses come back in base64, one per line;
  a response that is not strict base64 (a character outside the alphabet, "=" anywhere but at
  the end, RFC 4954 4) fails the exchange as MALFORMED (SMTP ``501 5.5.2``); one longer than
  :data:`MAX_RESPONSE_OCTETS` as TOO_LONG (SMTP ``500 5.5.6``).
- A response of "*" cancels (RFC 4954 4): CANCELLED (SMTP ``501 5.7.0``).
- The initial response (RFC 4422 3.3) comes with the command: absent is None, and "=" is an
  empty one (RFC 4954 4), which is not the same as none.
- RFC 4422 3.6 "additional data with success" (SCRAM's server-final message): a protocol that can
  send data with its success reply passes ``data_with_success=True`` and gets it in
  :attr:`Success.data`; SMTP (RFC 4954 4) and IMAP4rev1 cannot, so the exchange sends the data as
  one more challenge, expects an empty response, and only then reports the Success (with
  ``data`` None, since it was sent already).

The exchange's states, named for what it waits for::

    WAIT_START --begin--> WAIT_RESPONSE <--> (Challenge) ...
                               |  ^
                   PasswordCheck  password_checked
                               v  |
                            WAIT_CHECK
    any --Success with data, no data_with_success--> WAIT_ACK --empty line--> DONE
    any --Success / Failure--> DONE (final)

Usage by a protocol layer (SMTP AUTH)::

    exchange = open_exchange(name, settings)           # None: 504 5.5.4
    outcome = exchange.begin(initial_response)         # the AUTH argument, or None
    while True:
        match outcome:
            case Challenge():      send("334 " + outcome.text); line = read_line()
                                   outcome = exchange.receive(line)
            case PasswordCheck():  ok = await to_thread(outcome.check)
                                   outcome = exchange.password_checked(ok)
            case Success():        send("235 2.7.0 Authentication successful"); break
            case Failure():        send(reply_for(outcome.kind)); break
"""

from __future__ import annotations

import binascii
from collections.abc import Collection
from enum import Enum, auto
from typing import Final

from postroom.sasl.cram import CramMd5
from postroom.sasl.mechanism import Mechanism, SaslSettings
from postroom.sasl.outcomes import (
    Challenge,
    Failure,
    FailureKind,
    LocalProtocolError,
    Outcome,
    PasswordCheck,
    Success,
)
from postroom.sasl.password import Login, Plain
from postroom.sasl.scram import ScramSha256

#: Every mechanism this package implements, by its SASL name.
MECHANISMS: Final[dict[str, type[Mechanism]]] = {
    mechanism.name: mechanism for mechanism in (ScramSha256, Plain, Login, CramMd5)
}

#: What is offered unless configured otherwise, strongest first. CRAM-MD5 needs a
#: plaintext-equivalent secret, so it is offered only where an operator asks for it.
DEFAULT_MECHANISMS: Final = ("SCRAM-SHA-256", "PLAIN", "LOGIN")

#: The longest response line taken, in base64. RFC 4954 4: "12288 octets is considered to be a
#: sufficient line length limit" for deployed mechanisms; none of ours needs a tenth of it.
MAX_RESPONSE_OCTETS: Final = 12288

#: The cancellation response (RFC 4954 4, RFC 5034 4, RFC 9051 6.2.2).
CANCEL: Final = b"*"


class ExchangeState(Enum):
    WAIT_START = auto()  # begin() expected
    WAIT_RESPONSE = auto()  # a challenge is out; receive() expected
    WAIT_CHECK = auto()  # a PasswordCheck is out; password_checked() expected
    WAIT_ACK = auto()  # the success data went out as a challenge; an empty line expected
    DONE = auto()  # Success or Failure returned; final


def open_exchange(
    name: str,
    settings: SaslSettings,
    *,
    offered: Collection[str] = DEFAULT_MECHANISMS,
    data_with_success: bool = False,
) -> Exchange | None:
    """An exchange for mechanism *name* (any case), or None when it is not in *offered* or
    not implemented (SMTP ``504 5.5.4``)."""
    key = name.upper()
    mechanism = MECHANISMS.get(key)
    if mechanism is None or key not in {m.upper() for m in offered}:
        return None
    return Exchange(mechanism(settings), data_with_success=data_with_success)


def decode_response(line: bytes | str) -> bytes | None:
    """A response line's base64 (RFC 4648 4: alphabet only, padding required and only at the
    end) decoded; None when it is not base64. The empty line is the empty response."""
    if isinstance(line, str):
        if not line.isascii():
            return None
        line = line.encode("ascii")
    try:
        return binascii.a2b_base64(line, strict_mode=True)
    except binascii.Error:
        return None


def _octets(line: bytes | str) -> bytes:
    return line.encode("utf-8", "surrogateescape") if isinstance(line, str) else line


class Exchange:
    """One AUTH (or AUTHENTICATE) command from start to outcome; see the module docstring."""

    __slots__ = ("_data_with_success", "_mechanism", "_pending", "_state")

    def __init__(self, mechanism: Mechanism, *, data_with_success: bool = False) -> None:
        self._mechanism = mechanism
        self._data_with_success = data_with_success
        self._state = ExchangeState.WAIT_START
        self._pending: Success | None = None  # held while its data waits for the empty ACK

    @property
    def mechanism(self) -> Mechanism:
        return self._mechanism

    @property
    def state(self) -> ExchangeState:
        return self._state

    @property
    def done(self) -> bool:
        return self._state is ExchangeState.DONE

    def begin(self, initial_response: bytes | str | None = None) -> Outcome:
        """Start with the command's initial-response argument as sent ("=" for empty), or None."""
        self._require(ExchangeState.WAIT_START, "begin")
        if initial_response is None:
            return self._after(self._mechanism.start(None))
        raw = _octets(initial_response)
        if raw == b"=":
            return self._after(self._mechanism.start(b""))
        decoded = self._decode(raw)
        if isinstance(decoded, Failure):
            return decoded
        return self._after(self._mechanism.start(decoded))

    def receive(self, line: bytes | str) -> Outcome:
        """One client response line, without its line ending."""
        if self._state is ExchangeState.WAIT_ACK:
            return self._ack(line)
        self._require(ExchangeState.WAIT_RESPONSE, "receive")
        decoded = self._decode(line)
        if isinstance(decoded, Failure):
            return decoded
        return self._after(self._mechanism.respond(decoded))

    def password_checked(self, ok: bool) -> Outcome:
        """The result of running the :class:`PasswordCheck` this exchange returned."""
        self._require(ExchangeState.WAIT_CHECK, "password_checked")
        return self._after(self._mechanism.password_checked(ok))

    # --- plumbing ---

    def _require(self, state: ExchangeState, call: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"SASL exchange: {call}() while in {self._state.name}")

    def _fail(self, kind: FailureKind, detail: str = "") -> Failure:
        self._state = ExchangeState.DONE
        reason = f"{kind.value}: {detail}" if detail else kind.value
        return Failure(kind, reason, self._mechanism.authcid)

    def _decode(self, line: bytes | str) -> bytes | Failure:
        raw = _octets(line)
        if raw == CANCEL:
            return self._fail(FailureKind.CANCELLED)
        if len(raw) > MAX_RESPONSE_OCTETS:
            return self._fail(FailureKind.TOO_LONG)
        decoded = decode_response(raw)
        if decoded is None:
            return self._fail(FailureKind.MALFORMED, "not base64")
        return decoded

    def _ack(self, line: bytes | str) -> Outcome:
        raw = _octets(line)
        if raw == CANCEL:
            return self._fail(FailureKind.CANCELLED)
        if raw:
            return self._fail(FailureKind.MALFORMED, "expected an empty response")
        success, self._pending = self._pending, None
        if success is None:
            raise LocalProtocolError("SASL exchange: WAIT_ACK without a pending success")
        self._state = ExchangeState.DONE
        return Success(success.authcid, success.authzid, None)

    def _after(self, outcome: Outcome) -> Outcome:
        if isinstance(outcome, Challenge):
            self._state = ExchangeState.WAIT_RESPONSE
        elif isinstance(outcome, PasswordCheck):
            self._state = ExchangeState.WAIT_CHECK
        elif isinstance(outcome, Success) and outcome.data is not None and not self._data_with_success:
            self._pending = outcome
            self._state = ExchangeState.WAIT_ACK
            return Challenge(outcome.data)
        else:
            self._state = ExchangeState.DONE
        return outcome
