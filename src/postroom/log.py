"""Mail log lines in the familiar ``mail.log`` shape, or JSON.

Every line about a message starts with its queue id, so ``grep ID`` tells the message's whole life::

    4Q8X2B0C1DFG: client=mx.example[192.0.2.1]:41234
    4Q8X2B0C1DFG: from=<john@example.com>, size=1234, nrcpt=1
    4Q8X2B0C1DFG: to=<alice@example.net>, relay=local, delay=0.01, dsn=2.0.0,
        status=sent (delivered to maildir)

Use :func:`event` for message events: the fields keep their order and their Postfix names. With
``--json`` each line is one JSON object holding the same fields plus ``time``, ``level`` and
``queue_id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

LOGGER_NAME = "postroom"
logger = logging.getLogger(LOGGER_NAME)

#: Fields whose value is an address and is written in angle brackets, as Postfix does.
_BRACKETED = frozenset({"from", "to", "orig_to"})


def format_fields(fields: dict[str, Any]) -> str:
    """``from=<a@b>, size=12, status=sent (delivered)``: Postfix's field layout."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if key == "status_detail":
            continue
        if key in _BRACKETED:
            parts.append(f"{key}=<{value}>")
        elif key == "status" and fields.get("status_detail"):
            parts.append(f"status={value} ({fields['status_detail']})")
        elif isinstance(value, float):
            parts.append(f"{key}={f'{value:.2f}'.rstrip('0').rstrip('.') or '0'}")
        else:
            parts.append(f"{key}={value}")
    return ", ".join(parts)


def event(queue_id: str | None, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log one event. ``queue_id`` may be None for events that belong to no message."""
    if not logger.isEnabledFor(level):
        return
    text = format_fields(fields)
    if queue_id:
        text = f"{queue_id}: {text}"
    logger.log(level, text, extra={"pr_fields": fields, "pr_queue_id": queue_id})


class _TextFormatter(logging.Formatter):
    """``Nov 29 19:41:06 host postroom[1234]: text`` — close to syslog's layout."""

    def __init__(self, hostname: str) -> None:
        super().__init__()
        self.hostname = hostname
        self.pid = os.getpid()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second = second
            self._stamp = time.strftime("%b %d %H:%M:%S", time.localtime(second))
        stamp = self._stamp
        component = getattr(record, "pr_component", "postroom")
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        line = f"{stamp} {self.hostname} {component}[{self.pid}]: {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class _JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self.pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "pid": self.pid,
        }
        queue_id = getattr(record, "pr_queue_id", None)
        if queue_id:
            data["queue_id"] = queue_id
        fields = getattr(record, "pr_fields", None)
        if fields:
            data.update({k: v for k, v in fields.items() if v is not None})
        else:
            data["message"] = record.getMessage()
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _LineWriter(logging.Handler):
    """Writes formatted lines to file descriptors (stderr, the log file).

    Lines logged on a thread that runs an event loop are gathered and written once per loop
    iteration (``call_soon``), one ``write`` for every line of that iteration instead of one
    each; a busy server logs several lines per message. Nothing is dropped: lines from other
    threads, or with no loop, are written at once, and :meth:`flush` writes what is pending.
    """

    def __init__(self, fds: list[int]) -> None:
        super().__init__()
        self._fds = fds
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write([line])
            return
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_pending)

    def _flush_pending(self) -> None:
        self._scheduled = False
        lines, self._pending = self._pending, []
        if lines:
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        data = "".join(lines).encode("utf-8", "replace")
        with self.lock if self.lock is not None else contextlib.nullcontext():
            for fd in self._fds:
                view = memoryview(data)
                while view:
                    try:
                        view = view[os.write(fd, view):]
                    except InterruptedError:
                        continue
                    except OSError:
                        break  # a closed stderr must not stop the mail

    def flush(self) -> None:
        self._flush_pending()

    def close(self) -> None:
        self._flush_pending()
        for fd in self._fds[1:]:  # the first is stderr, which is not ours to close
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = self._fds[:1]
        super().close()


def setup(
    *, hostname: str, level: str = "info", json_lines: bool = False, file: Path | None = None
) -> None:
    """Send postroom's log to stderr and, when given, to *file* (appended)."""
    # A mail server logs several lines per message: skip what we never print (the caller's
    # source line costs a stack walk per record; process, thread and multiprocessing names
    # cost system calls). Formatters read the pid once.
    logging._srcfile = None  # a documented knob in logging/__init__.py
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter: logging.Formatter = _JsonFormatter() if json_lines else _TextFormatter(hostname)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.propagate = False
    logger.setLevel(level.upper())
    try:
        stderr = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced sys.stderr (tests, embedding)
        stderr = 2
    fds = [stderr]
    if file is not None:
        fds.append(os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640))
    handler = _LineWriter(fds)
    handler.setFormatter(formatter)
    logger.addHandler(handler)


def flush() -> None:
    """Write every pending line (before the process exits)."""
    for handler in logger.handlers:
        handler.flush()


def after_fork() -> None:
    """In a forked worker: keep the inherited log descriptors, print the worker's own pid."""
    pid = os.getpid()
    for handler in logger.handlers:
        formatter = handler.formatter
        if isinstance(formatter, _TextFormatter | _JsonFormatter):
            formatter.pid = pid
