"""Fixtures of the fault suite: one private PostgreSQL and RabbitMQ for the whole run.

The short variant (the default `uv run pytest`) runs each scenario with a
couple of hundred orders and a few faults. `SAGAWORKS_FAULT_LONG=1` runs the
long variant (more orders, many more kills, longer cuts; marker `slow` as
well): `SAGAWORKS_FAULT_LONG=1 uv run pytest -m fault`. Each scenario appends
its row of the results table to `SAGAWORKS_FAULT_RESULTS` (JSON lines), when
set.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rig import Books, FaultServices, Scenario, fault_services, record

LONG = os.environ.get("SAGAWORKS_FAULT_LONG") == "1"


@dataclass(frozen=True)
class Scale:
    orders: int
    kills: int
    """Kills per kill scenario."""
    cut_s: float
    """How long a network cut lasts."""


SCALE = Scale(orders=600, kills=10, cut_s=240.0) if LONG else Scale(orders=200, kills=2, cut_s=35.0)


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultServices]:
    with fault_services(tmp_path_factory.mktemp("fault-services")) as found:
        yield found


ScenarioFactory = Callable[..., Awaitable[Scenario]]


@pytest.fixture
async def scenario_factory(
    services: FaultServices, tmp_path: Path
) -> AsyncIterator[ScenarioFactory]:
    made: list[Scenario] = []

    async def make(name: str, **options: Any) -> Scenario:
        options.setdefault("orders", SCALE.orders)
        scenario = Scenario(services, name, tmp_path, **options)
        made.append(scenario)
        await scenario.open()
        return scenario

    yield make
    for scenario in made:
        await scenario.close()


def report(books: Books) -> None:
    """Fail with every broken guarantee; record the row when a results file is named."""
    results = os.environ.get("SAGAWORKS_FAULT_RESULTS")
    if results:
        record(books, Path(results))
    assert not books.violations(), f"{books.scenario}: {books.violations()}\n{books.row()}"
