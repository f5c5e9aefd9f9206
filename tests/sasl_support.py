"""Shared by the SASL tests: an in-memory credential store and settings with a fixed nonce and clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from postroom.accounts.passwords import hash_password
from postroom.config import PasswordSection
from postroom.errors import StorageError
from postroom.sasl import SaslSettings, ScramKeys, derive_scram_keys

#: The cheapest argon2 cost the library takes, so each check is instant.
FAST = PasswordSection(time_cost=1, memory_cost_kib=8, parallelism=1)
DECOY_SECRET = b"decoy secret for tests, 32 bytes"


@dataclass
class MemoryStore:
    """A CredentialStore over dicts; ``broken`` makes every lookup fail as a dead database would."""

    hashes: dict[str, str] = field(default_factory=dict)
    keys: dict[str, ScramKeys] = field(default_factory=dict)
    cram: dict[str, str] = field(default_factory=dict)
    broken: bool = False
    lookups: list[tuple[str, str]] = field(default_factory=list)

    def add(self, user: str, password: str, *, cram: bool = False) -> None:
        self.hashes[user] = hash_password(password, FAST)
        self.keys[user] = derive_scram_keys(password)
        if cram:
            self.cram[user] = password

    def _look(self, kind: str, authcid: str) -> None:
        self.lookups.append((kind, authcid))
        if self.broken:
            raise StorageError("accounts database: disk I/O error")

    def password_hash(self, authcid: str) -> str | None:
        self._look("hash", authcid)
        return self.hashes.get(authcid)

    def scram_keys(self, authcid: str, mechanism: str) -> ScramKeys | None:
        self._look(mechanism, authcid)
        return self.keys.get(authcid) if mechanism == "SCRAM-SHA-256" else None

    def cram_secret(self, authcid: str) -> str | None:
        self._look("cram", authcid)
        return self.cram.get(authcid)


def make_settings(
    store: MemoryStore,
    *,
    nonce: Callable[[], str] = lambda: "serverNONCE",
    clock: Callable[[], float] = lambda: 1_700_000_000.5,
    hostname: str = "mail.example",
    decoy_hash: str | None = None,
) -> SaslSettings:
    return SaslSettings(
        credentials=store,
        hostname=hostname,
        nonce=nonce,
        clock=clock,
        decoy_secret=DECOY_SECRET,
        decoy_hash=decoy_hash,
    )
