"""The topology against the real broker: idempotent, loud on conflicts, dead-letters work.

The broker-side guarantees (quorum queues, at-least-once dead-lettering,
the delivery limit) cannot be checked with TestRabbitBroker, so these tests
declare everything on the shared RabbitMQ under a prefix of their own,
inspect it with `rabbitmqctl`, and delete it afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import traceback
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection
from broker_tools import rabbitmqctl, vhost_of

from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.errors import (
    BrokerAuthenticationFailed,
    BrokerUnreachable,
    TopologyConflict,
)
from sagaworks.adapters.rabbitmq.topology import (
    Binding,
    QueueSpec,
    TopologySpec,
    apply_topology,
    commands_exchange_name,
    dead_letter_exchange_name,
    dead_letter_queue_arguments,
    dead_letter_queue_name,
    events_exchange_name,
    exchange_name,
    queue_arguments,
    saga_queue_name,
    unstorable_queue_name,
)
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGA = "order_fulfilment"


def _with_credentials(url: str, *, password: str | None = None, vhost: str | None = None) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if password is not None:
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username or 'guest'}:{password}@{host}"
    path = parts.path if vhost is None else f"/{vhost}"
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def arguments_of(row: dict[str, Any]) -> dict[str, Any]:
    """rabbitmqctl's `[[key, type, value], ...]` as a plain mapping."""
    return {key: value for key, _type, value in row["arguments"]}


def make_spec(prefix: str, *, delivery_limit: int = 5) -> TopologySpec:
    orders = exchange_name(prefix, "orders")
    warehouse = exchange_name(prefix, "warehouse")
    return TopologySpec(
        exchanges=(orders, warehouse, events_exchange_name(prefix), commands_exchange_name(prefix)),
        queues=(
            QueueSpec(
                saga_queue_name(prefix, SAGA),
                (
                    Binding(orders, "order.placed"),
                    Binding(orders, "order.cancellation_requested"),
                    Binding(warehouse, "shipment.#"),
                ),
            ),
        ),
        dead_letter_exchange=dead_letter_exchange_name(prefix),
        dead_letter_queue=dead_letter_queue_name(prefix),
        delivery_limit=delivery_limit,
    )


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
async def connection(settings: Settings) -> AsyncIterator[AbstractRobustConnection]:
    conn = await connect(
        settings.amqp_url.get_secret_value(), timeout_s=settings.amqp_connect_timeout_s
    )
    yield conn
    await conn.close()


@pytest.fixture
async def prefix(settings: Settings, connection: AbstractRobustConnection) -> AsyncIterator[str]:
    """A name prefix for one test; every queue and exchange under it is deleted afterwards."""
    test_prefix = f"{settings.exchange_prefix}{secrets.token_hex(3)}."
    yield test_prefix
    queues = [row["name"] for row in await rabbitmqctl("list_queues", "name")]
    exchanges = [row["name"] for row in await rabbitmqctl("list_exchanges", "name")]
    async with connection.channel() as channel:
        for name in queues:
            if name.startswith(test_prefix):
                await channel.queue_delete(name)
        for name in exchanges:
            if name.startswith(test_prefix):
                await channel.exchange_delete(name)


async def publish(
    connection: AbstractRobustConnection, exchange: str, routing_key: str, body: bytes
) -> None:
    """Publish persistently with confirms; an unroutable message fails the test."""
    async with connection.channel(on_return_raises=True) as channel:
        target = await channel.get_exchange(exchange)
        await target.publish(
            aio_pika.Message(
                body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=body.decode()
            ),
            routing_key=routing_key,
        )


async def wait_for_message(
    queue: AbstractQueue, timeout_s: float = 10.0
) -> AbstractIncomingMessage:
    async with asyncio.timeout(timeout_s):
        while True:
            message = await queue.get(fail=False)
            if message is not None:
                return message
            await asyncio.sleep(0.05)


def newest_death(dead: AbstractIncomingMessage) -> dict[str, Any]:
    """The newest `x-death` record RabbitMQ wrote on a dead letter."""
    death = dead.headers["x-death"]
    assert isinstance(death, list)
    newest = death[0]
    assert isinstance(newest, dict)
    return newest


