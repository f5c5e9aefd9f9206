"""The ``postroom`` command: in-process with CliRunner, and as a real program."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from postroom.accounts.credentials import AccountCredentials
from postroom.accounts.passwords import verify_password
from postroom.accounts.secrets import ServerKey
from postroom.accounts.store import AccountStore
from postroom.cli import format_size, main, parse_size

POSTROOM_BIN = Path(sys.executable).parent / "postroom"

FAST_PASSWORDS = """
[passwords]
time_cost = 1
memory_cost_kib = 8
parallelism = 1
"""


def write_config(root: Path, extra: str = "") -> Path:
    path = root / "postroom.toml"
    path.write_text(
        f"""
[server]
hostname = "mx.test.example"
data_dir = "{root / "data"}"
run_as = ""

[[listener]]
address = "127.0.0.1:2525"
{FAST_PASSWORDS}
{extra}
"""
    )
    return path


class Cli:
    def __init__(self, root: Path, extra: str = "") -> None:
        self.root = root
        self.config = write_config(root, extra)
        self.runner = CliRunner()

    def __call__(self, *args: str, input: str | None = None, code: int = 0) -> Result:
        result = self.runner.invoke(main, ["-c", str(self.config), *args], input=input)
        assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
        if code == 1:
            assert "Traceback" not in result.output
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json").stdout)

    def store(self) -> AccountStore:
        return AccountStore(self.root / "data" / "accounts.db", self.root / "data" / "mail")

    def credentials(self, store: AccountStore) -> AccountCredentials:
        """What the server will look SASL identities up in, with the CLI's server key."""
        return AccountCredentials(store, ServerKey.load_or_create(self.root / "data").cram_box())


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_domains(cli: Cli) -> None:
    assert cli("domain", "add", "Example.COM").stdout == "added domain example.com\n"
    cli("domain", "add", "example.org")
    assert cli.json("domain", "list") == [
        {"name": "example.com", "users": 0, "aliases": 0},
        {"name": "example.org", "users": 0, "aliases": 0},
    ]
    table = cli("domain", "list").stdout
    assert "Domains" in table and "example.com" in table and "example.org" in table
    cli("domain", "remove", "example.org")
    assert [d["name"] for d in cli.json("domain", "list")] == ["example.com"]


