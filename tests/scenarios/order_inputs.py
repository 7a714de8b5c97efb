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
from sagaworks.domain.decide import Failure, StepFinished

__all__ = ["DISPATCH_BY", "RESULTS", "T0", "Kind", "failed", "order_placed", "succeeded"]

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


def succeeded(
    step: str, *, kind: Kind = "action", attempt: int = 1, message_id: str | None = None
) -> StepFinished:
    """The step's port answered: an action with its result, a compensation with none."""
    result = RESULTS.get(step) if kind == "action" else None
    return StepFinished(step, kind, attempt, result=result, message_id=message_id)


def failed(
    step: str,
    reason: str,
    *,
    business: bool,
    retry_at: datetime | None = None,
    kind: Kind = "action",
    attempt: int = 1,
    message_id: str | None = None,
) -> StepFinished:
    """The step's port refused (`business`) or could not be reached."""
    failure = Failure(reason, business=business, retry_at=retry_at)
    return StepFinished(step, kind, attempt, failure=failure, message_id=message_id)
