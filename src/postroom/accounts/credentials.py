"""Account credentials for SASL: made together from one password, looked up for the mechanisms.

Setting a password (:func:`derive_credentials`) makes, in one go:

- the argon2id hash that PLAIN and LOGIN check (:mod:`postroom.accounts.passwords`);
- the SCRAM-SHA-256 keys (RFC 5802 3, RFC 7677), stored as RFC 5803 text: they let the server
  check a client without keeping the password;
- only for an account that opted in, the CRAM-MD5 secret (RFC 2195). CRAM-MD5 needs the password
  itself (whoever holds it can log in), so it is sealed with a key derived from the server key
  (:class:`postroom.accounts.secrets.SecretBox`), bound to the account: a database copied without
  ``keys/server.key`` yields no CRAM-MD5 secret, and a sealed value moved to another account
  does not open there.

:class:`AccountCredentials` is the :class:`postroom.sasl.credentials.CredentialStore` the SASL
mechanisms look identities up in. The authentication identity is the full address, matched as the
store matches addresses (domain in canonical form, local part case-insensitive). A user whose
password was set before schema version 2 has no SCRAM keys: SCRAM-SHA-256 fails for them as for a
wrong password until ``postroom user passwd`` sets the password again.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from postroom import log
from postroom.accounts.passwords import hash_password
from postroom.accounts.secrets import SecretBox, SecretError
from postroom.accounts.store import AccountStore, address_key
from postroom.config import PasswordSection
from postroom.sasl.credentials import (
    MIN_ITERATIONS,
    SCRAM_SHA_256,
    ScramKeys,
    derive_scram_keys,
    scram_keys_from_text,
    scram_keys_to_text,
)

#: The associated-data label of a sealed CRAM-MD5 secret; the account's lookup key follows.
_CRAM_CONTEXT = b"cram-md5\0"


@dataclass(frozen=True, slots=True)
class PasswordCredentials:
    """Everything stored for one password; its fields go to :meth:`AccountStore.add_user` and
    :meth:`AccountStore.set_password`."""

    password_hash: str = field(repr=False)
    #: RFC 5803 text (``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``).
    scram_sha256: str = field(repr=False)
    #: The sealed CRAM-MD5 secret; None when the account did not opt in.
    cram_md5: bytes | None = field(default=None, repr=False)


def _cram_context(address: str) -> bytes:
    local, _, domain = address.rpartition("@")
    return _CRAM_CONTEXT + address_key(local, domain).encode("utf-8")


def seal_cram_secret(box: SecretBox, address: str, password: str) -> bytes:
    """The CRAM-MD5 secret of *address* sealed in *box*. The secret is the password exactly as
    given: RFC 2195 keys HMAC-MD5 with the octets the client has, with no normalisation."""
    if not password:
        raise ValueError("the password is empty")
    return box.seal(password.encode("utf-8"), _cram_context(address))


def open_cram_secret(box: SecretBox, address: str, sealed: bytes) -> str:
    """The CRAM-MD5 secret :func:`seal_cram_secret` sealed; SecretError if it does not open."""
    plaintext = box.open(sealed, _cram_context(address))
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:  # authenticated, so only a bug could get here
        raise SecretError("sealed CRAM-MD5 secret is not UTF-8") from None


def derive_credentials(
    password: str,
    cost: PasswordSection,
    *,
    address: str,
    scram_iterations: int = MIN_ITERATIONS,
    cram_box: SecretBox | None = None,
) -> PasswordCredentials:
    """Every credential of *password* for the account *address*: the argon2id hash at *cost*,
    SCRAM-SHA-256 keys at *scram_iterations* (RFC 7677 4: at least 4096) with a fresh salt, and,
    when *cram_box* is given (the account opted in to CRAM-MD5), the sealed CRAM-MD5 secret.

    CPU-heavy (argon2, PBKDF2): run it off the event loop. ValueError for an empty password or
    an iteration count out of range; the message never holds the password.
    """
    if not password:
        raise ValueError("the password is empty")
    keys = derive_scram_keys(password, iterations=scram_iterations)
    return PasswordCredentials(
        password_hash=hash_password(password, cost),
        scram_sha256=scram_keys_to_text(keys),
        cram_md5=None if cram_box is None else seal_cram_secret(cram_box, address, password),
    )


def decoy_password_hash(cost: PasswordSection) -> str:
    """An argon2id hash at *cost* of a random password nobody knows:
    :attr:`postroom.sasl.SaslSettings.decoy_hash`, so an unknown user's PLAIN check takes as
    long as a known one's."""
    return hash_password(secrets.token_urlsafe(32), cost)


