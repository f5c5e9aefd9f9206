"""What a SASL mechanism (and the :class:`~postroom.sasl.exchange.Exchange` around it) answers.

RFC 4422 3.4 and 3.6: an exchange is a series of server challenges and client responses ending
in an outcome. Every call into a mechanism returns exactly one of these frozen dataclasses::

    Outcome
    ├── Challenge        send this to the client (SMTP ``334``, IMAP ``+``) and wait for a response
    ├── PasswordCheck    run :meth:`PasswordCheck.check` (CPU-heavy: off the event loop) and hand
    │                    the result back with ``password_checked(ok)``
    ├── Success          authenticated; ``data`` is RFC 4422 "additional data with success"
    └── Failure          over; ``kind`` picks the reply, ``reason`` is for the log only

A :class:`Failure` never says whether the user exists and never holds a password; the fields that
do hold secrets are left out of ``repr`` so a stray log line cannot show them.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from enum import Enum

from postroom.accounts.passwords import verify_password
from postroom.errors import PostroomError


class LocalProtocolError(PostroomError):
    """The caller misused a mechanism or exchange (a bug on our side), e.g. a response after the
    outcome, or ``password_checked`` with no check pending."""


class FailureKind(Enum):
    """Why an exchange failed, in the general terms a client may be told.

    The reply each protocol gives: SMTP from RFC 4954 4 and 6; POP3 with RFC 3206's response
    codes; IMAP with RFC 5530's (RFC 9051 6.2.2: a cancelled exchange is BAD)::

        kind                        SMTP        POP3              IMAP
        REJECTED                    535 5.7.8   -ERR [AUTH]       NO [AUTHENTICATIONFAILED]
        MALFORMED                   501 5.5.2   -ERR              BAD
        TOO_LONG                    500 5.5.6   -ERR              BAD
        CANCELLED                   501 5.7.0   -ERR              BAD
        INITIAL_RESPONSE_REFUSED    501 5.7.0   -ERR              BAD
        UNAVAILABLE                 454 4.7.0   -ERR [SYS/TEMP]   NO [UNAVAILABLE]

    RFC 4954 4 gives 501 5.5.2 for a response that is not base64; a mechanism message that is
    base64 but does not parse (PLAIN without its NULs) gets it too, as the more specific reply
    than 535 that RFC 4954 4 allows.
    """

    REJECTED = "bad credentials"  # wrong password, unknown user, authzid or option refused
    MALFORMED = "malformed response"  # not base64, or not the mechanism's syntax
    TOO_LONG = "response too long"  # longer than MAX_RESPONSE_OCTETS (RFC 4954 4)
    CANCELLED = "cancelled by the client"  # "*" (RFC 4954 4)
    INITIAL_RESPONSE_REFUSED = "initial response not allowed"  # server-first mechanism (RFC 4954 4)
    UNAVAILABLE = "credentials unavailable"  # the credential store failed: try again later


@dataclass(frozen=True, slots=True)
class Challenge:
    """Server data to send; the client answers with one response."""

    data: bytes

    @property
    def text(self) -> str:
        """The data in base64 (RFC 4648 4), "" for none: ``334 <text>`` in SMTP."""
        return base64.b64encode(self.data).decode("ascii")


@dataclass(frozen=True, slots=True)
class PasswordCheck:
    """PLAIN and LOGIN ask for this: does *password* match the argon2 hash of *authcid*?

    The mechanism has already looked the hash up (``password_hash`` is None for an unknown user,
    or one whose credentials hold no hash). :meth:`check` is the slow part, argon2 at the
    configured cost: run it in a worker thread and answer with ``password_checked(ok)``. For an
    unknown user it verifies against ``decoy_hash`` (when given) so the time taken does not tell
    whether the user exists.
    """

    authcid: str
    authzid: str
    password: str = field(repr=False)
    password_hash: str | None = field(repr=False)
    decoy_hash: str | None = field(default=None, repr=False)

    def check(self) -> bool:
        """True when the password matches. Pure and thread-safe; takes argon2's time."""
        if self.password_hash is None:
            if self.decoy_hash is not None:
                verify_password(self.decoy_hash, self.password)
            return False
        return verify_password(self.password_hash, self.password)


@dataclass(frozen=True, slots=True)
class Success:
    """Authenticated as *authcid* (the authentication identity, as the mechanism received it
    and, for SCRAM, SASLprep'd). *authzid* is "" or equal to *authcid* (we allow no proxying).
    *data* is sent to the client with the success (SCRAM's server-final message), or None."""

    authcid: str
    authzid: str = ""
    data: bytes | None = None

    @property
    def text(self) -> str | None:
        """*data* in base64, or None."""
        return None if self.data is None else base64.b64encode(self.data).decode("ascii")


@dataclass(frozen=True, slots=True)
class Failure:
    """The exchange is over without authentication.

    *reason* is for the log, in general terms; *authcid* is the identity the client claimed
    when the mechanism got that far (for the log and per-account throttling), else None.
    """

    kind: FailureKind
    reason: str
    authcid: str | None = None


Outcome = Challenge | PasswordCheck | Success | Failure
