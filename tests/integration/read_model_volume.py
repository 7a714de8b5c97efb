"""A busy day of history, made in SQL, and every dashboard query timed on it.

`fill(conn, sagas)` writes `sagas` finished sagas started evenly over the last
24 hours (90 % completed through five steps and a wait, 10 % compensated after
a declined payment; twelve and nine history rows each, in time order as the
engine appends them), a few hundred sagas still running, their timers, 10 000
dead letters over a week, some unpublished outbox rows and eight workers'
heartbeats and breakers (`top_up` adds a fresh last hour to a database filled
earlier). `roll_up_the_last_hour(url)` then folds that hour into the
per-minute rows as a worker would, from scratch, and reports how long it
took; `time_queries(url)` runs every Grafana panel and alert query and one
`sagaworks top` snapshot, and reports the median of five runs.
docs/operations.md ("Read models at scale") has the figures:

    createdb -h localhost -U postgres sagaworks_read_volume
    SAGAWORKS_DATABASE_URL=postgresql://postgres@localhost:5432/sagaworks_read_volume \\
        uv run sagaworks db upgrade
    uv run python tests/integration/read_model_volume.py \\
        postgresql://postgres@localhost:5432/sagaworks_read_volume --sagas 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg

__all__ = ["fill", "roll_up_the_last_hour", "time_queries", "top_up"]

_SAGAS = """
INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                            state_schema_version, version, progress, created_at, updated_at)
SELECT md5('saga' || n)::uuid, 'order_fulfilment', 'ord-' || lpad(n::text, 8, '0'),
       CASE WHEN n % 10 = 0 THEN 'compensated' ELSE 'completed' END, NULL, '{}'::jsonb, 1,
       CASE WHEN n % 10 = 0 THEN 5 ELSE 7 END, '{}'::jsonb, t.at,
       t.at + CASE WHEN n % 10 = 0 THEN 2 ELSE 20 END * interval '100 milliseconds'
FROM generate_series(1, $1::int) AS n
CROSS JOIN LATERAL (
  SELECT now() - interval '24 hours' + (n::float8 / $1::int) * interval '24 hours'
         - interval '3 seconds' AS at
) t
"""

_RECENT = """
INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                            state_schema_version, version, progress, created_at, updated_at)
SELECT gen_random_uuid(), 'order_fulfilment', 'recent-' || gen_random_uuid(),
       CASE WHEN n % 10 = 0 THEN 'compensated' ELSE 'completed' END, NULL, '{}'::jsonb, 1,
       CASE WHEN n % 10 = 0 THEN 5 ELSE 7 END, '{}'::jsonb, t.at,
       t.at + CASE WHEN n % 10 = 0 THEN 2 ELSE 20 END * interval '100 milliseconds'
FROM generate_series(1, $1::int) AS n
CROSS JOIN LATERAL (
  SELECT now() - interval '1 hour' + (n::float8 / $1::int) * interval '1 hour'
         - interval '3 seconds' AS at
) t
"""

_RUNNING = """
INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                            state_schema_version, version, progress, created_at, updated_at)
SELECT md5('running' || n)::uuid, 'order_fulfilment', 'run-' || n, 'running',
       'await_dispatch', '{}'::jsonb, 1, 4, '{"position": 3}'::jsonb,
       now() - n * interval '2 seconds', now() - n * interval '2 seconds'
FROM generate_series(1, 300) AS n
"""

_STEPS = """
(1, 0, 'started', NULL, '{"event": "order.placed"}'),
(2, 0, 'step_started', 'reserve_stock', '{"kind": "action", "attempt": 1, "port": "inventory"}'),
(3, 1, 'step_completed', 'reserve_stock', '{"attempt": 1}'),
(4, 1, 'step_started', 'authorise_payment',
    '{"kind": "action", "attempt": 1, "port": "payments"}')
"""

_HISTORY = f"""
INSERT INTO saga_history (saga_id, seq, at, kind, step, message_id, detail)
SELECT s.id, k.seq, s.created_at + k.tenths * interval '100 milliseconds', k.kind, k.step,
       s.id || '/' || k.seq, k.detail::jsonb
