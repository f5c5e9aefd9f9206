"""The accounts store on a real SQLite file: domains, users, aliases, several processes."""

from __future__ import annotations

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

from postroom.accounts.store import (
    AccountStore,
    Alias,
    Sender,
    address_key,
    check_domain,
    normalize_domain,
)
from postroom.config import from_dict
from postroom.errors import AccountError, StorageError

#: A real argon2id hash (of "pw" at the lowest cost); the store only checks its shape.
HASH = "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$6Kb0jT4pNOz2J5m4Yx1T8w"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[AccountStore]:
    with AccountStore(tmp_path / "data" / "accounts.db", tmp_path / "data" / "mail") as s:
        yield s


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the database file --------------------------------------------------------------------------


def test_database_file_settings(tmp_path: Path, store: AccountStore) -> None:
    db = tmp_path / "data" / "accounts.db"
    assert mode(db) == 0o600
    assert mode(db.parent) == 0o700
    other = sqlite3.connect(db)
    try:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        tables = {r[0] for r in other.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"domains", "users", "aliases", "senders", "schema_version"} <= tables
    finally:
        other.close()
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store._db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_reopen_keeps_data(tmp_path: Path) -> None:
    paths = (tmp_path / "accounts.db", tmp_path / "mail")
    with AccountStore(*paths) as first:
        first.add_domain("example.com")
    with AccountStore(*paths) as second:
        assert second.list_domains() == ["example.com"]


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    paths = (tmp_path / "accounts.db", tmp_path / "mail")
    AccountStore(*paths).close()
    db = sqlite3.connect(paths[0])
    db.execute("UPDATE schema_version SET version = 99")
    db.commit()
    db.close()
    with pytest.raises(AccountError, match="schema version 99 is newer"):
        AccountStore(*paths)


def test_for_config_uses_the_data_dir(tmp_path: Path) -> None:
    config = from_dict({"server": {"data_dir": str(tmp_path / "d"), "run_as": ""}})
    with AccountStore.for_config(config) as s:
        assert s.db_path == tmp_path / "d" / "accounts.db"
        assert s.mail_root == tmp_path / "d" / "mail"
    assert (tmp_path / "d" / "accounts.db").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_gets_what_the_store_creates(tmp_path: Path) -> None:
    with AccountStore(
        tmp_path / "d" / "accounts.db", tmp_path / "d" / "mail", owner=(4321, 4321)
    ) as s:
        s.add_domain("example.com")
        user = s.add_user("alice@example.com", HASH)
        for path in [
            tmp_path / "d",
            tmp_path / "d" / "accounts.db",
            user.maildir,
            user.maildir / "new",
        ]:
            assert (path.stat().st_uid, path.stat().st_gid) == (4321, 4321), path
        wal = tmp_path / "d" / "accounts.db-wal"
        assert wal.exists() and wal.stat().st_uid == 4321  # SQLite copies the db file's owner


# --- domains ----------------------------------------------------------------------------------


def test_domains(store: AccountStore) -> None:
    assert store.add_domain("Example.COM.") == "example.com"
    assert store.add_domain("b.example") == "b.example"
    assert store.list_domains() == ["example.com", "b.example"]  # oldest first: primary
    assert store.is_local_domain("EXAMPLE.com")
    assert store.is_local_domain("example.com.")
    assert not store.is_local_domain("other.com")
    with pytest.raises(AccountError, match=r"example\.com: domain already exists"):
        store.add_domain("EXAMPLE.com")


def test_idn_domain_matches_both_forms(store: AccountStore) -> None:
    assert store.add_domain("xn--bcher-kva.example") == "bücher.example"
    assert store.is_local_domain("bücher.example")
    assert store.is_local_domain("XN--BCHER-KVA.example")
    assert normalize_domain("B\u0308cher.example") == "b\u0308cher.example"  # only lowercased
    assert normalize_domain("Bu\u0308cher.example") == "bücher.example"  # NFC


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "a..b",
        "-a.com",
        "a-.com",
        "a_b.com",
        "a b.com",
        "[127.0.0.1]",
        "a/b",
        "x" * 64 + ".com",
        "xn--zz-.com",
        "xn--zz.com",
        "a@b.com",
        "ex\u00a0ample.com",
    ],
)
def test_bad_domain_syntax(store: AccountStore, bad: str) -> None:
    with pytest.raises(AccountError, match="bad domain name syntax"):
        store.add_domain(bad)


