"""POP3 status lines: ``+OK`` / ``-ERR``, with RFC 2449's extended response codes.

A response is one line: ``+OK`` or ``-ERR``, a space and text (RFC 1939 3). RFC 2449 8 lets a
``-ERR`` (or ``+OK``) carry a code in brackets right after the status, which clients act on::

    [LOGIN-DELAY]   RFC 2449 8.1.1  logging in again too soon (see LOGIN-DELAY, 6.5)
    [IN-USE]        RFC 2449 8.1.2  the maildrop is locked by another session
    [SYS/TEMP]      RFC 3206 4      a temporary problem on the server: try later
    [SYS/PERM]      RFC 3206 4      a lasting problem on the server: tell the user
    [AUTH]          RFC 3206 5      the credentials are wrong (AUTH-RESP-CODE)

RFC 2449 4: a response line is at most 512 octets with its CRLF; text longer than that is cut.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: RFC 2449 4: "Responses ... MUST NOT exceed 512 octets, including the terminating CRLF".
RESPONSE_LINE: Final = 512

IN_USE: Final = "IN-USE"
LOGIN_DELAY: Final = "LOGIN-DELAY"
SYS_TEMP: Final = "SYS/TEMP"
SYS_PERM: Final = "SYS/PERM"
AUTH: Final = "AUTH"


@dataclass(frozen=True, slots=True)
class Response:
    """One status line. ``code`` is the RFC 2449 response code without its brackets."""

    ok: bool
    text: str = ""
    code: str | None = None

    def to_bytes(self) -> bytes:
        """The line on the wire, CRLF included; CR and LF inside the text become spaces, so
        text from a peer cannot add lines."""
        text = self.text
        if "\r" in text or "\n" in text:
            text = text.replace("\r", " ").replace("\n", " ")
        if self.code:
            text = f"[{self.code}] {text}" if text else f"[{self.code}]"
        line = ("+OK " if self.ok else "-ERR ") + text if text else ("+OK" if self.ok else "-ERR")
        data = line.encode("utf-8", "replace")
        if len(data) > RESPONSE_LINE - 2:
            data = data[: RESPONSE_LINE - 2].decode("utf-8", "ignore").encode("utf-8")
        return data + b"\r\n"


def ok(text: str = "", code: str | None = None) -> Response:
    return Response(True, text, code)


def err(text: str, code: str | None = None) -> Response:
    return Response(False, text, code)


# Replies the core sends by itself.
GREETING_TEXT: Final = "POP3 server ready"
UNKNOWN_COMMAND: Final = err("Unknown command.")
BAD_STATE: Final = err("Command not valid in this state.")
LINE_TOO_LONG: Final = err("Line too long.")
BAD_SYNTAX: Final = err("Syntax error in command arguments.")
BAD_CHARACTERS: Final = err("Invalid characters in command.")
NO_SUCH_MESSAGE: Final = err("No such message.")
TOO_MANY_ERRORS: Final = err("Too many bad commands, closing the connection.")
TIMEOUT: Final = err("Disconnected for inactivity.")
SHUTDOWN: Final = err("Server shutting down.", SYS_TEMP)
PLAINTEXT_REFUSED: Final = err("Plaintext authentication disallowed on non-secure connection.", AUTH)
AUTH_FAILED: Final = err("Authentication failed.", AUTH)
AUTH_UNAVAILABLE: Final = err("Temporary authentication failure.", SYS_TEMP)
MAILDROP_UNAVAILABLE: Final = err("Mailbox temporarily unavailable.", SYS_TEMP)
IN_USE_REPLY: Final = err("Mailbox is locked by another POP3 session.", IN_USE)
UPDATE_FAILED: Final = err("Some deleted messages were not removed.", SYS_TEMP)
MESSAGE_UNAVAILABLE: Final = err("Message is no longer available.", SYS_TEMP)


def login_too_soon(delay: int, left: int) -> Response:
    """RFC 2449 8.1.1: the mailbox was logged in to less than *delay* seconds ago."""
    return err(f"Logged in less than {delay} seconds ago; try again in {left} seconds.", LOGIN_DELAY)
