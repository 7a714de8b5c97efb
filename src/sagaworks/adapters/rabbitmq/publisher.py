"""Publishing outbox rows: persistent, confirmed, pipelined.

All rows of a batch are sent before any confirm is awaited, so a batch costs
one broker round trip, not one per message. Commands to sagaworks' own
queues are `mandatory`: a command nobody would receive is an error, not a
silent drop. Events are not: another service may not listen yet. Every
message carries the connection's user as `user_id` (RabbitMQ verifies it),
so a consumer can tell sagaworks' own commands from anyone else's. A row
with a trace context carries it as the W3C `traceparent` header.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from sagaworks.adapters.rabbitmq.cloudevents import (
    CE_PREFIX,
    SPEC_VERSION,
    TRACEPARENT,
    is_broker_owned,
    parse_time,
    read_attribute,
)
from sagaworks.application.ports import OutboxRow

__all__ = ["RabbitPublisher", "amqp_properties"]

_PERSISTENT = aio_pika.DeliveryMode.PERSISTENT.value
_JSON = "application/json"


def amqp_properties(row: OutboxRow, user_id: str | None = None) -> aiormq.spec.Basic.Properties:
    """The AMQP properties of an outbox row, from its neutral envelope (see `wire.py`).

    `user_id` must be the publishing connection's user, or RabbitMQ refuses the message.
    """
    envelope = row.headers
    carried = envelope.get("headers")
    if carried is not None:
        return _resent(row, envelope, carried, user_id)
    time = envelope.get("time")
    correlation_id = envelope.get("correlationid")
    causation_id = envelope.get("causationid")
    content_type = envelope.get("datacontenttype") or _JSON
    headers: dict[str, Any] = {
        f"{CE_PREFIX}specversion": SPEC_VERSION,
        f"{CE_PREFIX}id": envelope.get("id"),
        f"{CE_PREFIX}type": envelope.get("type"),
        f"{CE_PREFIX}source": envelope.get("source"),
        f"{CE_PREFIX}time": time,
        f"{CE_PREFIX}datacontenttype": content_type,
    }
    if correlation_id:
        headers[f"{CE_PREFIX}correlationid"] = correlation_id
    if causation_id:
        headers[f"{CE_PREFIX}causationid"] = causation_id
    if row.trace_context:
        headers[TRACEPARENT] = row.trace_context
    return aiormq.spec.Basic.Properties(
        message_id=envelope.get("id") or row.message_id,
        message_type=envelope.get("type"),
        app_id=envelope.get("source"),
        correlation_id=correlation_id,
        content_type=content_type,
        timestamp=datetime.fromisoformat(time) if time else None,
        headers=headers,
        delivery_mode=_PERSISTENT,
        user_id=user_id,
    )


def _resent(
    row: OutboxRow, envelope: Mapping[str, Any], carried: Mapping[str, Any], user_id: str | None
) -> aiormq.spec.Basic.Properties:
    """A stored message sent again: its own headers, less what the broker wrote on them."""
    headers = {key: value for key, value in carried.items() if not is_broker_owned(key)}
    time = read_attribute("time", headers)
    return aiormq.spec.Basic.Properties(
        # A replay's outbox key differs from the message id it must keep (see dead_letters).
        message_id=envelope.get("id") or row.message_id,
        message_type=envelope.get("type") or read_attribute("type", headers),
        app_id=read_attribute("source", headers),
        correlation_id=read_attribute("correlationid", headers),
        content_type=read_attribute("datacontenttype", headers) or _JSON,
        timestamp=parse_time(time),
        headers=headers,
        delivery_mode=_PERSISTENT,
        user_id=user_id,
    )


class RabbitPublisher:
    """Implements the `Publisher` port on one confirming channel, as broker user `user_id`.

    `user_id` must be the connection's user (RabbitMQ refuses any other), and
    consumers accept step commands only from sagaworks' own user.

    Rows go straight to the channel's `basic_publish`: an `aio_pika.Message` and
    an exchange object per message would only be copied into these properties.

    A publish waits at most `confirm_timeout_s` for the broker's confirms, then
    raises `TimeoutError`: a confirm sent into a connection that went silent
    never arrives, and the channel does not always fail the wait when the
    connection is declared dead. When aiormq does fail it, it cancels the
    wait; that becomes a `ConnectionError`, as it is no cancellation of the
    caller. Either way the rows stay in the outbox for the sweeper.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        mandatory_exchanges: set[str],
        user_id: str,
        *,
        confirm_timeout_s: float = 30.0,
    ) -> None:
        self._connection = connection
        self._mandatory = mandatory_exchanges
        self._user_id = user_id
        self._confirm_timeout_s = confirm_timeout_s
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
        try:
            async with asyncio.timeout(self._confirm_timeout_s):
                channel = await self._open_channel()
                await asyncio.gather(
                    *(
                        channel.basic_publish(
                            row.body,
                            exchange=row.exchange,
                            routing_key=row.routing_key,
                            properties=amqp_properties(row, self._user_id),
                            mandatory=row.exchange in self._mandatory,
                        )
                        for row in rows
                    )
                )
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # aiormq cancels the confirms it still awaits when the connection dies under
            # them; raised as is, that would stop whichever loop called (the sweeper).
            raise ConnectionError(
                "publish interrupted: the broker connection closed before confirming"
            ) from None

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()
