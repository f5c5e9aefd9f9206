"""CRAM-MD5 (RFC 2195), for clients that still need it.

The server sends a challenge in the form of an RFC 5322 msg-id, ``<random.timestamp@hostname>``
(RFC 2195 2); the client answers ``user SP digest`` where digest is HMAC-MD5 (RFC 2104) of the
challenge keyed with the shared secret, as 32 lower-case hex digits. The random part and the
clock are injected (:class:`~postroom.sasl.mechanism.SaslSettings`).

The trade-off: the server must keep a plaintext-equivalent secret (whoever reads it can log in),
and the exchange is open to offline guessing by anyone who sees it. So CRAM-MD5 works only for
accounts that opted in (``cram_secret`` is None for all others) and only over TLS. An initial
response is refused: the mechanism starts with the server's challenge.
"""

from __future__ import annotations

import hmac
import string

from postroom.sasl.mechanism import Mechanism, SaslSettings
from postroom.sasl.outcomes import Challenge, FailureKind, Outcome, Success

_HEX = frozenset(string.hexdigits)


class CramMd5(Mechanism):
    name = "CRAM-MD5"
    client_first = False

    def __init__(self, settings: SaslSettings) -> None:
        super().__init__(settings)
        self._challenge = b""

    def _start(self, initial: bytes | None) -> Outcome:
        settings = self._settings
        stamp = int(settings.clock())
        self._challenge = f"<{settings.fresh_nonce()}.{stamp}@{settings.hostname}>".encode()
        return Challenge(self._challenge)

    def _respond(self, response: bytes) -> Outcome:
        try:
            text = response.decode("utf-8")
        except UnicodeDecodeError:
            return self.failure(FailureKind.MALFORMED, "CRAM-MD5 response is not UTF-8")
        user, space, digest = text.rpartition(" ")
        if not space or not user or len(digest) != 32 or not _HEX.issuperset(digest):
            return self.failure(FailureKind.MALFORMED, "CRAM-MD5 needs user SP 32 hex digits")
        self._authcid = user
        secret = self._settings.credentials.cram_secret(user)
        # Without a secret the HMAC is still computed (with a key no client knows) and compared,
        # so an unknown user costs the same time as a wrong digest.
        key = (
            secret.encode("utf-8")
            if secret is not None
            else hmac.digest(self._settings.decoy_secret, b"CRAM-MD5\0" + user.encode(), "sha256")
        )
        expected = hmac.new(key, self._challenge, "md5").hexdigest()
        if hmac.compare_digest(expected, digest.lower()) and secret is not None:
            return Success(user)
        return self.failure(FailureKind.REJECTED)
