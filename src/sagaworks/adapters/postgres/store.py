"""The saga store on PostgreSQL: the hot path of every message.

A batch of messages, one per saga, costs one transaction of four statements
whatever its size: take every saga's advisory lock; record every inbox row
and read every saga; write every transition (instances, history, outbox,
timers) as one statement of data-modifying CTEs over arrays; commit.
Statements go straight to asyncpg (prepared and cached per connection) on
connections of a plain asyncpg pool (`pool.py`): the ORM's unit of work
would triple the CPU per step for nothing we need here.

Every writer of a saga takes `pg_advisory_xact_lock(saga key)` first. That
lock serialises work on a saga that does not exist yet too (a cancellation
racing the order that starts it), which a row lock cannot.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import driver_connection
from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.application.ports import (
    DeadLetter,
    DueTimer,
    InboundMessage,
    LockedSaga,
    OutboxRow,
    ParkedMessage,
    PendingMessage,
    SagaChange,
    SagaClaim,
    TimerFailure,
    encode_raw_fields,
)
from sagaworks.application.stored import lock_key, refuse_repeats, saga_from_row
from sagaworks.domain.decide import HistoryEntry
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = ["PostgresStore"]


# Locks are taken in the order of the array, which the caller sorts: one global order.
_LOCK = """
SELECT count(pg_advisory_xact_lock(k)), set_config('sagaworks.publishes_own_outbox', 'on', true)
FROM unnest($1::bigint[]) AS k
"""

# A statement of its own after the locks: its snapshot then sees every write they waited for.
# A saga still at the version the caller already knows is not sent back (`SagaClaim.known`).
# The inbox read sees the statement's snapshot, not its own insert: a hash only for a duplicate,
# and the body recorded first only for a conflict (another hash), so a duplicate reads no body.
_CLAIM_AND_LOAD = """
WITH claimed AS (
  INSERT INTO inbox (consumer, message_id, saga_id, body_hash, body)
  SELECT c.consumer, c.message_id, c.saga_id, c.body_hash, c.body
  FROM unnest($1::uuid[], $2::text[], $3::text[], $5::bytea[], $6::bytea[])
    AS c(saga_id, consumer, message_id, body_hash, body)
  WHERE c.message_id IS NOT NULL
  ON CONFLICT DO NOTHING
  RETURNING saga_id
)
SELECT s.version, s.version = w.known AS unchanged,
       CASE WHEN s.version = w.known THEN NULL ELSE s.correlation_key END AS correlation_key,
       CASE WHEN s.version = w.known THEN NULL ELSE s.status END AS status,
       CASE WHEN s.version = w.known THEN NULL ELSE s.state::text END AS state,
       CASE WHEN s.version = w.known THEN NULL ELSE s.progress END AS progress,
       EXISTS (SELECT 1 FROM parked_messages p WHERE p.saga_id = w.id) AS has_parked,
       EXISTS (SELECT 1 FROM claimed WHERE claimed.saga_id = w.id) AS claimed,
       i.body_hash AS first_body_hash, i.first_body,
       s.trace_context, s.created_at AS started_at
FROM unnest($1::uuid[], $4::int[], $2::text[], $3::text[], $5::bytea[])
  WITH ORDINALITY AS w(id, known, consumer, message_id, body_hash, ord)
