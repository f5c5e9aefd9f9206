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
