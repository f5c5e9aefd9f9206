"""SMTP replies: the :class:`Reply` value and the named replies the server sends.

Basic codes come from RFC 5321 4.2 (4.2.2 and 4.2.3 list them by number; 4.3.2 says which command
may get which). Enhanced status codes (``class.subject.detail``) come from RFC 3463 and its registry
RFC 5248; RFC 2034 says they prefix every line of a reply except the greeting and the HELO/EHLO
answers, which therefore carry ``enhanced=None`` here. A 421 names the server host (RFC 5321
4.2.3: ``421 <domain> Service not available``), so the server builds its 421s with
:func:`with_host`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a basic code, an optional enhanced code and one or more lines of text."""

    code: int
    enhanced: str | None
    text: str | tuple[str, ...]

    @property
    def lines(self) -> tuple[str, ...]:
        return (self.text,) if isinstance(self.text, str) else self.text

    @property
    def is_positive(self) -> bool:
        """A 2xx or 3xx reply (RFC 5321 4.2.1): the command was accepted."""
        return self.code < 400

    def to_bytes(self) -> bytes:
        """The reply on the wire: ``250-first\\r\\n250 last\\r\\n``, the enhanced code on each line.

        CR and LF inside the text become spaces, so text taken from a peer cannot add lines.
        """
        lines = self.lines or ("",)
        last = len(lines) - 1
        out = []
        for i, line in enumerate(lines):
            if "\r" in line or "\n" in line:
                line = line.replace("\r", " ").replace("\n", " ")
            if self.enhanced:
                line = f"{self.enhanced} {line}" if line else self.enhanced
            # RFC 5321 4.2: [ SP textstring ]; RFC 4954 4: "334" SP [base64], the SP required
            sep = "-" if i < last else " " if line or self.code == 334 else ""
            out.append(f"{self.code}{sep}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")


def with_host(reply: Reply, hostname: str) -> Reply:
    """The reply with ``hostname`` in front of its (first line of) text, as a 421 wants."""
    lines = reply.lines
    return Reply(reply.code, reply.enhanced, (f"{hostname} {lines[0]}", *lines[1:])
                 if len(lines) > 1 else f"{hostname} {lines[0]}")


# -- 2xx: completion (RFC 5321 4.2.2) ---------------------------------------------------------
OK = Reply(250, "2.0.0", "Ok")  # RSET, NOOP (RFC 5321 4.1.1.5, 4.1.1.9); RFC 3463 X.0.0
OK_MAIL = Reply(250, "2.1.0", "Ok")  # MAIL accepted; RFC 3463 3.2 X.1.0 "other address status"
OK_RCPT = Reply(250, "2.1.5", "Ok")  # RCPT accepted; RFC 3463 3.2 X.1.5 "destination valid"
BYE = Reply(221, "2.0.0", "Bye")  # QUIT (RFC 5321 4.1.1.10)
HELP = Reply(  # HELP (RFC 5321 4.1.1.8): 214 help message
    214, "2.0.0", "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT"
)
CANNOT_VRFY = Reply(  # RFC 5321 3.5.3: 252 when the server will not verify
    252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery"
)

AUTH_OK = Reply(235, "2.7.0", "Authentication successful")  # RFC 4954 6

# -- 3xx: intermediate ------------------------------------------------------------------------
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")  # RFC 5321 4.1.1.4


def challenge(text: str) -> Reply:
    """A SASL challenge (RFC 4954 4): ``334 <base64>``, no enhanced code."""
    return Reply(334, None, text)


# -- 4xx: transient failure (RFC 5321 4.2.2) --------------------------------------------------
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")  # RFC 5321 4.5.3.2; X.4.2 bad connection
SHUTDOWN = Reply(  # RFC 5321 3.8: the server must shut down; X.3.2 system not accepting messages
    421, "4.3.2", "Service shutting down, closing transmission channel"
)
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")  # X.7.0 other security status
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing")  # 451; X.3.0 mail system
INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Error: insufficient system storage")  # X.3.1 full
TOO_MANY_RECIPIENTS = Reply(  # RFC 5321 4.5.3.1.10: 452 (not 552); RFC 3463 X.5.3
    452, "4.5.3", "Error: too many recipients"
)

