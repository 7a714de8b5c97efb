"""The history rollup: the views read the same numbers whether history was rolled up or not.

An hour of history is written as the engine writes it (`read_model_volume.top_up`);
each view is read with nothing rolled up (all of it from `saga_history`), then
with part of it and with all of it folded into the per-minute rows, and must
say the same. Percentiles come from histograms and are checked against the
exact ones within a bucket's width.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from engine_harness import EngineHarness
from read_model_volume import top_up
from structlog.testing import capture_logs

from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.read_rollup import PostgresHistoryRollup
from sagaworks.application.ports import RollUp
from sagaworks.application.read_rollup import RollUpHistory
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGAS_PER_DAY = 24 * 400
"""`top_up` writes a 24th of this in the last hour: 400 sagas, about 4 500 history rows."""
ALL_SETTLED = RollUp(settle=timedelta(0), span=timedelta(hours=2), keep=timedelta(days=1))

_EXACT = """
SELECT saga_type, step, kind, measure, count(*) AS n,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS p50,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS p95
FROM sagaworks_history_step_times(date_trunc('minute', now()) - interval '14 minutes', 'infinity')
GROUP BY 1, 2, 3, 4
"""


@pytest.fixture
async def rollup(migrated_database_url: str) -> AsyncIterator[PostgresHistoryRollup]:
    engine = create_engine(migrated_database_url, pool_size=2, max_overflow=0)
    try:
        yield PostgresHistoryRollup(engine)
    finally:
        await engine.dispose()


async def views(db: asyncpg.Connection) -> dict[str, list[dict[str, Any]]]:
    return {
        "throughput": [
            dict(r)
            for r in await db.fetch(
                "SELECT * FROM sagaworks_read.throughput_per_minute ORDER BY minute, saga_type"
            )
        ],
        "ports": [
            dict(r)
            for r in await db.fetch("SELECT * FROM sagaworks_read.port_activity ORDER BY port")
        ],
        "latency": [
            dict(r)
            for r in await db.fetch(
                "SELECT * FROM sagaworks_read.step_latency ORDER BY saga_type, step, kind"
            )
        ],
    }


async def far_from_a_new_minute(db: asyncpg.Connection, needed_s: float = 10.0) -> None:
    """Views' windows move at each minute: compare readings taken within one minute."""
    into = await db.fetchval("SELECT extract(epoch FROM now() - date_trunc('minute', now()))")
    if float(into) > 60 - needed_s:
        await asyncio.sleep(61 - float(into))


async def forget_the_rollup(db: asyncpg.Connection) -> None:
    await db.execute("UPDATE read_rollup_state SET rolled_up_to = now() - interval '2 hours'")
    await db.execute("TRUNCATE read_saga_minutes, read_step_minutes, read_latency_minutes")


async def test_views_say_the_same_rolled_up_in_part_or_in_full(
    db: asyncpg.Connection, rollup: PostgresHistoryRollup
) -> None:
    await top_up(db, SAGAS_PER_DAY)
    await rollup.roll_up(ALL_SETTLED)  # learns each step's port
    await forget_the_rollup(db)
    await far_from_a_new_minute(db)
    from_history = await views(db)
    assert sum(r["started"] for r in from_history["throughput"]) >= 390
    assert {r["port"] for r in from_history["ports"]} == {"inventory", "payments", "shipping"}
    assert all(r["attempts"] > 0 for r in from_history["latency"] if r["kind"] != "wait")

    half = await rollup.roll_up(
        RollUp(settle=timedelta(0), span=timedelta(minutes=35), keep=timedelta(days=1))
    )
    assert half is not None
    assert not half.caught_up, "the first span ends half an hour back"
    assert await views(db) == from_history

    full = await rollup.roll_up(ALL_SETTLED)
    assert full is not None
    assert full.caught_up
    assert await db.fetchval("SELECT count(*) FROM read_latency_minutes") > 0
    assert await views(db) == from_history


