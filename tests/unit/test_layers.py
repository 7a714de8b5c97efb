"""The layer rules of pyproject.toml are enforced: `lint-imports` fails on a broken one.

Each test copies `src/`, `sagas/` and `pyproject.toml` to a temporary folder,
optionally plants one forbidden import in the copy, and runs the real
`lint-imports` on the copy (PYTHONPATH points at it, so the installed tree is
not what gets analysed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def copy_project(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "src", target / "src", ignore=ignore)
    shutil.copytree(ROOT / "sagas", target / "sagas", ignore=ignore)
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def plant_import(module: Path, line: str) -> None:
    """Add `line` right after the module's `from __future__` import (or at the top)."""
    text = module.read_text()
    future = "from __future__ import annotations\n"
    text = text.replace(future, f"{future}\n{line}\n", 1) if future in text else f"{line}\n{text}"
    module.write_text(text)


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(project / "src"), str(project)]),
        "COLUMNS": "200",  # rich wraps long module paths at 80 columns otherwise
    }
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo", str(project / "pyproject.toml")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_project_as_it_is_keeps_every_contract(tmp_path: Path) -> None:
    project = copy_project(tmp_path)

    result = lint_imports(project)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
    assert "The domain imports no I/O library KEPT" in result.stdout
    assert "The engine does not import the sagas it runs KEPT" in result.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract", "offence"),
    [
        (
            "src/sagaworks/domain/decide.py",
            "import sqlalchemy",
            "The domain imports no I/O library",
            "sagaworks.domain.decide -> sqlalchemy",
        ),
        (
            "src/sagaworks/domain/decide.py",
            "import sagaworks.adapters.postgres.store",
            "Layers point inwards",
            "sagaworks.domain.decide -> sagaworks.adapters.postgres.store",
        ),
        (
            "src/sagaworks/application/handle_event.py",
            "import aio_pika",
            "The application layer does no I/O itself",
            "sagaworks.application.handle_event -> aio_pika",
        ),
        (
            "src/sagaworks/application/config.py",
            "import tenacity",
            "Resilience, logging and settings libraries stay out of the application",
            "sagaworks.application.config -> tenacity",
        ),
        (
            "src/sagaworks/application/handle_event.py",
            "import structlog",
            "Resilience, logging and settings libraries stay out of the application",
            "sagaworks.application.handle_event -> structlog",
        ),
        (
            "src/sagaworks/adapters/memory/store.py",
            "import sagaworks.adapters.postgres.tables",
            "Adapters are independent of one another",
            "sagaworks.adapters.memory.store -> sagaworks.adapters.postgres.tables",
        ),
        (
            "src/sagaworks/adapters/rabbitmq/publisher.py",
            "import sagaworks.adapters.observability.logging",
            "Adapters are independent of one another",
            "sagaworks.adapters.rabbitmq.publisher -> sagaworks.adapters.observability.logging",
        ),
        (
            "sagas/order_fulfilment/saga.py",
            "import sagaworks.bootstrap",
            "Sagas are written against the public API, not adapters or entry points",
            "sagas.order_fulfilment.saga -> sagaworks.bootstrap",
        ),
        (
            "sagas/order_fulfilment/simulation/shop.py",
            "import sagaworks.bootstrap",
            "Sagas are written against the public API, not adapters or entry points",
            "sagas.order_fulfilment.simulation.shop -> sagaworks.bootstrap",
        ),
        (
            "src/sagaworks/entrypoints/cli/app.py",
            "import sagas.order_fulfilment",
            "The engine does not import the sagas it runs",
            "sagaworks.entrypoints.cli.app -> sagas.order_fulfilment",
        ),
    ],
)
def test_a_forbidden_import_breaks_its_contract(
    tmp_path: Path, module: str, line: str, contract: str, offence: str
) -> None:
    project = copy_project(tmp_path)
    plant_import(project / module, line)

    result = lint_imports(project)

    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert f"{contract} BROKEN" in output
    assert offence in output
