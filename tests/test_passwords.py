"""argon2id password hashes: round trip, cost in the hash, rehash decisions, preparation."""

from __future__ import annotations

import unicodedata

import pytest
from argon2 import PasswordHasher, Type
from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.accounts.passwords import (
    hash_password,
    needs_rehash,
    prepare,
    verify_password,
)
from postroom.config import PasswordSection

FAST = PasswordSection(time_cost=1, memory_cost_kib=8, parallelism=1)


def test_round_trip() -> None:
    hashed = hash_password("correct horse", FAST)
    assert verify_password(hashed, "correct horse")
    assert not verify_password(hashed, "correct horsE")
    assert not verify_password(hashed, "")


def test_hash_is_argon2id_with_the_configured_cost() -> None:
    hashed = hash_password("pw", FAST)
    assert hashed.startswith("$argon2id$v=19$m=8,t=1,p=1$")


def test_each_hash_has_its_own_salt() -> None:
    assert hash_password("same", FAST) != hash_password("same", FAST)


def test_empty_password_is_refused_without_echo() -> None:
    with pytest.raises(ValueError, match="empty"):
        hash_password("", FAST)


@pytest.mark.parametrize("bad", ["", "plaintext", "$argon2id$garbage", "$2b$12$abcdefghijkl"])
def test_malformed_hash_never_verifies(bad: str) -> None:
    assert not verify_password(bad, "plaintext")


def test_needs_rehash() -> None:
    hashed = hash_password("pw", FAST)
    assert not needs_rehash(hashed, FAST)
    stronger = PasswordSection(time_cost=2, memory_cost_kib=8, parallelism=1)
    assert needs_rehash(hashed, stronger)
    assert needs_rehash("$argon2id$garbage", FAST)
    assert needs_rehash("not a hash", FAST)
    argon2i = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.I).hash("pw")
    assert verify_password(argon2i, "pw")  # still accepted at login ...
    assert needs_rehash(argon2i, FAST)  # ... and then upgraded to argon2id


def test_unicode_forms_and_spaces_are_prepared() -> None:
    composed = unicodedata.normalize("NFC", "caf\u00e9")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    assert verify_password(hash_password(composed, FAST), decomposed)
    # RFC 8265 4.2.1: a non-ASCII space (NO-BREAK SPACE) counts as U+0020.
    assert verify_password(hash_password("two words", FAST), "two\u00a0words")
    assert prepare("A\u2003b") == "A b"
    # No case folding: a password is opaque.
    assert not verify_password(hash_password("Secret", FAST), "secret")


@settings(max_examples=15, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_round_trip_property(password: str) -> None:
    hashed = hash_password(password, FAST)
    assert verify_password(hashed, password)
    assert not verify_password(hashed, password + "x")
