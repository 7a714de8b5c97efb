"""The three participants order fulfilment calls, as typed ports.

Each call takes one command object carrying the idempotency key, so a call
repeated after a crash or a retry has no second effect on the participant.
An undo names the request it undoes by that request's key: when a request
timed out, nobody knows whether it took effect, and the participant does.
The participant remembers that key even when nothing was done, and refuses
the action if it arrives later (`BusinessFailure(ALREADY_UNDONE)`), so an
action that lands after its undo has no effect.
"""

from __future__ import annotations

from typing import Protocol

from pydantic import BaseModel, ConfigDict

from sagas.order_fulfilment.messages import OrderLine

__all__ = [
    "ALREADY_UNDONE",
    "Authorisation",
    "AuthorisePayment",
    "BookShipment",
    "CancelShipment",
    "CapturePayment",
    "Inventory",
    "PaymentCapture",
    "Payments",
    "ReleaseStock",
    "ReserveStock",
    "ShipmentBooking",
    "Shipping",
    "StockReservation",
    "VoidAuthorisation",
]

ALREADY_UNDONE = "already_undone"
"""The refusal of an action whose key an undo named first: the action did not happen."""


class _Command(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    idempotency_key: str
    order_id: str


class ReserveStock(_Command):
    lines: tuple[OrderLine, ...]


class _Undo(_Command):
    undoes: str
    """Idempotency key of the request to undo; the participant undoes it if it took effect."""


class ReleaseStock(_Undo):
    pass


class AuthorisePayment(_Command):
    customer_id: str
    amount_cents: int
    currency: str


class VoidAuthorisation(_Undo):
    pass


class CapturePayment(_Command):
    authorisation_id: str
    amount_cents: int
    currency: str


class BookShipment(_Command):
    lines: tuple[OrderLine, ...]


class CancelShipment(_Undo):
    pass


class StockReservation(BaseModel):
    reservation_id: str


class Authorisation(BaseModel):
    authorisation_id: str


class PaymentCapture(BaseModel):
    capture_id: str


class ShipmentBooking(BaseModel):
    shipment_id: str


class Inventory(Protocol):
    async def reserve(self, command: ReserveStock) -> StockReservation: ...
    async def release(self, command: ReleaseStock) -> None: ...


class Payments(Protocol):
    """`authorise` raises `BusinessFailure("payment_declined")` on a decline."""

    async def authorise(self, command: AuthorisePayment) -> Authorisation: ...
    async def void(self, command: VoidAuthorisation) -> None: ...
    async def capture(self, command: CapturePayment) -> PaymentCapture: ...


class Shipping(Protocol):
    async def book(self, command: BookShipment) -> ShipmentBooking: ...
    async def cancel(self, command: CancelShipment) -> None: ...
