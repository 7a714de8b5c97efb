"""A saga store of realistic shape and any size, made in SQL, and the operator queries timed on it.

`fill(conn, sagas)` writes `sagas` rows into `saga_instances` with
`generate_series` (three saga types; mostly completed, some compensated, a
few running, compensating or needing attention, some of those on delayed
retries; created over 90 days), history rows for one saga in ten, a timer
for every waiting saga and a dead letter for a few. The filter tests use it
small; docs/operations.md measures `saga list` on a million rows with it:

    createdb -h localhost -U postgres sagaworks_volume
    SAGAWORKS_DATABASE_URL=postgresql://postgres@localhost:5432/sagaworks_volume \\
        uv run sagaworks db upgrade
    uv run python tests/integration/saga_volume.py \\
        postgresql://postgres@localhost:5432/sagaworks_volume --sagas 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg

__all__ = ["fill", "time_queries"]

_SAGAS = """
INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                            state_schema_version, version, progress, created_at, updated_at)
SELECT md5('saga' || n)::uuid,
       (ARRAY['order_fulfilment', 'refund', 'subscription'])[1 + n % 3],
       'ord-' || lpad(n::text, 8, '0'),
       s.status,
       CASE s.status
         WHEN 'completed' THEN NULL
         ELSE (ARRAY['reserve_stock', 'authorise_payment', 'book_shipment', 'await_dispatch'])
              [1 + (n / 3) % 4] END,
       '{}'::jsonb, 1, 5,
       jsonb_build_object(
         'position', 1, 'done', '[]'::jsonb, 'correlation_id', 'ord-' || n,
         'error', CASE WHEN s.status = 'needs_attention'
                       THEN (ARRAY['card_expired', 'HTTP 503 from payments'])[1 + n % 2] END,
         'reason', CASE WHEN s.status IN ('compensating', 'compensated')
                        THEN 'payment_declined' END,
         'in_flight', CASE WHEN s.status IN ('running', 'compensating') AND n % 4 <> 3
           THEN jsonb_build_object(
             'step', (ARRAY['reserve_stock', 'authorise_payment', 'book_shipment'])
                     [1 + (n / 3) % 3],
             'kind', CASE WHEN s.status = 'compensating' THEN 'compensation' ELSE 'action' END,
             'attempt', 1 + n % 3,
             'retry_at', CASE WHEN n % 5 = 0 THEN to_jsonb(now() + interval '30 seconds') END)
           END),
       c.created_at,
       CASE WHEN s.status IN ('running', 'compensating')
            THEN now() - (n % 600) * interval '1 second'
            ELSE c.created_at + (n % 30) * interval '1 second' END
FROM generate_series(1, $1::int) AS n
CROSS JOIN LATERAL (
  SELECT CASE
    WHEN n % 1000 < 900 THEN 'completed'
    WHEN n % 1000 < 960 THEN 'compensated'
    WHEN n % 1000 < 985 THEN 'running'
    WHEN n % 1000 < 995 THEN 'compensating'
    ELSE 'needs_attention' END AS status
) s
CROSS JOIN LATERAL (
  SELECT now() - (($1::int - n)::float8 / $1::int) * interval '90 days' AS created_at
) c
"""

_HISTORY = """
INSERT INTO saga_history (saga_id, seq, at, kind, step, message_id, detail)
SELECT s.id, k.seq, s.created_at + k.seq * interval '150 milliseconds', k.kind, k.step,
       s.id || '/' || k.seq, k.detail
FROM saga_instances s
CROSS JOIN (VALUES
  (1, 'started', NULL, '{}'::jsonb),
  (2, 'step_started', 'reserve_stock', '{"kind": "action", "attempt": 1, "port": "inventory"}'),
  (3, 'step_completed', 'reserve_stock', '{"attempt": 1}'),
  (4, 'step_started', 'authorise_payment',
      '{"kind": "action", "attempt": 1, "port": "payments"}'),
  (5, 'step_completed', 'authorise_payment', '{"attempt": 1}'),
  (6, 'step_started', 'book_shipment', '{"kind": "action", "attempt": 1, "port": "shipping"}')
) AS k(seq, kind, step, detail)
WHERE s.correlation_key LIKE '%0'
"""

_TIMERS = """
INSERT INTO timers (saga_id, name, fire_at)
SELECT id, 'deadline:await_dispatch', now() + interval '1 day'
FROM saga_instances
WHERE status = 'running' AND current_step = 'await_dispatch'
  AND jsonb_typeof(progress->'in_flight') IS DISTINCT FROM 'object'