class AccountCredentials:
    """:class:`postroom.sasl.credentials.CredentialStore` over an :class:`AccountStore`.

    *cram_box* opens CRAM-MD5 secrets (:meth:`postroom.accounts.secrets.ServerKey.cram_box`);
    None: CRAM-MD5 finds no secret for anyone. Lookups raise StorageError when the database
    fails (the SASL exchange answers ``454 4.7.0``). A stored credential that cannot be used
    (SCRAM text malformed, CRAM-MD5 secret that does not open) counts as none and is logged as a
    warning naming the account and the reason, never the value.
    """

    __slots__ = ("_cram_box", "_store")

    def __init__(self, store: AccountStore, cram_box: SecretBox | None = None) -> None:
        self._store = store
        self._cram_box = cram_box

    def account_address(self, authcid: str) -> str | None:
        """The address of the account *authcid* names, as stored (``Alice@Example.COM.`` names
        ``alice@example.com``), or None: what a session records as the logged-in user."""
        user = self._store.get_user(authcid) if _usable(authcid) else None
        return None if user is None else user.address

    def password_hash(self, authcid: str) -> str | None:
        user = self._store.get_user(authcid) if _usable(authcid) else None
        return None if user is None else user.password_hash

    def scram_keys(self, authcid: str, mechanism: str) -> ScramKeys | None:
        if mechanism.upper() != SCRAM_SHA_256 or not _usable(authcid):
            return None
        user = self._store.get_user(authcid)
        if user is None or user.scram_sha256 is None:
            return None
        try:
            return scram_keys_from_text(user.scram_sha256)
        except ValueError:
            log.logger.warning(
                "SCRAM-SHA-256 keys of %s are malformed; SCRAM fails for it until "
                "`postroom user passwd` sets the password again",
                user.address,
            )
            return None

    def cram_secret(self, authcid: str) -> str | None:
        if not _usable(authcid):
            return None
        user = self._store.get_user(authcid)
        if user is None or user.cram_md5 is None or self._cram_box is None:
            return None
        try:
            return open_cram_secret(self._cram_box, user.address, user.cram_md5)
        except SecretError as exc:
            log.logger.warning(
                "CRAM-MD5 secret of %s unusable: %s; CRAM-MD5 fails for it until "
                "`postroom user cram-md5 %s on` or `postroom user passwd` stores it again",
                user.address,
                exc,
                user.address,
            )
            return None


#: The longest identity that can name an account: an RFC 5321 4.5.3.1 path has a local part of
#: at most 64 octets and a domain of at most 255, with the "@" between them.
MAX_IDENTITY_OCTETS = 64 + 1 + 255


def _usable(authcid: str) -> bool:
    """An identity that can name an account: has an "@", fits in :data:`MAX_IDENTITY_OCTETS`
    and is encodable (no lone surrogate). Anything else is unknown without a store lookup, so a
    client-chosen 9 kB name costs no normalisation (the SASL mechanisms call the store on the
    event loop)."""
    if len(authcid) > MAX_IDENTITY_OCTETS or "@" not in authcid:  # characters <= octets
        return False
    try:
        octets = authcid.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(octets) <= MAX_IDENTITY_OCTETS
