"""One snapshot of every read model in `sagaworks_read`, for `sagaworks top`.

The views are the contract (docs/operations.md documents them column by
column); this module only selects from them, in one read-only transaction so
the figures of one snapshot agree with each other.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

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
    """The longest-stuck sagas, at most ten."""
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
        async with self._engine.connect() as conn:
            await conn.execute(text("START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"))
            try:
                return await self._read(conn)
            finally:
                await conn.rollback()

    async def _read(self, conn: AsyncConnection) -> ReadModelSnapshot:
        async def rows(sql: str) -> list[Row]:
            return [dict(row) for row in (await conn.execute(text(sql))).mappings()]

        async def one(sql: str) -> Row:
            return dict((await conn.execute(text(sql))).mappings().one())

        stuck = await rows(
            "SELECT reason, count(*) AS sagas FROM sagaworks_read.stuck_sagas GROUP BY 1"
        )
        return ReadModelSnapshot(
            taken_at=(await conn.execute(text("SELECT now()"))).scalar_one(),
            activity=await one("SELECT * FROM sagaworks_read.activity_now"),
            outcomes=await one(
                "SELECT coalesce(sum(completed), 0)::bigint AS completed, "
                "coalesce(sum(compensated), 0)::bigint AS compensated, "
                "coalesce(sum(needs_attention), 0)::bigint AS needs_attention "
                "FROM sagaworks_read.throughput_per_minute"
            ),
            in_progress=await rows(
                "SELECT * FROM sagaworks_read.sagas_in_progress "
                "ORDER BY saga_type, status, current_step"
            ),
            latency=await rows(
                "SELECT * FROM sagaworks_read.step_latency ORDER BY saga_type, step, kind"
            ),
            ports=await rows("SELECT * FROM sagaworks_read.port_activity ORDER BY port"),
            breakers=await rows("SELECT * FROM sagaworks_read.breakers ORDER BY port, worker"),
            backlog=await one("SELECT * FROM sagaworks_read.backlog"),
            queues=await rows("SELECT * FROM sagaworks_read.queue_depths ORDER BY queue"),
            dead_letter_groups=await rows(
                "SELECT * FROM sagaworks_read.dead_letter_groups ORDER BY letters DESC, reason"
            ),
            stuck_by_reason={row["reason"]: int(row["sagas"]) for row in stuck},
            stuck_oldest=await rows(
                "SELECT saga_id, saga_type, correlation_key, reason, since, command "
                "FROM sagaworks_read.stuck_sagas ORDER BY since LIMIT 10"
            ),
            workers=await rows("SELECT * FROM sagaworks_read.workers ORDER BY alive DESC, worker"),
        )
