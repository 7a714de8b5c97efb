"""Read a released migration's SQL, so a later revision's downgrade restores it word for word.

A migration's text never changes once released; loading it (instead of copying
its SQL) keeps one source for what an older schema looked like.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

__all__ = ["released_revision"]


def released_revision(filename: str) -> ModuleType:
    """The module of `versions/<filename>`, loaded on its own (Alembic does not import it)."""
    path = Path(__file__).with_name("versions") / filename
    spec = importlib.util.spec_from_file_location(f"sagaworks_migration_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"migration {path} is missing from the installed package")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
