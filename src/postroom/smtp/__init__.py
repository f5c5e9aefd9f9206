"""The sans-I/O SMTP core: bytes in, events out; replies in, bytes out.

- :mod:`.server`: :class:`ServerConnection` and :class:`ServerSettings` (RFC 5321, ESMTP).
- :mod:`.events`: what the core reports; a :class:`Request` needs an answer.
- :mod:`.codes`: :class:`Reply` and the named replies (RFC 5321 4.2, RFC 3463).
- :mod:`.states`: the states and the one transition table.
- :mod:`.data`: DATA and BDAT content decoding (the anti-smuggling rules).
- :mod:`.params`: MAIL and RCPT parameters (SIZE, BODY, SMTPUTF8, DSN).

Limits (RFC 5321 4.5.3.1): :data:`COMMAND_LINE`, :data:`COMMAND_LINE_WITH_PARAMS` and
:data:`TEXT_LINE` here; ``PATH``, ``LOCAL_PART`` and ``DOMAIN`` in :mod:`postroom.message.address`.

Nothing here does I/O or reads a clock; the asyncio transport lives in ``postroom.net``.
"""

from postroom.smtp.codes import Reply
from postroom.smtp.data import TEXT_LINE
from postroom.smtp.events import (
    DataAborted,
    DataChunk,
    DataStart,
    EndOfData,
    Event,
    Hello,
    MailFrom,
    ProtocolViolation,
    Quit,
    RcptTo,
    Request,
    Reset,
    StartTls,
    Vrfy,
)
from postroom.smtp.server import (
    COMMAND_LINE,
    COMMAND_LINE_WITH_PARAMS,
    LocalProtocolError,
    ServerConnection,
    ServerSettings,
)
from postroom.smtp.states import State

__all__ = [
    "COMMAND_LINE",
    "COMMAND_LINE_WITH_PARAMS",
    "TEXT_LINE",
    "DataAborted",
    "DataChunk",
    "DataStart",
    "EndOfData",
    "Event",
    "Hello",
    "LocalProtocolError",
    "MailFrom",
    "ProtocolViolation",
    "Quit",
    "RcptTo",
    "Reply",
    "Request",
    "Reset",
    "ServerConnection",
    "ServerSettings",
    "StartTls",
    "State",
    "Vrfy",
]
