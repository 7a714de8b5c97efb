"""The history rollup on PostgreSQL: one transaction per span, one process at a time.

The row of `read_rollup_state` is the lock (`FOR UPDATE SKIP LOCKED`: a
second worker skips its turn instead of waiting) and the mark: history
before `rolled_up_to` is in the per-minute rows, and the views of
`sagaworks_read` add what came after it from `saga_history`. Both move in
the same transaction, so a view never counts a row twice or misses one that
was committed when the rollup read it. The history is read through the same
functions the views use for their tail (migration 0013).
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import driver_connection
from sagaworks.application.ports import RolledUp, RollUp

__all__ = ["OLDEST_WINDOW", "PostgresHistoryRollup"]

OLDEST_WINDOW = timedelta(minutes=65)
"""History older than this is never rolled up late: no view reads that far back."""

_CLAIM = """
SELECT rolled_up_to AS mark,
       now() - $1::interval AS settled,
       greatest(rolled_up_to, now() - $1::interval - $3::interval) AS since,
       least(greatest(rolled_up_to, now() - $1::interval - $3::interval) + $2::interval,
             now() - $1::interval) AS until
FROM read_rollup_state WHERE id = 1
FOR UPDATE SKIP LOCKED
"""

_SAGAS = """
INSERT INTO read_saga_minutes AS r
       (minute, saga_type, started, completed, compensated, needs_attention, steps_run)
SELECT * FROM sagaworks_history_outcomes($1, $2)
ON CONFLICT (minute, saga_type) DO UPDATE SET
  started = r.started + excluded.started, completed = r.completed + excluded.completed,
  compensated = r.compensated + excluded.compensated,
  needs_attention = r.needs_attention + excluded.needs_attention,
  steps_run = r.steps_run + excluded.steps_run
"""

_STEPS = """
INSERT INTO read_step_minutes AS r
       (minute, saga_type, step, calls, transient_failures, business_failures,
        retries_scheduled, needs_attention)
SELECT * FROM sagaworks_history_step_counts($1, $2)
ON CONFLICT (minute, saga_type, step) DO UPDATE SET
  calls = r.calls + excluded.calls,
  transient_failures = r.transient_failures + excluded.transient_failures,
  business_failures = r.business_failures + excluded.business_failures,
  retries_scheduled = r.retries_scheduled + excluded.retries_scheduled,
  needs_attention = r.needs_attention + excluded.needs_attention
"""

_LATENCY = """
INSERT INTO read_latency_minutes AS r (minute, saga_type, step, kind, measure, bucket, samples)
SELECT date_trunc('minute', t.at), t.saga_type, t.step, t.kind, t.measure,
       sagaworks_latency_bucket(t.seconds), count(*)
FROM sagaworks_history_step_times($1, $2) t
GROUP BY 1, 2, 3, 4, 5, 6
ON CONFLICT (minute, saga_type, step, kind, measure, bucket) DO UPDATE SET
  samples = r.samples + excluded.samples
"""

_PORTS = """
INSERT INTO read_step_ports AS r (saga_type, step, port, seen_at)
SELECT * FROM sagaworks_history_step_ports($1, $2)
ON CONFLICT (saga_type, step) DO UPDATE SET port = excluded.port, seen_at = excluded.seen_at
WHERE r.seen_at <= excluded.seen_at
"""

_FORGET = [
    f"DELETE FROM {table} WHERE minute < now() - $1::interval"  # noqa: S608 - fixed names
    for table in ("read_saga_minutes", "read_step_minutes", "read_latency_minutes")
]

_MARK = "UPDATE read_rollup_state SET rolled_up_to = $1, rolled_at = now() WHERE id = 1"


class PostgresHistoryRollup:
    """Implements `HistoryRollup`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def roll_up(self, step: RollUp) -> RolledUp | None:
        async with driver_connection(self._engine) as conn, conn.transaction():
            # Seconds of history a few times a minute: compiling a plan (JIT) never pays.
            await conn.execute("SET LOCAL jit = off")
            claim = await conn.fetchrow(_CLAIM, step.settle, step.span, OLDEST_WINDOW)
            if claim is None:
                return None
            since, until = claim["since"], claim["until"]
            if until > since:
                for statement in (_SAGAS, _STEPS, _LATENCY, _PORTS):
                    await conn.execute(statement, since, until)
                await conn.execute(_MARK, until)
            for statement in _FORGET:
                await conn.execute(statement, step.keep)
        return RolledUp(
            since=since,
            until=max(since, until),
            caught_up=until >= claim["settled"],
            skipped=since - claim["mark"],
        )
