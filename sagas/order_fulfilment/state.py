"""What order fulfilment remembers between steps."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict

from sagas.order_fulfilment.messages import OrderLine

__all__ = ["STATE_VERSION", "OrderState"]

STATE_VERSION = 1


class OrderState(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    order_id: str
    customer_id: str
    lines: tuple[OrderLine, ...]
    amount_cents: int
    currency: str
    dispatch_by: datetime
    reservation_id: str | None = None
    authorisation_id: str | None = None
    shipment_id: str | None = None
    capture_id: str | None = None
