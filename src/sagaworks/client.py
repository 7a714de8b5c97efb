"""Publishing the events sagaworks consumes, from another Python service, as the contract says.

A service that imports the message classes of the sagas it feeds publishes a
model instance; the envelope is set here, the same way every time:

- the CloudEvents attributes as AMQP properties and `cloudEvents_*` headers
  (`id`, `type`, `source`, `time`, `datacontenttype`, `specversion`, and
  `correlationid`/`causationid` when given), the W3C `traceparent` and
  `tracestate` passed through as headers;
- `user_id`: the broker user of the connection (RabbitMQ checks it, and
  sagaworks accepts a type only from its allowed publishers);
- persistent delivery on a confirming channel, `mandatory`: a message no
  queue takes raises `MessageReturned`, one the broker refuses
  `MessageRefused`, and one not confirmed in time `PublishTimedOut`;
- the exchange of the message's domain (with the deployment's exchange
  prefix) and its routing key.

    async with EventPublisher.connect(url, source="order-service") as publisher:
        await publisher.publish(placed, message_id=stable_id(OrderPlaced, placed.order_id))

`stable_id` gives a re-sent event the id it had the first time, so sagaworks
takes it once. See docs/messages.md.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from aiormq.exceptions import (
    ChannelAccessRefused,
    ChannelClosed,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
)

from sagaworks.adapters.rabbitmq.connection import broker_user, connect
from sagaworks.adapters.rabbitmq.publisher import amqp_properties
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.application.ports import OutboxRow
from sagaworks.domain.messages import Message

__all__ = [
    "STABLE_ID_NAMESPACE",
    "EventPublisher",
    "MessageRefused",
    "MessageReturned",
    "PublishFailed",
    "PublishTimedOut",
    "stable_id",
]

STABLE_ID_NAMESPACE = uuid.UUID("7d0c8f53-5f0e-4a43-9a57-3c1f3f0e6a11")
"""The UUID namespace of `stable_id`; fixed forever, or re-sent ids would change."""

_JSON = "application/json"


def stable_id(message: type[Message] | str, *key: str) -> str:
    """The same message id for the same event type and business key, on every re-send.

    A UUID (version 5) of the type and the key's parts: `stable_id(OrderPlaced,
    "o-42")` is what the order service sends each time it publishes order
    o-42's placement, so sagaworks applies it once however often it comes.
    Give every distinct event its own key (a different body under the same id
    is dead-lettered as `id_conflict`).
    """
    if not key or not all(key):
        raise ValueError("stable_id needs a non-empty business key, e.g. the order id")
    message_type = message if isinstance(message, str) else message.message_type
    return str(uuid.uuid5(STABLE_ID_NAMESPACE, "\x1f".join((message_type, *key))))


class PublishFailed(Exception):
    """The message was not taken; nothing was published, or not for sure: send it again."""


class MessageReturned(PublishFailed):
    """No queue is bound for the exchange and routing key (mandatory routing returned it)."""


class MessageRefused(PublishFailed):
    """The broker refused the message: a negative confirm, a missing exchange, or a permission."""


class PublishTimedOut(PublishFailed):
    """No confirm within the deadline; the broker may or may not have the message."""


class EventPublisher:
    """Publishes `Message` instances on one confirming channel of `connection`, as its user.

    `source` is the CloudEvents `source` of every message (your service's
    name); `exchange_prefix` is the deployment's `SAGAWORKS_EXCHANGE_PREFIX`.
    """

    def __init__(
        self,
        connection: AbstractRobustConnection,
        *,
        user_id: str,
        source: str,
        exchange_prefix: str = "",
        confirm_timeout_s: float = 10.0,
    ) -> None:
        if not source:
            raise ValueError("give a source: the name of the service that publishes")
        self._connection = connection
        self._user_id = user_id
        self._source = source
        self._prefix = exchange_prefix
        self._timeout_s = confirm_timeout_s
        self._channel: AbstractChannel | None = None
        self._lock = asyncio.Lock()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        amqp_url: str,
        *,
        source: str,
        exchange_prefix: str = "",
        connect_timeout_s: float = 5.0,
        confirm_timeout_s: float = 10.0,
    ) -> AsyncIterator[EventPublisher]:
        """Connect to `amqp_url` (its user becomes `user_id`), publish, close on exit.

        A broker that cannot be reached, or refuses the login, raises within
        `connect_timeout_s` with a message naming host, port and user.
        """
        connection = await connect(amqp_url, timeout_s=connect_timeout_s)
        publisher = cls(
            connection,
            user_id=broker_user(amqp_url),
            source=source,
            exchange_prefix=exchange_prefix,
            confirm_timeout_s=confirm_timeout_s,
        )
        try:
            yield publisher
        finally:
            await publisher.close()
            await connection.close()

    async def publish(
        self,
        message: Message,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        time: datetime | None = None,
    ) -> str:
        """Publish `message` and wait for the broker's confirm; returns the message id.

        Without `message_id` a random one is made: pass `stable_id(...)` (or
        your own stable id) when the same event may be sent again.
        """
        if not type(message).is_declared():
            raise TypeError(
                f"{type(message).__name__} declares no type and domain; publish a message "
                "class declared with Message's type=... and domain=..."
            )
        identity = message_id or str(uuid.uuid4())
        exchange = exchange_name(self._prefix, message.domain)
        envelope = {
            "id": identity,
            "type": message.message_type,
            "source": self._source,
            "time": (time or datetime.now(UTC)).isoformat(),
            "datacontenttype": _JSON,
            "correlationid": correlation_id,
            "causationid": causation_id,
        }
        row = OutboxRow(
            0, identity, exchange, message.routing_key, envelope, message.model_dump_json().encode()
        )
        properties = amqp_properties(row, self._user_id)
        trace = {"traceparent": traceparent, "tracestate": tracestate}
        properties.headers = {**(properties.headers or {}), **{k: v for k, v in trace.items() if v}}
        await self._send(row, properties)
        return identity

    async def _send(self, row: OutboxRow, properties: aiormq.spec.Basic.Properties) -> None:
        what = f'"{row.headers["type"]}" (id {row.message_id}) to exchange "{row.exchange}" '
        what += f'with routing key "{row.routing_key}"'
        channel = await self._open_channel()
        try:
            async with asyncio.timeout(self._timeout_s):
                confirm = await channel.basic_publish(
                    row.body,
                    exchange=row.exchange,
                    routing_key=row.routing_key,
                    properties=properties,
                    mandatory=True,
                )
        except aiormq.exceptions.PublishError as error:
            raise MessageReturned(
                f"the broker returned {what}: no queue is bound for it ({error.args[0]}). "
                "Check the type and the exchange prefix, and that sagaworks' topology is "
                "applied (sagaworks topology apply)"
            ) from error
        except aiormq.exceptions.DeliveryError as error:
            raise MessageRefused(
                f"the broker refused {what} (negative confirm): it could not take it, e.g. a "
                "full queue with reject-publish or a node losing its quorum; send it again "
                "with the same id later"
            ) from error
        except ChannelNotFoundEntity as error:
            raise MessageRefused(
                f'the broker refused {what}: exchange "{row.exchange}" does not exist. Check '
                "the exchange prefix, or apply the topology (sagaworks topology apply)"
            ) from error
        except ChannelAccessRefused as error:
            raise MessageRefused(
                f"the broker refused {what}: {_reply_text(error)}. Broker user "
                f'"{self._user_id}" needs write permission on the exchange'
            ) from error
        except ChannelPreconditionFailed as error:
            raise MessageRefused(
                f"the broker refused {what} and closed the channel: {_reply_text(error)}. "
                f'user_id "{self._user_id}" must be the broker user the connection logged in as'
            ) from error
        except ChannelClosed as error:
            raise MessageRefused(
                f"the broker refused {what} and closed the channel: {_reply_text(error)}"
            ) from error
        except TimeoutError as error:
            raise PublishTimedOut(
                f"no confirm for {what} within {self._timeout_s:g} s; the broker may have it "
                "or not: send it again with the same id"
            ) from error
        if not isinstance(confirm, aiormq.spec.Basic.Ack):
            raise MessageRefused(f"the broker refused {what} (answered {confirm!r})")

    async def _open_channel(self) -> aiormq.abc.AbstractChannel:
        async with self._lock:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(
                    publisher_confirms=True, on_return_raises=True
                )
            return await self._channel.get_underlay_channel()

    async def close(self) -> None:
        if self._channel is not None and not self._channel.is_closed:
            await self._channel.close()


def _reply_text(error: BaseException) -> str:
    """The broker's reason, e.g. `PRECONDITION_FAILED - user_id property set to ...`."""
    reason: Any = error.args[1] if len(error.args) > 1 else (error.args[0] if error.args else "")
    return str(reason)
