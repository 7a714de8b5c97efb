"""Worker heartbeats in PostgreSQL: one upsert per beat, one delete on a graceful stop."""

from __future__ import annotations

from sqlalchemy import delete, func
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.tables import worker_heartbeats
from sagaworks.application.ports import Heartbeat

__all__ = ["PostgresHeartbeats"]


class PostgresHeartbeats:
    """Implements `HeartbeatLog`; `last_beat_at` is the database's clock, as the views' `now()`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def beat(self, heartbeat: Heartbeat) -> None:
        values = {
            "worker": heartbeat.worker,
            "host": heartbeat.host,
            "pid": heartbeat.pid,
            "version": heartbeat.version,
            "sagas": list(heartbeat.sagas),
            "ports": list(heartbeat.ports),
            "started_at": heartbeat.started_at,
            "last_beat_at": func.now(),
            "beat_interval_s": heartbeat.beat_interval_s,
            "in_flight": heartbeat.in_flight,
            "breakers": dict(heartbeat.breakers),
            "queue_depths": {
                queue: {"messages": depth.messages, "consumers": depth.consumers}
                for queue, depth in heartbeat.queue_depths.items()
            },
        }
        statement = insert(worker_heartbeats).values(values)
        refreshed = {name: statement.excluded[name] for name in values if name != "worker"}
        async with self._engine.begin() as conn:
            await conn.execute(
                statement.on_conflict_do_update(
                    index_elements=[worker_heartbeats.c.worker], set_=refreshed
                )
            )

    async def remove(self, worker: str) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(worker_heartbeats).where(worker_heartbeats.c.worker == worker)
            )
