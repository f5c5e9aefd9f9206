"""Connection counting for the limits ``smtp.max_connections`` and ``max_connections_per_ip``.

With one process a dictionary does. With several worker processes sharing the listening sockets,
the counts must be shared too, or each worker would allow the whole limit: :class:`SharedCounts`
keeps them in an anonymous shared memory map made before the workers are forked, one slot for the
total and a hashed slot per client address, updated under one cross-process lock. Two addresses
that hash to the same slot share its count, which can only make the limit stricter, never looser.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
import zlib
from collections import Counter
from typing import Protocol

_SLOT = struct.Struct("=I")
_SLOTS = 1 << 16  # per-address slots; slot 0 is the total


class ConnectionCounts(Protocol):
    def add(self, address: str) -> tuple[int, int]:
        """Count one more connection from *address*; return (total, from this address)."""

    def remove(self, address: str) -> None:
        """Forget one connection from *address*."""


class LocalCounts:
    """Counts for a single process."""

    def __init__(self) -> None:
        self._per_ip: Counter[str] = Counter()
        self._total = 0

    def add(self, address: str) -> tuple[int, int]:
        self._total += 1
        self._per_ip[address] += 1
        return self._total, self._per_ip[address]

    def remove(self, address: str) -> None:
        self._total -= 1
        self._per_ip[address] -= 1
        if self._per_ip[address] <= 0:
            del self._per_ip[address]


class SharedCounts:
    """Counts shared by forked worker processes (create it before forking).

    Each worker writes only its own row, so when a worker dies its row is simply zeroed
    (:meth:`reset`) and the counts of connections it held disappear with them.
    """

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._row = (_SLOTS + 1) * _SLOT.size
        self._map = mmap.mmap(-1, self._row * workers, flags=mmap.MAP_SHARED)
        self._lock = multiprocessing.get_context("fork").Lock()
        self.worker = 0  # set in each child after the fork

    @staticmethod
    def _slot(address: str) -> int:
        return 1 + (zlib.crc32(address.encode()) % _SLOTS)

    def _sum(self, slot: int) -> int:
        return sum(_SLOT.unpack_from(self._map, w * self._row + slot * _SLOT.size)[0]
                   for w in range(self._workers))

    def _bump(self, slot: int, delta: int) -> None:
        offset = self.worker * self._row + slot * _SLOT.size
        (value,) = _SLOT.unpack_from(self._map, offset)
        _SLOT.pack_into(self._map, offset, max(0, value + delta))

    def add(self, address: str) -> tuple[int, int]:
        slot = self._slot(address)
        with self._lock:
            self._bump(0, 1)
            self._bump(slot, 1)
            return self._sum(0), self._sum(slot)

    def remove(self, address: str) -> None:
        with self._lock:
            self._bump(0, -1)
            self._bump(self._slot(address), -1)

    def reset(self, worker: int) -> None:
        """Forget every connection of *worker* (it died; its sockets are closed)."""
        with self._lock:
            start = worker * self._row
            self._map[start : start + self._row] = bytes(self._row)
