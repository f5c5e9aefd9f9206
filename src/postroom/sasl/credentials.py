"""Credentials the SASL mechanisms check against, and SCRAM-SHA-256 keys.

:class:`CredentialStore` is how a mechanism asks for what it needs; the accounts layer
implements it. Each method is a quick lookup by the authentication identity (the argon2 check
itself is handed back to the caller as a :class:`~postroom.sasl.outcomes.PasswordCheck`). A store
that cannot answer (its database failed) raises :class:`~postroom.errors.StorageError`; the
exchange then fails with ``UNAVAILABLE`` (SMTP ``454 4.7.0``).

SCRAM keys (RFC 5802 3, with SHA-256 as RFC 7677 registers it)::

    SaltedPassword = PBKDF2-HMAC-SHA-256(SASLprep(password), salt, iterations)
    StoredKey      = SHA-256(HMAC(SaltedPassword, "Client Key"))
    ServerKey      = HMAC(SaltedPassword, "Server Key")

are derived when a password is set, so SCRAM works without keeping the password. They are stored
as one string in the RFC 5803 form (the LDAP ``authPassword`` syntax)::

    SCRAM-SHA-256$<iterations>:<base64 salt>$<base64 StoredKey>:<base64 ServerKey>
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final, Protocol

from postroom.sasl.saslprep import saslprep

SCRAM_SHA_256: Final = "SCRAM-SHA-256"

#: RFC 7677 4: the iteration count SHOULD be at least 4096.
MIN_ITERATIONS: Final = 4096
#: Above this a stored count is taken for corruption (and a cheap way to stall the server).
MAX_ITERATIONS: Final = 10_000_000
#: RFC 5802 does not fix a salt size; 16 random octets, as RFC 7677's example uses.
SALT_OCTETS: Final = 16
#: SHA-256 output: the size of StoredKey, ServerKey and a ClientProof.
KEY_OCTETS: Final = 32


class CredentialStore(Protocol):
    """What the mechanisms look up, by authentication identity (authcid). None means "nothing
    usable" (no such user, or no credential of that kind); the mechanisms treat both alike so
    that the client cannot tell them apart."""

    def password_hash(self, authcid: str) -> str | None:
        """The argon2 hash (PHC string) that PLAIN and LOGIN check against."""
        ...

    def scram_keys(self, authcid: str, mechanism: str) -> ScramKeys | None:
        """The keys for *mechanism* (``"SCRAM-SHA-256"``)."""
        ...

    def cram_secret(self, authcid: str) -> str | None:
        """The plaintext-equivalent secret for CRAM-MD5, only for accounts that opted in."""
        ...


@dataclass(frozen=True, slots=True)
class ScramKeys:
    """What the server keeps for SCRAM (RFC 5802 3): enough to check a client, not to be one."""

    salt: bytes
    iterations: int
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.salt:
            raise ValueError("SCRAM keys: empty salt")
        if not 1 <= self.iterations <= MAX_ITERATIONS:
            raise ValueError("SCRAM keys: iteration count out of range")
        if len(self.stored_key) != KEY_OCTETS or len(self.server_key) != KEY_OCTETS:
            raise ValueError("SCRAM keys: StoredKey and ServerKey must be 32 octets")


def scram_password_octets(password: str) -> bytes:
    """RFC 5802 Normalize(password): SASLprep as a stored string, in UTF-8.

    A password that SASLprep refuses (a control character, say) is used as given, in UTF-8,
    rather than refused: clients that skip SASLprep then still agree with us on ASCII and NFC text.
    """
    try:
        prepared = saslprep(password, stored=True)
    except ValueError:
        prepared = password
    return (prepared or password).encode("utf-8")


def derive_scram_keys(
    password: str, salt: bytes | None = None, iterations: int = MIN_ITERATIONS
) -> ScramKeys:
    """SCRAM-SHA-256 keys for *password* (a fresh random salt unless one is given)."""
    if not password:
        raise ValueError("the password is empty")
    if not MIN_ITERATIONS <= iterations <= MAX_ITERATIONS:
        raise ValueError(f"iterations must be between {MIN_ITERATIONS} and {MAX_ITERATIONS}")
    if salt is None:
        salt = secrets.token_bytes(SALT_OCTETS)
    salted = hashlib.pbkdf2_hmac("sha256", scram_password_octets(password), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    return ScramKeys(
        salt=salt,
        iterations=iterations,
        stored_key=hashlib.sha256(client_key).digest(),
        server_key=hmac.digest(salted, b"Server Key", "sha256"),
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def scram_keys_to_text(keys: ScramKeys) -> str:
    """The RFC 5803 string for *keys* (see the module docstring)."""
    return (
        f"{SCRAM_SHA_256}${keys.iterations}:{_b64(keys.salt)}${_b64(keys.stored_key)}:{_b64(keys.server_key)}"
    )


def scram_keys_from_text(text: str) -> ScramKeys:
    """Parse :func:`scram_keys_to_text`'s form; ValueError (without the text) if malformed."""
    bad = ValueError("not an RFC 5803 SCRAM-SHA-256 string")
    scheme, _, rest = text.partition("$")
    info, _, value = rest.partition("$")
    iterations, _, salt = info.partition(":")
    stored, _, server = value.partition(":")
    if scheme != SCRAM_SHA_256 or not text.isascii() or not iterations.isdigit():
        raise bad
    try:
        return ScramKeys(
            salt=_unb64(salt),
            iterations=int(iterations),
            stored_key=_unb64(stored),
            server_key=_unb64(server),
        )
    except (binascii.Error, ValueError):
        raise bad from None
