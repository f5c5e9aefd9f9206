"""What the SMTP server core tells its transport, as frozen dataclasses named by nouns.

::

    Event                     something happened; informational unless it is a Request
    ├── Request               the transport MUST answer it with exactly one ``respond(reply)``
    │   ├── Hello             HELO / EHLO (RFC 5321 4.1.1.1)
    │   ├── MailFrom          MAIL FROM with its parameters (4.1.1.2; RFC 1870, 6152, 3461, 6531)
    │   ├── RcptTo            RCPT TO with its DSN parameters (4.1.1.3; RFC 3461)
    │   ├── Vrfy              VRFY (4.1.1.6)
    │   ├── StartTls          STARTTLS (RFC 3207)
    │   ├── Auth              AUTH with its mechanism and initial response (RFC 4954)
    │   ├── AuthResponse      one SASL response line after a 334 challenge
    │   └── EndOfData         the message content is complete (4.1.1.4; RFC 3030 BDAT LAST)
    ├── DataStart             DATA accepted (354 already queued) or the first BDAT chunk began
    ├── DataChunk             decoded content: dot-unstuffed, every line ending in CRLF
    ├── DataAborted           the core refused the content and queued the reply; discard it
    ├── Reset                 the transaction is gone: every RSET; HELO/EHLO during a
    │                         transaction; after every DataAborted
    ├── AuthAborted           the core ended a SASL exchange itself (overlong line): forget it
    ├── Quit                  221 queued; the connection closes
    └── ProtocolViolation     for the log: too many errors, an overlong command line ...

While a Request waits for its answer the core parses no further input, which keeps the replies
to pipelined commands (RFC 2920) in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from postroom.message.address import Address
from postroom.smtp.codes import Reply


class Event:
    """Base of everything :meth:`ServerConnection.next_event` returns."""

    __slots__ = ()


class Request(Event):
    """An event the transport must answer with :meth:`ServerConnection.respond`."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Hello(Request):
    """HELO or EHLO. Answer 2xx to accept; the core then sends its own greeting text (for EHLO
    the multi-line extension list), so the text of a 2xx answer is not used."""

    verb: str  # "HELO" or "EHLO"
    name: str  # the client's name for itself, as given


@dataclass(frozen=True, slots=True)
class MailFrom(Request):
    address: Address  # ``Address("", "")`` for the null reverse path ``<>``
    size: int | None  # RFC 1870 SIZE=, octets
    body: str | None  # RFC 6152 BODY=: "7BIT" or "8BITMIME"
    smtputf8: bool  # RFC 6531 SMTPUTF8
    ret: str | None  # RFC 3461 RET=: "FULL" or "HDRS"
    envid: str | None  # RFC 3461 ENVID=, xtext-decoded


@dataclass(frozen=True, slots=True)
class RcptTo(Request):
    address: Address  # ``Address("Postmaster", "")`` for the bare ``<Postmaster>``
    notify: frozenset[str] | None  # RFC 3461 NOTIFY=: {"NEVER"} or some of SUCCESS/FAILURE/DELAY
    orcpt: str | None  # RFC 3461 ORCPT=, "addr-type;address" with the address xtext-decoded
    postmaster: bool  # the bare ``<Postmaster>`` (RFC 5321 4.5.1)


@dataclass(frozen=True, slots=True)
class Vrfy(Request):
    argument: str


@dataclass(frozen=True, slots=True)
class StartTls(Request):
    """STARTTLS (RFC 3207). Answer 220 to go ahead: the core then discards any input the client
    pipelined after the command, waits in WAIT_TLS, and the transport calls
    :meth:`~postroom.smtp.server.ServerConnection.tls_established` after the handshake.
    Answer 454 4.7.0 when TLS cannot be offered now."""


@dataclass(frozen=True, slots=True)
class Auth(Request):
    """AUTH (RFC 4954 4). Answer ``334 <base64>`` to send a challenge (the core then reads one
    :class:`AuthResponse`), ``235 2.7.0`` when authenticated, or a failure reply. The core has
    checked the state, TLS and the mechanism's syntax; the transport runs the SASL exchange."""

    mechanism: str  # upper-cased SASL mechanism name
    initial_response: str | None = field(repr=False)  # as sent: base64, "=" for empty; or None


@dataclass(frozen=True, slots=True)
class AuthResponse(Request):
    """One client line after a 334 challenge, without its line end. Answered like :class:`Auth`.
    It may hold a password (PLAIN, LOGIN): never log it."""

    line: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class EndOfData(Request):
    """The message is complete. The transaction ends with the answer, whatever its code."""

    size: int  # octets of the decoded message, lines ending in CRLF


@dataclass(frozen=True, slots=True)
class DataStart(Event):
    kind: str  # "DATA" or "BDAT"


@dataclass(frozen=True, slots=True)
class DataChunk(Event):
    data: bytes


@dataclass(frozen=True, slots=True)
class DataAborted(Event):
    """The core refused the content and already queued ``reply``; a :class:`Reset` follows."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset(Event):
    """The transaction in progress, if any, is discarded."""


@dataclass(frozen=True, slots=True)
class AuthAborted(Event):
    """The core ended the SASL exchange in progress and queued ``reply`` (a response line too
    long, RFC 4954 4: 500 5.5.6); the transport drops the exchange."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Quit(Event):
    """QUIT was answered with 221; the connection is closed."""


@dataclass(frozen=True, slots=True)
class ProtocolViolation(Event):
    """For the log only; the core has already acted (replied, and perhaps closed)."""

    reply: Reply
