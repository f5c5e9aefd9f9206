"""What the POP3 server core tells its transport, as frozen dataclasses named by nouns.

::

    Event                     something happened; informational unless it is a Request
    ├── Request               the transport MUST answer it, with the method named below
    │   ├── StartTls          STLS (RFC 2595 4): proceed() or refuse(response)
    │   ├── CheckPassword     USER/PASS, PLAIN, LOGIN: run ``check`` off the event loop,
    │   │                     then password_checked(ok)
    │   ├── LoginFailed       an authentication failed: proceed() sends the core's -ERR,
    │   │                     refuse(response) another; the transport counts it (throttling)
    │   │                     and may wait before answering, when it is ``counted``
    │   ├── OpenMaildrop      authenticated: lock and list the maildrop, then
    │   │                     maildrop_opened(Maildrop or a list of MaildropMessage), or
    │   │                     refuse(response): [IN-USE] ...
    │   ├── Retrieve          RETR or TOP: message_data(chunk)... then message_end(), or
    │   │                     refuse(response) before the first chunk (not asked for a RETR
    │   │                     of the message the transport read ahead: prepare())
    │   └── Commit            QUIT in TRANSACTION: the UPDATE state (RFC 1939 6): remove the
    │                         deleted messages, mark the retrieved ones seen, then proceed(),
    │                         or refuse(response) when some could not be removed
    ├── SizeMismatch          RETR sent another number of octets than LIST announced
    └── ProtocolViolation     for the log: an overlong line, too many bad commands ...

While a Request waits for its answer the core parses no further input, which keeps the
responses to pipelined commands (RFC 2449 6.6) in order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from postroom.pop3.content import valid_uidl
from postroom.pop3.responses import Response
from postroom.sasl.outcomes import FailureKind, PasswordCheck

#: Space-separated UIDLs, each as RFC 1939 7 allows (see :func:`.content.valid_uidl`).
_UIDLS: Final = re.compile(r"[\x21-\x7e]{1,70}(?: [\x21-\x7e]{1,70})*")


class Event:
    """Base of everything :meth:`Pop3Connection.next_event` returns."""

    __slots__ = ()


class Request(Event):
    """An event the transport must answer (see the module docstring for how)."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class MaildropMessage:
    """One message of the maildrop as the transport lists it at login."""

    size: int  # octets with CRLF line ends: what RETR will send (RFC 1939 11)
    uidl: str  # RFC 1939 7: 1-70 characters 0x21-0x7E, unique and stable (see content.uidl_for)


class Maildrop:
    """The whole maildrop as the transport lists it at login: each message's size and UIDL, in
    message-number order, and the total. Checked once when made, and immutable, so a transport
    may keep one and give it to every session of a mailbox that has not changed (listing and
    checking 10,000 entries at each login costs more than the rest of a warm login).

    Raises ValueError for a negative size, a UIDL RFC 1939 7 does not allow, or two equal UIDLs.
    """

    __slots__ = ("_octets", "_sizes", "_uidls")

    def __init__(self, sizes: Iterable[int], uidls: Iterable[str]) -> None:
        self._sizes = tuple(sizes)
        self._uidls = tuple(uidls)
        if len(self._sizes) != len(self._uidls):
            raise ValueError("as many sizes as UIDLs are needed")
        if self._sizes and min(self._sizes) < 0:
            raise ValueError("a negative message size")
        # One match over all of them: joined by spaces (which no UIDL may hold: 0x21-0x7E), the
        # UIDLs must be runs of 1-70 such characters, as many runs as UIDLs.
        joined = " ".join(self._uidls)
        if self._uidls and (_UIDLS.fullmatch(joined) is None
                            or joined.count(" ") != len(self._uidls) - 1):
            bad = next(u for u in self._uidls if not valid_uidl(u))
            raise ValueError(f"UIDL {bad!r}: not 1-70 characters 0x21-0x7E (RFC 1939 7)")
        if len(set(self._uidls)) != len(self._uidls):
            raise ValueError("two messages with the same UIDL")
        self._octets = sum(self._sizes)

    @classmethod
    def of(cls, messages: Iterable[MaildropMessage]) -> Maildrop:
        entries = list(messages)
        return cls([m.size for m in entries], [m.uidl for m in entries])

    @property
    def sizes(self) -> tuple[int, ...]:
        return self._sizes

    @property
    def uidls(self) -> tuple[str, ...]:
        return self._uidls

    @property
    def octets(self) -> int:
        """The sum of the sizes: STAT's answer while nothing is deleted."""
        return self._octets

    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return f"<Maildrop of {len(self._sizes)} messages, {self._octets} octets>"


@dataclass(frozen=True, slots=True)
class StartTls(Request):
    """STLS. proceed(): the core sends ``+OK``, drops input pipelined after the command (it came
    in plaintext) and waits until the transport calls ``tls_established()``."""


@dataclass(frozen=True, slots=True)
class CheckPassword(Request):
    """A password to verify: ``check.check()`` is argon2, slow on purpose. A throttled client's
    check may be answered ``password_checked(False)`` without running it."""

    mechanism: str  # "USER" for USER/PASS, else the SASL mechanism
    check: PasswordCheck

    @property
    def user(self) -> str:
        return self.check.authcid


#: Failures that are a client's guess and count against it (throttling, the fail2ban line): the
#: same set as SMTP AUTH's (``postroom.net.auth``). A cancel ("*", RFC 5034 4) and a failure on
#: our side (the credential store was down) are not the client's fault.
COUNTED_FAILURES: frozenset[FailureKind] = frozenset({
    FailureKind.REJECTED, FailureKind.MALFORMED, FailureKind.TOO_LONG,
    FailureKind.INITIAL_RESPONSE_REFUSED})


@dataclass(frozen=True, slots=True)
class LoginFailed(Request):
    user: str | None  # the identity claimed, when the client got that far
    mechanism: str  # "USER", "APOP" or the SASL mechanism
    kind: FailureKind
    reason: str  # for the log

    @property
    def counted(self) -> bool:
        """A guess by the client (:data:`COUNTED_FAILURES`): the transport counts it against the
        client and logs it for fail2ban; otherwise it answers at once and counts nothing."""
        return self.kind in COUNTED_FAILURES


@dataclass(frozen=True, slots=True)
class OpenMaildrop(Request):
    user: str  # the authentication identity, as the client sent it
    mechanism: str


@dataclass(frozen=True, slots=True)
class Retrieve(Request):
    number: int  # 1-based message number
    uidl: str
    size: int  # what LIST announced
    lines: int | None  # TOP: body lines wanted; None for RETR


@dataclass(frozen=True, slots=True)
class Commit(Request):
    deleted: tuple[int, ...]  # message numbers marked with DELE
    retrieved: tuple[int, ...]  # message numbers sent whole by RETR (not deleted): mark seen


@dataclass(frozen=True, slots=True)
class SizeMismatch(Event):
    """The message sent had another CRLF size than the one listed (a wrong ``W=`` in a name
    written by another program): the client may reject it. For the log, and to repair."""

    number: int
    announced: int
    sent: int


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """For the log only; the core has already replied (and perhaps closed)."""

    response: Response