async def test_percentiles_are_within_a_bucket_of_the_exact_ones(
    db: asyncpg.Connection, rollup: PostgresHistoryRollup
) -> None:
    await top_up(db, SAGAS_PER_DAY)
    assert await rollup.roll_up(ALL_SETTLED) is not None
    await far_from_a_new_minute(db)
    exact = {
        (r["saga_type"], r["step"], r["kind"], r["measure"]): r for r in await db.fetch(_EXACT)
    }
    checked = 0
    for row in await db.fetch("SELECT * FROM sagaworks_read.step_latency"):
        for measure, count, p50, p95 in (
            ("attempt", "attempts", "attempt_p50_s", "attempt_p95_s"),
            ("stay", "stays", "in_step_p50_s", "in_step_p95_s"),
        ):
            truth = exact.get((row["saga_type"], row["step"], row["kind"], measure))
            if truth is None:
                assert row[count] == 0
                continue
            assert row[count] == truth["n"]
            for estimate, real in ((row[p50], truth["p50"]), (row[p95], truth["p95"])):
                assert real / 1.25 - 0.001 <= estimate <= real * 1.25 + 0.001, (row, truth)
                checked += 1
    assert checked >= 12


async def test_one_process_rolls_up_at_a_time(
    db: asyncpg.Connection, rollup: PostgresHistoryRollup
) -> None:
    async with db.transaction():
        await db.execute("SELECT 1 FROM read_rollup_state FOR UPDATE")
        assert await rollup.roll_up(ALL_SETTLED) is None
        assert await RollUpHistory(rollup, keep=timedelta(days=1))() is None
    assert await rollup.roll_up(ALL_SETTLED) is not None


async def test_history_not_yet_settled_waits_and_old_minutes_are_forgotten(
    db: asyncpg.Connection, rollup: PostgresHistoryRollup
) -> None:
    await db.execute(
        "INSERT INTO read_saga_minutes (minute, saga_type, started) VALUES "
        "(date_trunc('minute', now()) - interval '2 days', 'old', 1), "
        "(date_trunc('minute', now()) - interval '2 hours', 'recent', 1)"
    )
    rolled = await rollup.roll_up(
        RollUp(settle=timedelta(seconds=30), span=timedelta(hours=2), keep=timedelta(days=1))
    )
    assert rolled is not None
    assert rolled.caught_up
    lag = await db.fetchval("SELECT now() - rolled_up_to FROM read_rollup_state")
    assert timedelta(seconds=30) <= lag < timedelta(seconds=35)
    kept = {r["saga_type"] for r in await db.fetch("SELECT saga_type FROM read_saga_minutes")}
    assert kept == {"recent"}


async def test_after_a_long_pause_only_what_the_views_read_is_rolled_up(
    db: asyncpg.Connection, rollup: PostgresHistoryRollup
) -> None:
    await db.execute("UPDATE read_rollup_state SET rolled_up_to = now() - interval '1 day'")
    rolled = await rollup.roll_up(ALL_SETTLED)
    assert rolled is not None
    assert timedelta(hours=22) < rolled.skipped < timedelta(hours=23)


async def test_a_worker_back_after_hours_logs_the_history_it_left_out(
    db: asyncpg.Connection,
    migrated_database_url: str,
    settings_factory: Callable[..., Settings],
    run_id: str,
) -> None:
    await db.execute("UPDATE read_rollup_state SET rolled_up_to = now() - interval '3 hours'")
    settings = settings_factory(
        database_url=migrated_database_url,
        exchange_prefix=f"{run_id}.{secrets.token_hex(3)}.",
        read_rollup_interval_s=0.2,
    )
    harness = EngineHarness(settings, migrated_database_url)
    await harness.open()
    try:
        with capture_logs() as logged:
            await harness.start_worker()
            deadline = time.monotonic() + 20
            while not (left_out := [e for e in logged if e["event"].startswith("history left")]):
                assert time.monotonic() < deadline, "no warning about the history left out"
                await asyncio.sleep(0.1)
    finally:
        await harness.close()
    (warning,) = left_out
    assert warning["log_level"] == "warning"
    assert "longer than any view looks back" in warning["event"]
    # Three hours behind, the views look back 65 minutes: 115 minutes were left out.
    assert 115 * 60 - 30 <= warning["skipped_s"] <= 115 * 60 + 30
    assert await db.fetchval(
        "SELECT rolled_up_to > now() - interval '1 minute' FROM read_rollup_state"
    ), "and the rest was rolled up"
