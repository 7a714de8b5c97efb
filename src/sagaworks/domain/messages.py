"""Messages that cross the broker, and the envelope every one of them carries.

A message class names its own CloudEvents `type`, the exchange (by domain) it
travels on, and its routing key, so publishing and subscribing need no
lookup tables that could drift from the code.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

__all__ = ["Envelope", "Message"]


class Message(BaseModel):
    """Base of every message body; subclasses declare where they travel.

    >>> class OrderPlaced(Message, type="order.placed", domain="orders"):
    ...     order_id: str
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    message_type: ClassVar[str]
    domain: ClassVar[str]
    routing_key: ClassVar[str]

    def __init_subclass__(
        cls,
        *,
        type: str | None = None,
        domain: str | None = None,
        routing_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if type is None or domain is None:
            return
        cls.message_type = type
        cls.domain = domain
        cls.routing_key = routing_key or type

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
