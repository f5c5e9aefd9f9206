"""The sans-I/O POP3 server core (RFC 1939, 2449, 2595, 5034, 3206): bytes in, events out.

- :mod:`.server`: :class:`Pop3Connection` and its :class:`Pop3Settings`.
- :mod:`.events`: what the core asks of its transport (:class:`Request` s) and tells it.
- :mod:`.states`: the states and the one transition table.
- :mod:`.responses`: ``+OK``/``-ERR`` lines and RFC 2449 response codes.
- :mod:`.content`: a stored message as a multi-line response (CRLF, byte-stuffing, TOP), UIDLs.

Nothing here does I/O or reads a clock (ruff's banned-api rule holds that line); the asyncio
transport is :mod:`postroom.net.pop3`.
"""

from postroom.pop3.content import ContentEncoder, uidl_for, valid_uidl
from postroom.pop3.events import (
    COUNTED_FAILURES,
    CheckPassword,
    Commit,
    Event,
    LoginFailed,
    Maildrop,
    MaildropMessage,
    OpenMaildrop,
    ProtocolViolation,
    Request,
    Retrieve,
    SizeMismatch,
    StartTls,
)
from postroom.pop3.responses import Response
from postroom.pop3.server import LocalProtocolError, Pop3Connection, Pop3Settings
from postroom.pop3.states import State

__all__ = [
    "COUNTED_FAILURES",
    "CheckPassword",
    "Commit",
    "ContentEncoder",
    "Event",
    "LocalProtocolError",
    "LoginFailed",
    "Maildrop",
    "MaildropMessage",
    "OpenMaildrop",
    "Pop3Connection",
    "Pop3Settings",
    "ProtocolViolation",
    "Request",
    "Response",
    "Retrieve",
    "SizeMismatch",
    "StartTls",
    "State",
    "uidl_for",
    "valid_uidl",
]
