"""Messages that cross the broker, and the envelope every one of them carries.

A message class names its own CloudEvents `type`, the exchange (by domain) it
travels on, its routing key, and the broker users allowed to publish it, so
publishing, subscribing and checking a publisher need no lookup tables that
could drift from the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["Envelope", "Message"]


class Message(BaseModel):
    """Base of every message body; subclasses declare where they travel.

    >>> class OrderPlaced(
    ...     Message, type="order.placed", domain="orders", publishers=("order-service",)
    ... ):
    ...     order_id: str

    `publishers` are the broker users (the AMQP `user_id`, which RabbitMQ
    verifies) allowed to publish the type; settings may override them
    (`SAGAWORKS_PUBLISHERS`). Empty: not declared here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_type: ClassVar[str]
    domain: ClassVar[str]
    routing_key: ClassVar[str]
    publishers: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        domain: str | None = None,
        routing_key: str | None = None,
        publishers: tuple[str, ...] = (),
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type is None or domain is None:
            return
        if isinstance(publishers, str) or not all(isinstance(p, str) and p for p in publishers):
            raise TypeError(
                f"{cls.__name__}: publishers must be a tuple of broker user names, e.g. "
                f'publishers=("order-service",), not {publishers!r}'
            )
        cls.message_type = type
        cls.domain = domain
        cls.routing_key = routing_key or type
        cls.publishers = tuple(publishers)

    @classmethod
    def is_declared(cls) -> bool:
        return "message_type" in cls.__dict__


@dataclass(frozen=True, slots=True)
class Envelope:
    """Transport metadata, named after CloudEvents attributes (`id`, `type`, `source`, `time`).

    `correlation_id` ties every message of one business transaction together;
    `causation_id` is the id of the message that caused this one.
    """

    id: str
    type: str
    source: str
    time: datetime
    correlation_id: str | None = None
    causation_id: str | None = None
