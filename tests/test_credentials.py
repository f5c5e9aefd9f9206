"""Account credentials for SASL on real files: the server key, sealed CRAM-MD5 secrets, SCRAM keys,
the CredentialStore adapter, the upgrade from schema 1, and whole exchanges through the SASL core."""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.accounts import secrets as secrets_mod
from postroom.accounts.credentials import (
    AccountCredentials,
    PasswordCredentials,
    decoy_password_hash,
    derive_credentials,
    open_cram_secret,
    seal_cram_secret,
)
from postroom.accounts.passwords import verify_password
from postroom.accounts.secrets import (
    KEY_OCTETS,
    SecretBox,
    SecretError,
    ServerKey,
)
from postroom.accounts.store import AccountStore
from postroom.config import PasswordSection
from postroom.errors import StorageError
from postroom.sasl import (
    Challenge,
    Exchange,
    Failure,
    FailureKind,
    Outcome,
    PasswordCheck,
    SaslSettings,
    Success,
    open_exchange,
    scram_keys_from_text,
)

FAST = PasswordSection(time_cost=1, memory_cost_kib=8, parallelism=1)
PASSWORD = "Tr0ub4dor&3 pencil"
OFFERED = ("SCRAM-SHA-256", "PLAIN", "LOGIN", "CRAM-MD5")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def key(data_dir: Path) -> ServerKey:
    return ServerKey.load_or_create(data_dir)


@pytest.fixture
def store(data_dir: Path) -> Iterator[AccountStore]:
    with AccountStore(data_dir / "accounts.db", data_dir / "mail") as s:
        s.add_domain("example.com")
        yield s


def add(
    store: AccountStore, address: str, password: str, *, cram: SecretBox | None = None
) -> PasswordCredentials:
    made = derive_credentials(password, FAST, address=address, cram_box=cram)
    store.add_user(
        address, made.password_hash, scram_sha256=made.scram_sha256, cram_md5=made.cram_md5
    )
    return made


# --- the server key file ----------------------------------------------------------------------


def test_key_file_is_made_once_private_and_reused(data_dir: Path) -> None:
    first = ServerKey.load_or_create(data_dir)
    path = data_dir / "keys" / "server.key"
    assert first.path == path
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and mode(data_dir) == 0o700
    raw = path.read_bytes()
    assert len(raw) == KEY_OCTETS
    again = ServerKey.load_or_create(data_dir)
    assert path.read_bytes() == raw
    assert again.decoy_secret() == first.decoy_secret()
    assert os.listdir(path.parent) == ["server.key"]  # no temporary file left behind
    assert raw.hex() not in repr(first) and "hidden" in repr(first)


def test_key_file_ignores_a_permissive_umask(data_dir: Path) -> None:
    old = os.umask(0)
    try:
        ServerKey.load_or_create(data_dir)
    finally:
        os.umask(old)
    assert mode(data_dir / "keys" / "server.key") == 0o600
    assert mode(data_dir / "keys") == 0o700


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_key_file_gets_the_owner(data_dir: Path) -> None:
    ServerKey.load_or_create(data_dir, owner=(4321, 4321))
    for path in (data_dir, data_dir / "keys", data_dir / "keys" / "server.key"):
        assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321), path


