"""Retention on PostgreSQL: batched deletes by a key subquery, each in a short transaction.

PostgreSQL has no `DELETE … LIMIT`: each batch selects at most `limit` keys
(`FOR UPDATE SKIP LOCKED`: a row the hot path holds is left for the next
run, never waited for) and deletes them. Every batch is its own transaction
under a `lock_timeout`, so a prune never holds a lock for longer than one
batch and never queues behind the workers for long. A finished saga is
deleted only under its advisory lock, tried (`pg_try_advisory_xact_lock`), so
no worker is between reading and writing it; its history and timers go with
it (`ON DELETE CASCADE`; the history's append-only trigger allows exactly
that).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import driver_connection
from sagaworks.application.ports import Prunable

__all__ = ["PRUNE_LOCK", "PostgresRetention"]

PRUNE_LOCK = (0x5A6A, 0x0001)
"""The two-key advisory lock one pruner at a time holds (a key space apart from sagas' locks)."""

_LOCK_TIMEOUT = "2s"
_STATEMENT_TIMEOUT = "60s"

_FINISHED = "status IN ('completed', 'compensated') AND updated_at < $1"
_SETTLED_LETTER = (
    "status IN ('replayed', 'archived') AND last_failed_at < $1 AND NOT EXISTS "
    "(SELECT 1 FROM dead_letter_audit a WHERE a.dead_letter_id = dead_letters.id AND a.at >= $1)"
)
_OLD: dict[Prunable, tuple[str, str]] = {
    Prunable.INBOX: ("inbox", "processed_at < $1"),
    Prunable.OUTBOX: ("outbox", "published_at < $1"),
    Prunable.SAGAS: ("saga_instances", _FINISHED),
    Prunable.DEAD_LETTERS: ("dead_letters", _SETTLED_LETTER),
    Prunable.BREAKERS: ("port_breakers", "changed_at < $1"),
}
"""(table, which of its rows are old enough) for each kind: fixed text, never input."""

_COUNT = {what: f"SELECT count(*) FROM {table} WHERE {old}" for what, (table, old) in _OLD.items()}  # noqa: S608

_DELETE: dict[Prunable, str] = {
    Prunable.INBOX: """
        DELETE FROM inbox WHERE (consumer, message_id) IN (
            SELECT consumer, message_id FROM inbox WHERE processed_at < $1
            ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED)
    """,
    Prunable.OUTBOX: """
        DELETE FROM outbox WHERE id IN (
            SELECT id FROM outbox WHERE published_at < $1
            ORDER BY id LIMIT $2 FOR UPDATE SKIP LOCKED)
    """,
    # The advisory lock key is `stored.lock_key` in SQL: the first 8 bytes of the saga id.
    Prunable.SAGAS: """
        WITH candidates AS (
            SELECT id FROM saga_instances
            WHERE status IN ('completed', 'compensated') AND updated_at < $1
            LIMIT $2 FOR UPDATE SKIP LOCKED
        ), unlocked AS (
            SELECT id FROM candidates WHERE pg_try_advisory_xact_lock(
                ('x' || substr(replace(id::text, '-', ''), 1, 16))::bit(64)::bigint)
        )
        DELETE FROM saga_instances s USING unlocked u
        WHERE s.id = u.id AND s.status IN ('completed', 'compensated') AND s.updated_at < $1
    """,
    Prunable.DEAD_LETTERS: """
        DELETE FROM dead_letters WHERE id IN (
            SELECT d.id FROM dead_letters d
            WHERE d.status IN ('replayed', 'archived') AND d.last_failed_at < $1
              AND NOT EXISTS (SELECT 1 FROM dead_letter_audit a
                              WHERE a.dead_letter_id = d.id AND a.at >= $1)
            LIMIT $2 FOR UPDATE OF d SKIP LOCKED)
    """,
    Prunable.BREAKERS: """
        DELETE FROM port_breakers WHERE (port, worker) IN (
            SELECT port, worker FROM port_breakers WHERE changed_at < $1
            LIMIT $2 FOR UPDATE SKIP LOCKED)
    """,
}


class PostgresRetention:
    """Implements `Retention`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def count(self, what: Prunable, before: datetime) -> int:
        async with driver_connection(self._engine) as conn:
            found: int = await conn.fetchval(_COUNT[what], before)
        return found

    async def delete_batch(self, what: Prunable, before: datetime, limit: int) -> int:
        async with driver_connection(self._engine) as conn, conn.transaction():
            await conn.execute(
                f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'; "
                f"SET LOCAL statement_timeout = '{_STATEMENT_TIMEOUT}'"
            )
            status = await conn.execute(_DELETE[what], before, limit)
        return int(status.rsplit(" ", 1)[-1])

    @asynccontextmanager
    async def exclusively(self) -> AsyncIterator[bool]:
        async with driver_connection(self._engine) as conn:
            taken = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *PRUNE_LOCK))
            try:
                yield taken
            finally:
                if taken:
                    await conn.execute("SELECT pg_advisory_unlock($1, $2)", *PRUNE_LOCK)
