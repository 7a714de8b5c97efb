"""Network cuts: a proxy between the worker and one service black-holes it, then resets it.

The worker must notice a silent cut within about 30 s (AMQP heartbeats; the
database statement deadline), say so once, wait it out without being
restarted, and lose nothing. Detection time is from the cut to the worker's
log line naming it.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import pytest
from conftest import SCALE, ScenarioFactory, report
from rig import FaultServices, Scenario
from tcp_proxy import BlackHoleProxy

pytestmark = [pytest.mark.fault, pytest.mark.integration]

DETECTION_LIMIT_S = 30.0


def _logged_at(scenario: Scenario, event: str, after: float) -> list[float]:
    """Wall-clock times of the worker's log lines starting with `event`, after `after`."""
    found = []
    for line in scenario.workers[0].lines():
        if str(line.get("event", "")).startswith(event):
            at = datetime.fromisoformat(line["timestamp"].replace("Z", "+00:00")).timestamp()
            if at >= after:
                found.append(at)
    return found


async def _cut(scenario: Scenario, proxy: BlackHoleProxy, event: str) -> float:
    """Black-hole `proxy` for the scale's cut, then reset it; the detection time."""
    worker = scenario.start_worker()
    await scenario.wait_until_consuming(worker)
    await scenario.listen_for_outcomes()
    scenario.place_orders(over_s=6.0)
    await asyncio.sleep(2.0)

    cut_at = time.time()
    proxy.black_hole()
    await asyncio.sleep(SCALE.cut_s)
    proxy.reset()
    await scenario.fault_ended()

    noticed = _logged_at(scenario, event, cut_at)
    assert noticed, f"the worker never logged {event!r} during a {SCALE.cut_s} s cut"
    return noticed[0] - cut_at


async def test_broker_black_holed_then_reset(
    scenario_factory: ScenarioFactory, services: FaultServices
) -> None:
    proxy = BlackHoleProxy(services.rabbitmq.tls_port)
    await proxy.start()
    try:
        scenario = await scenario_factory(
            "cut-broker", amqp_port=proxy.port, deadline_slack_s=SCALE.cut_s
        )
        detection = await _cut(scenario, proxy, "broker connection lost")
        await scenario.senders_done()
        assert await scenario.wait_until_all_ended(90), await scenario.diagnose()
        losses = [
            line for line in scenario.workers[0].lines()
            if line.get("event", "").startswith("broker connection lost")
        ]  # fmt: skip
        assert {line["connection"] for line in losses} <= {"consumers", "publisher"}
        assert len(losses) <= 2, "each connection's loss is logged once"
        assert all("missed heartbeats" in line["cause"] for line in losses), losses
        assert scenario.workers[0].alive
        books = await scenario.close_books()
    finally:
        await proxy.stop()
    books.detection_s = detection
    report(books)
    assert detection <= DETECTION_LIMIT_S


async def test_database_black_holed_then_reset(
    scenario_factory: ScenarioFactory, services: FaultServices
) -> None:
    proxy = BlackHoleProxy(services.postgres.port)
    await proxy.start()
    try:
        scenario = await scenario_factory(
            "cut-database", pg_port=proxy.port, deadline_slack_s=SCALE.cut_s
        )
        detection = await _cut(scenario, proxy, "outage:")
        await scenario.senders_done()
        assert await scenario.wait_until_all_ended(90), await scenario.diagnose()
        outages = _logged_at(scenario, "outage:", 0.0)
        assert len(outages) == 1, "the outage is logged once"
        assert _logged_at(scenario, "outage over", 0.0), "and its end"
        assert scenario.workers[0].alive
        books = await scenario.close_books()
    finally:
        await proxy.stop()
    books.detection_s = detection
    report(books)
    assert detection <= DETECTION_LIMIT_S
