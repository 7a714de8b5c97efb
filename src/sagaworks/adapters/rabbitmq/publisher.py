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
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from sagaworks.application.ports import OutboxRow

__all__ = ["RabbitPublisher", "amqp_properties"]


def amqp_properties(row: OutboxRow) -> aiormq.spec.Basic.Properties:
    props: dict[str, Any] = dict(row.headers)
    timestamp = props.get("timestamp")
    return aiormq.spec.Basic.Properties(
        # A replay's outbox key differs from the message id it must keep (see dead_letters).
        message_id=props.get("message_id") or row.message_id,
        message_type=props.get("type"),
        app_id=props.get("app_id"),
        correlation_id=props.get("correlation_id"),
        content_type=props.get("content_type", "application/json"),
        timestamp=datetime.fromisoformat(timestamp) if timestamp else None,
        headers=props.get("headers") or {},
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT.value,
    )


class RabbitPublisher:
    """Implements the `Publisher` port on one confirming channel.

    Rows go straight to the channel's `basic_publish`: an `aio_pika.Message` and
    an exchange object per message would only be copied into these properties.
    """

    def __init__(self, connection: AbstractRobustConnection, mandatory_exchanges: set[str]) -> None:
        self._connection = connection
        self._mandatory = mandatory_exchanges
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        channel = self._channel
        if channel is None or channel.is_closed:
            async with self._lock:
                if self._channel is None or self._channel.is_closed:
                    self._channel = await self._connection.channel(
                        publisher_confirms=True, on_return_raises=True
                    )
                channel = self._channel
        return await channel.get_underlay_channel()

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        channel = await self._open_channel()
        await asyncio.gather(
            *(
                channel.basic_publish(
                    row.body,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    properties=amqp_properties(row),
                    mandatory=row.exchange in self._mandatory,
                )
                for row in rows
            )
        )

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
