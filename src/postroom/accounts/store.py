"""Domains, users and aliases in one SQLite database (WAL), shared by every postroom process.

Tables: ``domains``, ``users`` (address, credentials, quota, Maildir path relative to the mail root),
``aliases`` (source -> destination rows; the source ``@domain`` is the domain's catch-all),
``senders`` (which extra envelope senders a login may use) and ``schema_version``. The database file
is created with mode 0600, runs with ``synchronous=FULL`` and foreign keys on, and waits (busy
timeout) rather than fails when another process holds the lock.

A user's credentials, all derived from one password when it is set (see
:mod:`postroom.accounts.credentials`): the argon2id hash (PLAIN, LOGIN), the SCRAM-SHA-256 keys in
RFC 5803 text, and, only for accounts that opted in, the CRAM-MD5 secret sealed with a key derived
from the server key (:mod:`postroom.accounts.secrets`). Setting a password replaces all three.

Schema versions, upgraded in place when the database is opened, in the same transaction that
reads the version (so a failed upgrade leaves the file as it was):

1. domains, users (argon2 hash only), aliases.
2. ``users.scram_sha256`` (RFC 5803 text) and ``users.cram_md5`` (sealed secret, NULL = not opted
   in), and the ``senders`` table. Users carried over from version 1 have no SCRAM keys: SCRAM-SHA-256
   fails for them as for a wrong password until ``postroom user passwd`` sets the password again.

Addresses follow Postfix's virtual maps: the domain is compared in one canonical form (lowercase,
Unicode NFC, U-labels: ``xn--bcher-kva.example`` and ``bücher.example`` are one domain, RFC 5890),
the local part is stored as given but matched case-insensitively. A user's Maildir is
``mail_root/<domain>/<local>/`` with ``cur/ new/ tmp/`` (mode 0700), made when the user is added and
left on disk when the user is removed.

Stored local parts are RFC 5322 3.2.3 dot-atoms (with RFC 6531's UTF-8), minus ``/`` (a path
separator), ``%`` and ``!`` (the percent hack and bang paths): such local parts can never name an
account, so they cannot be used to sneak a relay through (see the router).

Errors: :class:`~postroom.errors.AccountError` for refused operations (unknown domain, duplicate,
bad syntax); :class:`~postroom.errors.StorageError` when SQLite itself fails.
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import string
import threading
import time
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.errors import AccountError, StorageError
from postroom.sasl.credentials import SCRAM_SHA_256, scram_keys_from_text
from postroom.store.folders import create_default_folders

if TYPE_CHECKING:
    from postroom.config import Config

SCHEMA_VERSION = 2

#: How long a write waits for another process's transaction before failing (milliseconds).
BUSY_TIMEOUT_MS = 10_000

#: RFC 5321 4.5.3.1.1: a local part is at most 64 octets; 4.5.3.1.2: a domain at most 255.
MAX_LOCAL_OCTETS = 64
MAX_DOMAIN_OCTETS = 253  # without the trailing dot, as it travels in DNS
MAX_LABEL_OCTETS = 63

_SCHEMA = """
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
    created        INTEGER NOT NULL,
    scram_sha256   TEXT,
    cram_md5       BLOB
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
"""

#: The ``senders`` table, as made for a new database and by the upgrade from version 1.
#: ``login`` is the user's lookup key; ``lookup`` the sender's (``local@domain`` folded as
#: :func:`address_key` folds it, or ``@domain``); ``sender`` the spelling shown.
_SENDERS = """
CREATE TABLE senders (
    login    TEXT NOT NULL REFERENCES users(lookup) ON DELETE CASCADE,
    sender   TEXT NOT NULL,
    lookup   TEXT NOT NULL,
    created  INTEGER NOT NULL,
    PRIMARY KEY (login, lookup)
);
CREATE INDEX senders_lookup ON senders(lookup);
"""

#: What takes a database from version N to N + 1, run in the transaction that opens it.
_UPGRADES: dict[int, str] = {
    1: """
