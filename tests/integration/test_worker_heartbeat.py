"""A worker's heartbeat row: who it is, what it runs, how busy it is; gone when it stops beating."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
from engine_harness import EngineHarness, running_harness
from scenarios.order_inputs import order_placed

from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> AsyncIterator[EngineHarness]:
    def beating_fast(**overrides: object) -> Settings:
        return settings_factory(heartbeat_interval_s=0.2, **overrides)

    async with running_harness(beating_fast, migrated_database_url, run_id) as started:
        yield started


async def worker_row(harness: EngineHarness) -> dict[str, object] | None:
    row = await harness.db.fetchrow("SELECT * FROM sagaworks_read.workers")
    return dict(row) if row is not None else None


async def test_a_worker_beats_what_it_runs_and_its_queues(harness: EngineHarness) -> None:
    async def beating() -> dict[str, object] | None:
        row = await worker_row(harness)
        return row if row is not None and row["queue_depths"] != "{}" else None

    row = await harness.eventually(beating, what="a heartbeat with queue depths")
    assert row["alive"] is True
    assert row["sagas"] == ["order_fulfilment"]
    assert row["ports"] == ["inventory", "payments", "shipping"]
    assert row["worker"] == f"{row['host']}:{row['pid']}"
    queues = await harness.db.fetch("SELECT queue, consumers FROM sagaworks_read.queue_depths")
    assert {q["queue"] for q in queues} >= {f"{harness.prefix}sagaworks.port.inventory"}
    assert all(q["consumers"] >= 1 for q in queues)


async def test_deliveries_in_flight_show_in_the_heartbeat(harness: EngineHarness) -> None:
    gate = harness.gates["reserve"] = asyncio.Event()
    order_id = f"hb-{secrets.token_hex(3)}"
    await harness.publish(order_placed(order_id), f"{order_id}-placed")

    async def busy() -> dict[str, object] | None:
        row = await worker_row(harness)
        return row if row is not None and row["in_flight"] >= 1 else None

    await harness.eventually(busy, what="the held reservation counted in flight")
    gate.set()

    async def idle() -> dict[str, object] | None:
        row = await worker_row(harness)
        return row if row is not None and row["in_flight"] == 0 else None

    await harness.eventually(idle, what="nothing in flight once the reservation answered")


async def test_a_worker_that_stopped_beating_shows_as_gone(harness: EngineHarness) -> None:
    await harness.eventually(lambda: worker_row(harness), what="a heartbeat")
    await harness.db.execute(
        "INSERT INTO worker_heartbeats (worker, host, pid, version, sagas, ports, started_at, "
        "last_beat_at, beat_interval_s) VALUES ('crashed:1', 'crashed', 1, '0.1.0', "
        "'{order_fulfilment}', '{inventory}', now() - interval '1 hour', "
        "now() - interval '16 seconds', 5)"
    )
    rows = await harness.db.fetch("SELECT worker, alive FROM sagaworks_read.workers")
    states = {r["worker"]: r["alive"] for r in rows}
    assert states.pop("crashed:1") is False, "three intervals without a beat: gone"
    assert list(states.values()) == [True]


async def test_a_worker_that_stops_gracefully_removes_its_row(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> None:
    async with running_harness(
        lambda **o: settings_factory(heartbeat_interval_s=0.2, **o), migrated_database_url, run_id
    ) as harness:
        await harness.eventually(lambda: worker_row(harness), what="a heartbeat")
        db = harness.db
        for worker in harness.workers:
            await worker.stop()
        assert await db.fetchval("SELECT count(*) FROM worker_heartbeats") == 0
