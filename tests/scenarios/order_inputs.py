"""Order-fulfilment inputs for `decide()`, shared by the unit and contract tests.

One fixed moment, the order it places and what each step's port answers, so
tests written against different layers speak about the same order.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Literal

from pydantic import BaseModel

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.ports import (
    Authorisation,
    PaymentCapture,
    ShipmentBooking,
    StockReservation,
)

__all__ = ["DISPATCH_BY", "RESULTS", "T0", "Kind", "order_placed"]

Kind = Literal["action", "compensation"]

T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
DISPATCH_BY = T0 + timedelta(days=2)

RESULTS: dict[str, BaseModel] = {
    "reserve_stock": StockReservation(reservation_id="res-1"),
    "authorise_payment": Authorisation(authorisation_id="auth-1"),
    "book_shipment": ShipmentBooking(shipment_id="shp-1"),
    "capture_payment": PaymentCapture(capture_id="cap-1"),
}
"""What each step's action answers when it succeeds."""


def order_placed(
    order_id: str,
    *,
    quantity: int = 2,
    amount_cents: int = 4_200,
    dispatch_by: datetime = DISPATCH_BY,
) -> OrderPlaced:
    """Customer `c-1` orders `quantity` of `sku-1`, in euros."""
    return OrderPlaced(
        order_id=order_id,
        customer_id="c-1",
        lines=(OrderLine(sku="sku-1", quantity=quantity),),
        amount_cents=amount_cents,
        currency="EUR",
        dispatch_by=dispatch_by,
    )
