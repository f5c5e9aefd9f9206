"""PLAIN (RFC 4616) and LOGIN (draft-murchison-sasl-login): a password in clear, over TLS.

Both end in a :class:`~postroom.sasl.outcomes.PasswordCheck`: the mechanism parses the response
and looks up the argon2 hash, the caller runs the check off the event loop (argon2 is slow and
memory-hungry on purpose) and hands the result back with ``password_checked(ok)``. A verifier
callable passed in would have to block the event loop, or make the mechanism async; a returned
request keeps the mechanism a plain state machine and leaves the thread pool (and a bound on how
many argon2 checks run at once) to the transport.

PLAIN (RFC 4616 2)::

    message = [authzid] UTF8NUL authcid UTF8NUL passwd

each part UTF-8 without NUL; authcid and passwd not empty. We allow no proxy authorisation: an
authzid must be empty or name the authcid, compared after SASLprep (RFC 4954 4: an authzid that
SASLprep refuses, or makes empty, fails the exchange). The authcid goes to the credential store
as received; the store has its own canonical form for names. Without an initial
response the server first sends an empty challenge (RFC 4422 3.3).

LOGIN: the server sends "Username:", then "Password:", and the client answers each in turn. An
initial response, which many clients send, is the user name (so only "Password:" is asked).
"""

from __future__ import annotations

from postroom.sasl.mechanism import Mechanism, SaslSettings
from postroom.sasl.outcomes import (
    Challenge,
    FailureKind,
    Outcome,
    PasswordCheck,
    Success,
)
from postroom.sasl.saslprep import saslprep


class _PasswordMechanism(Mechanism):
    """Shared end of PLAIN and LOGIN: look the hash up, ask for the check, report."""

    def __init__(self, settings: SaslSettings) -> None:
        super().__init__(settings)
        self._authzid = ""

    def _check(self, authcid: str, authzid: str, password: str) -> Outcome:
        self._authcid, self._authzid = authcid, authzid
        if not password:
            return self.failure(FailureKind.MALFORMED, "empty password")
        if authzid and (_prepared(authzid) or None) != _prepared(authcid):
            return self.failure(FailureKind.REJECTED, "authorization identity not allowed")
        settings = self._settings
        return PasswordCheck(
            authcid=authcid,
            authzid=authzid,
            password=password,
            password_hash=settings.credentials.password_hash(authcid),
            decoy_hash=settings.decoy_hash,
        )

    def _checked(self, ok: bool) -> Outcome:
        if not ok or self._authcid is None:
            return self.failure(FailureKind.REJECTED)
        return Success(self._authcid, self._authzid)


def _prepared(name: str) -> str | None:
    """*name* SASLprep'd as a query (RFC 4954 4 asks so for comparing identities), or None."""
    try:
        return saslprep(name)
    except ValueError:
        return None


def _text(data: bytes) -> str | None:
    """*data* as UTF-8 without NUL, or None."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


class Plain(_PasswordMechanism):
    name = "PLAIN"

    def _start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(b"")
        return self._respond(initial)

    def _respond(self, response: bytes) -> Outcome:
        parts = response.split(b"\0")
        if len(parts) != 3:
            return self.failure(FailureKind.MALFORMED, "PLAIN needs authzid NUL authcid NUL passwd")
        authzid, authcid, password = (_text(part) for part in parts)
        if authzid is None or authcid is None or password is None:
            return self.failure(FailureKind.MALFORMED, "PLAIN fields are not UTF-8")
        if not authcid:
            return self.failure(FailureKind.MALFORMED, "empty authentication identity")
        return self._check(authcid, authzid, password)


class Login(_PasswordMechanism):
    name = "LOGIN"

    USERNAME = b"Username:"
    PASSWORD = b"Password:"

    def __init__(self, settings: SaslSettings) -> None:
        super().__init__(settings)
        self._username: str | None = None

    def _start(self, initial: bytes | None) -> Outcome:
        if initial is None:
            return Challenge(self.USERNAME)
        return self._respond(initial)

    def _respond(self, response: bytes) -> Outcome:
        text = _text(response)
        if text is None:
            return self.failure(FailureKind.MALFORMED, "LOGIN response is not UTF-8 text")
        if self._username is None:
            if not text:
                return self.failure(FailureKind.MALFORMED, "empty user name")
            self._username = self._authcid = text
            return Challenge(self.PASSWORD)
        return self._check(self._username, "", text)
