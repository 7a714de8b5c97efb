"""`sagaworks.client` on the real broker: what it sends, that a worker takes it, what it raises.

The envelope is read back from a queue of the test's own bound next to the
saga's; the saga completes; a re-send under `stable_id` is a duplicate; an
unroutable message and a missing exchange raise with a message that says
what to check.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from broker_tools import AMQP_URL, broker_user, vhost_of
from engine_harness import EngineHarness, running_harness

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagaworks import Message
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.client import EventPublisher, MessageRefused, MessageReturned, stable_id
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

MESSAGES_DOC = Path(__file__).resolve().parents[2] / "docs" / "messages.md"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class NobodyListens(Message, type="test.nobody_listens", domain="orders"):
    note: str


@pytest.fixture
async def harness(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[EngineHarness]:
    async with running_harness(settings_factory, migrated_database_url, run_id) as h:
        yield h


def placed(order_id: str) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=1),),
        amount_cents=1_200,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
    )


async def test_a_published_event_carries_the_contract_and_drives_its_saga(
    harness: EngineHarness,
) -> None:
    url = harness.settings.amqp_url.get_secret_value()
    oid = f"client-{secrets.token_hex(3)}"
    harness.plans[oid] = [(0.05, ShipmentDispatched(order_id=oid, shipment_id="s-1"), f"{oid}/d")]
    tap = await aio_pika.connect(url)
    try:
        channel = await tap.channel()
        copy = await channel.declare_queue(exclusive=True)
        await copy.bind(exchange_name(harness.prefix, "orders"), OrderPlaced.routing_key)
        async with EventPublisher.connect(
            url, source="order-service", exchange_prefix=harness.prefix
        ) as publisher:
            event = placed(oid)
            sent_id = await publisher.publish(
                event,
                message_id=stable_id(OrderPlaced, oid),
                correlation_id=f"corr-{oid}",
                traceparent=TRACEPARENT,
            )
            await harness.wait_for_status(oid, "completed")
            again = await publisher.publish(event, message_id=stable_id(OrderPlaced, oid))
        got = await copy.get(timeout=5, fail=True)
        assert got is not None
    finally:
        await tap.close()
    assert again == sent_id == stable_id(OrderPlaced, oid)
    assert got.message_id == sent_id
    assert got.type == "order.placed"
    assert got.app_id == "order-service"
    assert got.user_id == harness.user
    assert got.correlation_id == f"corr-{oid}"
    assert got.content_type == "application/json"
    assert got.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers = got.headers
    assert headers["cloudEvents_id"] == sent_id
    assert headers["cloudEvents_type"] == "order.placed"
    assert headers["cloudEvents_specversion"] == "1.0"
    assert headers["cloudEvents_source"] == "order-service"
    assert headers["traceparent"] == TRACEPARENT
    assert json.loads(got.body)["order_id"] == oid
    outcomes = [h.outcome for h in await harness.wait_for_handled(sent_id, times=2)]
    assert outcomes == ["applied", "duplicate"]


async def test_an_unroutable_message_is_returned_and_raised(harness: EngineHarness) -> None:
    url = harness.settings.amqp_url.get_secret_value()
    async with EventPublisher.connect(
        url, source="order-service", exchange_prefix=harness.prefix
    ) as publisher:
        with pytest.raises(MessageReturned, match="no queue is bound") as returned:
            await publisher.publish(NobodyListens(note="x"))
        assert "test.nobody_listens" in str(returned.value)
        # The channel is still good for the next message.
        oid = f"client-after-{secrets.token_hex(3)}"
        await publisher.publish(placed(oid))
    await harness.wait_for_status(oid, "running")


async def test_a_missing_exchange_is_refused_with_what_to_check(harness: EngineHarness) -> None:
    url = harness.settings.amqp_url.get_secret_value()
    async with EventPublisher.connect(
        url, source="order-service", exchange_prefix=f"{harness.prefix}absent."
    ) as publisher:
        with pytest.raises(MessageRefused, match="does not exist") as refused:
            await publisher.publish(placed("never"))
        assert f"{harness.prefix}absent.orders" in str(refused.value)
        assert "sagaworks topology apply" in str(refused.value)


def documented_example() -> dict[str, Any]:
    """The client example of docs/messages.md, as a module (not run as `__main__`)."""
    text = MESSAGES_DOC.read_text(encoding="utf-8")
    block = text.split("<!-- client-example:start -->", 1)[1].split("<!-- client-example:end -->")[
        0
    ]
    code = block.split("```python\n", 1)[1].rsplit("```", 1)[0]
    namespace: dict[str, Any] = {"__name__": "messages_md_example"}
    exec(compile(code, str(MESSAGES_DOC), "exec"), namespace)
    return namespace


async def test_the_documented_example_publishes_once_however_often_it_runs(
    harness: EngineHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORDER_SERVICE_AMQP_URL", harness.settings.amqp_url.get_secret_value())
    monkeypatch.setenv("SAGAWORKS_EXCHANGE_PREFIX", harness.prefix)
    place = documented_example()["place"]
    oid = f"doc-{secrets.token_hex(3)}"
    first = await place(oid)
    again = await place(oid)
    assert first == again == stable_id(OrderPlaced, oid)
    # Both may be in flight at once: which one the inbox takes first is the broker's to say.
    outcomes = sorted(h.outcome for h in await harness.wait_for_handled(first, times=2))
    assert outcomes == ["applied", "duplicate"]
    saga = await harness.saga(oid)
    assert saga is not None
    assert saga.state["amount_cents"] == 4_990


async def test_a_user_id_that_is_not_the_connections_is_refused_by_the_broker(
    harness: EngineHarness,
) -> None:
    connection = await aio_pika.connect_robust(harness.settings.amqp_url.get_secret_value())
    publisher = EventPublisher(
        connection, user_id="someone-else", source="order-service", exchange_prefix=harness.prefix
    )
    try:
        with pytest.raises(MessageRefused, match="closed the channel") as refused:
            await publisher.publish(placed("forged"))
        assert "user_id" in str(refused.value)
        # A new channel is opened for the next message; the forged one never arrived.
        honest = EventPublisher(
            connection, user_id=harness.user, source="order-service", exchange_prefix=harness.prefix
        )
        await honest.publish(placed("honest"))
        await honest.close()
    finally:
        await publisher.close()
        await connection.close()
    await harness.wait_for_status("honest", "running", "completed", "compensated")
    assert await harness.saga("forged") is None


async def test_a_user_without_write_permission_is_told_which_it_lacks(
    harness: EngineHarness,
) -> None:
    async with broker_user() as (name, password):
        ctl = shutil.which("rabbitmqctl")
        assert ctl is not None
        process = await asyncio.create_subprocess_exec(
            ctl, "-q", "set_permissions", "-p", vhost_of(AMQP_URL), name, ".*", "^$", ".*"
        )
        assert await process.wait() == 0
        parts = urlsplit(AMQP_URL)
        netloc = f"{name}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        async with EventPublisher.connect(
            urlunsplit(parts._replace(netloc=netloc)),
            source="order-service",
            exchange_prefix=harness.prefix,
        ) as publisher:
            with pytest.raises(MessageRefused, match="needs write permission") as refused:
                await publisher.publish(placed("no-write"))
    assert "ACCESS_REFUSED" in str(refused.value)
    assert f'"{name}"' in str(refused.value)
