"""The events order fulfilment consumes and publishes, with where each travels and who sends it.

Every field of a consumed event is bounded (lengths, amounts, counts) and
deadlines carry a timezone: a body outside these bounds is dead-lettered as
`schema_invalid`.
"""

from __future__ import annotations

from pydantic import AwareDatetime, BaseModel, Field

from sagaworks import Message

__all__ = [
    "MAX_AMOUNT_CENTS",
    "OrderCancellationRequested",
    "OrderCancelled",
    "OrderFulfilled",
    "OrderLine",
    "OrderPlaced",
    "ShipmentDispatched",
]


class OrderLine(BaseModel):
    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=10_000)


MAX_AMOUNT_CENTS = 10**12
"""Ten billion in the currency's main unit: more is a bug or an attack, never an order."""


class OrderPlaced(Message, type="order.placed", domain="orders", publishers=("order-service",)):
    """Published by the order service when a customer checks out."""

    order_id: str = Field(min_length=1, max_length=64)
    customer_id: str = Field(min_length=1, max_length=64)
    lines: tuple[OrderLine, ...] = Field(min_length=1, max_length=200)
    amount_cents: int = Field(gt=0, le=MAX_AMOUNT_CENTS)
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    dispatch_by: AwareDatetime


class OrderCancellationRequested(
    Message,
    type="order.cancellation_requested",
    domain="orders",
    publishers=("order-service",),
):
    """The customer asked to cancel; honoured until the payment is captured."""

    order_id: str = Field(min_length=1, max_length=64)


class ShipmentDispatched(
    Message, type="shipment.dispatched", domain="warehouse", publishers=("warehouse",)
):
    """Published by the warehouse when the parcel leaves."""

    order_id: str = Field(min_length=1, max_length=64)
    shipment_id: str = Field(min_length=1, max_length=64)


class OrderFulfilled(Message, type="order.fulfilled", domain="orders"):
    order_id: str
    shipment_id: str
    capture_id: str


class OrderCancelled(Message, type="order.cancelled", domain="orders"):
    order_id: str
    reason: str
