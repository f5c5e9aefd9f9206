"""What the SMTP client core takes and tells (the client's twin of :mod:`.events`).

::

    OutboundEnvelope, OutboundRecipient   what to send (RFC 5321 4.1.1.2-3 with RFC 1870,
                                          6152, 6531 and 3461 parameters)
    ClientSettings, ClientTimeouts        our name and the RFC 5321 4.5.3.2 timeouts
    ClientEvent                           what ClientConnection.next_event() returns
    ├── Greeting                          220 seen; EHLO queued
    ├── Ready                             EHLO/HELO accepted: the session takes commands
    ├── TlsReady / TlsRefused             the answer to STARTTLS (RFC 3207)
    ├── Authenticated                     235 to AUTH (RFC 4954)
    ├── ResetDone                         250 to a lone RSET
    ├── ContentWanted                     stream the message now (DATA 354, or BDAT)
    ├── TransactionDone                   a TransactionResult: one RecipientOutcome each
    ├── SessionFailed                     the session is over (the server's reply, or ours)
    └── Closed                            QUIT answered

:func:`verdict` is the one place that says what a reply code means for delivery, and
:class:`Stage` names the command a reply answered, as the mail log writes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from postroom.smtp.codes import Reply
from postroom.smtp.replies import Extensions


# -- verdicts and stages ------------------------------------------------------------------------
class Verdict(StrEnum):
    DELIVERED = "delivered"
    TEMPORARY = "deferred"  # try again later
    PERMANENT = "bounced"  # give up: a bounce is due


def verdict(code: int) -> Verdict:
    """RFC 5321 4.2.1: 2yz done, 5yz permanent; 4yz and anything unexpected is temporary."""
    if 200 <= code < 300:
        return Verdict.DELIVERED
    if 500 <= code < 600:
        return Verdict.PERMANENT
    return Verdict.TEMPORARY


class Stage(StrEnum):
    """The command a reply answered, named as the mail log names it."""

    CONNECT = "connect"
    GREETING = "initial greeting"
    EHLO = "EHLO"
    HELO = "HELO"
    STARTTLS = "STARTTLS"
    AUTH = "AUTH"
    RSET = "RSET"
    MAIL = "MAIL FROM"
    RCPT = "RCPT TO"
    DATA = "DATA"
    BDAT = "BDAT"
    END = "end of DATA"
    QUIT = "QUIT"

    @property
    def in_reply_to(self) -> str:
        """``in reply to RCPT TO command``, Postfix's wording."""
        if self is Stage.GREETING:
            return "in reply to initial greeting"
        return f"in reply to {self.value} command"


# -- what to send -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class OutboundRecipient:
    address: str  # as between the angle brackets of RCPT TO, e.g. ``bob@example.org``
    notify: frozenset[str] | None = None  # RFC 3461 NOTIFY words; None: not given
    orcpt: str | None = None  # RFC 3461 ORCPT, decoded: ``rfc822;bob@example.org``


@dataclass(frozen=True, slots=True)
class OutboundEnvelope:
    sender: str  # "" for the null reverse path
    recipients: tuple[OutboundRecipient, ...]
    size: int | None = None  # octets of the message, for SIZE= (RFC 1870)
    body: str | None = None  # "7BIT" or "8BITMIME" (RFC 6152)
    smtputf8: bool = False  # the message came in with SMTPUTF8 (RFC 6531)
    utf8_headers: bool = False  # its header section holds UTF-8 (RFC 6532): needs SMTPUTF8
    ret: str | None = None  # RFC 3461 RET: "FULL" or "HDRS"
    envid: str | None = None  # RFC 3461 ENVID, decoded

    @property
    def needs_smtputf8(self) -> bool:
        """The message cannot travel without SMTPUTF8 (RFC 6531 3.5): non-ASCII in an address
        or in the header section. A request without such content may be downgraded."""
        if not self.smtputf8:
            return False
        return (self.utf8_headers or not self.sender.isascii()
                or any(not r.address.isascii() for r in self.recipients))


@dataclass(frozen=True, slots=True)
class ClientTimeouts:
    """Seconds to wait for each reply; the defaults are RFC 5321 4.5.3.2's."""

    greeting: float = 300.0  # 4.5.3.2.1 initial 220 message: 5 minutes
    helo: float = 300.0  # EHLO/HELO, STARTTLS, AUTH: as MAIL
    mail: float = 300.0  # 4.5.3.2.2 MAIL: 5 minutes
    rcpt: float = 300.0  # 4.5.3.2.3 RCPT: 5 minutes
    data_init: float = 120.0  # 4.5.3.2.4 DATA initiation: 2 minutes
    data_block: float = 180.0  # 4.5.3.2.5 data block: 3 minutes per write
    data_end: float = 600.0  # 4.5.3.2.6 DATA termination: 10 minutes
    rset: float = 120.0  # not in the RFC; Postfix waits 20 s, a slow server deserves more
    quit: float = 30.0  # nothing depends on the answer


@dataclass(frozen=True, slots=True)
class ClientSettings:
    helo_name: str  # our name in EHLO/HELO (RFC 5321 4.1.1.1: an FQDN or an address literal)
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    pipelining: bool = True  # use PIPELINING when offered
    chunking: bool = True  # use BDAT when CHUNKING and PIPELINING are offered


# -- events ---------------------------------------------------------------------------------------
class ClientEvent:
    """Base of everything :meth:`ClientConnection.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Greeting(ClientEvent):
    reply: Reply  # the 220; EHLO is queued


@dataclass(frozen=True, slots=True)
class Ready(ClientEvent):
    """EHLO (or the HELO fallback) was accepted: the session takes commands."""

    reply: Reply
    extensions: Extensions
    esmtp: bool  # False after the HELO fallback


@dataclass(frozen=True, slots=True)
class TlsReady(ClientEvent):
    reply: Reply  # 220 to STARTTLS: start the handshake now


@dataclass(frozen=True, slots=True)
class TlsRefused(ClientEvent):
    reply: Reply  # STARTTLS refused; the session is Ready again, in plaintext


@dataclass(frozen=True, slots=True)
class Authenticated(ClientEvent):
    reply: Reply  # 235 (RFC 4954 6)


@dataclass(frozen=True, slots=True)
class ResetDone(ClientEvent):
    reply: Reply


@dataclass(frozen=True, slots=True)
class ContentWanted(ClientEvent):
    kind: str  # "DATA" (354 received) or "BDAT" (a recipient was accepted)


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient: OutboundRecipient
    reply: Reply
    stage: Stage  # the command ``reply`` answered
    local: bool = False  # we decided (SIZE, SMTPUTF8, lost connection ...): the server did not

    @property
    def verdict(self) -> Verdict:
        return verdict(self.reply.code)


@dataclass(frozen=True, slots=True)
class TransactionResult:
    outcomes: tuple[RecipientOutcome, ...]  # one per recipient, in envelope order
    dsn_passed: bool  # NOTIFY/ORCPT/RET/ENVID went to the server (it offers DSN)
    smtputf8: bool  # the transaction used SMTPUTF8
    chunked: bool  # the content went with BDAT


@dataclass(frozen=True, slots=True)
class TransactionDone(ClientEvent):
    result: TransactionResult


@dataclass(frozen=True, slots=True)
class SessionFailed(ClientEvent):
    """The session is over. ``reply`` is the server's (or, with ``local``, ours: a timeout, a
    lost connection, a protocol error). Send :meth:`ClientConnection.data_to_send` and close."""

    reply: Reply
    stage: Stage
    local: bool = False


@dataclass(frozen=True, slots=True)
class Closed(ClientEvent):
    """QUIT was answered."""