FROM saga_instances s
LEFT JOIN LATERAL (SELECT 1 FROM saga_history x WHERE x.saga_id = s.id LIMIT 1) known ON true
CROSS JOIN LATERAL (
  SELECT * FROM (VALUES {_STEPS},
    (5, 2, 'step_completed', 'authorise_payment', '{{"attempt": 1}}'),
    (6, 2, 'step_started', 'book_shipment',
        '{{"kind": "action", "attempt": 1, "port": "shipping"}}'),
    (7, 4, 'step_completed', 'book_shipment', '{{"attempt": 1}}'),
    (8, 4, 'waiting', 'await_dispatch', '{{"event": "shipment.dispatched"}}'),
    (9, 16, 'event_received', 'await_dispatch', '{{"event": "shipment.dispatched"}}'),
    (10, 16, 'step_started', 'capture_payment',
        '{{"kind": "action", "attempt": 1, "port": "payments"}}'),
    (11, 20, 'step_completed', 'capture_payment', '{{"attempt": 1}}'),
    (12, 20, 'completed', NULL, '{{}}')
  ) AS v(seq, tenths, kind, step, detail)
  WHERE s.status = 'completed'
  UNION ALL
  SELECT * FROM (VALUES {_STEPS},
    (5, 1, 'step_failed', 'authorise_payment',
        '{{"reason": "payment_declined", "outcome_unknown": false}}'),
    (6, 1, 'compensation_started', NULL, '{{"reason": "payment_declined"}}'),
    (7, 1, 'step_started', 'reserve_stock',
        '{{"kind": "compensation", "attempt": 1, "port": "inventory"}}'),
    (8, 2, 'compensation_completed', 'reserve_stock', '{{"attempt": 1}}'),
    (9, 2, 'compensated', NULL, '{{"reason": "payment_declined"}}')
  ) AS v(seq, tenths, kind, step, detail)
  WHERE s.status = 'compensated'
  UNION ALL
  SELECT * FROM (VALUES {_STEPS},
    (5, 2, 'step_completed', 'authorise_payment', '{{"attempt": 1}}'),
    (6, 2, 'step_started', 'book_shipment',
        '{{"kind": "action", "attempt": 1, "port": "shipping"}}'),
    (7, 4, 'step_completed', 'book_shipment', '{{"attempt": 1}}'),
    (8, 4, 'waiting', 'await_dispatch', '{{"event": "shipment.dispatched"}}')
  ) AS v(seq, tenths, kind, step, detail)
  WHERE s.status = 'running'
) AS k(seq, tenths, kind, step, detail)
WHERE known IS NULL
ORDER BY s.created_at + k.tenths * interval '100 milliseconds'
"""

_REST = [
    """
    INSERT INTO timers (saga_id, name, fire_at)
    SELECT id, 'deadline:await_dispatch', now() + interval '1 hour'
    FROM saga_instances WHERE status = 'running'
    """,
    """
    INSERT INTO dead_letters (message_id, queue, exchange, routing_key, saga_type, handler, body,
                              reason, fingerprint, first_failed_at, last_failed_at)
    SELECT 'dl-' || n, 'sagaworks.order_fulfilment', 'orders', 'order.placed',
           'order_fulfilment', 'order_fulfilment', '{}'::bytea,
           (ARRAY['schema_invalid', 'delivery_limit', 'no_saga'])[1 + n % 3],
           'fp-' || n % 12, now() - (n * 60) * interval '1 second',
           now() - (n * 60) * interval '1 second'
    FROM generate_series(1, 10000) AS n
    """,
    """
    INSERT INTO outbox (message_id, exchange, routing_key, body, created_at)
    SELECT 'out-' || n, 'orders', 'order.fulfilled', '{}'::bytea, now() - n * interval '1 second'
    FROM generate_series(1, 50) AS n
    """,
    """
    INSERT INTO worker_heartbeats (worker, host, pid, version, sagas, ports, started_at,
                                   last_beat_at, beat_interval_s, in_flight, breakers,
                                   queue_depths)
    SELECT 'host' || n || ':1', 'host' || n, 1, '0.1.0', '{order_fulfilment}',
           '{inventory,payments,shipping}', now() - interval '1 day', now(), 5, n,
           '{"inventory": "closed", "payments": "closed", "shipping": "closed"}',
           '{"sagaworks.order_fulfilment": {"messages": 3, "consumers": 8}}'
    FROM generate_series(1, 8) AS n
    """,
    """
    INSERT INTO port_breakers (port, worker, state, failures, times_opened, changed_at)
    SELECT p, 'host' || n || ':1', 'closed', 0, 1, now() - interval '1 hour'
    FROM generate_series(1, 8) AS n, unnest(ARRAY['inventory', 'payments', 'shipping']) AS p
    """,
]


async def fill(conn: asyncpg.Connection, sagas: int) -> None:
    """Write the sagas, their history and the rest, as the engine would have; then ANALYZE.

    Foreign-key and append-only triggers are skipped while loading (a superuser
    session with `session_replication_role = replica`): the rows are consistent
    by construction, and loading a day's history takes minutes instead of hours.
    """
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(_SAGAS, sagas)
    await conn.execute(_RUNNING)
    await conn.execute(_HISTORY)
    for statement in _REST:
        await conn.execute(statement)
    await conn.execute("RESET session_replication_role")
    await conn.execute("VACUUM ANALYZE")


async def top_up(conn: asyncpg.Connection, sagas: int) -> None:
    """Add the last hour again (`sagas` / 24 sagas up to now), so the windows are full.

    Measuring a while after `fill` would find the recent windows emptying; the
    hour added on top makes them at least as full as right after filling.
    """
    await conn.execute("SET session_replication_role = replica")
    await conn.execute(_RECENT, max(sagas // 24, 1))
    await conn.execute(_HISTORY)
    await conn.execute("RESET session_replication_role")
    await conn.execute("ANALYZE saga_instances, saga_history")
    # What autovacuum's `autosummarize` does for ranges filled by the hot path.
    await conn.execute("SELECT brin_summarize_new_values('ix_saga_history_at_brin')")


async def roll_up_the_last_hour(url: str) -> tuple[float, int]:
    """Forget the rollup, fold the last hour in as a worker does: seconds taken, rows read."""
    from sagaworks.adapters.postgres.engine import create_engine
    from sagaworks.adapters.postgres.read_rollup import PostgresHistoryRollup
    from sagaworks.application.read_rollup import RollUpHistory

    conn = await asyncpg.connect(url)
    try:
        await conn.execute("UPDATE read_rollup_state SET rolled_up_to = now() - interval '1 hour'")
        await conn.execute(
            "TRUNCATE read_saga_minutes, read_step_minutes, read_latency_minutes, read_step_ports"
        )
        rows = await conn.fetchval(
            "SELECT count(*) FROM saga_history WHERE at >= now() - interval '1 hour'"
        )
    finally:
        await conn.close()
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        start = time.perf_counter()
        await RollUpHistory(PostgresHistoryRollup(engine), keep=timedelta(days=1))()
        return time.perf_counter() - start, rows
    finally:
        await engine.dispose()


async def time_queries(url: str, runs: int = 5) -> dict[str, tuple[float, int]]:
    """Median milliseconds and rows of every panel and alert query, and of a `top` snapshot."""
    from grafana_files import panel_queries, rule_queries

    from sagaworks.adapters.postgres.engine import create_engine
    from sagaworks.adapters.postgres.read_models import PostgresReadModels

    results: dict[str, tuple[float, int]] = {}
    conn = await asyncpg.connect(url)
    try:
        for query in [*panel_queries(), *rule_queries()]:

            async def run(sql: str = query.sql) -> int:
                return len(await conn.fetch(sql))

            results[query.where] = await _median(run, runs)
    finally:
        await conn.close()
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        read_models = PostgresReadModels(engine)

        async def snapshot() -> int:
            return len((await read_models.snapshot()).latency)

        results["sagaworks top (one whole snapshot)"] = await _median(snapshot, runs)
    finally:
        await engine.dispose()
    return results


async def _median(run: Callable[[], Awaitable[int]], runs: int) -> tuple[float, int]:
    rows = await run()  # warm the cache and the plan, as a dashboard's next refresh would
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        rows = await run()
        took.append((time.perf_counter() - start) * 1000)
    return statistics.median(took), rows


async def _main(url: str, sagas: int, runs: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT count(*) FROM saga_instances") == 0:
            start = time.perf_counter()
            await fill(conn, sagas)
            print(f"filled {sagas} sagas in {time.perf_counter() - start:.0f} s")
        else:
            await top_up(conn, sagas)
        history = await conn.fetchval("SELECT count(*) FROM saga_history")
        last_hour = await conn.fetchval(
            "SELECT count(*) FROM saga_history WHERE at > now() - interval '1 hour'"
        )
        size = await conn.fetchval("SELECT pg_size_pretty(pg_relation_size('saga_history'))")
        brin = await conn.fetchval(
            "SELECT pg_size_pretty(pg_relation_size('ix_saga_history_at_brin'))"
        )
    finally:
        await conn.close()
    print(f"history: {history} rows ({size}; BRIN index {brin}), {last_hour} in the last hour")
    took, rolled = await roll_up_the_last_hour(url)
    print(f"rollup of the last hour: {rolled} history rows in {took:.1f} s")
    print("| query | median ms | rows |\n|---|---:|---:|")
    for name, (ms, rows) in (await time_queries(url, runs)).items():
        print(f"| {name} | {ms:.1f} | {rows} |")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="a migrated, empty database (plain postgresql:// URL)")
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    arguments = parser.parse_args()
    asyncio.run(_main(arguments.url, arguments.sagas, arguments.runs))
