"""`ApplyInputs` on the in-memory adapters: many sagas per transaction, each settled on its own."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import pytest
from scenarios.order_inputs import order_placed

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    ShipmentDispatched,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks.adapters.memory.publisher import InMemoryPublisher
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.observability.telemetry import NoTelemetry
from sagaworks.application.apply_inputs import ApplyInputs, Arrival
from sagaworks.application.config import EngineOptions
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import InboundMessage, SagaChange, SagaTransaction
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import EventReceived, RunStep
from sagaworks.domain.instance import Status, saga_id_for
from sagaworks.domain.messages import Envelope, Message
from sagaworks.testing import FakeClock

pytestmark = pytest.mark.unit

SAGA = order_fulfilment


class CountingStore(InMemoryStore):
    """The in-memory store, counting transactions; `poison` makes a batch holding it fail."""

    def __init__(self) -> None:
        super().__init__()
        self.transactions = 0
        self.poison: set[Any] = set()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SagaTransaction]:
        self.transactions += 1
        async with super().transaction() as tx:
            yield _Poisoned(tx, self.poison) if self.poison else tx


class _Poisoned:
    def __init__(self, tx: SagaTransaction, poison: set[Any]) -> None:
        self._tx = tx
        self._poison = poison

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def save_all(self, changes: Sequence[SagaChange]) -> None:
        for change in changes:
            instance = change.decision.instance
            assert instance is not None
            if instance.id in self._poison:
                raise RuntimeError(f"saga {instance.id} cannot be written")
        await self._tx.save_all(changes)


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def publisher() -> InMemoryPublisher:
    return InMemoryPublisher()


@pytest.fixture
def apply(store: CountingStore, publisher: InMemoryPublisher) -> ApplyInputs:
    relay = OutboxRelay(store, publisher)
    options = EngineOptions(park_for=timedelta(minutes=1))
    return ApplyInputs(
        store, relay, FakeClock(), options, Wire(lambda domain: domain), NoTelemetry()
    )


def event(message: Message, key: str, message_id: str) -> Arrival:
    envelope = Envelope(id=message_id, type=message.message_type, source="tests", time=T0)
    inbound = InboundMessage(
        message_id=message_id,
        message_type=message.message_type,
        body=message.model_dump_json().encode(),
        headers={},
        queue="sagaworks.order_fulfilment",
        exchange="tests",
        routing_key=message.message_type,
    )
    return Arrival(
        SAGA,
        saga_id_for(SAGA.name, key),
        key,
        EventReceived(envelope, message),
        message_id,
        parkable=inbound,
    )


T0 = FakeClock().now()


def placed(order_id: str, message_id: str | None = None) -> Arrival:
    order = order_placed(order_id, quantity=1, amount_cents=100, dispatch_by=T0 + timedelta(days=1))
    return event(order, order_id, message_id or f"placed-{order_id}")


async def test_inputs_for_different_sagas_share_one_transaction_and_one_publish(
    apply: ApplyInputs, store: CountingStore, publisher: InMemoryPublisher
) -> None:
    orders = [f"o-{n}" for n in range(5)]
    settled = await asyncio.gather(*(apply(placed(o)) for o in orders))
    assert [s.outcome for s in settled] == ["applied"] * 5
    assert store.transactions == 1
    assert publisher.calls == 1
    commands = [RunStep.model_validate_json(row.body) for row in publisher.published]
    assert sorted(str(c.saga_id) for c in commands) == sorted(
        str(saga_id_for(SAGA.name, o)) for o in orders
    )
    for order in orders:
        saga = store.saga(SAGA, saga_id_for(SAGA.name, order))
        assert saga is not None
        assert saga.version == 1


async def test_a_batch_settles_each_input_as_if_it_had_been_alone(
    apply: ApplyInputs, store: CountingStore
) -> None:
    await apply(placed("o-1"))
    too_early = event(ShipmentDispatched(order_id="o-2", shipment_id="wh-1"), "o-2", "d-2")
    settled = await asyncio.gather(apply(placed("o-1")), apply(too_early), apply(placed("o-3")))
    assert [(s.outcome, s.reason) for s in settled] == [
        ("duplicate", ""),
        ("parked", "no_saga"),
        ("applied", ""),
    ]
    assert store.transactions == 2
    assert [p.message_id for p in store.parked(saga_id_for(SAGA.name, "o-2"))] == ["d-2"]


async def test_two_inputs_for_one_saga_are_applied_one_transaction_after_the_other(
    apply: ApplyInputs, store: CountingStore
) -> None:
    cancel = event(OrderCancellationRequested(order_id="o-1"), "o-1", "cancel-o-1")
    settled = await asyncio.gather(apply(placed("o-1")), apply(cancel))
    assert [s.outcome for s in settled] == ["applied", "applied"]
    assert store.transactions == 2
    saga = store.saga(SAGA, saga_id_for(SAGA.name, "o-1"))
    assert saga is not None
    assert (saga.version, saga.status) == (2, Status.COMPENSATING)


async def test_an_input_that_breaks_its_batch_fails_alone(
    apply: ApplyInputs, store: CountingStore, publisher: InMemoryPublisher
) -> None:
    store.poison = {saga_id_for(SAGA.name, "o-2")}
    outcomes = await asyncio.gather(
        *(apply(placed(o)) for o in ("o-1", "o-2", "o-3")), return_exceptions=True
    )
    assert [getattr(o, "outcome", None) for o in outcomes] == ["applied", None, "applied"]
    assert isinstance(outcomes[1], RuntimeError)
    assert store.saga(SAGA, saga_id_for(SAGA.name, "o-2")) is None
    assert store.transactions == 4, "one batch, then each input alone"
    assert len(publisher.published) == 2
