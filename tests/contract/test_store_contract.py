"""The store contract, run against the in-memory store (unit) and PostgreSQL (integration).

PostgreSQL runs twice: on the SQLAlchemy engine's connections, and on the
store's own asyncpg pool as `bootstrap` wires it for workers.

Each PostgreSQL case gets a fresh migrated database, so claims over the
whole outbox or every dead letter see only what the case wrote.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any
from uuid import UUID

import pytest
from contract_wire import contract_wire
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from store_contract import (
    Backend,
    DeadLetterRow,
    HistoryRow,
    StoreContract,
    TimerRow,
)

from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.adapters.postgres.store import PostgresStore

_DEAD_LETTER_COLUMNS = (
    "id, message_id, queue, exchange, routing_key, message_type, saga_type, headers, body, "
    "reason, exception_type, exception_message, handler, fingerprint, first_failed_at, "
    "last_failed_at, times_failed, status, first_body"
)


class MemoryProbe:
    def __init__(self, store: InMemoryStore) -> None:
        self._store = store

    async def history(self, saga_id: UUID) -> list[HistoryRow]:
        return [
            HistoryRow(r.seq, r.kind, r.step, r.message_id) for r in self._store.history(saga_id)
        ]

    async def timers(self, saga_id: UUID) -> dict[str, TimerRow]:
        return {
            t.name: TimerRow(t.id, t.fire_at, t.attempts, t.last_error, t.parked_at)
            for t in self._store.timers(saga_id)
        }

    async def published_at(self, outbox_id: int) -> datetime | None:
        (record,) = [r for r in self._store.outbox() if r.id == outbox_id]
        return record.published_at

    async def dead_letters(self) -> list[DeadLetterRow]:
        return [
            DeadLetterRow(
                d.id,
                d.message_id,
                d.queue,
                d.exchange,
                d.routing_key,
                d.message_type,
                d.saga_type,
                d.headers,
                d.body,
                d.reason,
                d.exception_type,
                d.exception_message,
                d.handler,
                d.fingerprint,
                d.first_failed_at,
                d.last_failed_at,
                d.times_failed,
                d.status,
                d.first_body,
            )
            for d in self._store.dead_letters()
        ]

    async def parked_ids(self) -> list[int]:
        return [p.id for p in self._store.parked()]

    async def inbox(self) -> set[tuple[str, str]]:
        return set(self._store.inbox())

    async def saga_version(self, saga_id: UUID) -> int | None:
        record = self._store.saga_record(saga_id)
        return None if record is None else record.version


class PostgresProbe:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def _rows(self, sql: str, **params: Any) -> list[Any]:
        async with self._engine.connect() as conn:
            return list((await conn.execute(text(sql), params)).all())

    async def history(self, saga_id: UUID) -> list[HistoryRow]:
        rows = await self._rows(
            "SELECT seq, kind, step, message_id FROM saga_history WHERE saga_id = :s ORDER BY seq",
            s=saga_id,
        )
        return [HistoryRow(*r) for r in rows]

    async def timers(self, saga_id: UUID) -> dict[str, TimerRow]:
        rows = await self._rows(
            "SELECT name, id, fire_at, attempts, last_error, parked_at FROM timers "
            "WHERE saga_id = :s",
            s=saga_id,
        )
        return {name: TimerRow(*rest) for name, *rest in rows}

    async def published_at(self, outbox_id: int) -> datetime | None:
        (row,) = await self._rows("SELECT published_at FROM outbox WHERE id = :i", i=outbox_id)
        published: datetime | None = row[0]
        return published

    async def dead_letters(self) -> list[DeadLetterRow]:
        rows = await self._rows(f"SELECT {_DEAD_LETTER_COLUMNS} FROM dead_letters ORDER BY id")
        return [DeadLetterRow(*r) for r in rows]

    async def parked_ids(self) -> list[int]:
        return [r[0] for r in await self._rows("SELECT id FROM parked_messages ORDER BY id")]

    async def inbox(self) -> set[tuple[str, str]]:
        return {(c, m) for c, m in await self._rows("SELECT consumer, message_id FROM inbox")}

    async def saga_version(self, saga_id: UUID) -> int | None:
        rows = await self._rows("SELECT version FROM saga_instances WHERE id = :s", s=saga_id)
        return rows[0][0] if rows else None


@pytest.fixture(
    params=[
        pytest.param("memory", marks=pytest.mark.unit),
        pytest.param("postgres", marks=pytest.mark.integration),
        pytest.param("postgres-pool", marks=pytest.mark.integration),
    ]
)
def backend_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def database_url(request: pytest.FixtureRequest, backend_kind: str) -> str | None:
    """A fresh migrated database for the PostgreSQL backend; nothing for the memory one."""
    if not backend_kind.startswith("postgres"):
        return None
    url: str = request.getfixturevalue("migrated_database_url")
    return url


@pytest.fixture
async def backend(backend_kind: str, database_url: str | None) -> AsyncIterator[Backend]:
    wire = contract_wire()
    if database_url is None:
        store = InMemoryStore()
        yield Backend(backend_kind, store, MemoryProbe(store), wire)
        return
    engine = create_engine(database_url, pool_size=5, max_overflow=5)
    # "postgres-pool" is the store as bootstrap builds it, on its own asyncpg pool.
    pool = (
        ConnectionPool(database_url, size=8, connect_timeout_s=5.0)
        if backend_kind == "postgres-pool"
        else None
    )
    store = PostgresStore(engine, pool)
    try:
        yield Backend(backend_kind, store, PostgresProbe(engine), wire)
    finally:
        await store.aclose()
        await engine.dispose()


class TestStoreContract(StoreContract):
    """Every case of `StoreContract`, once per backend."""