ALTER TABLE users ADD COLUMN scram_sha256 TEXT;
ALTER TABLE users ADD COLUMN cram_md5 BLOB;
"""
    + _SENDERS,
}

# RFC 5322 3.2.3 atext, without "!" "%" "/" (see the module docstring).
_LOCAL_ASCII = frozenset(string.ascii_letters + string.digits + "#$&'*+-=?^_`{|}~")
_LDH = frozenset(string.ascii_lowercase + string.digits + "-")


#: SASL mechanisms every account can use: they check the argon2 hash.
PASSWORD_MECHANISMS = ("PLAIN", "LOGIN")
CRAM_MD5 = "CRAM-MD5"


@dataclass(frozen=True, slots=True)
class User:
    """One mailbox account."""

    address: str  # local part as given, canonical domain
    password_hash: str = field(repr=False)
    quota: int  # octets; 0 is unlimited
    maildir: Path  # absolute: mail_root/<domain>/<local>
    created: datetime
    #: RFC 5803 text of the SCRAM-SHA-256 keys; None for a password set before schema 2.
    scram_sha256: str | None = field(default=None, repr=False)
    #: The sealed CRAM-MD5 secret (:mod:`postroom.accounts.secrets`); None: not opted in.
    cram_md5: bytes | None = field(default=None, repr=False)

    @property
    def local(self) -> str:
        return self.address.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanisms the stored credentials can answer (whether a listener offers
        them is the server's configuration)."""
        names = list(PASSWORD_MECHANISMS)
        if self.scram_sha256 is not None:
            names.append(SCRAM_SHA_256)
        if self.cram_md5 is not None:
            names.append(CRAM_MD5)
        return tuple(names)


@dataclass(frozen=True, slots=True)
class Alias:
    """One alias row; ``source`` is ``local@domain`` or ``@domain`` (the catch-all)."""

    source: str
    destination: str


@dataclass(frozen=True, slots=True)
class Sender:
    """One ``senders`` row: *login* may also use *sender* (``local@domain`` or ``@domain``) as its
    envelope sender."""

    login: str  # the user's address as stored
    sender: str


# --- names -----------------------------------------------------------------------------------


def _decode_label(label: str) -> str:
    """The U-label of an A-label (RFC 5890 2.3.2.1); anything else unchanged.

    A label longer than 63 octets (RFC 1035 2.3.4) is no A-label and is not decoded: punycode
    takes time quadratic in the length (the round trip below encodes every distinct code point
    once per output position), and a client-chosen 9 kB label would hold the event loop for most
    of a second.
    """
    if not label.startswith("xn--") or len(label) > MAX_LABEL_OCTETS:
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except (UnicodeError, ValueError):
        return label
    # A valid A-label holds non-ASCII and encodes back to itself ("xn--zz-" is not one).
    if decoded.isascii() or "xn--" + decoded.encode("punycode").decode("ascii") != label:
        return label
    return decoded


def normalize_domain(domain: str) -> str:
    """The canonical form used for every comparison; never raises (lookups of junk find nothing).

    Lowercase, no trailing dot, A-labels decoded to U-labels, Unicode NFC. An address literal
    (``[192.0.2.1]``) is only lowercased. A name longer than 253 characters cannot be a host name
    in any spelling (a U-label has no more characters than its A-label has octets): it is only
    lowercased, without decoding anything, and so matches no domain (see :func:`_decode_label`).
    """
    domain = domain.strip().lower()
    if domain.startswith("["):
        return domain
    domain = domain.rstrip(".")
    if len(domain) > MAX_DOMAIN_OCTETS:
        return domain
    labels = [_decode_label(label) for label in domain.split(".")]
    return unicodedata.normalize("NFC", ".".join(labels)).lower()


def _a_label(label: str) -> str:
    return label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")


