"""Backends the port contracts run on: in memory (unit) and PostgreSQL (integration)."""

from __future__ import annotations

import pytest


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
    ]
)
def database_url_or_memory(request: pytest.FixtureRequest) -> str | None:
    """A fresh migrated database for the PostgreSQL run; None for the in-memory one."""
    if request.param == "memory":
        return None
    url: str = request.getfixturevalue("migrated_database_url")
    return url