def test_domain_length_limits() -> None:
    assert check_domain("a" * 63 + ".com")
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 octets
    assert len(name) == 253 and check_domain(name) == name
    with pytest.raises(AccountError):
        check_domain(name + "b")


def _punycode_bomb(chars: int) -> str:
    """An A-label whose U-label has *chars* distinct code points: the worst case of punycode,
    whose encoder walks every distinct code point once per output position (about 0.75 s of
    CPU for 3000 of them)."""
    label = "".join(chr(0x4E00 + i * 7) for i in range(chars))
    return "xn--" + label.encode("punycode").decode("ascii")


def test_overlong_labels_and_names_are_not_decoded_and_return_at_once() -> None:
    """Issue 3 review: a@xn--<9 kB> in an AUTH identity held the event loop ~0.75 s per try.
    A label over 63 octets or a name over 253 is no host name: no punycode work is done."""
    bomb = _punycode_bomb(3000)
    unicode_bomb = bomb[4:].encode("ascii").decode("punycode")
    for name in (bomb, bomb + ".example.com", "a." + bomb, unicode_bomb + ".com",
                 ".".join(["xn--bcher-kva"] * 30)):
        started = time.perf_counter()
        folded = normalize_domain(name)
        with pytest.raises(AccountError, match="bad domain name syntax"):
            check_domain(name)
        address_key("alice", name)
        assert time.perf_counter() - started < 0.05, name[:40]
        assert folded == name.lower()  # not decoded: matches no stored domain
    # a name at the limits is still decoded
    label = "xn--" + "bücher".encode("punycode").decode("ascii")
    assert normalize_domain(".".join([label] * 18)) == ".".join(["bücher"] * 18)  # 251 octets


def test_address_literal_is_never_local(store: AccountStore) -> None:
    store.add_domain("example.com")
    assert not store.is_local_domain("[127.0.0.1]")


def test_remove_domain_refused_while_in_use(store: AccountStore) -> None:
    store.add_domain("example.com")
    user = store.add_user("alice@example.com", HASH)
    store.add_alias("info@example.com", "alice@example.com")
    with pytest.raises(AccountError, match=r"still has 1 user\(s\) and 1 alias\(es\)"):
        store.remove_domain("example.com")
    assert store.is_local_domain("example.com")
    store.remove_domain("EXAMPLE.com", force=True)
    assert store.list_domains() == []
    assert store.list_users() == [] and store.list_aliases() == []
    assert user.maildir.is_dir()  # mail is never deleted by account changes
    with pytest.raises(AccountError, match="unknown domain"):
        store.remove_domain("example.com")


def test_remove_empty_domain(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.remove_domain("example.com")
    assert not store.is_local_domain("example.com")


def test_domain_cache_sees_other_connections(tmp_path: Path, store: AccountStore) -> None:
    assert not store.is_local_domain("example.com")  # fills the cache
    with AccountStore(tmp_path / "data" / "accounts.db", tmp_path / "data" / "mail") as other:
        other.add_domain("example.com")
        assert store.is_local_domain("example.com")
        other.remove_domain("example.com")
        assert not store.is_local_domain("example.com")


def test_domain_cache_sees_other_processes(tmp_path: Path, store: AccountStore) -> None:
    assert not store.is_local_domain("example.org")
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from postroom.accounts.store import AccountStore
        with AccountStore(Path({str(store.db_path)!r}), Path({str(store.mail_root)!r})) as s:
            s.add_domain("example.org")
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert store.is_local_domain("example.org")


def test_concurrent_writers_in_several_processes(tmp_path: Path, store: AccountStore) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        from pathlib import Path
        from postroom.accounts.store import AccountStore
        n = sys.argv[1]
        with AccountStore(Path({str(store.db_path)!r}), Path({str(store.mail_root)!r})) as s:
            for i in range(15):
                s.add_domain(f"p{{n}}-{{i}}.example")
                s.add_user(f"u@p{{n}}-{{i}}.example", {HASH!r})
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(n)]) for n in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    assert len(store.list_domains()) == 60
    assert len(store.list_users()) == 60


# --- users --------------------------------------------------------------------------------------


