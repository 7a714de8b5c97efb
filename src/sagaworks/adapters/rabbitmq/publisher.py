"""Publishing outbox rows: persistent, confirmed, pipelined.

All rows of a batch are sent before any confirm is awaited, so a batch costs
one broker round trip, not one per message. Commands to sagaworks' own
queues are `mandatory`: a command nobody would receive is an error, not a
silent drop. Events are not: another service may not listen yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractRobustConnection

from sagaworks.application.ports import OutboxRow

__all__ = ["RabbitPublisher", "to_amqp_message"]


def to_amqp_message(row: OutboxRow) -> aio_pika.Message:
    props: dict[str, Any] = dict(row.headers)
    timestamp = props.get("timestamp")
    return aio_pika.Message(
        row.body,
        # A replay's outbox key differs from the message id it must keep (see dead_letters).
        message_id=props.get("message_id") or row.message_id,
        type=props.get("type"),
        app_id=props.get("app_id"),
        correlation_id=props.get("correlation_id"),
        content_type=props.get("content_type", "application/json"),
        timestamp=datetime.fromisoformat(timestamp) if timestamp else None,
        headers=props.get("headers") or {},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


class RabbitPublisher:
    """Implements the `Publisher` port on one confirming channel."""

    def __init__(self, connection: AbstractRobustConnection, mandatory_exchanges: set[str]) -> None:
        self._connection = connection
        self._mandatory = mandatory_exchanges
        self._channel: AbstractChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._lock = asyncio.Lock()

    async def _exchange(self, name: str) -> AbstractExchange:
        channel = self._channel
        if channel is None or channel.is_closed:
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    self._channel = await self._connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                    self._exchanges.clear()
                channel = self._channel
        exchange = self._exchanges.get(name)
        if exchange is None:
            exchange = (
                channel.default_exchange
                if name == ""
                else await channel.get_exchange(name, ensure=False)
            )
            self._exchanges[name] = exchange
        return exchange

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        sends = []
        for row in rows:
            exchange = await self._exchange(row.exchange)
            sends.append(
                exchange.publish(
                    to_amqp_message(row),
                    routing_key=row.routing_key,
                    mandatory=row.exchange in self._mandatory,
                )
            )
        await asyncio.gather(*sends)

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