LEFT JOIN saga_instances s ON s.id = w.id
LEFT JOIN LATERAL (
  SELECT i.body_hash, CASE WHEN i.body_hash <> w.body_hash THEN i.body END AS first_body
  FROM inbox i WHERE i.consumer = w.consumer AND i.message_id = w.message_id
) i ON true
ORDER BY w.ord
"""

_LOAD_UNLOCKED = """
SELECT s.correlation_key, s.status, s.state::text AS state, s.version, s.progress
FROM unnest($1::uuid[]) WITH ORDINALITY AS w(id, ord)
LEFT JOIN saga_instances s ON s.id = w.id
ORDER BY w.ord
"""

# Every saga of the batch at once: each array holds one entry per saga (instances) or per
# row (history, outbox, timers); an eager step's outbox row gets its lease (NULL: none).
# History continues each saga's own sequence. Only sagas whose instance row was written get
# the rest, so a stale version writes nothing and is reported.
_SAVE_ALL = """
WITH u AS (
  SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[],
                       $6::timestamptz[], $7::jsonb[], $8::int[], $9::jsonb[], $10::int[],
                       $29::text[])
    AS u(id, saga_type, correlation_key, status, current_step, at, state,
         state_schema_version, progress, version, trace_context)
),
created AS (
  INSERT INTO saga_instances (id, saga_type, correlation_key, status, current_step, state,
                              state_schema_version, version, created_at, updated_at, progress,
                              trace_context)
  SELECT id, saga_type, correlation_key, status, current_step, state, state_schema_version,
         1, at, at, progress, trace_context
  FROM u WHERE version = 1
  RETURNING id
),
updated AS (
  UPDATE saga_instances s
  SET status = u.status, current_step = u.current_step, state = u.state, updated_at = u.at,
      progress = u.progress, version = s.version + 1,
      state_schema_version = u.state_schema_version
  FROM u
  WHERE u.version > 1 AND s.id = u.id AND s.saga_type = u.saga_type
    AND s.correlation_key = u.correlation_key AND s.version = u.version - 1
  RETURNING s.id
),
written AS (SELECT id FROM created UNION ALL SELECT id FROM updated),
h AS (
  INSERT INTO saga_history (saga_id, seq, at, kind, step, message_id, detail)
  SELECT e.saga_id,
         COALESCE((SELECT max(x.seq) FROM saga_history x WHERE x.saga_id = e.saga_id), 0) + e.ord,
         e.at, e.kind, e.step, e.message_id, e.detail
  FROM unnest($11::uuid[], $12::int[], $13::timestamptz[], $14::text[], $15::text[],
              $16::text[], $17::jsonb[])
    AS e(saga_id, ord, at, kind, step, message_id, detail)
  WHERE e.saga_id IN (SELECT id FROM written)
),
o AS (
  INSERT INTO outbox (message_id, saga_id, exchange, routing_key, headers, body, trace_context,
                      lease_until)
  SELECT m.message_id, m.saga_id, m.exchange, m.routing_key, m.headers, m.body, m.trace_context,
         now() + make_interval(secs => m.lease_s)
  FROM unnest($18::uuid[], $19::text[], $20::text[], $21::text[], $22::jsonb[], $23::bytea[],
              $30::text[], $32::float8[])
    AS m(saga_id, message_id, exchange, routing_key, headers, body, trace_context, lease_s)
  WHERE m.saga_id IN (SELECT id FROM written)
  ORDER BY m.message_id
  RETURNING id, message_id
),
tc AS (
  DELETE FROM timers t USING unnest($24::uuid[], $25::text[]) AS c(saga_id, name)
  WHERE t.saga_id = c.saga_id AND t.name = c.name AND c.saga_id IN (SELECT id FROM written)
),
ts AS (
  INSERT INTO timers (saga_id, name, fire_at, trace_context)
  SELECT t.saga_id, t.name, t.fire_at, t.trace_context
  FROM unnest($26::uuid[], $27::text[], $28::timestamptz[], $31::text[])
    AS t(saga_id, name, fire_at, trace_context)
  WHERE t.saga_id IN (SELECT id FROM written)
  ON CONFLICT (saga_id, name) DO UPDATE
  SET fire_at = EXCLUDED.fire_at, attempts = 0, last_error = NULL, parked_at = NULL,
      trace_context = EXCLUDED.trace_context
)
SELECT ARRAY(SELECT id FROM written) AS written, o.id, o.message_id
FROM (SELECT 1) AS one LEFT JOIN o ON true
"""

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
# Only events with no saga, or whose saga ended: one kept for a living saga waits for it.
_EXPIRE_PARKED = """
WITH expired AS (
  DELETE FROM parked_messages WHERE id IN (
    SELECT p.id FROM parked_messages p WHERE p.expires_at <= $1
    AND NOT EXISTS (SELECT 1 FROM saga_instances s WHERE s.id = p.saga_id
                    AND s.status IN ('running', 'compensating', 'needs_attention'))
    ORDER BY p.expires_at LIMIT $2 FOR UPDATE OF p SKIP LOCKED)
  RETURNING id, consumer, saga_type, headers, body, reason, expires_at, message_id, message_type
),
forgotten AS (
  DELETE FROM inbox USING expired
  WHERE inbox.consumer = expired.consumer AND inbox.message_id = expired.message_id
)
SELECT id, saga_type, headers, body, reason, expires_at, message_id, message_type FROM expired
"""

# A paused saga fires no timer: its due timers wait, unclaimed, until it is unpaused.
_DUE_TIMERS = """
SELECT t.id, t.saga_id, t.name, t.attempts, s.saga_type, t.fire_at, t.trace_context
FROM timers t JOIN saga_instances s ON s.id = t.saga_id
WHERE t.fire_at <= $1 AND t.parked_at IS NULL
  AND s.progress->'paused' IS DISTINCT FROM 'true'::jsonb
