"""One snapshot of every read model in `sagaworks_read`, for `sagaworks top`.

The views are the contract (docs/operations.md documents them column by
column); this module only selects from them. The views are read in parallel,
each on a connection of its own, so a snapshot takes as long as its slowest
view rather than their sum; its parts may differ by the milliseconds between
them.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

__all__ = ["PostgresReadModels", "ReadModelSnapshot"]

Row = dict[str, Any]


@dataclass(frozen=True)
class ReadModelSnapshot:
    """What the read models said at `taken_at` (the database's clock)."""

    taken_at: datetime
    activity: Row
    """`activity_now`: sagas started and ended, steps run, per second over the last 10 s."""
    outcomes: Row
    """Sagas ended in the last hour, by outcome (from `throughput_per_minute`)."""
    in_progress: list[Row]
    latency: list[Row]
    ports: list[Row]
    breakers: list[Row]
    backlog: Row
    queues: list[Row]
    dead_letter_groups: list[Row]
    stuck_by_reason: dict[str, int]
    stuck_oldest: list[Row]
    """The longest-stuck sagas, at most ten (as JSON: times are ISO 8601 text)."""
    workers: list[Row]

    def as_json(self) -> dict[str, Any]:
        """Plain JSON types: times as ISO 8601, ids as text, decimals as floats."""
        converted: dict[str, Any] = _plain(asdict(self))
        return converted


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID):
        return str(value)
    if isinstance(value, Decimal):
        return float(value)
    return value


class PostgresReadModels:
    """Reads the views of `sagaworks_read`; any role with SELECT on them will do."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def snapshot(self) -> ReadModelSnapshot:
        """Every read model at once, each on a connection of its own (in parallel)."""
        one, rows = self._one, self._rows
        try:
            async with asyncio.TaskGroup() as group:
                head = group.create_task(self._now_and(_ACTIVITY))
                outcomes = group.create_task(one(_OUTCOMES))
                in_progress = group.create_task(rows(_IN_PROGRESS))
                latency = group.create_task(rows(_LATENCY))
                ports = group.create_task(rows(_PORTS))
                breakers = group.create_task(rows(_BREAKERS))
                backlog = group.create_task(one(_BACKLOG))
                queues = group.create_task(rows(_QUEUES))
                dead_letter_groups = group.create_task(rows(_DEAD_LETTER_GROUPS))
                stuck = group.create_task(one(_STUCK))
                workers = group.create_task(rows(_WORKERS))
        except ExceptionGroup as failed:
            raise failed.exceptions[0] from None  # callers handle one database error
        taken_at, activity = head.result()
        return ReadModelSnapshot(
            taken_at=taken_at,
            activity=activity,
            outcomes=outcomes.result(),
            in_progress=in_progress.result(),
            latency=latency.result(),
            ports=ports.result(),
            breakers=breakers.result(),
            backlog=backlog.result(),
            queues=queues.result(),
            dead_letter_groups=dead_letter_groups.result(),
            stuck_by_reason={
                reason: int(n) for reason, n in json.loads(stuck.result()["by_reason"]).items()
            },
            stuck_oldest=json.loads(stuck.result()["oldest"]),
            workers=workers.result(),
        )

    async def _rows(self, sql: str) -> list[Row]:
        async with self._engine.connect() as conn:
            return [dict(row) for row in (await conn.execute(text(sql))).mappings()]

    async def _one(self, sql: str) -> Row:
        (row,) = await self._rows(sql)
        return row

    async def _now_and(self, sql: str) -> tuple[datetime, Row]:
        row = await self._one(sql)
        taken_at = row.pop("taken_at")
        assert isinstance(taken_at, datetime)
        return taken_at, row


_ACTIVITY = "SELECT now() AS taken_at, * FROM sagaworks_read.activity_now"
_OUTCOMES = (
    "SELECT coalesce(sum(completed), 0)::bigint AS completed, "
    "coalesce(sum(compensated), 0)::bigint AS compensated, "
    "coalesce(sum(needs_attention), 0)::bigint AS needs_attention "
    "FROM sagaworks_read.throughput_per_minute"
)
_IN_PROGRESS = (
    "SELECT * FROM sagaworks_read.sagas_in_progress ORDER BY saga_type, status, current_step"
)
_LATENCY = "SELECT * FROM sagaworks_read.step_latency ORDER BY saga_type, step, kind"
_PORTS = "SELECT * FROM sagaworks_read.port_activity ORDER BY port"
_BREAKERS = "SELECT * FROM sagaworks_read.breakers ORDER BY port, worker"
_BACKLOG = "SELECT * FROM sagaworks_read.backlog"
_QUEUES = "SELECT * FROM sagaworks_read.queue_depths ORDER BY queue"
_DEAD_LETTER_GROUPS = (
    "SELECT * FROM sagaworks_read.dead_letter_groups ORDER BY letters DESC, reason"
)
_STUCK = """
WITH stuck AS MATERIALIZED (
  SELECT saga_id, saga_type, correlation_key, reason, since, command
  FROM sagaworks_read.stuck_sagas
)
SELECT
  (SELECT coalesce(json_object_agg(reason, sagas), '{}')::text
   FROM (SELECT reason, count(*) AS sagas FROM stuck GROUP BY reason) counted) AS by_reason,
  (SELECT coalesce(json_agg(oldest ORDER BY since), '[]')::text
   FROM (SELECT * FROM stuck ORDER BY since LIMIT 10) oldest) AS oldest
"""
_WORKERS = "SELECT * FROM sagaworks_read.workers ORDER BY alive DESC, worker"
