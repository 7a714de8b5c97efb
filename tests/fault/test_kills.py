"""kill -9 of a worker at exact points of the path of a message, several times per run.

Each scenario runs one worker process patched (worker_main.py) to SIGKILL
itself the n-th time it reaches the point; the test restarts it, with a new
n, until it was killed `SCALE.kills` times, then lets a clean worker finish
and checks the books.
"""

from __future__ import annotations

import asyncio

import pytest
from conftest import SCALE, ScenarioFactory, report

pytestmark = [pytest.mark.fault, pytest.mark.integration]

KILL_ON = {
    "port_returned": (15, 60),
    "committed": (15, 60),
    "published": (15, 60),
    "mid_batch": (2, 10),
    "compensating": (2, 8),
    "dead_letter_ingest": (1, 2),
}
"""The n of each life is drawn from this range: each point is reached that often early on."""


@pytest.mark.parametrize("point", list(KILL_ON))
async def test_a_worker_killed_at_the_point_loses_and_repeats_nothing(
    scenario_factory: ScenarioFactory, point: str
) -> None:
    scenario = await scenario_factory(f"kill-{point}", poison=SCALE.kills * 3)
    low, high = KILL_ON[point]
    worker = scenario.start_worker(point, scenario.rng.randint(low, high))
    await scenario.wait_until_consuming(worker)
    await scenario.listen_for_outcomes()
    scenario.place_orders()

    while not await scenario.wait_until_all_ended(0.5):
        if worker.alive:
            continue
        assert worker.killed_at_point, f"worker exited on its own: {worker.log}"
        scenario.kills += 1
        await scenario.fault_ended()
        more = scenario.kills < SCALE.kills
        worker = scenario.start_worker(
            point if more else None, scenario.rng.randint(low, high) if more else 1
        )
        if scenario.kills > SCALE.kills + 1:
            break
    await scenario.senders_done()
    assert await scenario.wait_until_all_ended(120), await scenario.diagnose()
    await asyncio.sleep(1.0)
    books = await scenario.close_books()
    assert books.kills >= 1, f"the worker never reached {point}"
    report(books)