ORDER BY t.fire_at LIMIT 20
"""

# After the failed application rolled back: count it, then back off (`$4`) or park (`$4` NULL).
_TIMER_FAILED = """
UPDATE timers
SET attempts = $2, last_error = $3, fire_at = COALESCE($4, fire_at),
    parked_at = CASE WHEN $4::timestamptz IS NULL THEN $5::timestamptz END
WHERE id = $1
"""

# An input that changed nothing (an ignored event) still leaves its trace in the history.
_APPEND_HISTORY = """
INSERT INTO saga_history (saga_id, seq, at, kind, step, message_id, detail)
SELECT $1, COALESCE((SELECT max(x.seq) FROM saga_history x WHERE x.saga_id = $1), 0) + e.ord,
       $2, e.kind, e.step, e.message_id, e.detail
FROM unnest($3::text[], $4::text[], $5::text[], $6::jsonb[]) WITH ORDINALITY
  AS e(kind, step, message_id, detail, ord)
"""

_CLAIM_TIMER = "DELETE FROM timers WHERE id = $1 RETURNING id"

_DEAD_LETTER = """
INSERT INTO dead_letters (message_id, queue, exchange, routing_key, message_type, saga_type,
                          headers, body, reason, exception_type, exception_message, handler,
                          fingerprint, first_failed_at, last_failed_at, raw_fields,
                          body_length, body_sha256, first_body)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $14, $15, $16, $17, $18)
ON CONFLICT (queue, message_id) DO UPDATE
SET times_failed = dead_letters.times_failed + 1, last_failed_at = EXCLUDED.last_failed_at,
    reason = EXCLUDED.reason, exception_type = EXCLUDED.exception_type,
    exception_message = EXCLUDED.exception_message, fingerprint = EXCLUDED.fingerprint,
    handler = EXCLUDED.handler, headers = EXCLUDED.headers, status = 'active'
