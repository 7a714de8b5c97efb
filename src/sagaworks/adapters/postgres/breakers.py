"""Breaker changes in PostgreSQL: the port's row for dashboards and the event, in one commit."""

from __future__ import annotations

import json
from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import driver_connection
from sagaworks.application.ports import BreakerChange, OutboxRow, PendingMessage

__all__ = ["PostgresBreakerLog"]

_UPSERT = """
INSERT INTO port_breakers (port, worker, state, failures, times_opened, changed_at)
VALUES ($1, $2, $3, $4, CASE WHEN $3 = 'open' THEN 1 ELSE 0 END, $5)
ON CONFLICT (port, worker) DO UPDATE
SET state = EXCLUDED.state, failures = EXCLUDED.failures, changed_at = EXCLUDED.changed_at,
    times_opened = port_breakers.times_opened + EXCLUDED.times_opened
"""

_OUTBOX = """
INSERT INTO outbox (message_id, exchange, routing_key, headers, body)
VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""


class PostgresBreakerLog:
    """Implements `BreakerLog`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def record(self, change: BreakerChange, event: PendingMessage) -> Sequence[OutboxRow]:
        async with driver_connection(self._engine) as driver, driver.transaction():
            await driver.execute(
                _UPSERT, change.port, change.worker, change.state, change.failures, change.at
            )
            row_id = await driver.fetchval(
                _OUTBOX,
                event.message_id,
                event.exchange,
                event.routing_key,
                json.dumps(event.headers),
                event.body,
            )
        return [
            OutboxRow(
                row_id,
                event.message_id,
                event.exchange,
                event.routing_key,
                event.headers,
                event.body,
            )
        ]