def check_domain(domain: str) -> str:
    """The canonical form of *domain*, or AccountError if it is not a host name (RFC 1123 2.1)."""
    name = normalize_domain(domain)
    bad = AccountError(f"{domain!r}: bad domain name syntax")
    if not name or name.startswith("["):
        raise bad
    labels = name.split(".")
    # Length first: punycode-encoding a long label is quadratic (see _decode_label), and no
    # U-label has more characters than its A-label has octets.
    if len(name) > MAX_DOMAIN_OCTETS or any(len(label) > MAX_LABEL_OCTETS for label in labels):
        raise bad
    try:
        ascii_form = ".".join(_a_label(label) for label in labels)
    except UnicodeError:
        raise bad from None
    if len(ascii_form) > MAX_DOMAIN_OCTETS:
        raise bad
    for label in labels:
        if not label or len(_a_label(label)) > MAX_LABEL_OCTETS:
            raise bad
        if label.startswith("-") or label.endswith("-"):
            raise bad
        for ch in label:
            if ch.isascii():
                if ch not in _LDH:
                    raise bad
            elif unicodedata.category(ch)[0] not in "LMN":
                raise bad
        if label.startswith("xn--") and _decode_label(label) == label:
            raise bad  # an A-label that does not decode
    return name


def _check_literal(domain: str) -> str:
    """An RFC 5321 4.1.3 address literal, or AccountError."""
    inner = domain[1:-1] if domain.startswith("[") and domain.endswith("]") else ""
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
            return "[IPv6:" + inner[5:].lower() + "]"
        ipaddress.IPv4Address(inner)
    except ValueError:
        raise AccountError(f"{domain!r}: bad address literal") from None
    return domain


def _local_unicode_ok(ch: str) -> bool:
    category = unicodedata.category(ch)
    return category[0] in "LMN" or category in ("Pc", "Pd")


