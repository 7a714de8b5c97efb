"""What every `BreakerLog` must do, run against the in-memory and the PostgreSQL log.

A change is recorded for dashboards (one row per port and worker, counting
how often it opened) and its event lands in the same store's outbox, so the
relay publishes it like any other row.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest
from contract_wire import contract_wire
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks.adapters.memory.breakers import InMemoryBreakerLog
from sagaworks.adapters.memory.publisher import InMemoryPublisher
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.postgres.breakers import PostgresBreakerLog
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.store import PostgresStore
from sagaworks.application.circuit import breaker_event
from sagaworks.application.ports import BreakerChange, BreakerLog, BreakerState, Store
from sagaworks.application.wire import Wire
from sagaworks.bootstrap import bootstrap
from sagaworks.settings import Settings

T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)

Row = tuple[str, str, str, int, int, datetime]
"""port, worker, state, failures, times opened, changed at."""


class Rows(Protocol):
    async def __call__(self) -> list[Row]: ...


@dataclass
class Backend:
    log: BreakerLog
    store: Store
    wire: Wire
    rows: Rows


@pytest.fixture
async def backend(database_url_or_memory: str | None) -> AsyncIterator[Backend]:
    wire = contract_wire()
    if database_url_or_memory is None:
        store = InMemoryStore()
        log = InMemoryBreakerLog(store)

        async def memory_rows() -> list[Row]:
            return [
                (b.port, b.worker, b.state, b.failures, b.times_opened, b.changed_at)
                for b in log.breakers()
            ]

        yield Backend(log, store, wire, memory_rows)
        return
    engine = create_engine(database_url_or_memory, pool_size=2, max_overflow=2)
    yield Backend(PostgresBreakerLog(engine), PostgresStore(engine), wire, _rows(engine))
    await engine.dispose()


def _rows(engine: AsyncEngine) -> Rows:
    async def rows() -> list[Row]:
        query = (
            "SELECT port, worker, state, failures, times_opened, changed_at "
            "FROM port_breakers ORDER BY port, worker"
        )
        async with engine.connect() as conn:
            return [tuple(r) for r in (await conn.execute(text(query))).all()]  # type: ignore[misc]

    return rows


def change(
    state: BreakerState,
    *,
    previous: BreakerState = "closed",
    failures: int = 0,
    worker: str = "w-1",
    port: str = "payment",
    minutes: int = 0,
) -> BreakerChange:
    return BreakerChange(port, worker, previous, state, failures, T0 + timedelta(minutes=minutes))


async def record(backend: Backend, given: BreakerChange) -> Any:
    return await backend.log.record(given, backend.wire.encode(breaker_event(given)))


async def test_the_event_is_written_to_the_outbox_unpublished(backend: Backend) -> None:
    opened = change("open", failures=5)
    event = breaker_event(opened)
    sent = backend.wire.encode(event)
    (row,) = await backend.log.record(opened, sent)
    assert (row.message_id, row.exchange, row.routing_key, row.body) == (
        sent.message_id,
        sent.exchange,
        "breaker.open.payment",
        sent.body,
    )
    assert row.headers == sent.headers
    async with backend.store.claim_unpublished(10, 0) as claimed:
        assert claimed == [row]


async def test_each_port_and_worker_keeps_one_row_counting_how_often_it_opened(
    backend: Backend,
) -> None:
    await record(backend, change("open", failures=5))
    await record(backend, change("half_open", previous="open", failures=5, minutes=1))
    await record(backend, change("open", previous="half_open", failures=6, minutes=2))
    await record(backend, change("open", failures=3, worker="w-2", minutes=3))
    assert await backend.rows() == [
        ("payment", "w-1", "open", 6, 2, T0 + timedelta(minutes=2)),
        ("payment", "w-2", "open", 3, 1, T0 + timedelta(minutes=3)),
    ]
    await record(backend, change("closed", previous="half_open", minutes=4))
    assert (await backend.rows())[0] == (
        "payment",
        "w-1",
        "closed",
        0,
        2,
        T0 + timedelta(minutes=4),
    )


async def test_a_change_that_never_opened_counts_no_opening(backend: Backend) -> None:
    await record(backend, change("half_open", previous="open", port="inventory"))
    assert await backend.rows() == [("inventory", "w-1", "half_open", 0, 0, T0)]


@pytest.mark.unit
async def test_bootstrap_records_breaker_changes_in_the_in_memory_store() -> None:
    store = InMemoryStore()
    publisher = InMemoryPublisher()
    system = await bootstrap(
        Settings.load(secrets_dir=None),
        [order_fulfilment],
        {p: object() for p in order_fulfilment.ports()},
        store=store,
        publisher=publisher,
    )
    assert system.record_breaker_change is not None
    await system.record_breaker_change(change("open", failures=5))
    (published,) = publisher.published
    assert published.routing_key == "breaker.open.payment"
    assert [r.routing_key for r in store.outbox()] == ["breaker.open.payment"]
