"""The exception tree, drawn by who is at fault.

::

    PostroomError
    ├── ConfigError            the operator's configuration is wrong (names the key and file)
    ├── AccountError           an accounts-store operation was refused (duplicate, unknown ...)
    ├── StorageError           our disk failed; ``disk_full`` picks 452 4.3.1 over 451 4.3.0
    └── ProtocolError          a peer broke the protocol; carries the reply to send
"""

from __future__ import annotations


class PostroomError(Exception):
    """Base of every error postroom raises on purpose."""


class ConfigError(PostroomError):
    """The configuration is invalid. The message names the file and the key."""


class AccountError(PostroomError):
    """An accounts operation cannot be done (unknown domain, duplicate user, ...)."""


class StorageError(PostroomError):
    """Writing to stable storage failed. Nothing half-written is left behind."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full
