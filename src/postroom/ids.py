"""Queue ids: short, unique, sortable by arrival, safe as file names.

An id is 12 characters of Crockford-style base 32: 40 bits of microsecond time (wrapping every
~12 days, which only matters for sort order) and 20 bits of a per-process counter seeded at random,
so two processes on one machine do not collide in practice and one process never repeats an id
within a microsecond. Postfix's "long queue ids" have the same shape.
"""

from __future__ import annotations

import os
import time

_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXYZb"  # no vowels: ids never spell words
assert len(_ALPHABET) == 32

_counter = int.from_bytes(os.urandom(3), "big")


def _reseed() -> None:
    """A forked worker must not continue its parent's sequence, or two workers would make the
    same ids in the same microsecond."""
    global _counter
    _counter = int.from_bytes(os.urandom(3), "big")


os.register_at_fork(after_in_child=_reseed)


def _encode(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_queue_id() -> str:
    global _counter
    _counter = (_counter + 1) & 0xFFFFF
    micros = int(time.time() * 1_000_000) & ((1 << 40) - 1)
    return _encode(micros, 8) + _encode(_counter, 4)


def is_queue_id(text: str) -> bool:
    return len(text) == 12 and all(c in _ALPHABET for c in text)
