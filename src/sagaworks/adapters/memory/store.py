"""The saga store in memory, with the PostgreSQL store's semantics.

Why it is more than a few dicts: tests that run on it must not pass where the
real store would fail. Transactions (`transaction.py`) see their own writes
and nobody else's until they commit, lock what PostgreSQL locks (`locks.py`)
and store values as PostgreSQL does (`records.py`); `claim_unpublished` skips
what another claim holds, as `SKIP LOCKED` does.

The readers at the end of `InMemoryStore` (`history`, `outbox`, `timers`...)
show committed rows only; tests and the harness use them to look inside.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from sagaworks.adapters.memory.locks import Locks, Owner, round_trip
from sagaworks.adapters.memory.records import (
    HistoryRecord,
    OutboxRecord,
    ParkedRecord,
    SagaRecord,
    Tables,
    TimerRecord,
    instance_of,
    utc,
)
from sagaworks.adapters.memory.transaction import MemoryTransaction
from sagaworks.application.ports import Clock, OutboxRow, StoredDeadLetter
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = ["InMemoryStore"]


class _UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class InMemoryStore:
    """Implements `Store` in memory; see the module docstring for what it keeps faithful.

    `tables`, `locks`, `wire` and `clock` are shared with the in-memory
    dead-letter repository and breaker log built on this store.
    """

    def __init__(self, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock or _UtcClock()
        self.tables = Tables()
        self.locks = Locks()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[MemoryTransaction]:
        tx = MemoryTransaction(self.tables, self.locks, self.clock)
        try:
            await round_trip()
            yield tx
            await round_trip()
        except BaseException:
            tx.end()
            raise
        tx.commit()
        tx.end()

    async def load_sagas(
        self, wanted: Sequence[tuple[SagaDefinition[Any], UUID]]
    ) -> list[SagaInstance | None]:
        await round_trip()
        return [self.saga(definition, saga_id) for definition, saga_id in wanted]

    @asynccontextmanager
    async def claim_unpublished(
        self, limit: int, older_than_s: float
    ) -> AsyncIterator[list[OutboxRow]]:
        owner = Owner()
        try:
            await round_trip()
            cutoff = utc(self.clock.now()) - timedelta(seconds=older_than_s)
            claimed: list[OutboxRecord] = []
            for record in sorted(self.tables.outbox.values(), key=lambda r: r.id):
                if len(claimed) >= limit:
                    break
                if record.published_at is not None or record.created_at > cutoff:
                    continue
                if record.lease_until is not None and record.lease_until > utc(self.clock.now()):
                    continue
                if self.locks.try_acquire(("outbox", record.id), owner):
                    claimed.append(record)
            yield [r.row() for r in claimed]
            self._mark([r.id for r in claimed])
        finally:
            self.locks.release_all(owner)

    async def mark_published(self, ids: Sequence[int]) -> None:
        owner = Owner()
        try:
            await round_trip()
            for outbox_id in sorted(set(ids)):
                await self.locks.acquire(("outbox", outbox_id), owner)
            self._mark(ids)
        finally:
            self.locks.release_all(owner)

    def _mark(self, ids: Iterable[int]) -> None:
        now = utc(self.clock.now())
        for outbox_id in ids:
            record = self.tables.outbox.get(outbox_id)
            if record is not None:
                self.tables.outbox[outbox_id] = replace(record, published_at=now)

    # -- committed data, for tests and the harness ---------------------------------------------

    def saga_record(self, saga_id: UUID) -> SagaRecord | None:
        return self.tables.sagas.get(saga_id)

    def saga(self, definition: SagaDefinition[Any], saga_id: UUID) -> SagaInstance | None:
        """A committed saga, read without awaiting."""
        record = self.tables.sagas.get(saga_id)
        return None if record is None else instance_of(definition, record)

    def history(self, saga_id: UUID) -> list[HistoryRecord]:
        return list(self.tables.history.get(saga_id, ()))

    def outbox(self) -> list[OutboxRecord]:
        return sorted(self.tables.outbox.values(), key=lambda r: r.id)

    def timers(self, saga_id: UUID | None = None) -> list[TimerRecord]:
        chosen = (t for t in self.tables.timers.values() if saga_id in (None, t.saga_id))
        return sorted(chosen, key=lambda t: (t.fire_at, t.id))

    def parked(self, saga_id: UUID | None = None) -> list[ParkedRecord]:
        chosen = (p for p in self.tables.parked.values() if saga_id in (None, p.saga_id))
        return sorted(chosen, key=lambda p: p.id)

    def dead_letters(self) -> list[StoredDeadLetter]:
        return sorted(self.tables.dead_letters.values(), key=lambda d: d.id)

    def inbox(self) -> dict[tuple[str, str], UUID | None]:
        """Processed (consumer, message_id) pairs and the saga each was for."""
        return {key: record.saga_id for key, record in self.tables.inbox.items()}
