"""Test helpers: run SMTP byte scripts against the sans-I/O server core, no network involved.

:func:`run_script` feeds a client's bytes to a :class:`~postroom.smtp.server.ServerConnection`
(whole, or cut into segments of any size), answers every Request with a policy (by default the
answers a transport with no policy would give) and returns a :class:`Transcript`: every octet the
server sent, the events, and the messages accepted. :func:`run_all_ways` runs one script whole,
in 7-octet segments and one octet at a time and checks that the three agree (in output,
events and accepted messages; content of a refused message may stream in different pieces).

Dialog files (``tests/scripts/*.smtp``) read like the examples in RFC 5321 appendix D. Each line
is one of: ``# comment``; ``! field = value`` (a ServerSettings field for this dialog);
``C: text`` (a client line, CRLF added); ``C| text`` (raw client octets with the escapes
``\\r \\n \\t \\0 \\\\ \\xHH``, nothing added); ``S: text`` (a server line, CRLF added)::

    ! max_recipients = 2
    S: 220 mx.example.test ESMTP postroom
    C: HELO client.example
    S: 250 mx.example.test
    C| DATA\\n
    S: 503 5.5.1 Error: need MAIL command

:func:`parse_dialog` turns one into the client's octets and the server's expected octets.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from postroom.smtp import codes
from postroom.smtp.codes import Reply
from postroom.smtp.events import (
    DataAborted,
    DataChunk,
    DataStart,
    EndOfData,
    Event,
    Hello,
    MailFrom,
    RcptTo,
    Request,
    Reset,
    Vrfy,
)
from postroom.smtp.server import ServerConnection, ServerSettings

#: The host name test servers use in their banner and greetings.
HOSTNAME = "mx.example.test"

Policy = Callable[[Request], Reply]


def settings(**overrides: object) -> ServerSettings:
    """Test server settings: :data:`HOSTNAME` and the defaults, with ``overrides``."""
    return dataclasses.replace(ServerSettings(hostname=HOSTNAME), **overrides)  # type: ignore[arg-type]


class DefaultPolicy:
    """Answers what a transport without policy answers; queue ids count TESTQUEUE001 up."""

    def __init__(self) -> None:
        self.queued = 0

    def __call__(self, request: Request) -> Reply:
        if isinstance(request, Hello):
            return codes.OK
        if isinstance(request, MailFrom):
            return codes.OK_MAIL
        if isinstance(request, RcptTo):
            return codes.OK_RCPT
        if isinstance(request, Vrfy):
            return codes.CANNOT_VRFY
        if isinstance(request, EndOfData):
            self.queued += 1
            return codes.ok_queued(f"TESTQUEUE{self.queued:03d}")
        raise AssertionError(f"unexpected request {request!r}")


@dataclass(slots=True)
class Transcript:
    output: bytes  # every octet the server sent, banner included
    events: list[Event]  # in order; consecutive DataChunks merged
    messages: list[bytes] = field(default_factory=list)  # content of each message answered 2xx
    closed: bool = False
    max_buffered: int = 0  # the most ``buffered`` ever was after the events were drained

    @property
    def lines(self) -> list[str]:
        """The server's output as text lines, without CRLF."""
        return self.output.decode("utf-8", "replace").split("\r\n")[:-1]

    @property
    def replies(self) -> list[str]:
        """The last line of each reply (``"250 2.1.0 Ok"``), the banner included."""
        return [line for line in self.lines if line[3:4] == " " or len(line) == 3]

    @property
    def reply_codes(self) -> list[str]:
        """``"250 2.1.0"`` (or ``"220"``, ``"354"``) for each reply."""
        out = []
        for line in self.replies:
            words = line.split(" ")
            if len(words) > 1 and re.fullmatch(r"[245]\.\d{1,3}\.\d{1,3}", words[1]):
                out.append(f"{words[0]} {words[1]}")
            else:
                out.append(words[0])
        return out


def _segments(data: bytes, size: int | None) -> Sequence[bytes]:
    if size is None or not data:
        return [data]
    return [data[i : i + size] for i in range(0, len(data), size)]


