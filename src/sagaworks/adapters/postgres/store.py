"""The saga store on PostgreSQL: the hot path of every message.

Each handled message costs one transaction of four statements: take the
saga's advisory lock and record the inbox row; read the saga; write the
transition (instance, history, outbox, timers) as one statement of
data-modifying CTEs; commit. Statements go straight to asyncpg (prepared and
cached per connection) on connections of a plain asyncpg pool (`pool.py`): the ORM's unit
of work would triple the CPU per step for nothing we need here.

Every writer of a saga takes `pg_advisory_xact_lock(saga key)` first. That
lock serialises work on a saga that does not exist yet too (a cancellation
racing the order that starts it), which a row lock cannot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any, cast
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.application.dead_letters import envelope_headers
from sagaworks.application.ports import (
    DeadLetter,
    DueTimer,
    InboundMessage,
    LockedSaga,
    OutboxRow,
    ParkedMessage,
)
from sagaworks.application.stored import fingerprint, inbound_from_meta, inbound_meta
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import Decision
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import InFlight, SagaInstance, Status

__all__ = ["PostgresStore", "advisory_key"]


def advisory_key(saga_id: UUID) -> int:
    """A signed 64-bit lock key from the saga id."""
    return int.from_bytes(saga_id.bytes[:8], "big", signed=True)


_LOCK_AND_CLAIM = """
WITH lock AS (
  SELECT pg_advisory_xact_lock($1), set_config('sagaworks.publishes_own_outbox', 'on', true)
)
INSERT INTO inbox (consumer, message_id, saga_id)
SELECT $2, $3, $4 FROM lock
ON CONFLICT DO NOTHING
RETURNING 1
"""

_LOCK = """
SELECT pg_advisory_xact_lock($1), set_config('sagaworks.publishes_own_outbox', 'on', true)
"""

_LOAD = """
SELECT s.correlation_key, s.status, s.state, s.version, s.progress,
       EXISTS (SELECT 1 FROM parked_messages p WHERE p.saga_id = $1) AS has_parked
FROM (SELECT 1) AS one LEFT JOIN saga_instances s ON s.id = $1
"""

_LOAD_UNLOCKED = """
SELECT correlation_key, status, state, version, progress FROM saga_instances WHERE id = $1
"""

_WRITE_TAIL = """
h AS (
  INSERT INTO saga_history (saga_id, seq, at, kind, step, message_id, detail)
  SELECT $1, base.m + e.ord, $6, e.kind, e.step, e.message_id, e.detail
  FROM s,
       (SELECT COALESCE(max(seq), 0) AS m FROM saga_history WHERE saga_id = $1) AS base,
       unnest($8::text[], $9::text[], $10::text[], $11::jsonb[])
         WITH ORDINALITY AS e(kind, step, message_id, detail, ord)
),
o AS (
  INSERT INTO outbox (message_id, saga_id, exchange, routing_key, headers, body)
  SELECT m.message_id, $1, m.exchange, m.routing_key, m.headers, m.body
  FROM s, unnest($12::text[], $13::text[], $14::text[], $15::jsonb[], $16::bytea[])
         AS m(message_id, exchange, routing_key, headers, body)
  ORDER BY m.message_id
  RETURNING id, message_id, exchange, routing_key, headers, body
),
tc AS (
  DELETE FROM timers WHERE saga_id = $1 AND name = ANY($17::text[]) AND EXISTS (SELECT 1 FROM s)
),
ts AS (
  INSERT INTO timers (saga_id, name, fire_at)
  SELECT $1, t.name, t.fire_at FROM s, unnest($18::text[], $19::timestamptz[]) AS t(name, fire_at)
  ON CONFLICT (saga_id, name) DO UPDATE SET fire_at = EXCLUDED.fire_at
)
SELECT (SELECT count(*) FROM s) AS written, o.id, o.message_id, o.exchange, o.routing_key,
       o.headers, o.body
FROM (SELECT 1) AS one LEFT JOIN o ON true
"""

_INSERT_HEAD = """
WITH s AS (
  INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                              state_schema_version, version, created_at, updated_at, progress)
  VALUES ($1, $2, $3, $4, $5, $7, $20, 1, $6, $6, $21)
  RETURNING id
),"""

_UPDATE_HEAD = """
WITH s AS (
  UPDATE saga_instances
  SET status = $4, current_step = $5, state = $7, updated_at = $6, progress = $21,
      version = version + 1, state_schema_version = $20
  WHERE id = $1 AND saga_type = $2 AND correlation_key = $3 AND version = $22 - 1
  RETURNING id
),"""

_INSERT_SAGA = "".join((_INSERT_HEAD, _WRITE_TAIL))
_UPDATE_SAGA = "".join((_UPDATE_HEAD, _WRITE_TAIL))

_PARK = """
INSERT INTO parked_messages (consumer, saga_type, saga_id, correlation_key, message_id,
                             message_type, headers, body, reason, expires_at)
