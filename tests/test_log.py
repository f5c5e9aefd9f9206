"""Mail log lines: Postfix's field layout, and JSON."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from postroom import log


def test_postfix_field_layout() -> None:
    text = log.format_fields({"to": "a@b", "relay": "local", "delay": 0.0123, "dsn": "2.0.0",
                              "status": "sent", "status_detail": "delivered to maildir"})
    assert text == "to=<a@b>, relay=local, delay=0.01, dsn=2.0.0, status=sent (delivered to maildir)"
    assert log.format_fields({"delay": 12.0, "from": ""}) == "delay=12, from=<>"


def test_lines_to_file_text_and_json(tmp_path: Path) -> None:
    path = tmp_path / "mail.log"
    log.setup(hostname="mx", level="info", json_lines=False, file=path)
    log.event("ABC", to="x@y", status="sent")
    log.setup(hostname="mx", level="info", json_lines=True, file=path)
    log.event("ABC", size=5)
    for handler in log.logger.handlers:
        handler.flush()
    text, js = path.read_text().splitlines()
    assert text.endswith(f"postroom[{os.getpid()}]: ABC: to=<x@y>, status=sent")
    data = json.loads(js)
    assert data["queue_id"] == "ABC" and data["size"] == 5 and data["level"] == "info"
    for handler in list(log.logger.handlers):
        log.logger.removeHandler(handler)
        handler.close()
    log.logger.setLevel(logging.WARNING)


def test_lines_logged_in_one_loop_iteration_are_written_together(tmp_path: Path) -> None:
    import asyncio

    path = tmp_path / "mail.log"
    log.setup(hostname="mx", level="info", json_lines=False, file=path)

    async def burst() -> tuple[str, str]:
        for n in range(3):
            log.event(f"ID{n}", status="sent")
        during = path.read_text()  # nothing written yet: the lines wait for the iteration's end
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return during, path.read_text()

    during, after = asyncio.run(burst())
    log.event("LAST", status="sent")  # no loop: written at once
    try:
        assert during == ""
        assert [line.split(": ")[1] for line in after.splitlines()] == ["ID0", "ID1", "ID2"]
        assert path.read_text().splitlines()[-1].endswith("LAST: status=sent")
    finally:
        for handler in list(log.logger.handlers):
            log.logger.removeHandler(handler)
            handler.close()
        log.logger.setLevel(logging.WARNING)
