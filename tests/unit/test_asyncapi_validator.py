"""docs/asyncapi.yaml passes the AsyncAPI parser itself, which catches a broken document.

The parser is the npm package `@asyncapi/parser` (what the AsyncAPI CLI's
`validate` runs), installed by .ci/run into tools/asyncapi/node_modules. The
tests run where node is; in CI with npm a missing parser is a failure, not a skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.tooling

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "asyncapi"
DOCUMENT = ROOT / "docs" / "asyncapi.yaml"
INSTALL = "npm ci --prefix tools/asyncapi --ignore-scripts --no-audit --no-fund"


def validate(path: Path) -> subprocess.CompletedProcess[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the AsyncAPI parser runs on node")
    if not (TOOL / "node_modules" / "@asyncapi" / "parser").is_dir():
        message = f"the AsyncAPI parser is not installed: {INSTALL}"
        if os.environ.get("CI") and shutil.which("npm"):
            pytest.fail(message)  # .ci/run installs it wherever npm is
        pytest.skip(message)
    return subprocess.run(
        [node, str(TOOL / "validate.mjs"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_committed_document_is_valid_asyncapi_3() -> None:
    result = validate(DOCUMENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0" in result.stdout
    assert "Error:" not in result.stdout


def test_a_broken_document_is_refused_with_where(tmp_path: Path) -> None:
    document: dict[str, Any] = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    del document["operations"]["receive.order.placed"]["action"]
    document["channels"]["order.placed"]["messages"]["order.placed"]["$ref"] = (
        "#/components/messages/no.such.message"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = validate(broken)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "receive.order.placed" in result.stdout
    assert "no.such.message" in result.stdout
