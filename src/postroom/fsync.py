"""Durability of directory entries.

``fsync`` of a file makes its data and inode durable, not its name: a create, rename, link or
unlink is only durable once the directory holding the name is fsynced too (POSIX leaves it to
the file system; ext4 and XFS need it). Every part that writes files uses this one function.
"""

from __future__ import annotations

import os


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory *path* durable. Raises ``OSError``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