def check_local(local: str) -> str:
    """*local* in NFC if it may name an account or alias, else AccountError."""
    value = unicodedata.normalize("NFC", local)
    bad = AccountError(
        f"{local!r}: bad local part (letters, digits and #$&'*+-=?^_`{{|}}~ between dots; "
        "no '/', '%', '!', '@' or spaces)"
    )
    if not value or len(value.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise bad
    for piece in value.split("."):
        if not piece:
            raise bad
        for ch in piece:
            if ch.isascii():
                if ch not in _LOCAL_ASCII:
                    raise bad
            elif not _local_unicode_ok(ch):
                raise bad
    return value


def address_key(local: str, domain: str) -> str:
    """The lookup key: case-folded NFC local part, canonical domain. ``@domain`` for local=""."""
    return unicodedata.normalize("NFC", local).casefold() + "@" + normalize_domain(domain)


def _split(address: str) -> tuple[str, str]:
    local, at, domain = address.strip().rpartition("@")
    if not at:
        raise AccountError(f"{address!r}: bad address syntax (expected local@domain)")
    return local, domain


def _check_destination(destination: str) -> str:
    local, domain = _split(destination)
    if not local or len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise AccountError(f"{destination!r}: bad destination address")
    if any(unicodedata.category(ch) == "Cc" for ch in local):
        raise AccountError(f"{destination!r}: bad destination address")
    if domain.startswith("["):
        return f"{local}@{_check_literal(domain)}"
    return f"{local}@{check_domain(domain)}"


def _stamp(seconds: int) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def base_local(local: str, delimiter: str) -> str | None:
    """``user`` for ``user+tag``: cut at the first character of *delimiter* found, unless it is
    the first character (as the router cuts subaddresses); None when nothing is cut."""
    cut = min((i for i, ch in enumerate(local) if ch in delimiter), default=-1)
    return local[:cut] if cut > 0 else None


def _check_scram_text(text: str | None) -> None:
    if text is not None:
        try:
            scram_keys_from_text(text)
        except ValueError:
            raise AccountError("the SCRAM-SHA-256 keys are not in RFC 5803 form") from None


def data_owner(config: Config) -> tuple[int, int] | None:
    """The ``(uid, gid)`` that files made under the data directory should get: ``server.run_as``
    when running as root for a server that drops to that (existing) user, else None."""
    run_as = config.server.run_as
    if os.geteuid() != 0 or not run_as or run_as == "root":
        return None
    import pwd

    try:
        entry = pwd.getpwnam(run_as)
    except KeyError:
        return None  # not made yet: ``serve`` creates it and hands it the data directory
    return (entry.pw_uid, entry.pw_gid)


# --- the store --------------------------------------------------------------------------------


class AccountStore:
    """Domains, users and aliases. Safe to share between threads and between processes."""

    def __init__(
        self, db_path: Path, mail_root: Path, *, owner: tuple[int, int] | None = None
    ) -> None:
        """Open (creating if needed) the database at *db_path*.

        *owner* is the ``(uid, gid)`` that files and directories made here are given: when the
        command runs as root for a server that drops to an unprivileged user.
        """
        self.db_path = db_path
        self.mail_root = mail_root
        self._owner = owner
        self._lock = threading.RLock()
        self._domains: tuple[str, ...] | None = None
        self._data_version = -1
        self._mkdirs(db_path.parent)
        try:
            fd = os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            self._chown(db_path)  # SQLite gives -wal and -shm the database file's owner
        try:
            self._db = sqlite3.connect(
                db_path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
            self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as exc:
            raise self._storage_error(exc) from None
        self._migrate()

    @classmethod
    def for_config(cls, config: Config) -> AccountStore:
        """The store of *config*'s data directory: ``accounts.db`` and ``mail/``.

        Run as root for a server that drops to ``server.run_as`` (an existing user), what is
        created here belongs to that user, so the server can still write to it.
        """
        data_dir = config.data_dir
        return cls(data_dir / "accounts.db", data_dir / "mail", owner=data_owner(config))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> AccountStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing ---

    def _storage_error(self, exc: sqlite3.Error) -> StorageError:
        full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
        return StorageError(f"accounts database {self.db_path}: {exc}", disk_full=full)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._storage_error(exc) from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One IMMEDIATE transaction: committed on success, rolled back on any error."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._storage_error(exc) from None
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._storage_error(exc) from None
                raise
            finally:
                self._domains = None

    def _migrate(self) -> None:
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                self._run_script(db, _SCHEMA + _SENDERS)
                db.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
                return
            version = row[0]
            if version > SCHEMA_VERSION:
                raise AccountError(
                    f"{self.db_path}: schema version {version} is newer than this postroom "
                    f"understands ({SCHEMA_VERSION})"
                )
            # Upgrades run in this one transaction: a failure rolls every step back.
            while version < SCHEMA_VERSION:
                self._run_script(db, _UPGRADES[version])
                version += 1
                db.execute("UPDATE schema_version SET version = ?", (version,))

    @staticmethod
    def _run_script(db: sqlite3.Connection, script: str) -> None:
        # Not executescript(): it would COMMIT the open transaction first.
        for statement in script.split(";"):
            if statement.strip():
                db.execute(statement)

    def _chown(self, path: Path) -> None:
        if self._owner is not None:
            os.chown(path, *self._owner)

    def _mkdirs(self, path: Path) -> None:
        """Make *path* and missing parents with mode 0700 (owned by *owner* when set)."""
        missing: list[Path] = []
        probe = path
        while not probe.exists():
            missing.append(probe)
            if probe.parent == probe:
                break
            probe = probe.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue
            self._chown(directory)

    _USER_COLUMNS = "address, password_hash, quota, maildir, created, scram_sha256, cram_md5"

    def _user(self, row: tuple[str, str, int, str, int, str | None, bytes | None]) -> User:
        address, password_hash, quota, maildir, created, scram, cram = row
        return User(
            address, password_hash, quota, self.mail_root / maildir, _stamp(created), scram, cram
        )

    # --- domains ---

    def _domain_list(self) -> tuple[str, ...]:
        """The domains in creation order, cached until this or another process changes them."""
        with self._read() as db:
            version = db.execute("PRAGMA data_version").fetchone()[0]
            if self._domains is None or version != self._data_version:
                rows = db.execute("SELECT name FROM domains ORDER BY rowid").fetchall()
                self._domains = tuple(name for (name,) in rows)
                self._data_version = version
            return self._domains

    def add_domain(self, name: str) -> str:
        """Make *name* a local domain; returns its canonical form."""
        domain = check_domain(name)
        with self._write() as db:
            if db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone():
                raise AccountError(f"{domain}: domain already exists")
            db.execute(
                "INSERT INTO domains (name, created) VALUES (?, ?)", (domain, int(time.time()))
            )
        return domain

    def remove_domain(self, name: str, *, force: bool = False) -> None:
        """Forget a domain. With users or aliases left it is refused unless *force*, which
        removes them too (Maildirs stay on disk)."""
        domain = normalize_domain(name)
        with self._write() as db:
            if not db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone():
                raise AccountError(f"{name}: unknown domain")
            users = db.execute("SELECT count(*) FROM users WHERE domain = ?", (domain,))
            n_users = users.fetchone()[0]
            aliases = db.execute("SELECT count(*) FROM aliases WHERE domain = ?", (domain,))
            n_aliases = aliases.fetchone()[0]
            if (n_users or n_aliases) and not force:
                raise AccountError(
                    f"{domain}: domain still has {n_users} user(s) and {n_aliases} alias(es); "
                    "remove them first or force the removal"
                )
            db.execute("DELETE FROM aliases WHERE domain = ?", (domain,))
            db.execute("DELETE FROM users WHERE domain = ?", (domain,))
            db.execute("DELETE FROM domains WHERE name = ?", (domain,))

    def list_domains(self) -> list[str]:
        """The local domains, oldest first (the first is the primary domain)."""
        return list(self._domain_list())

    def is_local_domain(self, domain: str) -> bool:
        return normalize_domain(domain) in self._domain_list()

    def _require_domain(self, db: sqlite3.Connection, domain: str) -> None:
        if not db.execute("SELECT 1 FROM domains WHERE name = ?", (domain,)).fetchone():
            raise AccountError(f"{domain}: unknown domain")

    # --- users ---

    def check_new_user(self, address: str) -> str:
        """The canonical form of *address* if it could be added now, else AccountError."""
        local, domain = _split(address)
        local, domain = check_local(local), check_domain(domain)
        canonical = f"{local}@{domain}"
        with self._read() as db:
            self._require_domain(db, domain)
            key = address_key(local, domain)
            if db.execute("SELECT 1 FROM users WHERE lookup = ?", (key,)).fetchone():
                raise AccountError(f"{canonical}: user already exists")
            if db.execute("SELECT 1 FROM aliases WHERE lookup = ?", (key,)).fetchone():
                raise AccountError(f"{canonical}: an alias with this address exists")
        return canonical

    def add_user(
        self,
        address: str,
        password_hash: str,
        quota: int = 0,
        *,
        scram_sha256: str | None = None,
        cram_md5: bytes | None = None,
    ) -> User:
        """Add a mailbox and make its Maildir. *password_hash* must be an argon2 hash;
        *scram_sha256* (RFC 5803 text) and *cram_md5* (sealed) come with it from
        :func:`postroom.accounts.credentials.derive_credentials`."""
        if not password_hash.startswith("$argon2"):
            raise AccountError("the password hash is not an argon2 hash")
        if quota < 0:
            raise AccountError(f"quota must be 0 (unlimited) or more, not {quota}")
        _check_scram_text(scram_sha256)
        with self._write() as db:
            canonical = self.check_new_user(address)
            local, _, domain = canonical.rpartition("@")
            relative = f"{domain}/{local}"
            now = int(time.time())
            db.execute(
                "INSERT INTO users (address, lookup, domain, password_hash, quota, maildir,"
                " created, scram_sha256, cram_md5) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    canonical,
                    address_key(local, domain),
                    domain,
                    password_hash,
                    quota,
                    relative,
                    now,
                    scram_sha256,
                    cram_md5,
                ),
            )
            maildir = self.mail_root / relative
            for sub in ("cur", "new", "tmp"):
                self._mkdirs(maildir / sub)
            # Drafts, Sent, Trash, Junk (RFC 6154 roles), so every client finds the same ones
            create_default_folders(maildir, self._owner)
        return User(
            canonical, password_hash, quota, maildir, _stamp(now), scram_sha256, cram_md5
        )

    def get_user(self, address: str) -> User | None:
        """The account *address* names (local part matched case-insensitively), or None."""
        local, _, domain = address.rpartition("@")
        with self._read() as db:
            row = db.execute(
                f"SELECT {self._USER_COLUMNS} FROM users WHERE lookup = ?",
                (address_key(local, domain),),
            ).fetchone()
        return None if row is None else self._user(row)

    def list_users(self, domain: str | None = None) -> list[User]:
        query = f"SELECT {self._USER_COLUMNS} FROM users"
        args: tuple[str, ...] = ()
        if domain is not None:
            query += " WHERE domain = ?"
            args = (normalize_domain(domain),)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY domain, lookup", args).fetchall()
        return [self._user(row) for row in rows]

    def _update_user(self, address: str, values: dict[str, str | int | bytes | None]) -> None:
        local, _, domain = address.rpartition("@")
        assignments = ", ".join(f"{column} = ?" for column in values)  # our own column names
        with self._write() as db:
            cursor = db.execute(
                f"UPDATE users SET {assignments} WHERE lookup = ?",
                (*values.values(), address_key(local, domain)),
            )
            if cursor.rowcount == 0:
                raise AccountError(f"{address}: no such user")

    def remove_user(self, address: str) -> None:
        """Remove the account; its Maildir stays on disk."""
        local, _, domain = address.rpartition("@")
        with self._write() as db:
            cursor = db.execute("DELETE FROM users WHERE lookup = ?", (address_key(local, domain),))
            if cursor.rowcount == 0:
                raise AccountError(f"{address}: no such user")

    def set_password(
        self,
        address: str,
        password_hash: str,
        *,
        scram_sha256: str | None = None,
        cram_md5: bytes | None = None,
    ) -> None:
        """Replace every credential of *address* at once, in one statement. What is not given is
        cleared: a SCRAM key or CRAM-MD5 secret of the old password must not outlive it."""
        if not password_hash.startswith("$argon2"):
            raise AccountError("the password hash is not an argon2 hash")
        _check_scram_text(scram_sha256)
        self._update_user(
            address,
            {"password_hash": password_hash, "scram_sha256": scram_sha256, "cram_md5": cram_md5},
        )

    def set_cram_md5(self, address: str, sealed: bytes | None) -> None:
        """Store the sealed CRAM-MD5 secret of *address* (opt in), or delete it (None: opt out)."""
        self._update_user(address, {"cram_md5": sealed})

    def set_quota(self, address: str, quota: int) -> None:
        if quota < 0:
            raise AccountError(f"quota must be 0 (unlimited) or more, not {quota}")
        self._update_user(address, {"quota": quota})

    # --- aliases ---

    def add_alias(self, source: str, destination: str) -> Alias:
        """Add ``source -> destination``. *source* is ``local@domain`` in a local domain, or
        ``@domain`` for the catch-all; *destination* is any address, local or remote."""
        local, domain = _split(source)
        domain = check_domain(domain)
        if local:
            local = check_local(local)
        canonical_source = f"{local}@{domain}"
        canonical_destination = _check_destination(destination)
        key = address_key(local, domain)
        with self._write() as db:
            self._require_domain(db, domain)
            if db.execute("SELECT 1 FROM users WHERE lookup = ?", (key,)).fetchone():
                raise AccountError(f"{canonical_source}: a user with this address exists")
            existing = db.execute("SELECT source FROM aliases WHERE lookup = ?", (key,)).fetchone()
            if existing:  # one spelling per alias: the first one given
                canonical_source = existing[0]
            if db.execute(
                "SELECT 1 FROM aliases WHERE lookup = ? AND destination = ?",
                (key, canonical_destination),
            ).fetchone():
                raise AccountError(
                    f"{canonical_source} -> {canonical_destination}: alias already exists"
                )
            db.execute(
                "INSERT INTO aliases (source, lookup, destination, domain, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (canonical_source, key, canonical_destination, domain, int(time.time())),
            )
        return Alias(canonical_source, canonical_destination)

    def remove_alias(self, source: str, destination: str | None = None) -> int:
        """Remove one destination of *source*, or all of them; returns how many rows went."""
        local, _, domain = source.strip().rpartition("@")
        key = address_key(local, domain)
        with self._write() as db:
            if destination is None:
                cursor = db.execute("DELETE FROM aliases WHERE lookup = ?", (key,))
            else:
                try:
                    target = _check_destination(destination)
                except AccountError:
                    target = destination.strip()
                cursor = db.execute(
                    "DELETE FROM aliases WHERE lookup = ? AND destination = ?", (key, target)
                )
            if cursor.rowcount == 0:
                what = source if destination is None else f"{source} -> {destination}"
                raise AccountError(f"{what}: no such alias")
            return cursor.rowcount

    def list_aliases(self, domain: str | None = None) -> list[Alias]:
        query = "SELECT source, destination FROM aliases"
        args: tuple[str, ...] = ()
        if domain is not None:
            query += " WHERE domain = ?"
            args = (normalize_domain(domain),)
        with self._read() as db:
            rows = db.execute(query + " ORDER BY domain, lookup, rowid", args).fetchall()
        return [Alias(source, destination) for source, destination in rows]

    def alias_targets(self, source: str) -> list[str]:
        """The destinations of *source* (``local@domain`` or ``@domain``), oldest first."""
        local, _, domain = source.rpartition("@")
        with self._read() as db:
            rows = db.execute(
                "SELECT destination FROM aliases WHERE lookup = ? ORDER BY rowid",
                (address_key(local, domain),),
            ).fetchall()
        return [destination for (destination,) in rows]

    # --- senders ---

    def _login(self, db: sqlite3.Connection, login: str) -> tuple[str, str] | None:
        """``(address, lookup)`` of the user *login* names, or None."""
        local, _, domain = login.strip().rpartition("@")
        row = db.execute(
            "SELECT address, lookup FROM users WHERE lookup = ?", (address_key(local, domain),)
        ).fetchone()
        return None if row is None else (row[0], row[1])

    @staticmethod
    def _sender_key(sender: str, *, strict: bool) -> tuple[str, str]:
        """``(spelling, lookup)`` of a sender grant: ``local@domain`` or ``@domain``. *strict*
        checks the syntax (adding); otherwise only folds (removing what may predate a rule)."""
        local, domain = _split(sender)
        if not local:
            name = check_domain(domain) if strict else normalize_domain(domain)
            return f"@{name}", f"@{name}"
        canonical = _check_destination(sender) if strict else f"{local}@{normalize_domain(domain)}"
        c_local, _, c_domain = canonical.rpartition("@")
        return canonical, address_key(c_local, c_domain)

    def add_sender(self, login: str, sender: str) -> Sender:
        """Let the user *login* also send as *sender*: one address (in any domain), or
        ``@domain`` for every address in a domain."""
        spelling, key = self._sender_key(sender, strict=True)
        with self._write() as db:
            found = self._login(db, login)
            if found is None:
                raise AccountError(f"{login}: no such user")
            address, login_key = found
            if db.execute(
                "SELECT 1 FROM senders WHERE login = ? AND lookup = ?", (login_key, key)
            ).fetchone():
                raise AccountError(f"{address} may already send as {spelling}")
            db.execute(
                "INSERT INTO senders (login, sender, lookup, created) VALUES (?, ?, ?, ?)",
                (login_key, spelling, key, int(time.time())),
            )
        return Sender(address, spelling)

    def remove_sender(self, login: str, sender: str) -> None:
        """Withdraw what :meth:`add_sender` granted."""
        _, key = self._sender_key(sender, strict=False)
        with self._write() as db:
            found = self._login(db, login)
            if found is None:
                raise AccountError(f"{login}: no such user")
            cursor = db.execute(
                "DELETE FROM senders WHERE login = ? AND lookup = ?", (found[1], key)
            )
            if cursor.rowcount == 0:
                raise AccountError(f"{found[0]} -> {sender}: no such sender")

    def list_senders(self, login: str | None = None) -> list[Sender]:
        """The sender grants, of one user or all, oldest first within a user."""
        query = (
            "SELECT users.address, senders.sender FROM senders"
            " JOIN users ON users.lookup = senders.login"
        )
        args: tuple[str, ...] = ()
        if login is not None:
            local, _, domain = login.strip().rpartition("@")
            query += " WHERE senders.login = ?"
            args = (address_key(local, domain),)
        with self._read() as db:
            rows = db.execute(
                query + " ORDER BY users.domain, users.lookup, senders.rowid", args
            ).fetchall()
        return [Sender(address, sender) for address, sender in rows]

    def may_send_as(self, login: str, sender: str, delimiter: str = "+") -> bool:
        """May the authenticated user *login* use *sender* as the envelope sender (MAIL FROM)?

        Yes when *sender* is the login's own address (local part compared case-insensitively,
        domain in canonical form), or that address with a subaddress tag (``user+tag``, cut at
        the first character of *delimiter* as the router cuts it; "" turns this off); or an
        alias whose destinations name the login itself (not through another alias; the
        catch-all ``@domain`` grants nothing); or a ``senders`` row of the login, for that
        address or its whole domain. Tags are cut from *sender* for the alias and ``senders``
        lookups too, as the router delivers ``info+x`` to the alias ``info``.

        The null reverse-path (*sender* exactly "", RFC 5321 4.5.5: bounces and other
        notifications) is allowed: it names nobody, so there is no one to impersonate, and
        Postfix's ``reject_sender_login_mismatch`` does not check it either. A caller checking
        a header address must therefore refuse "" itself rather than ask here. An unknown
        *login*, or a *sender* without a local part and a domain, is refused.
        """
        if not _utf8(login) or not _utf8(sender):
            return False
        s_local, at, s_domain = sender.strip().rpartition("@")
        with self._read() as db:
            found = self._login(db, login)
            if found is None:
                return False
            if sender == "":
                return True
            if not at or not s_local or not s_domain:
                return False
            login_key = found[1]
            keys = [address_key(s_local, s_domain)]
            base = base_local(s_local, delimiter) if delimiter else None
            if base is not None:
                keys.append(address_key(base, s_domain))
            if login_key in keys:
                return True
            marks = ", ".join("?" * len(keys))
            rows = db.execute(
                f"SELECT destination FROM aliases WHERE lookup IN ({marks})", keys
            ).fetchall()
            for (destination,) in rows:
                d_local, _, d_domain = destination.rpartition("@")
                d_base = base_local(d_local, delimiter) if delimiter else None
                names = {address_key(d_local, d_domain)}
                if d_base is not None:
                    names.add(address_key(d_base, d_domain))
                if login_key in names:
                    return True
            patterns = [*keys, "@" + normalize_domain(s_domain)]
            marks = ", ".join("?" * len(patterns))
            row = db.execute(
                f"SELECT 1 FROM senders WHERE login = ? AND lookup IN ({marks})",
                (login_key, *patterns),
            ).fetchone()
            return row is not None


def _utf8(text: str) -> bool:
    """False for a string SQLite cannot take (a lone surrogate from a lenient decoder)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