WHERE dead_letters.headers IS DISTINCT FROM EXCLUDED.headers
"""

_CLAIM_UNPUBLISHED = """
SELECT id, message_id, exchange, routing_key, headers, body, trace_context, created_at
FROM outbox
WHERE published_at IS NULL AND created_at <= now() - make_interval(secs => $2)
  AND (lease_until IS NULL OR lease_until <= now())
ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
"""

_MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE id = ANY($1::bigint[])"


def _parked(row: asyncpg.Record) -> ParkedMessage:
    inbound = InboundMessage.from_meta(
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
        trace_context=row["trace_context"],
        created_at=row["created_at"],
    )


def _instance(definition: SagaDefinition[Any], saga_id: UUID, row: asyncpg.Record) -> SagaInstance:
    return saga_from_row(
        definition,
        saga_id,
        correlation_key=row["correlation_key"],
        status=row["status"],
        state=row["state"],
        version=row["version"],
        progress=row["progress"],
    )


class _SaveColumns:
    """The `_SAVE_ALL` arrays: one entry per saga, or per history, outbox or timer row."""

    def __init__(self) -> None:
        self.ids: list[UUID] = []
        self._sagas: list[tuple[Any, ...]] = []
        self._history: list[tuple[Any, ...]] = []
        self._outbox: list[tuple[Any, ...]] = []
        self._pending: list[tuple[PendingMessage, datetime]] = []
        self._cancelled: list[tuple[Any, ...]] = []
        self._timers: list[tuple[Any, ...]] = []

    def add(self, change: SagaChange) -> None:
        definition, decision = change.definition, change.decision
        instance = decision.instance
        assert instance is not None
        assert decision.outcome == "applied"
        saga_id, at = instance.id, decision.at
        current = (
            definition.steps[instance.position].name
            if instance.position < len(definition.steps)
            else None
        )
        self.ids.append(saga_id)
        self._sagas.append(
            (
                definition.name,
                instance.correlation_key,
                instance.status.value,
                current,
                at,
                instance.state.model_dump_json(),
                definition.state_version,
                json.dumps(instance.progress_json()),
                instance.version,
                change.trace_context,
            )
        )
        self._history.extend(
            (saga_id, n, at, h.kind, h.step, h.message_id, json.dumps(h.detail, default=str))
            for n, h in enumerate(decision.history, start=1)
        )
        for p in change.outbox:
            self._pending.append((p, at))
            self._outbox.append(
                (
                    saga_id,
                    p.message_id,
                    p.exchange,
                    p.routing_key,
                    json.dumps(p.headers),
                    p.body,
                    p.trace_context,
                    p.lease_s,
                )
            )
        cancelled = set(decision.cancel_timers) - {t.name for t in decision.set_timers}
        self._cancelled.extend((saga_id, name) for name in sorted(cancelled))
        self._timers.extend(
            (saga_id, t.name, t.fire_at, change.trace_context) for t in decision.set_timers
        )

    def outbox_rows(self, ids: dict[str, int]) -> list[OutboxRow]:
        """The rows written, in id order, from what was sent rather than read back."""
        rows = [
            OutboxRow(
                ids[p.message_id],
                p.message_id,
                p.exchange,
                p.routing_key,
                p.headers,
                p.body,
                p.trace_context,
                at,
            )
            for p, at in self._pending
            if p.message_id in ids
        ]
        return sorted(rows, key=lambda r: r.id)

    def args(self) -> list[list[Any]]:
        """`$1`..`$32`: each table's columns; the trace contexts, then the leases, last."""
        sagas = _columns(self._sagas, 10)
        outbox = _columns(self._outbox, 8)
        timers = _columns(self._timers, 4)
        return [
            self.ids,
            *sagas[:9],
            *_columns(self._history, 7),
            *outbox[:6],
            *_columns(self._cancelled, 2),
            *timers[:3],
            sagas[9],
            outbox[6],
            timers[3],
            outbox[7],
        ]


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)] if rows else [[]] * width


def _locked_instance(claim: SagaClaim, row: asyncpg.Record) -> SagaInstance | None:
    if row["unchanged"]:
        return claim.known
    if row["version"] is None:
        return None
    return _instance(claim.definition, claim.saga_id, row)


def _locked(claim: SagaClaim, row: asyncpg.Record) -> LockedSaga:
    duplicate = claim.message_id is not None and not row["claimed"]
    first, first_body = row["first_body_hash"], row["first_body"]
    return LockedSaga(
        _locked_instance(claim, row),
        duplicate,
        bool(row["has_parked"]),
        bytes(first) if duplicate and first is not None else None,
        bytes(first_body) if duplicate and first_body is not None else None,
        row["trace_context"],
        row["started_at"],
    )


