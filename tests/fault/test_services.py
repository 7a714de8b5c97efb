"""The broker restarted and killed, and PostgreSQL restarted (immediate), under load."""

from __future__ import annotations

import asyncio

import pytest
from conftest import ScenarioFactory, report
from rig import Scenario

pytestmark = [pytest.mark.fault, pytest.mark.integration]


async def _under_load(scenario: Scenario) -> None:
    worker = scenario.start_worker()
    await scenario.wait_until_consuming(worker)
    await scenario.listen_for_outcomes()
    scenario.place_orders(over_s=6.0)
    await asyncio.sleep(2.0)


async def _finish(scenario: Scenario) -> None:
    await scenario.senders_done()
    assert await scenario.wait_until_all_ended(180), await scenario.diagnose()
    assert all(w.alive for w in scenario.workers), "a worker died instead of waiting it out"
    report(await scenario.close_books())


async def test_rabbitmq_restarted_under_load(scenario_factory: ScenarioFactory) -> None:
    scenario = await scenario_factory("rabbit-restart")
    await _under_load(scenario)

    await asyncio.to_thread(scenario.services.rabbitmq.restart)
    await scenario.fault_ended()

    await _finish(scenario)


async def test_rabbitmq_killed_under_load(scenario_factory: ScenarioFactory) -> None:
    scenario = await scenario_factory("rabbit-kill")
    await _under_load(scenario)

    await asyncio.to_thread(scenario.services.rabbitmq.kill)
    scenario.kills += 1
    await asyncio.sleep(3.0)
    await asyncio.to_thread(scenario.services.rabbitmq.start)
    await scenario.fault_ended()

    await _finish(scenario)


async def test_postgresql_restarted_immediate_under_load(scenario_factory: ScenarioFactory) -> None:
    scenario = await scenario_factory("pg-restart")
    await _under_load(scenario)

    await asyncio.to_thread(scenario.services.postgres.restart, "immediate")
    await scenario.reconnect_db()
    await scenario.fault_ended()

    await _finish(scenario)