VALUES ($1, $1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (consumer, message_id) DO NOTHING
"""

_PARKED_FOR = """
SELECT id, saga_type, headers, body, reason, expires_at, message_id, message_type
FROM parked_messages WHERE saga_id = $1 ORDER BY id FOR UPDATE
"""

# An expired message was never applied: its inbox row goes too, so a replay is not a duplicate.
_EXPIRE_PARKED = """
WITH expired AS (
  DELETE FROM parked_messages WHERE id IN (
    SELECT id FROM parked_messages WHERE expires_at <= $1
    ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED)
  RETURNING id, consumer, saga_type, headers, body, reason, expires_at, message_id, message_type
),
forgotten AS (
  DELETE FROM inbox USING expired
  WHERE inbox.consumer = expired.consumer AND inbox.message_id = expired.message_id
)
SELECT id, saga_type, headers, body, reason, expires_at, message_id, message_type FROM expired
"""

_DUE_TIMERS = """
SELECT t.id, t.saga_id, t.name, s.saga_type
FROM timers t JOIN saga_instances s ON s.id = t.saga_id
WHERE t.fire_at <= $1 ORDER BY t.fire_at LIMIT 20
"""

_CLAIM_TIMER = "DELETE FROM timers WHERE id = $1 RETURNING id"

_DEAD_LETTER = """
INSERT INTO dead_letters (message_id, queue, exchange, routing_key, message_type, saga_type,
                          headers, body, reason, exception_type, exception_message, handler,
                          fingerprint, first_failed_at, last_failed_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14)
ON CONFLICT (queue, message_id) DO UPDATE
SET times_failed = dead_letters.times_failed + 1, last_failed_at = EXCLUDED.last_failed_at,
    reason = EXCLUDED.reason, exception_type = EXCLUDED.exception_type,
    exception_message = EXCLUDED.exception_message, fingerprint = EXCLUDED.fingerprint,
    handler = EXCLUDED.handler, headers = EXCLUDED.headers, status = 'active'
WHERE dead_letters.headers IS DISTINCT FROM EXCLUDED.headers
"""

_CLAIM_UNPUBLISHED = """
SELECT id, message_id, exchange, routing_key, headers, body FROM outbox
WHERE published_at IS NULL AND created_at <= now() - make_interval(secs => $2)
ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""

_MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"


def _parked(row: asyncpg.Record) -> ParkedMessage:
    inbound = inbound_from_meta(
        row["message_id"], row["message_type"], bytes(row["body"]), row["headers"]
    )
    return ParkedMessage(row["id"], row["saga_type"], inbound, row["reason"], row["expires_at"])


def _outbox_row(row: asyncpg.Record) -> OutboxRow:
    return OutboxRow(
        id=row["id"],
        message_id=row["message_id"],
        exchange=row["exchange"],
        routing_key=row["routing_key"],
        headers=row["headers"],
        body=bytes(row["body"]),
    )


def _instance(definition: SagaDefinition[Any], saga_id: UUID, row: asyncpg.Record) -> SagaInstance:
    progress = row["progress"]
    flight = progress.get("in_flight")
    return SagaInstance(
        id=saga_id,
        saga_type=definition.name,
        correlation_key=row["correlation_key"],
        correlation_id=progress.get("correlation_id") or row["correlation_key"],
        status=Status(row["status"]),
        position=int(progress["position"]),
        state=definition.state.model_validate(row["state"]),
        version=row["version"],
        in_flight=InFlight.from_json(flight) if flight else None,
        done=tuple(progress.get("done", ())),
        reason=progress.get("reason"),
        error=progress.get("error"),
    )


class _Transaction:
    def __init__(self, conn: asyncpg.Connection, wire: Wire) -> None:
        self._conn = conn
        self._wire = wire
        self._written: list[OutboxRow] = []

    async def lock_saga(
        self, definition: SagaDefinition[Any], saga_id: UUID, *, message_id: str | None = None
    ) -> LockedSaga:
        key = advisory_key(saga_id)
        duplicate = False
        if message_id is None:
            await self._conn.execute(_LOCK, key)
        else:
            claimed = await self._conn.fetchval(
                _LOCK_AND_CLAIM, key, definition.name, message_id, saga_id
            )
            duplicate = claimed is None
        row = await self._conn.fetchrow(_LOAD, saga_id)
        assert row is not None
        instance = None if row["status"] is None else _instance(definition, saga_id, row)
        return LockedSaga(instance, duplicate, bool(row["has_parked"]))

    async def save(self, definition: SagaDefinition[Any], decision: Decision) -> None:
        instance = decision.instance
        assert instance is not None
        assert decision.outcome == "applied"
        cancelled = set(decision.cancel_timers) - {t.name for t in decision.set_timers}
        pending = [self._wire.encode(o) for o in decision.outgoing]
        current = (
            definition.steps[instance.position].name
            if instance.position < len(definition.steps)
            else None
        )
        args = (
            instance.id,
            definition.name,
            instance.correlation_key,
            instance.status.value,
            current,
            decision.at,
            instance.state.model_dump_json(),
            [h.kind for h in decision.history],
            [h.step for h in decision.history],
            [h.message_id for h in decision.history],
            [json.dumps(h.detail, default=str) for h in decision.history],
            [p.message_id for p in pending],
            [p.exchange for p in pending],
            [p.routing_key for p in pending],
            [json.dumps(p.headers) for p in pending],
            [p.body for p in pending],
            sorted(cancelled),
            [t.name for t in decision.set_timers],
            [t.fire_at for t in decision.set_timers],
            definition.state_version,
            json.dumps(instance.progress_json()),
        )
        if instance.version == 1:
            rows = await self._conn.fetch(_INSERT_SAGA, *args)
        else:
            rows = await self._conn.fetch(_UPDATE_SAGA, *args, instance.version)
        if not rows or rows[0]["written"] != 1:
            raise RuntimeError(
                f"saga {instance.id} changed under its lock (expected version "
                f"{instance.version - 1}); another writer bypassed the advisory lock"
            )
        self._written.extend(_outbox_row(r) for r in rows if r["id"] is not None)

    async def park(
        self,
        saga_type: str,
        saga_id: UUID,
        correlation_key: str,
        message: InboundMessage,
        reason: str,
        expires_at: datetime,
    ) -> None:
        await self._conn.execute(
            _PARK,
            saga_type,
            saga_id,
            correlation_key,
            message.message_id,
            message.message_type,
            json.dumps(inbound_meta(message), default=str),
            message.body,
            reason,
            expires_at,
        )

    async def parked_for(self, saga_id: UUID) -> list[ParkedMessage]:
        return [_parked(r) for r in await self._conn.fetch(_PARKED_FOR, saga_id)]

    async def unpark(self, ids: Sequence[int]) -> None:
        await self._conn.execute(
            "DELETE FROM parked_messages WHERE id = ANY($1::bigint[])", list(ids)
        )

    async def claim_due_timer(self, now: datetime) -> DueTimer | None:
        for row in await self._conn.fetch(_DUE_TIMERS, now):
            if not await self._conn.fetchval(
                "SELECT pg_try_advisory_xact_lock($1)", advisory_key(row["saga_id"])
            ):
                continue
            if await self._conn.fetchval(_CLAIM_TIMER, row["id"]) is None:
                continue
            return DueTimer(row["id"], row["saga_type"], row["saga_id"], row["name"])
        return None

    async def expire_parked(self, now: datetime, limit: int) -> list[ParkedMessage]:
        return [_parked(r) for r in await self._conn.fetch(_EXPIRE_PARKED, now, limit)]

    async def dead_letter(self, letter: DeadLetter, now: datetime) -> None:
        inbound = letter.inbound
        await self._conn.execute(
            _DEAD_LETTER,
            inbound.message_id,
            inbound.queue,
            inbound.exchange,
            inbound.routing_key,
            inbound.message_type or None,
            letter.saga_type,
            json.dumps(envelope_headers(inbound), default=str),
            inbound.body,
            letter.reason,
            letter.exception_type,
            letter.exception_message,
            letter.handler,
            fingerprint(
                letter.reason, letter.exception_type, letter.exception_message, letter.handler
            ),
            now,
        )

    def written_outbox(self) -> list[OutboxRow]:
        return list(self._written)


class PostgresStore:
    def __init__(self, engine: AsyncEngine, wire: Wire, pool: ConnectionPool | None = None) -> None:
        self._engine = engine
        self._wire = wire
        self._pool = pool
        """The hot path's own asyncpg pool (see `pool.py`); without it, the engine's."""

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is not None:
            async with self._pool.acquire() as pooled:
                yield pooled
            return
        async with self._engine.connect() as conn:
            raw = await conn.get_raw_connection()
            yield cast(asyncpg.Connection, raw.driver_connection)

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        async with self._connection() as conn, conn.transaction():
            yield _Transaction(conn, self._wire)

    async def load_saga(
        self, definition: SagaDefinition[Any], saga_id: UUID
    ) -> SagaInstance | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_LOAD_UNLOCKED, saga_id)
        return None if row is None else _instance(definition, saga_id, row)

    @asynccontextmanager
    async def claim_unpublished(
        self, limit: int, older_than_s: float
    ) -> AsyncIterator[list[OutboxRow]]:
        async with self._connection() as conn, conn.transaction():
            rows = [
                _outbox_row(r) for r in await conn.fetch(_CLAIM_UNPUBLISHED, limit, older_than_s)
            ]
            yield rows
            if rows:
                await conn.execute(_MARK_PUBLISHED, [r.id for r in rows])

    async def mark_published(self, ids: Sequence[int]) -> None:
        async with self._connection() as conn:
            await conn.execute(_MARK_PUBLISHED, list(ids))