AUTH_UNAVAILABLE = Reply(  # RFC 4954 6: temporary authentication failure
    454, "4.7.0", "Temporary authentication failure"
)

# -- 5xx: permanent failure -------------------------------------------------------------------
AUTH_LINE_TOO_LONG = Reply(  # RFC 4954 4/6
    500, "5.5.6", "Authentication Exchange line is too long"
)
AUTH_MALFORMED = Reply(501, "5.5.2", "Cannot decode response")  # RFC 4954 4: not base64
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")  # RFC 4954 4: "*"
AUTH_MECHANISM = Reply(  # RFC 4954 6: unknown or unoffered mechanism
    504, "5.5.4", "Unrecognized authentication type"
)
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")  # RFC 4954 6
AUTH_FAILED = Reply(  # RFC 4954 6
    535, "5.7.8", "Authentication credentials invalid"
)
ENCRYPTION_REQUIRED = Reply(  # RFC 4954 6 / RFC 5248: X.7.11 encryption required
    538, "5.7.11", "Encryption required for requested authentication mechanism"
)
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")  # RFC 5321 4.5.3.1: "500 Line too long"
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")  # X.5.2 syntax error
SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")  # X.5.4 invalid args
BAD_SENDER_SYNTAX = Reply(501, "5.1.7", "Bad sender address syntax")  # X.1.7
BAD_RECIPIENT_SYNTAX = Reply(501, "5.1.3", "Bad recipient address syntax")  # X.1.3
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")  # X.5.1 invalid command
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")  # RFC 5321 4.2.4 / 4.3.2
PARAM_NOT_IMPLEMENTED = Reply(504, "5.5.4", "Error: parameter not implemented")  # RFC 5321 4.2.4
PARAM_UNRECOGNIZED = Reply(  # RFC 5321 4.1.1.11: unknown MAIL/RCPT parameter gets 555
    555, "5.5.4", "Error: unsupported MAIL FROM or RCPT TO parameter"
)
USER_UNKNOWN = Reply(550, "5.1.1", "User unknown")  # X.1.1 bad destination mailbox
MESSAGE_TOO_BIG = Reply(  # RFC 1870 6.1 / RFC 5321 4.5.3.1: 552; RFC 3463 X.3.4
    552, "5.3.4", "Error: message file too big"
)
MAILBOX_FULL = Reply(552, "5.2.2", "Mailbox full")  # X.2.2 mailbox full
NON_ASCII = Reply(  # RFC 6531 3.5 / RFC 5248: X.6.7 non-ASCII addresses not permitted
    553, "5.6.7", "Non-ASCII address requires SMTPUTF8"
)
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")  # X.7.1 delivery not authorized
LOOP = Reply(554, "5.4.6", "Too many hops: mail loop detected")  # X.4.6 routing loop
BAD_CONTENT = Reply(  # RFC 5321 2.3.8 / 4.1.1.4: lines end in CRLF; X.6.0 other media error
    554, "5.6.0", "Error: bare <CR> or NUL in message content"
)
BARE_LF = Reply(554, "5.6.0", "Error: bare <LF> in message content")  # as BAD_CONTENT


def ok_queued(queue_id: str) -> Reply:
    """The answer to an accepted message (RFC 5321 4.1.1.4; Postfix's wording)."""
    return Reply(250, "2.0.0", f"Ok: queued as {queue_id}")


def octets_received(count: int) -> Reply:
    """The answer to a BDAT chunk that is not the last (RFC 3030 2)."""
    return Reply(250, "2.0.0", f"{count} octets received")
