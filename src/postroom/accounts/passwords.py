"""Password hashes: argon2id (RFC 9106) through argon2-cffi.

The cost comes from :class:`~postroom.config.PasswordSection`; a hash records its own cost, so
:func:`verify_password` needs none and :func:`needs_rehash` tells when a stored hash is weaker than
(or different from) the configured cost, to be replaced after the next successful login.

Before hashing, a password is prepared as RFC 8265 (PRECIS) section 4.2 prepares an OpaqueString:
non-ASCII spaces become U+0020 and the string is put in Unicode NFC, so the same password typed on
two keyboards gives the same hash. Nothing else is changed (no case folding, no trimming).

Hashing is CPU- and memory-heavy on purpose: callers on an event loop run these functions in a
worker thread. No function here logs a password or puts one into an exception message.
"""

from __future__ import annotations

import unicodedata

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError

from postroom.config import PasswordSection

#: Every argon2id hash this module writes starts so (PHC string format).
HASH_PREFIX = "$argon2id$"


def _hasher(cost: PasswordSection) -> PasswordHasher:
    return PasswordHasher(
        time_cost=cost.time_cost,
        memory_cost=cost.memory_cost_kib,
        parallelism=cost.parallelism,
        type=Type.ID,
    )


def prepare(password: str) -> str:
    """RFC 8265 4.2 OpaqueString preparation: non-ASCII spaces to U+0020, then NFC."""
    spaced = "".join(
        " " if ch != " " and unicodedata.category(ch) == "Zs" else ch for ch in password
    )
    return unicodedata.normalize("NFC", spaced)


def hash_password(password: str, cost: PasswordSection) -> str:
    """The argon2id hash of *password* (PHC string, salt included) at *cost*."""
    if not password:
        raise ValueError("the password is empty")
    return _hasher(cost).hash(prepare(password))


def verify_password(password_hash: str, password: str) -> bool:
    """True when *password* matches *password_hash*; False on mismatch or a malformed hash."""
    if not password or not password_hash.startswith("$argon2"):
        return False
    try:
        # The parameters (and the argon2 variant) are read from the hash itself.
        return PasswordHasher().verify(password_hash, prepare(password))
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str, cost: PasswordSection) -> bool:
    """True when *password_hash* was not made with argon2id at exactly *cost*."""
    if not password_hash.startswith(HASH_PREFIX):
        return True
    try:
        return _hasher(cost).check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True