"""

_DEAD_LETTERS = """
INSERT INTO dead_letters (message_id, queue, exchange, routing_key, saga_type, body, reason,
                          fingerprint, first_failed_at, last_failed_at)
SELECT id || '/4/0', 'sagaworks.port.payments', 'sagaworks.commands',
       'port.payments.' || saga_type, saga_type, '{}'::bytea, 'delivery_limit',
       'fp-' || (abs(hashtext(saga_type)) % 3), now(), now()
FROM saga_instances
WHERE status = 'running' AND correlation_key LIKE '%7'
"""


async def fill(conn: asyncpg.Connection, sagas: int) -> None:
    """Write `sagas` sagas and their history, timers and dead letters; then ANALYZE."""
    await conn.execute(_SAGAS, sagas)
    for statement in (_HISTORY, _TIMERS, _DEAD_LETTERS):
        await conn.execute(statement)
    await conn.execute("ANALYZE")


async def time_queries(url: str, runs: int = 5) -> dict[str, tuple[float, int]]:
    """Median milliseconds of each command's query (first page, 50 rows), and rows returned."""
    from sagaworks.adapters.postgres.engine import create_engine
    from sagaworks.adapters.postgres.saga_queries import PostgresSagaQueries
    from sagaworks.application.operations import SagaFilter, SagaSort

    now = datetime.now(UTC)
    filters = {
        "saga list": SagaFilter(),
        "saga list --type refund --status needs_attention": SagaFilter(
            saga_types=("refund",), statuses=("needs_attention",)
        ),
        "saga list --status running --step authorise_payment": SagaFilter(
            statuses=("running",), current_steps=("authorise_payment",)
        ),
        "saga list --key-prefix ord-0012": SagaFilter(correlation_key_prefix="ord-0012"),
        "saga list --key ord-00123457": SagaFilter(correlation_key="ord-00123457"),
        "saga list --status running --older-than 30d": SagaFilter(
            statuses=("running",), older_than=timedelta(days=30)
        ),
        "saga list --status running --changed-before 5m": SagaFilter(
            statuses=("running",), changed_before=now - timedelta(minutes=5)
        ),
        "saga list --failure card_expired": SagaFilter(failure="card_expired"),
        "saga list --group fp-1": SagaFilter(failure_group="fp-1"),
        "saga list --stuck needs_attention": SagaFilter(stuck_reasons=("needs_attention",)),
        "saga list --stuck step_retrying": SagaFilter(stuck_reasons=("step_retrying",)),
    }
    engine = create_engine(url, pool_size=1, max_overflow=0)
    queries = PostgresSagaQueries(engine)
    results: dict[str, tuple[float, int]] = {}
    try:
        for name in [*filters, "saga stuck"]:
            if name == "saga stuck":

                async def run() -> int:
                    return len(await queries.stuck(SagaFilter(), limit=200))

            else:
                selection = filters[name]

                async def run(selection: SagaFilter = selection) -> int:
                    page = await queries.find(selection, SagaSort(), limit=50, offset=0)
                    return len(page.items)

            results[name] = await _median(run, runs)
    finally:
        await engine.dispose()
    return results


async def _median(run: Callable[[], Awaitable[int]], runs: int) -> tuple[float, int]:
    rows = await run()  # warm the cache and the plan, as a second operator query would
    took = []
    for _ in range(runs):
        start = time.perf_counter()
        rows = await run()
        took.append((time.perf_counter() - start) * 1000)
    return statistics.median(took), rows


async def _main(url: str, sagas: int, runs: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        existing = await conn.fetchval("SELECT count(*) FROM saga_instances")
        if existing == 0:
            start = time.perf_counter()
            await fill(conn, sagas)
            print(f"filled {sagas} sagas in {time.perf_counter() - start:.0f} s")
        counts = await conn.fetch(
            "SELECT status, count(*) FROM saga_instances GROUP BY 1 ORDER BY 2 DESC"
        )
        history = await conn.fetchval("SELECT count(*) FROM saga_history")
    finally:
        await conn.close()
    mix = ", ".join(f"{r['status']} {r['count']}" for r in counts)
    print(f"sagas: {mix}; history rows: {history}")
    for name, (ms, rows) in (await time_queries(url, runs)).items():
        print(f"{ms:8.1f} ms  {rows:>4} rows  {name}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="postgresql:// URL of a migrated, private database")
    parser.add_argument("--sagas", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    asyncio.run(_main(options.url, options.sagas, options.runs))
