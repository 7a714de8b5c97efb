"""Breaker changes in memory: the port's row for dashboards and the event, in one commit."""

from __future__ import annotations

from collections.abc import Sequence

from sagaworks.adapters.memory.locks import Owner, round_trip
from sagaworks.adapters.memory.records import BreakerRecord, OutboxRecord, as_json, utc
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.application.ports import BreakerChange, OutboxRow, PendingMessage

__all__ = ["InMemoryBreakerLog"]


class InMemoryBreakerLog:
    """Implements `BreakerLog` on the outbox of `store`, so its relay publishes the events."""

    def __init__(self, store: InMemoryStore) -> None:
        self._store = store
        self._tables = store.tables

    async def record(self, change: BreakerChange, pending: PendingMessage) -> Sequence[OutboxRow]:
        key = (change.port, change.worker)
        owner = Owner()
        try:
            await round_trip()
            await self._store.locks.acquire(("port_breakers", *key), owner)
            await self._store.locks.acquire(("outbox.message_id", pending.message_id), owner)
            if pending.message_id in self._tables.outbox_ids:
                raise RuntimeError(f"outbox already holds message id {pending.message_id}")
            previous = self._tables.breakers.get(key)
            opened = int(change.state == "open")
            self._tables.breakers[key] = BreakerRecord(
                change.port,
                change.worker,
                change.state,
                change.failures,
                opened + (0 if previous is None else previous.times_opened),
                utc(change.at),
            )
            record = OutboxRecord(
                self._tables.next_id("outbox"),
                pending.message_id,
                None,
                pending.exchange,
                pending.routing_key,
                as_json(pending.headers),
                pending.body,
                utc(self._store.clock.now()),
            )
            self._tables.add_outbox(record)
            return [record.row()]
        finally:
            self._store.locks.release_all(owner)

    def breakers(self) -> list[BreakerRecord]:
        """Every port's breaker row, as a dashboard reads `port_breakers`."""
        return sorted(self._tables.breakers.values(), key=lambda b: (b.port, b.worker))
