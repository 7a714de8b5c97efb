"""Ingesting a dead letter reads where and why it failed from its neutral failure record."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.application.dead_letters import IngestDeadLetter, LastErrors, QueueOwner
from sagaworks.application.ports import InboundMessage, PriorFailure, StoredDeadLetter
from sagaworks.application.stored import fingerprint
from sagaworks.testing import FakeClock

pytestmark = pytest.mark.unit

FAILED_AT = datetime(2024, 5, 1, 11, 0, tzinfo=UTC)
SAGA_QUEUE = "sagaworks.order_fulfilment"

NEWEST = PriorFailure(
    "delivery_limit", SAGA_QUEUE, "shop.orders", ("order.placed", "order.any"), 1, FAILED_AT
)
OLDER = PriorFailure("rejected", "sagaworks.elsewhere", "other", ("x",), 2, None)


def dead(message_id: str = "m-1", **overrides: Any) -> InboundMessage:
    """As the dead-letter queue delivers it: routed by the dead-letter exchange."""
    message = InboundMessage(
        message_id=message_id,
        message_type="order.placed",
        body=b"{}",
        headers={"cloudEvents_id": message_id, "x-trace": "t"},
        queue="sagaworks.dead_letters",
        exchange="sagaworks.dlx",
        routing_key="dead.order.placed",
        delivery_count=4,
        failures=(NEWEST, OLDER),
    )
    return replace(message, **overrides)


async def ingest(*messages: InboundMessage, errors: LastErrors | None = None) -> InMemoryStore:
    store = InMemoryStore()
    use_case = IngestDeadLetter(
        store,
        FakeClock(),
        {SAGA_QUEUE: QueueOwner(saga_type="order_fulfilment")},
        errors or LastErrors(),
    )
    for message in messages:
        await use_case(message)
    return store


def only(store: InMemoryStore) -> StoredDeadLetter:
    (letter,) = store.dead_letters()
    return letter


async def test_the_newest_failure_says_where_and_why_and_when() -> None:
    letter = only(await ingest(dead()))
    assert (letter.queue, letter.exchange, letter.routing_key, letter.reason) == (
        SAGA_QUEUE,
        "shop.orders",
        "order.placed",
        "delivery_limit",
    )
    assert (letter.first_failed_at, letter.handler, letter.saga_type) == (
        FAILED_AT,
        "order_fulfilment",
        "order_fulfilment",
    )
    assert letter.exception_type == "DeliveryLimitExceeded"
    assert letter.exception_message is not None
    assert letter.exception_message.startswith("returned to the queue 4 times without")
    assert letter.fingerprint == fingerprint(
        "delivery_limit", "DeliveryLimitExceeded", letter.exception_message, "order_fulfilment"
    )
    assert letter.headers == {"cloudEvents_id": "m-1", "x-trace": "t"}


async def test_the_worker_that_saw_the_error_names_it() -> None:
    errors = LastErrors()
    errors.remember(SAGA_QUEUE, "m-1", ValueError("bad sku"))
    letter = only(await ingest(dead(), errors=errors))
    assert (letter.exception_type, letter.exception_message) == ("ValueError", "bad sku")


async def test_without_a_recorded_failure_the_letter_says_unknown() -> None:
    letter = only(await ingest(dead(failures=())))
    assert (letter.queue, letter.reason, letter.exchange, letter.routing_key) == (
        "unknown",
        "unknown",
        "",
        "dead.order.placed",
    )
    assert letter.first_failed_at == FakeClock().now()


async def test_a_broker_reason_is_explained_and_missing_routing_keys_keep_the_delivery_one() -> (
    None
):
    expired = PriorFailure("expired", SAGA_QUEUE, "shop.orders", (), 1, FAILED_AT)
    letter = only(await ingest(dead(failures=(expired,))))
    assert (letter.reason, letter.exception_type, letter.routing_key) == (
        "expired",
        "MessageExpired",
        "dead.order.placed",
    )


async def test_a_message_without_an_id_is_named_after_its_body_and_failures() -> None:
    store = await ingest(
        dead(""),
        dead(""),  # the same dead letter delivered again: the same id
        dead("", failures=(replace(NEWEST, count=2), OLDER)),  # failed once more
    )
    ids = sorted({letter.message_id for letter in store.dead_letters()})
    assert len(ids) == 2
    assert all(i.startswith("no-id:") for i in ids)
