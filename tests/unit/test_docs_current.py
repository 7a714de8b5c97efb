"""Generated documentation must match the code it documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagaworks.settings import reference_markdown

pytestmark = pytest.mark.unit

DOCS = Path(__file__).resolve().parents[2] / "docs"


def _between(text: str, start: str, end: str) -> str:
    return text.split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def test_settings_reference_is_current() -> None:
    text = (DOCS / "configuration.md").read_text()
    committed = _between(
        text, "<!-- settings-reference:start -->", "<!-- settings-reference:end -->"
    )
    assert committed == reference_markdown(), (
        "docs/configuration.md is stale: paste sagaworks.settings.reference_markdown() "
        "between the settings-reference markers"
    )