class _Transaction:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self._conn = conn
        self._written: list[OutboxRow] = []

    async def lock_saga(
        self,
        definition: SagaDefinition[Any],
        saga_id: UUID,
        *,
        message_id: str | None = None,
        body_hash: bytes | None = None,
        body: bytes | None = None,
    ) -> LockedSaga:
        claim = SagaClaim(definition, saga_id, message_id, body_hash=body_hash, body=body)
        return (await self.lock_sagas([claim]))[0]

    async def lock_sagas(self, claims: Sequence[SagaClaim]) -> list[LockedSaga]:
        ids = [c.saga_id for c in claims]
        refuse_repeats(ids)
        await self._conn.fetchval(_LOCK, sorted(lock_key(i) for i in ids))
        rows = await self._conn.fetch(
            _CLAIM_AND_LOAD,
            ids,
            [c.definition.name for c in claims],
            [c.message_id for c in claims],
            [None if c.known is None else c.known.version for c in claims],
            [c.body_hash for c in claims],
            [c.body for c in claims],
        )
        return [_locked(c, row) for c, row in zip(claims, rows, strict=True)]

    async def save(self, change: SagaChange) -> None:
        await self.save_all([change])

    async def save_all(self, changes: Sequence[SagaChange]) -> None:
        columns = _SaveColumns()
        for change in changes:
            columns.add(change)
        refuse_repeats(columns.ids)
        rows = await self._conn.fetch(_SAVE_ALL, *columns.args())
        stale = set(columns.ids) - set(rows[0]["written"])
        if stale:
            raise RuntimeError(
                f"saga(s) {', '.join(sorted(map(str, stale)))} changed under its lock "
                "(stale version); another writer bypassed the advisory lock"
            )
        self._written.extend(columns.outbox_rows({r["message_id"]: r["id"] for r in rows}))

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
            json.dumps(message.meta(), default=str),
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
                "SELECT pg_try_advisory_xact_lock($1)", lock_key(row["saga_id"])
            ):
                continue
            if await self._conn.fetchval(_CLAIM_TIMER, row["id"]) is None:
                continue
            return DueTimer(
                row["id"],
                row["saga_type"],
                row["saga_id"],
                row["name"],
                row["attempts"],
                row["fire_at"],
                row["trace_context"],
            )
        return None

    async def record_timer_failure(self, failure: TimerFailure) -> None:
        await self._conn.execute(
            _TIMER_FAILED,
            failure.timer.id,
            failure.attempts,
            failure.error,
            failure.retry_at,
            failure.at,
        )

    async def append_history(
        self, saga_id: UUID, at: datetime, entries: Sequence[HistoryEntry]
    ) -> None:
        await self._conn.execute(
            _APPEND_HISTORY,
            saga_id,
            at,
            [h.kind for h in entries],
            [h.step for h in entries],
            [h.message_id for h in entries],
            [json.dumps(h.detail, default=str) for h in entries],
        )

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
            json.dumps(dict(inbound.headers), default=str),
            inbound.body,
            letter.reason,
            letter.exception_type,
            letter.exception_message,
            letter.handler,
            letter.fingerprint,
            now,
            json.dumps(encode_raw_fields(inbound.raw_fields)) if inbound.raw_fields else None,
            None if letter.whole_body is None else letter.whole_body.length,
            None if letter.whole_body is None else letter.whole_body.sha256,
            letter.first_body,
        )

    def written_outbox(self) -> list[OutboxRow]:
        return list(self._written)


class PostgresStore:
    def __init__(self, engine: AsyncEngine, pool: ConnectionPool | None = None) -> None:
        self._engine = engine
        self._pool = pool
        """The hot path's own asyncpg pool (see `pool.py`); without it, the engine's."""

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is not None:
            async with self._pool.acquire() as pooled:
                yield pooled
            return
        async with driver_connection(self._engine) as conn:
            yield conn

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        async with self._connection() as conn, conn.transaction():
            yield _Transaction(conn)

    async def load_sagas(
        self, wanted: Sequence[tuple[SagaDefinition[Any], UUID]]
    ) -> list[SagaInstance | None]:
        async with self._connection() as conn:
            rows = await conn.fetch(_LOAD_UNLOCKED, [saga_id for _, saga_id in wanted])
        return [
            None if row["status"] is None else _instance(definition, saga_id, row)
            for (definition, saga_id), row in zip(wanted, rows, strict=True)
        ]

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
