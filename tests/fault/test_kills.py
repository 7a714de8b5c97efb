"""kill -9 of a worker at exact points of the path of a message, many times per run.

A worker process is patched (worker_main.py) to SIGKILL itself the n-th
time it reaches a point; the test restarts it, with a new point or n, until
it was killed the scenario's number of times, then lets a clean worker
finish and checks the books. The short variant kills once at each point in
turn in one run; the long one (`SAGAWORKS_FAULT_LONG=1`) runs each point on
its own, `SCALE.kills` times.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
from conftest import LONG, SCALE, ScenarioFactory, report
from rig import Scenario, WorkerProcess

pytestmark = [pytest.mark.fault, pytest.mark.integration]

KILL_ON = {
    "dead_letter_ingest": (1, 2),
    "mid_batch": (2, 10),
    "compensating": (2, 8),
    "port_returned": (5, 40),
    "committed": (5, 40),
    "published": (5, 40),
}
"""The n of each life is drawn from this range: each point is reached that often early on.

In this order the short variant meets each point while there is still work that reaches
it: the poison is sent first, and there are fewer compensations than calls.
"""


async def _kill_and_restart(scenario: Scenario, points: list[str], workers: int = 1) -> None:
    """Run `workers` workers; each killed one restarts at the next point until all are used."""
    queue = iter(points)

    def start(point: str | None) -> WorkerProcess:
        if point is None:
            return scenario.start_worker()
        low, high = KILL_ON[point]
        return scenario.start_worker(point, scenario.rng.randint(low, high))

    running = [start(next(queue, None)) for _ in range(workers)]
    for worker in running:
        await scenario.wait_until_consuming(worker)
    await scenario.listen_for_outcomes()
    scenario.place_orders(over_s=10.0)
    deadline = time.monotonic() + 300
    while not await scenario.wait_until_all_ended(0.5):
        assert time.monotonic() < deadline, await scenario.diagnose()
        for index, worker in enumerate(running):
            if worker.alive:
                continue
            assert worker.killed_at_point, f"worker exited on its own: {worker.log}"
            scenario.kills += 1
            await scenario.fault_ended()
            running[index] = start(next(queue, None))
    await scenario.senders_done()
    assert await scenario.wait_until_all_ended(120), await scenario.diagnose()
    await asyncio.sleep(1.0)


async def test_a_worker_killed_at_each_point_in_turn_loses_and_repeats_nothing(
    scenario_factory: ScenarioFactory,
) -> None:
    scenario = await scenario_factory("kill-each-point", poison=6)

    await _kill_and_restart(scenario, list(KILL_ON))

    books = await scenario.close_books()
    assert books.kills == len(KILL_ON), f"some point was never reached: {books.kills} kills"
    report(books)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long variant: set SAGAWORKS_FAULT_LONG=1")
@pytest.mark.parametrize("point", list(KILL_ON))
async def test_a_worker_killed_many_times_at_one_point_loses_and_repeats_nothing(
    scenario_factory: ScenarioFactory, point: str
) -> None:
    scenario = await scenario_factory(f"kill-{point}", poison=SCALE.kills * 3)

    await _kill_and_restart(scenario, [point] * SCALE.kills)

    books = await scenario.close_books()
    assert books.kills == SCALE.kills, f"{point} reached only {books.kills} times"
    report(books)


async def test_three_workers_competing_while_killed_at_random_points(
    scenario_factory: ScenarioFactory,
) -> None:
    scenario = await scenario_factory("three-workers", poison=6)
    points = list(itertools.islice(itertools.cycle(KILL_ON), max(SCALE.kills * 3, 6)))
    scenario.rng.shuffle(points)

    await _kill_and_restart(scenario, points, workers=3)

    books = await scenario.close_books()
    assert books.kills >= 3
    report(books)


async def test_a_worker_killed_while_a_breaker_is_open(scenario_factory: ScenarioFactory) -> None:
    scenario = await scenario_factory("breaker-kill")
    worker = scenario.start_worker()
    await scenario.wait_until_consuming(worker)
    await scenario.listen_for_outcomes()
    await scenario.participant_fault("payments", for_s=15.0)
    scenario.place_orders()

    async def payments_open() -> bool:
        state = await scenario.db.fetchval(
            "SELECT state FROM port_breakers WHERE port = 'payments'"
        )
        return state == "open"

    for _ in range(120):
        if await payments_open():
            break
        await asyncio.sleep(0.25)
    assert await payments_open(), "the payments breaker never opened"
    held = await scenario.db.fetchval(
        "SELECT count(*) FROM saga_instances WHERE current_step = 'authorise_payment' "
        "AND status = 'running'"
    )
    worker.kill()
    scenario.kills += 1
    await scenario.fault_ended()
    scenario.start_worker()
    await scenario.senders_done()
    assert await scenario.wait_until_all_ended(180), await scenario.diagnose()

    books = await scenario.close_books()
    assert held > 0, "no saga was waiting on the open breaker when the worker died"
    report(books)