def test_concurrent_creators_end_up_with_one_key(data_dir: Path) -> None:
    """Eight processes start at once on an empty data directory; all must use the same key."""
    go = data_dir.parent / "go"
    script = textwrap.dedent(
        f"""
        import os, time
        from pathlib import Path
        from postroom.accounts.secrets import ServerKey
        while not os.path.exists({str(go)!r}):
            time.sleep(0.001)
        print(ServerKey.load_or_create(Path({str(data_dir)!r})).decoy_secret().hex())
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    go.touch()
    outputs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outputs)) == 1 and len(outputs[0]) == 64
    key = ServerKey.load_or_create(data_dir)
    assert key.decoy_secret().hex() == outputs[0]
    assert sorted(os.listdir(data_dir / "keys")) == ["server.key"]


def test_losing_the_link_race_takes_the_winners_key(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process links its key between our write and our link: ours is dropped."""
    winner = bytes(range(32))
    real_link = os.link

    def link_after_rival(src: str | Path, dst: str | Path) -> None:
        Path(dst).write_bytes(winner)
        os.chmod(dst, 0o600)
        real_link(src, dst)  # raises FileExistsError, as the kernel would

    monkeypatch.setattr(secrets_mod.os, "link", link_after_rival)
    key = ServerKey.load_or_create(data_dir)
    assert key.decoy_secret() == ServerKey(winner).decoy_secret()
    assert os.listdir(data_dir / "keys") == ["server.key"]


def test_a_damaged_key_file_is_an_error_not_a_new_key(data_dir: Path) -> None:
    ServerKey.load_or_create(data_dir)
    path = data_dir / "keys" / "server.key"
    path.write_bytes(b"short")
    with pytest.raises(StorageError, match="holds 5 octets, not 32") as caught:
        ServerKey.load_or_create(data_dir)
    assert "short" not in str(caught.value)
    assert path.read_bytes() == b"short"  # never replaced


def test_a_readable_key_file_is_warned_about(data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    ServerKey.load_or_create(data_dir)
    os.chmod(data_dir / "keys" / "server.key", 0o644)
    with caplog.at_level(logging.WARNING, logger="postroom"):
        ServerKey.load_or_create(data_dir)
    assert "readable by others (mode 644)" in caplog.text


def test_purpose_keys_are_hkdf_sha256_and_distinct(key: ServerKey, data_dir: Path) -> None:
    raw = (data_dir / "keys" / "server.key").read_bytes()
    # RFC 5869 2.2-2.3 by hand: PRK = HMAC(zero salt, IKM); T(1) = HMAC(PRK, info | 0x01).
    prk = hmac.digest(b"\0" * 32, raw, "sha256")
    expected = hmac.digest(prk, secrets_mod.SASL_DECOY_INFO + b"\x01", "sha256")
    assert key.decoy_secret() == expected
    assert key.derive(secrets_mod.CRAM_MD5_INFO) != key.decoy_secret()
    assert len(key.decoy_secret()) >= 16  # what SaslSettings requires


# --- sealing --------------------------------------------------------------------------------


def test_box_round_trip_layout_and_context(key: ServerKey) -> None:
    box = key.cram_box()
    sealed = box.seal(b"secret", b"ctx")
    assert sealed[0] == 1 and len(sealed) == 1 + 12 + len(b"secret") + 16
    assert box.open(sealed, b"ctx") == b"secret"
    assert box.seal(b"secret", b"ctx") != sealed  # a fresh nonce each time
    with pytest.raises(SecretError, match="does not authenticate"):
        box.open(sealed, b"other ctx")
    flipped = bytearray(sealed)
    flipped[-1] ^= 1
    with pytest.raises(SecretError, match="does not authenticate"):
        box.open(bytes(flipped), b"ctx")
    with pytest.raises(SecretError, match="unknown version 2"):
        box.open(b"\x02" + sealed[1:], b"ctx")
    with pytest.raises(SecretError, match="truncated"):
        box.open(sealed[:20], b"ctx")


def test_cram_secret_is_bound_to_the_account_and_the_key(key: ServerKey, tmp_path: Path) -> None:
    box = key.cram_box()
    sealed = seal_cram_secret(box, "Alice@Example.com", PASSWORD)
    assert open_cram_secret(box, "alice@example.com", sealed) == PASSWORD  # same account
    with pytest.raises(SecretError) as caught:
        open_cram_secret(box, "bob@example.com", sealed)
    assert PASSWORD not in str(caught.value)
    other = ServerKey.load_or_create(tmp_path / "elsewhere").cram_box()
    with pytest.raises(SecretError):
        open_cram_secret(other, "alice@example.com", sealed)


# --- deriving -------------------------------------------------------------------------------


def test_derived_scram_keys_match_an_independent_computation(key: ServerKey) -> None:
    made = derive_credentials(PASSWORD, FAST, address="a@example.com", scram_iterations=5000)
    assert verify_password(made.password_hash, PASSWORD)
    assert made.cram_md5 is None  # not asked for
    scheme, info, value = made.scram_sha256.split("$")
    iterations, salt_b64 = info.split(":")
    stored_b64, server_b64 = value.split(":")
    assert scheme == "SCRAM-SHA-256" and iterations == "5000"
    salt = base64.b64decode(salt_b64)
    assert len(salt) == 16
    salted = hashlib.pbkdf2_hmac("sha256", PASSWORD.encode(), salt, 5000)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    assert PASSWORD not in repr(made)


def test_derive_defaults_and_refusals(key: ServerKey) -> None:
    made = derive_credentials("pw", FAST, address="a@example.com", cram_box=key.cram_box())
    assert scram_keys_from_text(made.scram_sha256).iterations == 4096  # RFC 7677 4's minimum
    assert made.cram_md5 is not None
    assert open_cram_secret(key.cram_box(), "a@example.com", made.cram_md5) == "pw"
    with pytest.raises(ValueError, match="empty"):
        derive_credentials("", FAST, address="a@example.com")
    with pytest.raises(ValueError, match="iterations"):
        derive_credentials("pw", FAST, address="a@example.com", scram_iterations=1000)
    other = derive_credentials("pw", FAST, address="a@example.com")
    assert other.scram_sha256 != made.scram_sha256  # fresh salt


def test_decoy_password_hash_matches_nothing() -> None:
    decoy = decoy_password_hash(FAST)
    assert decoy.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert decoy != decoy_password_hash(FAST)
    assert not verify_password(decoy, "")


# --- the adapter ---------------------------------------------------------------------------


def test_cram_secret_is_not_stored_in_plaintext(store: AccountStore, key: ServerKey) -> None:
    password = "plaintext-canary-7Qx9"
    add(store, "alice@example.com", password, cram=key.cram_box())
    store.close()
    blob = b"".join(
        p.read_bytes() for p in store.db_path.parent.iterdir() if p.name.startswith("accounts.db")
    )
    assert b"alice@example.com" in blob  # the row is there ...
    assert password.encode() not in blob  # ... the secret is not
    assert base64.b64encode(password.encode()) not in blob
    assert password.encode().hex().encode() not in blob


def test_adapter_lookups(store: AccountStore, key: ServerKey) -> None:
    made = add(store, "Alice@example.com", PASSWORD, cram=key.cram_box())
    add(store, "bob@example.com", "bobs pw")
    creds = AccountCredentials(store, key.cram_box())
    for spelling in ("alice@example.com", "ALICE@EXAMPLE.COM", "Alice@example.com.",
                     "alice@EXAMPLE.com"):
        assert creds.password_hash(spelling) == made.password_hash
        assert creds.scram_keys(spelling, "SCRAM-SHA-256") == scram_keys_from_text(made.scram_sha256)
        assert creds.cram_secret(spelling) == PASSWORD
    assert creds.cram_secret("bob@example.com") is None  # did not opt in
    assert creds.scram_keys("alice@example.com", "SCRAM-SHA-1") is None
    for unknown in ("carol@example.com", "alice", "alice+tag@example.com", "", "@example.com",
                    "alice@example.org", "\ud800@example.com"):
        assert creds.password_hash(unknown) is None
        assert creds.scram_keys(unknown, "SCRAM-SHA-256") is None
        assert creds.cram_secret(unknown) is None
    assert AccountCredentials(store).cram_secret("alice@example.com") is None  # no box given


class NoLookups(AccountStore):
    """An AccountStore that must not be asked."""

    def __init__(self) -> None:  # no database at all
        pass

    def get_user(self, address: str) -> None:
        raise AssertionError(f"looked up {address[:40]!r}")


def test_adapter_refuses_overlong_identities_without_a_lookup() -> None:
    """Issue 3 review: the SASL mechanisms call the store on the event loop, and a 9 kB IDN user
    name cost ~0.75 s of punycode per AUTH. Longer than 320 octets (RFC 5321: local part 64,
    "@", domain 255) names no account: unknown at once, the store never asked."""
    label = "".join(chr(0x4E00 + i * 7) for i in range(3000))
    bomb = "a@xn--" + label.encode("punycode").decode("ascii")
    creds = AccountCredentials(NoLookups())
    for identity in (bomb, "a@" + label, "a" * 300 + "@" + "b" * 20, "é" * 200 + "@example.com"):
        started = time.perf_counter()
        assert creds.password_hash(identity) is None
        assert creds.scram_keys(identity, "SCRAM-SHA-256") is None
        assert creds.cram_secret(identity) is None
        assert creds.account_address(identity) is None
        assert time.perf_counter() - started < 0.05


def test_adapter_takes_identities_up_to_320_octets(store: AccountStore) -> None:
    local = "a" * 64
    domain = ".".join(["b" * 63] * 3 + ["c" * 61])  # 253 octets
    store.add_domain(domain)
    made = add(store, f"{local}@{domain}", PASSWORD)
    creds = AccountCredentials(store)
    assert len(f"{local}@{domain}.") == 319
    assert creds.password_hash(f"{local.upper()}@{domain}.") == made.password_hash


def test_adapter_names_the_account_as_stored(store: AccountStore, key: ServerKey) -> None:
    """What a session records as the logged-in user: the account, however it was typed."""
    add(store, "Alice@example.com", PASSWORD)
    creds = AccountCredentials(store, key.cram_box())
    for spelling in ("alice@example.com", "ALICE@EXAMPLE.COM", "alice@example.com.",
                     "alice@EXAMPLE.com"):
        assert creds.account_address(spelling) == "Alice@example.com"
    assert creds.account_address("carol@example.com") is None
    assert creds.account_address("alice") is None


def test_adapter_fails_closed_on_another_server_key(
    store: AccountStore, key: ServerKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    add(store, "alice@example.com", PASSWORD, cram=key.cram_box())
    wrong = ServerKey.load_or_create(tmp_path / "other").cram_box()
    creds = AccountCredentials(store, wrong)
    with caplog.at_level(logging.WARNING, logger="postroom"):
        assert creds.cram_secret("alice@example.com") is None
    assert "CRAM-MD5 secret of alice@example.com unusable" in caplog.text
    assert "does not authenticate" in caplog.text
    assert PASSWORD not in caplog.text
    assert creds.password_hash("alice@example.com") is not None  # the rest still works


def test_adapter_treats_corrupt_stored_values_as_none(
    store: AccountStore, key: ServerKey, caplog: pytest.LogCaptureFixture
) -> None:
    add(store, "alice@example.com", PASSWORD, cram=key.cram_box())
    db = sqlite3.connect(store.db_path)
    db.execute("UPDATE users SET scram_sha256 = 'SCRAM-SHA-256$x', cram_md5 = x'0102'")
    db.commit()
    db.close()
    creds = AccountCredentials(store, key.cram_box())
    with caplog.at_level(logging.WARNING, logger="postroom"):
        assert creds.scram_keys("alice@example.com", "SCRAM-SHA-256") is None
        assert creds.cram_secret("alice@example.com") is None
    assert "SCRAM-SHA-256 keys of alice@example.com are malformed" in caplog.text
    assert "truncated" in caplog.text


def test_adapter_turns_sqlite_failure_into_storage_error(store: AccountStore, key: ServerKey) -> None:
    add(store, "alice@example.com", PASSWORD)
    other = sqlite3.connect(store.db_path)
    other.execute("DROP TABLE senders")
    other.execute("DROP TABLE users")  # the next lookup fails inside SQLite
    other.commit()
    other.close()
    creds = AccountCredentials(store, key.cram_box())
    with pytest.raises(StorageError, match="no such table"):
        creds.password_hash("alice@example.com")
    with pytest.raises(StorageError):
        creds.scram_keys("alice@example.com", "SCRAM-SHA-256")
    with pytest.raises(StorageError):
        creds.cram_secret("alice@example.com")
    ex = open_exchange("PLAIN", settings(creds, key), offered=OFFERED)
    assert ex is not None
    outcome = ex.begin(b64(b"\0alice@example.com\0" + PASSWORD.encode()))
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.UNAVAILABLE


# --- whole exchanges through the SASL core -------------------------------------------------


def settings(creds: AccountCredentials, key: ServerKey, nonce: str = "serverNONCE") -> SaslSettings:
    return SaslSettings(
        credentials=creds,
        hostname="mail.example.com",
        nonce=lambda: nonce,
        clock=lambda: 1_700_000_000.0,
        decoy_secret=key.decoy_secret(),
        decoy_hash=decoy_password_hash(FAST),
    )


def exchange(creds: AccountCredentials, key: ServerKey, name: str, nonce: str = "serverNONCE") -> Exchange:
    ex = open_exchange(name, settings(creds, key, nonce), offered=OFFERED)
    assert ex is not None
    return ex


def scram_login(ex: Exchange, user: str, password: str) -> tuple[Outcome, bytes | None]:
    """A SCRAM-SHA-256 client written from RFC 5802 3 with hashlib and hmac alone, driven over
    the exchange as SMTP carries it (server-final in a 334, then an empty line)."""
    client_nonce = "fyko+d2lbbFgONRv9qkxdawL"
    bare = f"n={user.replace('=', '=3D').replace(',', '=2C')},r={client_nonce}"
    first = ex.begin(b64(("n,," + bare).encode()))
    if not isinstance(first, Challenge):
        return first, None
    fields = dict(item.split("=", 1) for item in first.data.decode().split(","))
    assert fields["r"].startswith(client_nonce)
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(fields["s"]), int(fields["i"])
    )
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c=biws,r={fields['r']}"
    auth_message = f"{bare},{first.data.decode()},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = ex.receive(b64(f"{without_proof},p={b64(proof)}".encode()))
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expected = b"v=" + base64.b64encode(hmac.new(server_key, auth_message, hashlib.sha256).digest())
    if not isinstance(final, Challenge):
        return final, first.data
    assert final.data == expected  # the server proves it knows the keys too
    return ex.receive(""), first.data


def cram_login(ex: Exchange, user: str, password: str) -> Outcome:
    challenge = ex.begin(None)
    assert isinstance(challenge, Challenge)
    assert challenge.data.startswith(b"<serverNONCE.1700000000@mail.example.com>"[:12])
    digest = hmac.new(password.encode(), challenge.data, hashlib.md5).hexdigest()
    return ex.receive(b64(f"{user} {digest}".encode()))


def plain_login(ex: Exchange, user: str, password: str) -> Outcome:
    outcome = ex.begin(b64(b"\0" + user.encode() + b"\0" + password.encode()))
    assert isinstance(outcome, PasswordCheck)
    return ex.password_checked(outcome.check())


def test_scram_sha256_end_to_end(store: AccountStore, key: ServerKey) -> None:
    add(store, "Alice@example.com", PASSWORD)
    creds = AccountCredentials(store, key.cram_box())
    outcome, _ = scram_login(exchange(creds, key, "SCRAM-SHA-256"), "alice@example.com", PASSWORD)
    assert outcome == Success("alice@example.com", "", None)
    outcome, _ = scram_login(exchange(creds, key, "SCRAM-SHA-256"), "alice@example.com", "wrong")
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED


def test_scram_unknown_user_sees_a_stable_salt_across_processes(
    store: AccountStore, data_dir: Path
) -> None:
    """Two workers load the key separately; an unknown name gets one salt from both."""
    salts = []
    for _ in range(2):
        key = ServerKey.load_or_create(data_dir)
        creds = AccountCredentials(store, key.cram_box())
        outcome, server_first = scram_login(
            exchange(creds, key, "SCRAM-SHA-256"), "nobody@example.com", "x"
        )
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED
        assert server_first is not None
        salts.append(server_first.split(b",s=")[1].split(b",")[0])
    assert salts[0] == salts[1]


def test_cram_md5_end_to_end(store: AccountStore, key: ServerKey) -> None:
    add(store, "alice@example.com", PASSWORD, cram=key.cram_box())
    add(store, "bob@example.com", "bobs pw")
    creds = AccountCredentials(store, key.cram_box())
    assert cram_login(exchange(creds, key, "CRAM-MD5"), "ALICE@example.com", PASSWORD) == Success(
        "ALICE@example.com"
    )
    for user, password in (("alice@example.com", "wrong"), ("bob@example.com", "bobs pw"),
                           ("carol@example.com", "x")):
        outcome = cram_login(exchange(creds, key, "CRAM-MD5"), user, password)
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED, user
    # The secret follows the password: a new password, and the old one stops working.
    made = derive_credentials("new pw", FAST, address="alice@example.com", cram_box=key.cram_box())
    store.set_password("alice@example.com", made.password_hash, scram_sha256=made.scram_sha256,
                       cram_md5=made.cram_md5)
    assert isinstance(cram_login(exchange(creds, key, "CRAM-MD5"), "alice@example.com", "new pw"), Success)
    assert isinstance(cram_login(exchange(creds, key, "CRAM-MD5"), "alice@example.com", PASSWORD), Failure)
    store.set_cram_md5("alice@example.com", None)
    assert isinstance(cram_login(exchange(creds, key, "CRAM-MD5"), "alice@example.com", "new pw"), Failure)


def test_plain_end_to_end(store: AccountStore, key: ServerKey) -> None:
    add(store, "alice@example.com", PASSWORD)
    creds = AccountCredentials(store, key.cram_box())
    assert plain_login(exchange(creds, key, "PLAIN"), "Alice@Example.COM", PASSWORD) == Success(
        "Alice@Example.COM"
    )
    outcome = plain_login(exchange(creds, key, "PLAIN"), "alice@example.com", "nope")
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED


# --- a database from before SCRAM ---------------------------------------------------------------

#: The schema as postroom wrote it at version 1, verbatim.
V1_SCHEMA = """
CREATE TABLE domains (
    name     TEXT PRIMARY KEY,
    created  INTEGER NOT NULL
);
CREATE TABLE users (
    address        TEXT PRIMARY KEY,
    lookup         TEXT NOT NULL UNIQUE,
    domain         TEXT NOT NULL REFERENCES domains(name),
    password_hash  TEXT NOT NULL,
    quota          INTEGER NOT NULL DEFAULT 0 CHECK (quota >= 0),
    maildir        TEXT NOT NULL,
    created        INTEGER NOT NULL
);
CREATE INDEX users_domain ON users(domain);
CREATE TABLE aliases (
    source       TEXT NOT NULL,
    lookup       TEXT NOT NULL,
    destination  TEXT NOT NULL,
    domain       TEXT NOT NULL REFERENCES domains(name),
    created      INTEGER NOT NULL,
    PRIMARY KEY (lookup, destination)
);
CREATE INDEX aliases_domain ON aliases(domain);
CREATE TABLE schema_version (version INTEGER NOT NULL);
INSERT INTO schema_version (version) VALUES (1);
"""


def make_v1_database(path: Path, password_hash: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("INSERT INTO domains VALUES ('example.com', 1700000000)")
    db.execute(
        "INSERT INTO users VALUES ('Alice@example.com', 'alice@example.com', 'example.com', ?, 0,"
        " 'example.com/Alice', 1700000000)",
        (password_hash,),
    )
    db.commit()
    db.close()


def test_v1_user_still_logs_in_with_plain_and_has_no_scram_keys(data_dir: Path) -> None:
    from postroom.accounts.passwords import hash_password

    db_path = data_dir / "accounts.db"
    make_v1_database(db_path, hash_password(PASSWORD, FAST))
    key = ServerKey.load_or_create(data_dir)
    with AccountStore(db_path, data_dir / "mail") as store:
        user = store.get_user("alice@example.com")
        assert user is not None and user.address == "Alice@example.com"
        assert user.scram_sha256 is None and user.cram_md5 is None
        assert user.mechanisms == ("PLAIN", "LOGIN")
        creds = AccountCredentials(store, key.cram_box())
        assert creds.scram_keys("alice@example.com", "SCRAM-SHA-256") is None
        assert plain_login(exchange(creds, key, "PLAIN"), "alice@example.com", PASSWORD) == Success(
            "alice@example.com"
        )
        # SCRAM fails as a wrong password would (the client cannot tell) ...
        outcome, _ = scram_login(exchange(creds, key, "SCRAM-SHA-256"), "alice@example.com", PASSWORD)
        assert isinstance(outcome, Failure) and outcome.kind is FailureKind.REJECTED
        # ... until the password is set again (what `postroom user passwd` does).
        made = derive_credentials(PASSWORD, FAST, address=user.address)
        store.set_password(user.address, made.password_hash, scram_sha256=made.scram_sha256)
        outcome, _ = scram_login(exchange(creds, key, "SCRAM-SHA-256"), "alice@example.com", PASSWORD)
        assert outcome == Success("alice@example.com", "", None)
    check = sqlite3.connect(db_path)
    try:
        assert check.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    finally:
        check.close()