def run_script(
    client: bytes,
    *,
    config: ServerSettings | None = None,
    policy: Policy | None = None,
    segment: int | None = None,
    eof: bool = False,
) -> Transcript:
    """Feed ``client`` to a new server in segments of ``segment`` octets (all at once if None).

    After each segment every event is drained and every Request answered by ``policy``, as a
    transport does. With ``eof`` the client then closes its side.
    """
    conn = ServerConnection(config or settings())
    answer = policy or DefaultPolicy()
    conn.start()
    output = bytearray(conn.data_to_send())
    events: list[Event] = []
    messages: list[bytes] = []
    current: list[bytes] | None = None
    max_buffered = 0

    def drain() -> None:
        nonlocal current, max_buffered
        while (event := conn.next_event()) is not None:
            if isinstance(event, DataChunk) and events and isinstance(events[-1], DataChunk):
                events[-1] = DataChunk(events[-1].data + event.data)
            else:
                events.append(event)
            if isinstance(event, DataStart):
                current = []
            elif isinstance(event, DataChunk):
                assert current is not None, "DataChunk outside DATA/BDAT"
                current.append(event.data)
            elif isinstance(event, (DataAborted, Reset)):
                current = None
            if isinstance(event, Request):
                reply = answer(event)
                if isinstance(event, EndOfData):
                    assert current is not None, "EndOfData without DataStart"
                    if 200 <= reply.code < 300:
                        messages.append(b"".join(current))
                    current = None
                conn.respond(reply)
        output.extend(conn.data_to_send())
        max_buffered = max(max_buffered, conn.buffered)

    for piece in _segments(client, segment):
        conn.receive_data(piece)
        drain()
    if eof:
        conn.receive_eof()
        drain()
    return Transcript(bytes(output), events, messages, conn.closed, max_buffered)


def run_all_ways(client: bytes, **options: object) -> Transcript:
    """:func:`run_script` whole, in 7-octet segments and octet by octet; all three must agree.

    Returns the transcript of the whole run. A fresh :class:`DefaultPolicy` is used each time
    unless ``policy`` is given (then it should not keep state that changes its answers).
    """
    whole = run_script(client, **options)  # type: ignore[arg-type]
    for size in (7, 1):
        other = run_script(client, segment=size, **options)  # type: ignore[arg-type]
        assert other.output == whole.output, f"segments of {size}: output differs"
        # content streams as it comes, so DataChunks differ when a message is refused later
        assert _no_chunks(other.events) == _no_chunks(whole.events), (
            f"segments of {size}: events differ"
        )
        assert other.messages == whole.messages, f"segments of {size}: messages differ"
        assert other.closed == whole.closed, f"segments of {size}: closed differs"
    return whole


def _no_chunks(events: list[Event]) -> list[Event]:
    return [event for event in events if not isinstance(event, DataChunk)]


@dataclass(frozen=True, slots=True)
class Dialog:
    client: bytes
    server: bytes
    settings: ServerSettings


_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0\\])")
_SIMPLE_ESCAPES = {"r": "\r", "n": "\n", "t": "\t", "0": "\0", "\\": "\\"}


def _unescape(text: str) -> bytes:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        return chr(int(code[1:], 16)) if code[0] == "x" else _SIMPLE_ESCAPES[code]

    # \xHH means the octet HH, so go through latin-1 for the escapes and UTF-8 for the rest
    parts = []
    pos = 0
    for match in _ESCAPE.finditer(text):
        parts.append(text[pos : match.start()].encode("utf-8"))
        parts.append(one(match).encode("latin-1"))
        pos = match.end()
    parts.append(text[pos:].encode("utf-8"))
    return b"".join(parts)


def parse_dialog(text: str) -> Dialog:
    """Read a dialog (see the module docstring) into client octets, server octets, settings."""
    client = bytearray()
    server = bytearray()
    overrides: dict[str, object] = {}
    defaults = ServerSettings(hostname=HOSTNAME)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        tag, body = line[:3], line[3:]
        if tag == "C: ":
            client += body.encode("utf-8") + b"\r\n"
        elif tag == "C| ":
            client += _unescape(body)
        elif tag == "S: ":
            server += body.encode("utf-8") + b"\r\n"
        elif line.startswith("! "):
            key, _, value = line[2:].partition("=")
            key, value = key.strip(), value.strip()
            current = getattr(defaults, key)
            if isinstance(current, bool):
                overrides[key] = value.lower() in ("1", "true", "yes")
            elif isinstance(current, int):
                overrides[key] = int(value)
            else:
                overrides[key] = value
        else:
            raise ValueError(f"dialog line {number}: cannot read {line!r}")
    return Dialog(bytes(client), bytes(server), settings(**overrides))