async def test_applying_twice_changes_nothing_and_keeps_messages(
    connection: AbstractRobustConnection, prefix: str, settings: Settings
) -> None:
    spec = make_spec(prefix)
    saga_queue = saga_queue_name(prefix, SAGA)

    first = await apply_topology(connection, spec)
    await publish(connection, exchange_name(prefix, "orders"), "order.placed", b"kept-1")
    second = await apply_topology(connection, spec)

    assert second == first
    unstorable = unstorable_queue_name(prefix)
    assert set(first.queues) == {saga_queue, dead_letter_queue_name(prefix), unstorable}
    assert first.summary() == "5 exchanges, 3 queues, 4 bindings"

    queues = {
        row["name"]: row
        for row in await rabbitmqctl("list_queues", "name", "type", "durable", "arguments")
        if row["name"].startswith(prefix)
    }
    assert set(queues) == {saga_queue, dead_letter_queue_name(prefix), unstorable}
    assert arguments_of(queues[saga_queue]) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": dead_letter_exchange_name(prefix),
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 5,
    }
    assert arguments_of(queues[saga_queue]) == queue_arguments(spec)
    assert arguments_of(queues[dead_letter_queue_name(prefix)]) == {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": unstorable,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": 20,
    }
    assert arguments_of(queues[dead_letter_queue_name(prefix)]) == dead_letter_queue_arguments(spec)
    assert arguments_of(queues[unstorable]) == {"x-queue-type": "quorum"}
    assert all(row["type"] == "quorum" and row["durable"] for row in queues.values())

    exchanges = {
        row["name"]: (row["type"], row["durable"])
        for row in await rabbitmqctl("list_exchanges", "name", "type", "durable")
        if row["name"].startswith(prefix)
    }
    assert exchanges == {
        exchange_name(prefix, "orders"): ("topic", True),
        exchange_name(prefix, "warehouse"): ("topic", True),
        events_exchange_name(prefix): ("topic", True),
        commands_exchange_name(prefix): ("topic", True),
        dead_letter_exchange_name(prefix): ("fanout", True),
    }

    bindings = {
        (row["source_name"], row["destination_name"], row["routing_key"])
        for row in await rabbitmqctl(
            "list_bindings", "source_name", "destination_name", "routing_key"
        )
        if row["source_name"].startswith(prefix)
    }
    assert bindings == {
        (exchange_name(prefix, "orders"), saga_queue, "order.placed"),
        (exchange_name(prefix, "orders"), saga_queue, "order.cancellation_requested"),
        (exchange_name(prefix, "warehouse"), saga_queue, "shipment.#"),
        (dead_letter_exchange_name(prefix), dead_letter_queue_name(prefix), ""),
    }

    async with connection.channel() as channel:
        queue = await channel.get_queue(saga_queue)
        message = await wait_for_message(queue)
        assert message.body == b"kept-1"
        await message.ack()
        assert await queue.get(fail=False) is None


async def test_queue_with_another_delivery_limit_is_a_conflict(
    connection: AbstractRobustConnection, prefix: str, settings: Settings
) -> None:
    spec = make_spec(prefix, delivery_limit=5)
    saga_queue = saga_queue_name(prefix, SAGA)
    older = replace(spec, delivery_limit=3)
    async with connection.channel() as channel:
        await channel.declare_queue(saga_queue, durable=True, arguments=queue_arguments(older))

    with pytest.raises(TopologyConflict) as caught:
        await apply_topology(connection, spec)

    conflict = caught.value
    assert (conflict.kind, conflict.name) == ("queue", saga_queue)
    assert (conflict.argument, conflict.existing, conflict.wanted) == ("x-delivery-limit", "3", "5")
    text = str(conflict)
    assert f'queue "{saga_queue}" exists with x-delivery-limit=3 but sagaworks declares 5' in text
    assert f"rabbitmqctl delete_queue {saga_queue} --if-empty" in text
    assert "SAGAWORKS_DELIVERY_LIMIT=3" in text

    rows = await rabbitmqctl("list_queues", "name", "arguments")
    (existing,) = (row for row in rows if row["name"] == saga_queue)
    assert arguments_of(existing)["x-delivery-limit"] == 3, "the existing queue must be untouched"

    # The refused declaration closed only apply_topology's own channel.
    report = await apply_topology(connection, older)
    assert saga_queue in report.queues


