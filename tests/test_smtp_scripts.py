"""The dialogues in tests/scripts/*.smtp, each run whole, chunked and octet by octet."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.testing import parse_dialog, run_all_ways

SCRIPTS = sorted((Path(__file__).parent / "scripts").glob("*.smtp"))


def test_there_are_scripts() -> None:
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.stem)
def test_dialog(path: Path) -> None:
    dialog = parse_dialog(path.read_text(encoding="utf-8"))
    transcript = run_all_ways(dialog.client, config=dialog.settings)
    assert transcript.output.decode("utf-8", "replace").splitlines() == (
        dialog.server.decode("utf-8", "replace").splitlines()
    )
    assert transcript.output == dialog.server


def test_parse_dialog_escapes_and_settings() -> None:
    dialog = parse_dialog("! reject_bare_lf = yes\n! max_errors = 3\nC| a\\r\\n\\x00\\\\é\nC: b\n")
    assert dialog.client == b"a\r\n\x00\\\xc3\xa9b\r\n"
    assert dialog.settings.reject_bare_lf and dialog.settings.max_errors == 3
    with pytest.raises(ValueError, match="line 1"):
        parse_dialog("X: what")
