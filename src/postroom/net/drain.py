"""Shutdown of a protocol server's sessions, the same for SMTP and POP3.

Idle sessions are told goodbye at once; busy ones get ``grace`` seconds to finish. A session
whose transport is already closing has said its last word and waits at most for the peer's
TLS close_notify: it is aborted after :data:`CLOSING_GRACE` seconds, so an idle TLS client that
never answers cannot hold up a restart for the whole grace period.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Set
from typing import Final, Protocol

#: Seconds a closing session may wait for the peer's TLS goodbye during shutdown.
CLOSING_GRACE: Final = 1.0


class Drainable(Protocol):
    @property
    def closing(self) -> bool: ...

    def shutdown(self, force: bool = False) -> None: ...

    def abort(self) -> None: ...


async def drain(sessions: Set[Drainable], grace: float) -> None:
    """Shut *sessions* down (the set shrinks as connections are lost): goodbye to idle ones,
    ``grace`` seconds for busy ones, then force; abort whatever is left."""
    for session in list(sessions):
        session.shutdown()
    deadline = time.monotonic() + grace
    closing_since: dict[Drainable, float] = {}
    while sessions and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = time.monotonic()
        for session in list(sessions):
            session.shutdown()
            if session.closing and now - closing_since.setdefault(session, now) >= CLOSING_GRACE:
                session.abort()
    for session in list(sessions):
        session.shutdown(force=True)
    await asyncio.sleep(0.05)
    for session in list(sessions):
        session.abort()
