"""Events built and laid out by the official CloudEvents SDK drive a running worker.

Each of the SDK's layouts on RabbitMQ is published as its binding says, on
the real broker: the AMQP binding (`cloudEvents_*` headers, `time` in epoch
milliseconds), the RabbitMQ binding (`ce-*` headers) and structured mode
(`application/cloudevents+json`). Each order completes, under the SDK's id
and correlation id; a structured event with invalid data is dead-lettered
as `schema_invalid` under its own id, its data as the letter's body.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from cloudevents.core.bindings import amqp, rabbitmq
from cloudevents.core.v1.event import CloudEvent
from engine_harness import EngineHarness, running_harness

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[EngineHarness]:
    async with running_harness(settings_factory, migrated_database_url, run_id) as h:
        yield h


def order_event(order_id: str, **data: Any) -> CloudEvent:
    body = OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=2),),
        amount_cents=2_500,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
    ).model_dump(mode="json")
    body.update(data)
    return CloudEvent(
        attributes={
            "id": f"ce-{order_id}",
            "type": OrderPlaced.message_type,
            "source": "/order-service",
            "time": datetime.now(UTC),
            "datacontenttype": "application/json",
            "correlationid": f"corr-{order_id}",
        },
        data=body,
    )


async def send(
    harness: EngineHarness,
    body: bytes,
    headers: dict[str, Any],
    content_type: str | None,
) -> None:
    """Publish as an SDK user would with aio-pika: only what the binding lays out, plus
    the user and persistence RabbitMQ itself asks for."""
    async with harness_channel(harness) as channel:
        exchange = await channel.get_exchange(exchange_name(harness.prefix, "orders"), ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                headers=headers,
                content_type=content_type,
                user_id=harness.user,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=OrderPlaced.routing_key,
        )


class harness_channel:
    """A confirming channel on a connection of the test's own, as another service has."""

    def __init__(self, harness: EngineHarness) -> None:
        self._url = harness.settings.amqp_url.get_secret_value()

    async def __aenter__(self) -> aio_pika.abc.AbstractChannel:
        self._connection = await aio_pika.connect(self._url)
        return await self._connection.channel(publisher_confirms=True, on_return_raises=True)

    async def __aexit__(self, *_: object) -> None:
        await self._connection.close()


def layouts(oid: str) -> dict[str, tuple[bytes, dict[str, Any], str | None]]:
    amqp_message = amqp.to_binary_event(order_event(f"{oid}-amqp"))
    binary = rabbitmq.to_binary_event(order_event(f"{oid}-rmq"))
    structured = rabbitmq.to_structured_event(order_event(f"{oid}-structured"))
    return {
        f"{oid}-amqp": (
            amqp_message.application_data,
            amqp_message.application_properties,
            amqp_message.properties.get("content-type"),
        ),
        f"{oid}-rmq": (binary.body, binary.headers, binary.content_type),
        f"{oid}-structured": (structured.body, structured.headers, structured.content_type),
    }


async def test_every_sdk_layout_drives_a_saga_to_completion(harness: EngineHarness) -> None:
    oid = f"sdk-{secrets.token_hex(3)}"
    sent = layouts(oid)
    for order_id, (body, headers, content_type) in sent.items():
        harness.plans[order_id] = [
            (
                0.05,
                ShipmentDispatched(order_id=order_id, shipment_id=f"s-{order_id}"),
                f"{order_id}/d",
            )
        ]
        await send(harness, body, headers, content_type)
    for order_id in sent:
        await harness.wait_for_status(order_id, "completed")
        handled = harness.handled_for(f"ce-{order_id}")
        assert [h.outcome for h in handled][:1] == ["applied"], harness
        outcome = await harness.wait_for_outcome(order_id)
        assert outcome.correlation_id == f"corr-{order_id}"
    assert not await harness.db.fetch("SELECT reason FROM dead_letters")


async def test_structured_event_with_invalid_data_is_a_letter_under_its_own_id(
    harness: EngineHarness,
) -> None:
    oid = f"sdk-bad-{secrets.token_hex(3)}"
    message = rabbitmq.to_structured_event(order_event(oid, currency="euro"))
    await send(harness, message.body, message.headers, message.content_type)

    async def letter() -> Any:
        return await harness.dead_letter(f"ce-{oid}")

    found = await harness.eventually(letter, what=f"the dead letter of ce-{oid}")
    assert found["reason"] == "schema_invalid"
    assert json.loads(bytes(found["body"]))["currency"] == "euro"
    assert found["message_type"] == OrderPlaced.message_type