def test_add_user_makes_maildir(tmp_path: Path, store: AccountStore) -> None:
    store.add_domain("example.com")
    user = store.add_user("Alice@EXAMPLE.com", HASH, quota=1000)
    assert user.address == "Alice@example.com"  # local part as given, domain canonical
    assert user.local == "Alice" and user.domain == "example.com"
    assert user.quota == 1000
    assert user.maildir == tmp_path / "data" / "mail" / "example.com" / "Alice"
    for sub in ("", "cur", "new", "tmp"):
        assert (user.maildir / sub).is_dir()
        assert mode(user.maildir / sub) == 0o700
    assert mode(tmp_path / "data" / "mail") == 0o700
    assert HASH not in repr(user)


def test_get_user_folds_case(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.add_user("Alice@example.com", HASH)
    for spelling in ("alice@example.com", "ALICE@Example.Com", "Alice@example.com."):
        found = store.get_user(spelling)
        assert found is not None and found.address == "Alice@example.com"
        assert found.password_hash == HASH
    assert store.get_user("bob@example.com") is None
    assert store.get_user("not an address") is None


def test_add_user_errors(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.add_user("alice@example.com", HASH)
    with pytest.raises(AccountError, match="unknown domain"):
        store.add_user("alice@other.com", HASH)
    with pytest.raises(AccountError, match=r"ALICE@example\.com: user already exists"):
        store.add_user("ALICE@example.com", HASH)
    with pytest.raises(AccountError, match="bad address syntax"):
        store.add_user("alice", HASH)
    with pytest.raises(AccountError, match="not an argon2 hash"):
        store.add_user("carol@example.com", "hunter2")
    with pytest.raises(AccountError, match="quota"):
        store.add_user("carol@example.com", HASH, quota=-1)
    assert [u.address for u in store.list_users()] == ["alice@example.com"]


@pytest.mark.parametrize(
    "local",
    ["a/b", "../x", ".a", "a.", "a..b", "a b", "a%b", "a!b", '"q"', "a\\b", "a\x00", "x" * 65, ""],
)
def test_bad_local_parts(store: AccountStore, local: str) -> None:
    store.add_domain("example.com")
    with pytest.raises(AccountError, match="bad"):
        store.add_user(f"{local}@example.com", HASH)


def test_good_local_parts(store: AccountStore) -> None:
    store.add_domain("example.com")
    for local in ("a.b", "x+y", "o'brien", "j\u00fcrgen", "x" * 64, "a_b-c=d"):
        store.add_user(f"{local}@example.com", HASH)
        assert store.get_user(f"{local}@example.com") is not None


def test_list_remove_and_update_users(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.add_domain("example.org")
    store.add_user("bob@example.com", HASH)
    alice = store.add_user("alice@example.com", HASH)
    store.add_user("carol@example.org", HASH)
    assert [u.address for u in store.list_users()] == [
        "alice@example.com",
        "bob@example.com",
        "carol@example.org",
    ]
    assert [u.address for u in store.list_users("EXAMPLE.org")] == ["carol@example.org"]
    new_hash = HASH.replace("6Kb0", "AAAA")
    store.set_password("ALICE@example.com", new_hash)
    store.set_quota("alice@example.com", 5)
    found = store.get_user("alice@example.com")
    assert found is not None and found.password_hash == new_hash and found.quota == 5
    with pytest.raises(AccountError, match="not an argon2 hash"):
        store.set_password("alice@example.com", "plain")
    store.remove_user("Alice@example.com")
    assert store.get_user("alice@example.com") is None
    assert alice.maildir.is_dir()
    missing = r"alice@example\.com: no such user"
    with pytest.raises(AccountError, match=missing):
        store.remove_user("alice@example.com")
    with pytest.raises(AccountError, match=missing):
        store.set_password("alice@example.com", HASH)
    with pytest.raises(AccountError, match=missing):
        store.set_quota("alice@example.com", 1)


# --- aliases ------------------------------------------------------------------------------------


def test_aliases(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.add_user("alice@example.com", HASH)
    assert store.add_alias("Info@Example.com", "alice@example.com") == Alias(
        "Info@example.com", "alice@example.com"
    )
    store.add_alias("info@example.com", "Bob@ELSEWHERE.net")
    store.add_alias("@example.com", "alice@example.com")
    store.add_alias("ops@example.com", "root@[192.0.2.1]")
    assert store.alias_targets("INFO@example.com") == ["alice@example.com", "Bob@elsewhere.net"]
    assert store.alias_targets("@EXAMPLE.com") == ["alice@example.com"]
    assert store.alias_targets("nobody@example.com") == []
    assert store.list_aliases() == [
        Alias("@example.com", "alice@example.com"),
        Alias("Info@example.com", "alice@example.com"),
        Alias("Info@example.com", "Bob@elsewhere.net"),
        Alias("ops@example.com", "root@[192.0.2.1]"),
    ]
    assert store.list_aliases("example.org") == []
    with pytest.raises(AccountError, match="alias already exists"):
        store.add_alias("info@example.com", "Bob@elsewhere.NET")
    # A remote local part may be case-sensitive (RFC 5321 2.4): "bob" is not "Bob".
    with pytest.raises(AccountError, match="no such alias"):
        store.remove_alias("info@example.com", "bob@elsewhere.net")
    assert store.remove_alias("info@example.com", "Bob@ELSEWHERE.net") == 1
    assert store.alias_targets("info@example.com") == ["alice@example.com"]
    assert store.remove_alias("ops@example.com") == 1
    with pytest.raises(AccountError, match=r"ops@example\.com: no such alias"):
        store.remove_alias("ops@example.com")


def test_alias_errors(store: AccountStore) -> None:
    store.add_domain("example.com")
    store.add_user("alice@example.com", HASH)
    with pytest.raises(AccountError, match="unknown domain"):
        store.add_alias("x@other.com", "alice@example.com")
    with pytest.raises(AccountError, match="a user with this address exists"):
        store.add_alias("ALICE@example.com", "bob@elsewhere.net")
    with pytest.raises(AccountError, match="bad destination"):
        store.add_alias("x@example.com", "@elsewhere.net")
    with pytest.raises(AccountError, match="bad address literal"):
        store.add_alias("x@example.com", "root@[999.1.1.1]")
    with pytest.raises(AccountError, match="bad local part"):
        store.add_alias("a%b@example.com", "alice@example.com")
    with pytest.raises(AccountError, match="bad address syntax"):
        store.add_alias("x@example.com", "no-at-sign")
    store.add_alias("x@example.com", "alice@example.com")
    with pytest.raises(AccountError, match="an alias with this address exists"):
        store.add_user("X@example.com", HASH)


# --- schema 2: the upgrade from schema 1 ---------------------------------------------------------

#: The version 1 schema, verbatim as postroom wrote it.
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
INSERT INTO domains VALUES ('example.com', 1700000000);
INSERT INTO users VALUES ('Alice@example.com', 'alice@example.com', 'example.com',
    '$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHRzYWx0$6Kb0jT4pNOz2J5m4Yx1T8w', 500,
    'example.com/Alice', 1700000000);
INSERT INTO aliases VALUES ('info@example.com', 'info@example.com', 'Alice@example.com',
    'example.com', 1700000000);
"""


def make_v1(path: Path, extra: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA + extra)
    db.close()


def columns(db_path: Path) -> dict[str, list[tuple[str, str, int]]]:
    db = sqlite3.connect(db_path)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {
            t: sorted((c[1], c[2], c[3]) for c in db.execute(f"PRAGMA table_info({t})"))
            for t in sorted(tables)
        }
    finally:
        db.close()


def test_v1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    old = tmp_path / "old" / "accounts.db"
    make_v1(old)
    with AccountStore(old, tmp_path / "old" / "mail") as store:
        user = store.get_user("alice@example.com")
        assert user is not None
        assert (user.address, user.quota, user.password_hash) == ("Alice@example.com", 500, HASH)
        assert user.scram_sha256 is None and user.cram_md5 is None
        assert user.mechanisms == ("PLAIN", "LOGIN")
        assert store.alias_targets("info@example.com") == ["Alice@example.com"]
        assert store.may_send_as("alice@example.com", "info@example.com")
        store.add_sender("alice@example.com", "@example.org")  # the new table works
    # An upgraded database has the columns a new one has.
    new = tmp_path / "new" / "accounts.db"
    AccountStore(new, tmp_path / "new" / "mail").close()
    assert columns(old) == columns(new)
    db = sqlite3.connect(old)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "senders_lookup" in indexes
    finally:
        db.close()
    AccountStore(old, tmp_path / "old" / "mail").close()  # opening again changes nothing
    assert columns(old) == columns(new)


def test_a_failed_upgrade_leaves_version_1_untouched(tmp_path: Path) -> None:
    """The upgrade runs in one transaction: a step that fails rolls back the steps before it."""
    path = tmp_path / "accounts.db"
    make_v1(path, "CREATE TABLE senders (x INTEGER);")  # in the way of the upgrade's CREATE
    before = columns(path)
    with pytest.raises(StorageError, match="already exists"):
        AccountStore(path, tmp_path / "mail")
    assert columns(path) == before  # users did not gain its columns
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(1,)]
    finally:
        db.close()


def test_concurrent_openers_upgrade_once(tmp_path: Path) -> None:
    path = tmp_path / "accounts.db"
    make_v1(path)
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from postroom.accounts.store import AccountStore
        AccountStore(Path({str(path)!r}), Path({str(tmp_path / "mail")!r})).close()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script]) for _ in range(4)]
    assert [p.wait(60) for p in procs] == [0, 0, 0, 0]
    db = sqlite3.connect(path)
    try:
        assert db.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    finally:
        db.close()


# --- credentials columns -------------------------------------------------------------------------

SCRAM = (
    "SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$WG5d8oPm3OtcPnkdi4Uo7BkeZkBFzpcXkuLmtbsT4qY=:"
    "wfPLwcE6nTWhTAmQ7tl2KeoiWGPlZqQxSrmfPwDl2dU="
)


def test_credentials_are_stored_and_replaced_together(store: AccountStore) -> None:
    store.add_domain("example.com")
    user = store.add_user("alice@example.com", HASH, scram_sha256=SCRAM, cram_md5=b"\x01sealed")
    assert user.mechanisms == ("PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5")
    assert SCRAM not in repr(user) and "sealed" not in repr(user)
    found = store.get_user("ALICE@example.com")
    assert found is not None and (found.scram_sha256, found.cram_md5) == (SCRAM, b"\x01sealed")
    # A password set without the other credentials clears them: none may outlive the password.
    store.set_password("alice@example.com", HASH)
    found = store.get_user("alice@example.com")
    assert found is not None and (found.scram_sha256, found.cram_md5) == (None, None)
    store.set_password("alice@example.com", HASH, scram_sha256=SCRAM)
    store.set_cram_md5("alice@example.com", b"\x01again")
    found = store.get_user("alice@example.com")
    assert found is not None and found.mechanisms[-1] == "CRAM-MD5"
    store.set_cram_md5("alice@example.com", None)
    found = store.get_user("alice@example.com")
    assert found is not None and found.mechanisms == ("PLAIN", "LOGIN", "SCRAM-SHA-256")
    assert [u.mechanisms for u in store.list_users()] == [found.mechanisms]
    with pytest.raises(AccountError, match="RFC 5803"):
        store.set_password("alice@example.com", HASH, scram_sha256="SCRAM-SHA-256$bogus")
    with pytest.raises(AccountError, match="RFC 5803"):
        store.add_user("bob@example.com", HASH, scram_sha256="plain text")
    with pytest.raises(AccountError, match="no such user"):
        store.set_cram_md5("bob@example.com", None)


# --- senders and may_send_as ---------------------------------------------------------------------


@pytest.fixture
def senders(store: AccountStore) -> AccountStore:
    store.add_domain("example.com")
    store.add_domain("example.org")
    store.add_domain("bücher.example")
    store.add_user("Alice@example.com", HASH)
    store.add_user("bob@example.com", HASH)
    store.add_user("jürgen@bücher.example", HASH)
    store.add_alias("info@example.com", "alice@EXAMPLE.com")
    store.add_alias("info@example.com", "someone@elsewhere.net")
    store.add_alias("team@example.com", "info@example.com")  # alice only through another alias
    store.add_alias("sales@example.com", "alice+sales@example.com")
    store.add_alias("@example.org", "alice@example.com")  # catch-all
    return store


@pytest.mark.parametrize(
    ("sender", "allowed"),
    [
        ("Alice@example.com", True),  # own address
        ("alice@EXAMPLE.COM.", True),  # case and the trailing dot do not matter
        ("ALICE@xn--example-invalid.com", False),
        ("alice+lists@example.com", True),  # subaddress
        ("alice+@example.com", True),
        ("+alice@example.com", False),  # a delimiter first is no subaddress (as the router)
        ("info@example.com", True),  # alias naming alice
        ("INFO+x@example.com", True),  # ... with a tag
        ("sales@example.com", True),  # alias to alice's +tag
        ("team@example.com", False),  # only through another alias
        ("anything@example.org", False),  # a catch-all grants nothing
        ("bob@example.com", False),  # another user's address
        ("bob+alice@example.com", False),
        ("nobody@example.com", False),
        ("alice@example.net", False),
        ("alice", False),  # no domain
        ("@example.com", False),  # no local part
        ("", True),  # the null reverse-path
        (" ", False),  # only exactly "" is the null path
    ],
)
def test_may_send_as(senders: AccountStore, sender: str, allowed: bool) -> None:
    assert senders.may_send_as("alice@example.com", sender) is allowed


def test_may_send_as_idn_and_unknown_login(senders: AccountStore) -> None:
    assert senders.may_send_as("JÜRGEN@xn--bcher-kva.example", "jürgen@bücher.example")
    assert senders.may_send_as("jürgen@bücher.example", "J\u00dcrgen+x@XN--BCHER-KVA.example")
    for login in ("carol@example.com", "info@example.com", "alice", "", "\ud800@example.com"):
        assert not senders.may_send_as(login, "")
        assert not senders.may_send_as(login, "info@example.com")
    assert not senders.may_send_as("alice@example.com", "\udcff@example.com")


def test_may_send_as_delimiter(senders: AccountStore) -> None:
    assert not senders.may_send_as("alice@example.com", "alice+x@example.com", delimiter="")
    assert not senders.may_send_as("alice@example.com", "alice-x@example.com")
    assert senders.may_send_as("alice@example.com", "alice-x@example.com", delimiter="+-")
    # Without subaddressing an alias to alice+sales no longer names alice.
    assert not senders.may_send_as("alice@example.com", "sales@example.com", delimiter="")


def test_sender_rows(senders: AccountStore) -> None:
    assert not senders.may_send_as("bob@example.com", "ceo@example.com")
    assert senders.add_sender("BOB@example.com", "CEO@Example.COM") == Sender(
        "bob@example.com", "CEO@example.com"
    )
    assert senders.add_sender("bob@example.com", "@Partner.EXAMPLE") == Sender(
        "bob@example.com", "@partner.example"
    )
    senders.add_sender("alice@example.com", "alice@gmail.example")
    assert senders.may_send_as("bob@example.com", "ceo@example.com")
    assert senders.may_send_as("bob@example.com", "Ceo+news@EXAMPLE.com")
    assert senders.may_send_as("bob@example.com", "anyone@partner.example.")
    assert not senders.may_send_as("bob@example.com", "anyone@sub.partner.example")
    assert not senders.may_send_as("alice@example.com", "ceo@example.com")  # bob's row only
    assert not senders.may_send_as("bob@example.com", "alice@gmail.example")
    assert senders.list_senders() == [
        Sender("Alice@example.com", "alice@gmail.example"),
        Sender("bob@example.com", "CEO@example.com"),
        Sender("bob@example.com", "@partner.example"),
    ]
    assert senders.list_senders("BOB@example.com") == senders.list_senders()[1:]
    with pytest.raises(AccountError, match=r"bob@example\.com may already send as ceo@example\.com"):
        senders.add_sender("bob@example.com", "ceo@example.com")
    with pytest.raises(AccountError, match="no such user"):
        senders.add_sender("carol@example.com", "x@example.com")
    with pytest.raises(AccountError, match="bad domain name syntax"):
        senders.add_sender("bob@example.com", "@bad domain")
    with pytest.raises(AccountError, match="bad address syntax"):
        senders.add_sender("bob@example.com", "nodomain")
    senders.remove_sender("bob@example.com", "ceo@EXAMPLE.com")
    assert not senders.may_send_as("bob@example.com", "ceo@example.com")
    with pytest.raises(AccountError, match="no such sender"):
        senders.remove_sender("bob@example.com", "ceo@example.com")
    with pytest.raises(AccountError, match="no such user"):
        senders.remove_sender("carol@example.com", "@partner.example")
    # Rows go with their user, also when the whole domain goes.
    senders.remove_user("bob@example.com")
    assert senders.list_senders() == [Sender("Alice@example.com", "alice@gmail.example")]
    senders.add_user("bob@example.com", HASH)
    assert not senders.may_send_as("bob@example.com", "anyone@partner.example")  # not inherited
    senders.remove_domain("example.com", force=True)
    assert senders.list_senders() == []