def test_errors_are_one_line_and_exit_1(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    result = cli("domain", "add", "example.com", code=1)
    assert result.stderr == "Error: example.com: domain already exists\n"
    assert result.stdout == ""
    result = cli("domain", "add", "bad domain", code=1)
    assert "bad domain name syntax" in result.stderr
    result = cli("domain", "remove", "nope.example", code=1)
    assert result.stderr == "Error: nope.example: unknown domain\n"


def test_user_add_from_stdin_and_list(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    result = cli("user", "add", "Alice@example.com", "--password-stdin", input="s3cret pw\n")
    assert result.stdout.startswith("added user Alice@example.com (maildir ")
    assert "s3cret" not in result.output
    users = cli.json("user", "list")
    assert isinstance(users, list) and len(users) == 1
    record = users[0]
    assert record["address"] == "Alice@example.com"
    assert record["quota"] == 0
    assert record["maildir"] == str(cli.root / "data" / "mail" / "example.com" / "Alice")
    assert set(record) == {"address", "quota", "maildir", "created", "mechanisms"}  # no hash
    assert record["mechanisms"] == ["PLAIN", "LOGIN", "SCRAM-SHA-256"]
    assert (cli.root / "data" / "mail" / "example.com" / "Alice" / "new").is_dir()
    with cli.store() as store:
        user = store.get_user("alice@example.com")
        assert user is not None
        assert user.password_hash.startswith("$argon2id$v=19$m=8,t=1,p=1$")
        assert verify_password(user.password_hash, "s3cret pw")
    table = cli("user", "list", "example.com").stdout
    assert "Alice@example.com" in table and "unlimited" in table
    assert "PLAIN LOGIN SCRAM-SHA-256" in table and "CRAM-MD5" not in table
    assert not (cli.root / "data" / "keys").exists()  # the server key is made only when needed
    assert cli.json("user", "list", "example.org") == []


def test_user_add_with_prompt_and_confirmation(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    # The first pair does not match: click asks again.
    result = cli("user", "add", "bob@example.com", input="one\ntwo\nthree\nthree\n")
    assert "do not match" in result.output
    assert "one" not in result.output and "three" not in result.output
    with cli.store() as store:
        user = store.get_user("bob@example.com")
        assert user is not None and verify_password(user.password_hash, "three")


def test_user_add_refused_before_the_password_is_asked(cli: Cli) -> None:
    result = cli("user", "add", "carol@nowhere.example", code=1)
    assert result.stderr == "Error: nowhere.example: unknown domain\n"
    assert "Password" not in result.output
    cli("domain", "add", "example.com")
    cli("user", "add", "carol@example.com", "--password-stdin", input="pw\n")
    result = cli("user", "add", "CAROL@example.com", "--password-stdin", input="pw\n", code=1)
    assert result.stderr == "Error: CAROL@example.com: user already exists\n"
    result = cli("user", "add", "dave@example.com", "--password-stdin", input="\n", code=1)
    assert result.stderr == "Error: the password is empty\n"


def test_quota(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "a@example.com", "--quota", "100M", "--password-stdin", input="pw\n")
    cli("user", "quota", "a@example.com", "2G")
    cli("user", "add", "b@example.com", "--quota", "1.5k", "--password-stdin", input="pw\n")
    quotas = {u["address"]: u["quota"] for u in cli.json("user", "list")}
    assert quotas == {"a@example.com": 2 * 1024**3, "b@example.com": 1536}
    result = cli("user", "add", "c@example.com", "--quota", "lots", "--password-stdin", code=2)
    assert "not a size" in result.stderr


def test_default_quota_from_config(tmp_path: Path) -> None:
    cli = Cli(tmp_path, "[delivery]\ndefault_quota = 1048576\n")
    cli("domain", "add", "example.com")
    cli("user", "add", "a@example.com", "--password-stdin", input="pw\n")
    assert cli.json("user", "list")[0]["quota"] == 1048576


def test_passwd_and_remove(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--password-stdin", input="old\n")
    cli("user", "passwd", "ALICE@example.com", "--password-stdin", input="new\r\n")
    with cli.store() as store:
        user = store.get_user("alice@example.com")
        assert user is not None
        assert verify_password(user.password_hash, "new")
        assert not verify_password(user.password_hash, "old")
    result = cli("user", "passwd", "ghost@example.com", "--password-stdin", input="x\n", code=1)
    assert result.stderr == "Error: ghost@example.com: no such user\n"
    result = cli("user", "remove", "alice@example.com")
    assert "mail kept in" in result.stdout
    assert cli.json("user", "list") == []
    assert (cli.root / "data" / "mail" / "example.com" / "alice" / "cur").is_dir()
    cli("user", "remove", "alice@example.com", code=1)


def test_user_add_with_cram_md5(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "Alice@example.com", "--allow-cram-md5", "--password-stdin", input="pw one\n")
    cli("user", "add", "bob@example.com", "--password-stdin", input="pw two\n")
    mechanisms = {u["address"]: u["mechanisms"] for u in cli.json("user", "list")}
    assert mechanisms == {
        "Alice@example.com": ["PLAIN", "LOGIN", "SCRAM-SHA-256", "CRAM-MD5"],
        "bob@example.com": ["PLAIN", "LOGIN", "SCRAM-SHA-256"],
    }
    assert "PLAIN LOGIN SCRAM-SHA-256 CRAM-MD5" in cli("user", "list").stdout
    key = cli.root / "data" / "keys" / "server.key"
    assert key.stat().st_mode & 0o777 == 0o600
    with cli.store() as store:
        creds = cli.credentials(store)
        assert creds.cram_secret("alice@example.com") == "pw one"
        assert creds.cram_secret("bob@example.com") is None
        keys = creds.scram_keys("bob@example.com", "SCRAM-SHA-256")
        assert keys is not None and keys.iterations == 4096
    raw = (cli.root / "data" / "accounts.db").read_bytes()
    wal = cli.root / "data" / "accounts.db-wal"
    raw += wal.read_bytes() if wal.exists() else b""
    assert b"pw one" not in raw


def test_passwd_derives_every_credential_again(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--allow-cram-md5", "--password-stdin", input="old\n")
    cli("user", "add", "bob@example.com", "--password-stdin", input="old\n")
    with cli.store() as store:
        before = {a: cli.credentials(store).scram_keys(a, "SCRAM-SHA-256")
                  for a in ("alice@example.com", "bob@example.com")}
    cli("user", "passwd", "alice@example.com", "--password-stdin", input="new\n")
    cli("user", "passwd", "bob@example.com", "--password-stdin", input="new\n")
    with cli.store() as store:
        creds = cli.credentials(store)
        for address in ("alice@example.com", "bob@example.com"):
            keys = creds.scram_keys(address, "SCRAM-SHA-256")
            assert keys is not None and keys != before[address]
            hashed = creds.password_hash(address)
            assert hashed is not None and verify_password(hashed, "new")
        assert creds.cram_secret("alice@example.com") == "new"  # kept on, follows the password
        assert creds.cram_secret("bob@example.com") is None  # still off


def test_passwd_gives_a_schema_1_user_scram_keys(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--password-stdin", input="pw\n")
    db = sqlite3.connect(cli.root / "data" / "accounts.db")  # as an upgraded v1 row looks
    db.execute("UPDATE users SET scram_sha256 = NULL")
    db.commit()
    db.close()
    assert cli.json("user", "list")[0]["mechanisms"] == ["PLAIN", "LOGIN"]
    cli("user", "passwd", "alice@example.com", "--password-stdin", input="pw\n")
    assert cli.json("user", "list")[0]["mechanisms"] == ["PLAIN", "LOGIN", "SCRAM-SHA-256"]


def test_cram_md5_on_and_off(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--password-stdin", input="the pw\n")
    result = cli("user", "cram-md5", "alice@example.com", "on", "--password-stdin",
                 input="not it\n", code=1)
    assert "not the account's password" in result.stderr and "not it" not in result.output
    assert "CRAM-MD5" not in cli.json("user", "list")[0]["mechanisms"]
    # The prompt asks twice, as user passwd does.
    result = cli("user", "cram-md5", "ALICE@example.com", "on", input="the pw\nthe pw\n")
    assert result.stdout.endswith("CRAM-MD5 on for alice@example.com\n")
    assert "the pw" not in result.output
    with cli.store() as store:
        assert cli.credentials(store).cram_secret("alice@example.com") == "the pw"
    assert cli("user", "cram-md5", "alice@example.com", "off").stdout == (
        "CRAM-MD5 off for alice@example.com (secret deleted)\n"
    )
    with cli.store() as store:
        user = store.get_user("alice@example.com")
        assert user is not None and user.cram_md5 is None
    result = cli("user", "cram-md5", "ghost@example.com", "off", code=1)
    assert result.stderr == "Error: ghost@example.com: no such user\n"
    cli("user", "cram-md5", "alice@example.com", "maybe", code=2)


def test_user_senders(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--password-stdin", input="pw\n")
    result = cli("user", "sender", "add", "ALICE@example.com", "ceo@example.com", "@Partner.example")
    assert result.stdout == (
        "alice@example.com may send as ceo@example.com\n"
        "alice@example.com may send as @partner.example\n"
    )
    assert cli.json("user", "sender", "list") == [
        {"login": "alice@example.com", "sender": "ceo@example.com"},
        {"login": "alice@example.com", "sender": "@partner.example"},
    ]
    assert "@partner.example" in cli("user", "sender", "list", "alice@example.com").stdout
    with cli.store() as store:
        assert store.may_send_as("alice@example.com", "x@partner.example")
    cli("user", "sender", "remove", "alice@example.com", "@partner.example")
    assert len(cli.json("user", "sender", "list", "alice@example.com")) == 1
    result = cli("user", "sender", "remove", "alice@example.com", "@partner.example", code=1)
    assert "no such sender" in result.stderr
    result = cli("user", "sender", "add", "ghost@example.com", "x@example.com", code=1)
    assert result.stderr == "Error: ghost@example.com: no such user\n"
    result = cli("user", "sender", "list", "ghost@example.com", code=1)
    assert result.stderr == "Error: ghost@example.com: no such user\n"


def test_aliases(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    result = cli("alias", "add", "info@example.com", "a@example.com", "b@elsewhere.net")
    assert result.stdout == (
        "added alias info@example.com -> a@example.com\n"
        "added alias info@example.com -> b@elsewhere.net\n"
    )
    cli("alias", "add", "@example.com", "a@example.com")
    assert cli.json("alias", "list") == [
        {"source": "@example.com", "destination": "a@example.com"},
        {"source": "info@example.com", "destination": "a@example.com"},
        {"source": "info@example.com", "destination": "b@elsewhere.net"},
    ]
    assert "info@example.com" in cli("alias", "list", "example.com").stdout
    cli("alias", "remove", "info@example.com", "b@elsewhere.net")
    assert cli("alias", "remove", "info@example.com").stdout.startswith("removed 1 alias")
    result = cli("alias", "remove", "info@example.com", code=1)
    assert result.stderr == "Error: info@example.com: no such alias\n"
    result = cli("alias", "add", "x@other.example", "a@example.com", code=1)
    assert result.stderr == "Error: other.example: unknown domain\n"


def test_domain_remove_needs_force(cli: Cli) -> None:
    cli("domain", "add", "example.com")
    cli("user", "add", "alice@example.com", "--password-stdin", input="pw\n")
    result = cli("domain", "remove", "example.com", code=1)
    assert "still has 1 user(s)" in result.stderr
    cli("domain", "remove", "example.com", "--force")
    assert cli.json("domain", "list") == []


def test_check_config(cli: Cli) -> None:
    result = cli("check-config")
    assert f"config: {cli.config}\n" in result.stdout
    assert "hostname: mx.test.example\n" in result.stdout
    assert f"data dir: {cli.root / 'data'}\n" in result.stdout
    assert "listeners:\n  mx 127.0.0.1:2525\n" in result.stdout
    assert "nobody may relay" in result.stdout
    assert "does not exist yet" in result.stderr  # a warning, not an error
    assert result.stdout.endswith("configuration OK\n")


def test_check_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[smtp]\nmax_recipients = 0\nbogus = 1\n[relay]\ntrusted_networks = ["x"]\n')
    runner = CliRunner()
    result = runner.invoke(main, ["-c", str(bad), "check-config"])
    assert result.exit_code == 1
    assert f"error: {bad}: unknown key 'smtp.bogus'" in result.stderr
    assert "invalid value for 'smtp.max_recipients'" in result.stderr
    assert "invalid value for 'relay.trusted_networks'" in result.stderr
    assert "Traceback" not in result.output
    result = runner.invoke(main, ["-c", str(tmp_path / "missing.toml"), "check-config"])
    assert result.exit_code == 1
    assert "no such file" in result.stderr
    # Other commands report a bad configuration the same way.
    result = runner.invoke(main, ["-c", str(bad), "domain", "list"])
    assert result.exit_code == 1
    assert "unknown key 'smtp.bogus'" in result.stderr


def test_config_from_environment(cli: Cli) -> None:
    result = cli.runner.invoke(
        main, ["domain", "add", "env.example"], env={"POSTROOM_CONFIG": str(cli.config)}
    )
    assert result.exit_code == 0, result.output
    assert cli.json("domain", "list") == [{"name": "env.example", "users": 0, "aliases": 0}]


@pytest.mark.parametrize(
    ("text", "octets"),
    [
        ("0", 0),
        ("unlimited", 0),
        ("512", 512),
        ("1K", 1024),
        ("100M", 100 * 1024**2),
        ("2g", 2 * 1024**3),
        ("1T", 1024**4),
        ("10MB", 10 * 1024**2),
        ("10MiB", 10 * 1024**2),
    ],
)
def test_parse_size(text: str, octets: int) -> None:
    assert parse_size(text) == octets


@pytest.mark.parametrize("text", ["", "M", "-1", "1X", "1.2.3K", "ten"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1536, 1024, 100 * 1024**2, 2 * 1024**3)] == [
        "unlimited",
        "1536",
        "1K",
        "100M",
        "2G",
    ]


# --- as a real program ------------------------------------------------------------------------


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(POSTROOM_BIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k != "POSTROOM_CONFIG"},
    )


def test_installed_program(tmp_path: Path) -> None:
    config = str(write_config(tmp_path))
    assert run("-c", config, "domain", "add", "example.com").returncode == 0
    added = run(
        "-c", config, "user", "add", "alice@example.com", "--password-stdin", stdin="alice-secret\n"
    )
    assert added.returncode == 0, added.stderr
    listed = run("-c", config, "user", "list", "--json")
    assert listed.returncode == 0
    assert [u["address"] for u in json.loads(listed.stdout)] == ["alice@example.com"]
    assert "alice-secret" not in listed.stdout + added.stdout + added.stderr
    dup = run("-c", config, "user", "add", "alice@example.com", "--password-stdin", stdin="x\n")
    assert dup.returncode == 1
    assert dup.stderr == "Error: alice@example.com: user already exists\n"
    checked = run("-c", config, "check-config")
    assert checked.returncode == 0 and "hostname: mx.test.example" in checked.stdout
    bad = run("-c", str(tmp_path / "nope.toml"), "domain", "list")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert (tmp_path / "data" / "accounts.db").stat().st_mode & 0o777 == 0o600


def test_scram_iterations_from_config(tmp_path: Path) -> None:
    cli = Cli(tmp_path, "[auth]\nscram_iterations = 6000\n")
    cli("domain", "add", "example.com")
    cli("user", "add", "a@example.com", "--password-stdin", input="pw\n")
    with cli.store() as store:
        keys = cli.credentials(store).scram_keys("a@example.com", "SCRAM-SHA-256")
        assert keys is not None and keys.iterations == 6000
