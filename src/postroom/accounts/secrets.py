"""The server key: one random secret per installation, and the keys derived from it.

``data_dir/keys/server.key`` holds 32 random octets (mode 0600, in a 0700 directory). It is made
on first use and read ever after; every process of the installation (the CLI, each server
worker) derives the same purpose keys from it with HKDF-SHA256 (RFC 5869), so that:

- a CRAM-MD5 secret sealed by ``postroom user`` opens in every worker (:meth:`ServerKey.cram_box`);
- SCRAM shows one unknown user the same made-up salt in every worker and after a restart
  (:meth:`ServerKey.decoy_secret`, for :class:`postroom.sasl.SaslSettings`).

Making the file is safe against a crash and against a second process doing the same at the same
time: the key is written to a private temporary file, fsynced, then hard-linked to its name
(``link`` never replaces, unlike ``rename``), and the directory fsynced. A process that loses the
race drops its own key and reads the winner's, which was complete on disk before it got its
name; a crash leaves at most a stray temporary file, never a short key file.

Losing the file is not a disaster but has effects: sealed CRAM-MD5 secrets no longer open (the
accounts fall back to "no CRAM-MD5" until it is turned on again or the password is set again),
and unknown users are shown other decoy salts than before.

Sealing (:class:`SecretBox`) is AES-256-GCM with a fresh random 96-bit nonce per message (NIST SP
800-38D 8.2.2) and the caller's context (for CRAM-MD5, the account) as associated data, so a
sealed secret copied onto another account does not open. The layout is versioned::

    0x01 | nonce (12 octets) | ciphertext | tag (16 octets)

No exception raised here carries a key, a plaintext or a sealed value.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from postroom import log
from postroom.errors import PostroomError, StorageError
from postroom.fsync import fsync_dir

#: The server key's size: 256 bits, HKDF-SHA256's own output size.
KEY_OCTETS: Final = 32
KEY_DIR: Final = "keys"
KEY_FILE: Final = "server.key"

#: HKDF ``info`` strings (RFC 5869 3.2): one per use, so no derived key serves two purposes.
CRAM_MD5_INFO: Final = b"postroom v1 cram-md5 secret sealing"
SASL_DECOY_INFO: Final = b"postroom v1 sasl decoy secret"

#: The first octet of a sealed value: which layout and algorithm follow.
SEAL_VERSION: Final = 1
NONCE_OCTETS: Final = 12
TAG_OCTETS: Final = 16


class SecretError(PostroomError):
    """A sealed value does not open: wrong key, another context, or corrupt. The message says
    which of the visible reasons applies and nothing about the contents."""


class SecretBox:
    """Authenticated encryption of small secrets with one derived key (see the module docstring)."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_OCTETS:
            raise ValueError("a SecretBox key is 32 octets")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "SecretBox(<key hidden>)"

    def seal(self, plaintext: bytes, context: bytes) -> bytes:
        """*plaintext* encrypted and bound to *context* (which must be given again to open it)."""
        nonce = os.urandom(NONCE_OCTETS)
        header = bytes([SEAL_VERSION])
        return header + nonce + self._aead.encrypt(nonce, plaintext, header + context)

    def open(self, sealed: bytes, context: bytes) -> bytes:
        """The plaintext of :meth:`seal`'s output; SecretError if it does not authenticate."""
        if len(sealed) < 1 + NONCE_OCTETS + TAG_OCTETS:
            raise SecretError("sealed value is truncated")
        if sealed[0] != SEAL_VERSION:
            raise SecretError(f"sealed value has unknown version {sealed[0]}")
        nonce, body = sealed[1 : 1 + NONCE_OCTETS], sealed[1 + NONCE_OCTETS :]
        try:
            return self._aead.decrypt(nonce, body, sealed[:1] + context)
        except InvalidTag:
            raise SecretError(
                "sealed value does not authenticate (another server key, or corrupt)"
            ) from None


class ServerKey:
    """The installation's secret; see the module docstring."""

    __slots__ = ("_key", "path")

    def __init__(self, key: bytes, path: Path | None = None) -> None:
        if len(key) != KEY_OCTETS:
            raise ValueError("the server key is 32 octets")
        self._key = key
        self.path = path

    def __repr__(self) -> str:
        return f"ServerKey(path={self.path!r}, <key hidden>)"

    @classmethod
    def load_or_create(cls, data_dir: Path, *, owner: tuple[int, int] | None = None) -> ServerKey:
        """The key in ``data_dir/keys/server.key``, made first if it does not exist.

        *owner* ``(uid, gid)`` is given to the directory and file made here (a command run as
        root for a server that runs as another user). StorageError if the file cannot be read
        or written, or does not hold exactly 32 octets (it is never replaced: sealed secrets
        depend on it).
        """
        directory = data_dir / KEY_DIR
        path = directory / KEY_FILE
        try:
            key = _read_key(path)
            if key is None:
                _make_dirs(directory, owner)
                _create_key(path, owner)
                key = _read_key(path)
                if key is None:  # pragma: no cover - linked above, and keys are never deleted
                    raise StorageError(f"{path}: the server key vanished while being made")
        except OSError as exc:
            raise StorageError(f"server key {path}: {exc.strerror or exc}") from None
        return cls(key, path)

    def derive(self, info: bytes, length: int = KEY_OCTETS) -> bytes:
        """HKDF-SHA256 (RFC 5869) of the server key for the purpose *info*; no salt, as the
        input is already uniformly random (RFC 5869 3.1)."""
        return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(self._key)

    def cram_box(self) -> SecretBox:
        """The box CRAM-MD5 secrets are sealed in."""
        return SecretBox(self.derive(CRAM_MD5_INFO))

    def decoy_secret(self) -> bytes:
        """:attr:`postroom.sasl.SaslSettings.decoy_secret`: the same in every process."""
        return self.derive(SASL_DECOY_INFO)


# --- the file ----------------------------------------------------------------------------------


def _read_key(path: Path) -> bytes | None:
    """The key in *path*, None if there is no file; StorageError if it is not a key."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StorageError(f"server key {path}: not a regular file")
        data = os.read(fd, KEY_OCTETS + 1)
    finally:
        os.close(fd)
    if len(data) != KEY_OCTETS:
        raise StorageError(
            f"server key {path}: holds {len(data)} octets, not {KEY_OCTETS}; restore it from a "
            "backup (deleting it makes a new key, and CRAM-MD5 secrets must then be set again)"
        )
    if info.st_mode & 0o077:
        log.logger.warning(
            "server key %s is readable by others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(info.st_mode),
        )
    return data



def _make_dirs(directory: Path, owner: tuple[int, int] | None) -> None:
    """*directory* and missing parents, mode 0700, each new entry made durable in its parent."""
    missing: list[Path] = []
    probe = directory
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:
            continue
        if owner is not None:
            os.chown(new, *owner)
        fsync_dir(new.parent)


def _create_key(path: Path, owner: tuple[int, int] | None) -> None:
    """Write a fresh key to *path* unless another process does first (see the module docstring)."""
    directory = path.parent
    temporary = directory / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temporary, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            if owner is not None:
                os.fchown(fd, *owner)
            data = os.urandom(KEY_OCTETS)
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process won; its key was on disk before it had this name
    finally:
        try:
            os.unlink(temporary)
        finally:
            fsync_dir(directory)