async def test_queue_without_delivery_limit_is_a_conflict(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    spec = make_spec(prefix)
    saga_queue = saga_queue_name(prefix, SAGA)
    arguments = queue_arguments(spec)
    del arguments["x-delivery-limit"]
    async with connection.channel() as channel:
        await channel.declare_queue(saga_queue, durable=True, arguments=arguments)

    with pytest.raises(TopologyConflict) as caught:
        await apply_topology(connection, spec)

    assert (caught.value.argument, caught.value.existing, caught.value.wanted) == (
        "x-delivery-limit",
        None,
        "5",
    )
    assert f'queue "{saga_queue}" exists without x-delivery-limit but sagaworks declares 5' in str(
        caught.value
    )
    assert "SAGAWORKS_DELIVERY_LIMIT" not in str(caught.value)


async def test_exchange_of_another_type_is_a_conflict(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    orders = exchange_name(prefix, "orders")
    async with connection.channel() as channel:
        await channel.declare_exchange(orders, aio_pika.ExchangeType.DIRECT, durable=True)

    with pytest.raises(TopologyConflict) as caught:
        await apply_topology(connection, make_spec(prefix))

    conflict = caught.value
    assert (conflict.kind, conflict.name) == ("exchange", orders)
    assert (conflict.argument, conflict.existing, conflict.wanted) == ("type", "direct", "topic")
    assert f'exchange "{orders}" exists with type=direct but sagaworks declares topic' in str(
        conflict
    )
    assert "SAGAWORKS_EXCHANGE_PREFIX" in str(conflict)


async def test_rejected_message_is_dead_lettered_with_its_origin(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    spec = make_spec(prefix)
    saga_queue = saga_queue_name(prefix, SAGA)
    orders = exchange_name(prefix, "orders")
    await apply_topology(connection, spec)
    await publish(connection, orders, "order.placed", b"rejected-1")

    async with connection.channel() as channel:
        queue = await channel.get_queue(saga_queue)
        dead_letters = await channel.get_queue(dead_letter_queue_name(prefix))
        message = await wait_for_message(queue)
        await message.reject(requeue=False)

        dead = await wait_for_message(dead_letters)
        await dead.ack()
        assert await queue.get(fail=False) is None

    assert dead.body == b"rejected-1"
    assert dead.message_id == "rejected-1"
    newest = newest_death(dead)
    assert newest["queue"] == saga_queue
    assert newest["reason"] == "rejected"
    assert newest["exchange"] == orders
    assert newest["routing-keys"] == ["order.placed"]


async def test_message_delivered_past_the_limit_is_dead_lettered(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    limit = 2
    spec = make_spec(prefix, delivery_limit=limit)
    saga_queue = saga_queue_name(prefix, SAGA)
    await apply_topology(connection, spec)
    await publish(connection, exchange_name(prefix, "warehouse"), "shipment.dispatched", b"poison")

    deliveries = 0
    async with connection.channel() as channel:
        queue = await channel.get_queue(saga_queue)
        dead_letters = await channel.get_queue(dead_letter_queue_name(prefix))
        async with asyncio.timeout(20):
            while True:
                message = await queue.get(fail=False)
                if message is not None:
                    deliveries += 1
                    await message.nack(requeue=True)
                    continue
                dead = await dead_letters.get(fail=False)
                if dead is not None:
                    break
                await asyncio.sleep(0.05)
        await dead.ack()

    # x-delivery-limit counts returns: the first delivery plus `limit` redeliveries.
    assert deliveries == limit + 1
    assert dead.body == b"poison"
    newest = newest_death(dead)
    assert newest["queue"] == saga_queue
    assert newest["reason"] == "delivery_limit"


def test_spec_refuses_a_binding_to_an_undeclared_exchange() -> None:
    with pytest.raises(ValueError, match='bound to exchange "elsewhere"'):
        TopologySpec(
            exchanges=("a",),
            queues=(QueueSpec("q", (Binding("elsewhere", "#"),)),),
            dead_letter_exchange="dlx",
            dead_letter_queue="dlq",
            delivery_limit=5,
        )


async def test_closed_port_is_unreachable_at_once() -> None:
    # A generous deadline: reaching it would mean connect() kept retrying.
    async with asyncio.timeout(10):
        with pytest.raises(BrokerUnreachable) as caught:
            await connect("amqp://guest:guest@127.0.0.1:1/", timeout_s=60)

    text = str(caught.value)
    assert "127.0.0.1:1" in text
    assert "RabbitMQ is running" in text
    assert "SAGAWORKS_AMQP_URL (amqp://guest:***@127.0.0.1:1/)" in text


async def test_silent_server_is_unreachable_after_the_timeout(silent_port: int) -> None:
    port = silent_port
    async with asyncio.timeout(10):
        with pytest.raises(BrokerUnreachable) as caught:
            await connect(f"amqp://guest:guest@127.0.0.1:{port}/", timeout_s=0.5)

    assert f"127.0.0.1:{port}" in str(caught.value)
    assert "no AMQP session within 0.5 s" in str(caught.value)


async def test_wrong_password_is_an_authentication_failure_without_the_password(
    settings: Settings,
) -> None:
    password = f"not-the-password-{secrets.token_hex(8)}"
    url = _with_credentials(settings.amqp_url.get_secret_value(), password=password)
    user = urlsplit(url).username

    with pytest.raises(BrokerAuthenticationFailed) as caught:
        await connect(url, timeout_s=settings.amqp_connect_timeout_s)

    failure = caught.value
    text = str(failure)
    assert (failure.user, failure.vhost) == (user, vhost_of(url))
    assert f'refused user "{user}" on vhost "{failure.vhost}"' in text
    assert "Check the user name and password" in text
    rendered = "".join(traceback.format_exception(failure))
    assert password not in rendered
    assert password not in repr(failure)
    assert ":***@" in text


async def test_unknown_vhost_is_an_authentication_failure_naming_it(
    settings: Settings, prefix: str
) -> None:
    vhost = f"{prefix}missing"
    url = _with_credentials(settings.amqp_url.get_secret_value(), vhost=vhost)

    with pytest.raises(BrokerAuthenticationFailed) as caught:
        await connect(url, timeout_s=settings.amqp_connect_timeout_s)

    assert caught.value.vhost == vhost
    assert f'vhost "{vhost}" exists' in str(caught.value)


async def test_a_dead_letter_queue_of_an_earlier_release_is_a_conflict_with_its_upgrade(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    spec = make_spec(prefix)
    dead_letters = dead_letter_queue_name(prefix)
    async with connection.channel() as channel:
        await channel.declare_queue(
            dead_letters, durable=True, arguments={"x-queue-type": "quorum"}
        )

    with pytest.raises(TopologyConflict) as caught:
        await apply_topology(connection, spec)

    assert caught.value.name == dead_letters
    assert f"rabbitmqctl delete_queue {dead_letters} --if-empty" in str(caught.value)


async def test_the_dead_letter_queue_moves_what_it_cannot_deliver_to_the_unstorable_queue(
    connection: AbstractRobustConnection, prefix: str
) -> None:
    spec = replace(make_spec(prefix), dead_letter_delivery_limit=2)
    await apply_topology(connection, spec)
    async with connection.channel() as channel:
        for body in (b"refused", b"returned"):
            await channel.default_exchange.publish(
                aio_pika.Message(body, message_id=body.decode(), headers={"x-kept": "yes"}),
                routing_key=dead_letter_queue_name(prefix),
            )
        dead_letters = await channel.get_queue(dead_letter_queue_name(prefix))
        refused = await wait_for_message(dead_letters)
        await refused.reject(requeue=False)
        returns = 0
        async with asyncio.timeout(20):
            while (message := await dead_letters.get(fail=False)) is not None or returns == 0:
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                returns += 1
                await message.nack(requeue=True)
        unstorable = await channel.get_queue(unstorable_queue_name(prefix))
        moved = [await wait_for_message(unstorable), await wait_for_message(unstorable)]
        for message in moved:
            await message.ack()

    assert returns == 3, "the first delivery and `dead_letter_delivery_limit` returns"
    assert [(m.body, m.message_id, m.headers["x-kept"]) for m in moved] == [
        (b"refused", "refused", "yes"),
        (b"returned", "returned", "yes"),
    ]
    assert [m.headers["x-first-death-reason"] for m in moved] == ["rejected", "delivery_limit"]
