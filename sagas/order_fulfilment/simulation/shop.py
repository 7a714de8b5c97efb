"""Simulated services around the saga, talking over real RabbitMQ like real ones would.

`OrderService` publishes `order.placed` and cancellation requests and listens
for the outcome events; `Warehouse` publishes `shipment.dispatched` once a
shipment was booked. Both set CloudEvents attributes as AMQP properties, and
their broker user as `user_id`: run on one connection, they publish as its
user, which `simulated_publishers` adds to the allowed publishers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderPlaced,
    ShipmentDispatched,
)
from sagaworks import Message
from sagaworks.settings import Settings

__all__ = ["OrderService", "Outcome", "Warehouse", "publish", "simulated_publishers"]


def simulated_publishers(settings: Settings, user: str) -> Settings:
    """`settings` with `user` (the simulation's broker user) allowed to publish what it sends."""
    allowed = dict(settings.publishers)
    for event in (OrderPlaced, OrderCancellationRequested, ShipmentDispatched):
        users = allowed.get(event.message_type, event.publishers)
        allowed[event.message_type] = tuple(dict.fromkeys((*users, user)))
    return settings.model_copy(update={"publishers": allowed})


Outcome = tuple[str, str]
"""(outcome event type, reason or shipment id) per order id."""


async def publish(
    exchange: AbstractExchange,
    message: Message,
    message_id: str,
    *,
    source: str,
    user_id: str,
    correlation_id: str | None = None,
) -> None:
    """Publish like a well-behaved service: persistent, confirmed, CloudEvents attributes.

    `user_id` must be the connection's broker user: RabbitMQ verifies it.
    """
    await exchange.publish(
        aio_pika.Message(
            message.model_dump_json().encode(),
            message_id=message_id,
            type=message.message_type,
            app_id=source,
            user_id=user_id,
            correlation_id=correlation_id,
            timestamp=datetime.now(UTC),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            headers={"cloudEvents_specversion": "1.0"},
        ),
        routing_key=message.routing_key,
    )


class OrderService:
    """Places orders and records how each one ended, from the events sagaworks publishes."""

    def __init__(self, channel: AbstractChannel, orders_exchange: str, user_id: str) -> None:
        self._channel = channel
        self._user_id = user_id
        self._exchange_name = orders_exchange
        self.exchange: AbstractExchange | None = None
        self.outcomes: dict[str, Outcome] = {}
        self.outcome_events = 0
        self._queue: aio_pika.abc.AbstractQueue | None = None

    async def start(self) -> None:
        self.exchange = await self._channel.get_exchange(self._exchange_name)
        self._queue = await self._channel.declare_queue(exclusive=True, auto_delete=True)
        for event in (OrderFulfilled, OrderCancelled):
            await self._queue.bind(self.exchange, event.routing_key)
        await self._queue.consume(self._on_outcome)

    async def _on_outcome(self, incoming: AbstractIncomingMessage) -> None:
        async with incoming.process():
            self.outcome_events += 1
            if incoming.type == OrderFulfilled.message_type:
                done = OrderFulfilled.model_validate_json(incoming.body)
                self.outcomes[done.order_id] = (done.message_type, done.shipment_id)
            elif incoming.type == OrderCancelled.message_type:
                cancelled = OrderCancelled.model_validate_json(incoming.body)
                self.outcomes[cancelled.order_id] = (cancelled.message_type, cancelled.reason)

    async def send(self, message: Message, message_id: str, correlation_id: str) -> None:
        assert self.exchange is not None, "start() the order service first"
        await publish(
            self.exchange,
            message,
            message_id,
            source="demo/order-service",
            user_id=self._user_id,
            correlation_id=correlation_id,
        )


class Warehouse:
    """Dispatches booked shipments after a while, as told by `plan` for each order.

    The plan may also make the customer cancel while the parcel waits; each
    message goes to the exchange of its own domain (`exchange_for`).
    """

    def __init__(
        self,
        channel: AbstractChannel,
        exchange_for: Callable[[str], str],
        plan: Callable[[str, str], list[tuple[float, Message, str]]],
        user_id: str,
    ) -> None:
        self._channel = channel
        self._user_id = user_id
        self._exchange_for = exchange_for
        self._plan = plan
        self._pending: set[asyncio.Task[None]] = set()
        self.published = 0

    def on_booked(self, order_id: str, shipment_id: str) -> None:
        """Called by the shipping participant when it books a shipment."""
        for delay, message, message_id in self._plan(order_id, shipment_id):
            task = asyncio.get_running_loop().create_task(self._later(delay, message, message_id))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _later(self, delay: float, message: Message, message_id: str) -> None:
        await asyncio.sleep(delay)
        exchange = await self._channel.get_exchange(
            self._exchange_for(message.domain), ensure=False
        )
        await publish(exchange, message, message_id, source="demo/warehouse", user_id=self._user_id)
        self.published += 1

    async def stop(self) -> None:
        for task in list(self._pending):
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
