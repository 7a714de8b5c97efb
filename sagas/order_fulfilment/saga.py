"""The order-fulfilment saga, read top to bottom as the business process."""

from __future__ import annotations

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.ports import (
    Authorisation,
    AuthorisePayment,
    BookShipment,
    CancelShipment,
    CapturePayment,
    Inventory,
    PaymentCapture,
    Payments,
    ReleaseStock,
    ReserveStock,
    ShipmentBooking,
    Shipping,
    StockReservation,
    VoidAuthorisation,
)
from sagas.order_fulfilment.state import STATE_VERSION, OrderState
from sagaworks import CancelOn, SagaDefinition, StartOn, Step, StepInput, Wait

__all__ = ["order_fulfilment"]

Call = StepInput[OrderState]


def _placed(event: OrderPlaced) -> OrderState:
    return OrderState(
        order_id=event.order_id,
        customer_id=event.customer_id,
        lines=event.lines,
        amount_cents=event.amount_cents,
        currency=event.currency,
        dispatch_by=event.dispatch_by,
    )


async def reserve_stock(inventory: Inventory, call: Call) -> StockReservation:
    return await inventory.reserve(
        ReserveStock(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            lines=call.state.lines,
        )
    )


async def release_stock(inventory: Inventory, call: Call) -> None:
    await inventory.release(
        ReleaseStock(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            undoes=call.action_key,
        )
    )


async def authorise_payment(payments: Payments, call: Call) -> Authorisation:
    return await payments.authorise(
        AuthorisePayment(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            customer_id=call.state.customer_id,
            amount_cents=call.state.amount_cents,
            currency=call.state.currency,
        )
    )


async def void_authorisation(payments: Payments, call: Call) -> None:
    await payments.void(
        VoidAuthorisation(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            undoes=call.action_key,
        )
    )


async def book_shipment(shipping: Shipping, call: Call) -> ShipmentBooking:
    return await shipping.book(
        BookShipment(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            lines=call.state.lines,
        )
    )


async def cancel_shipment(shipping: Shipping, call: Call) -> None:
    await shipping.cancel(
        CancelShipment(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            undoes=call.action_key,
        )
    )


async def capture_payment(payments: Payments, call: Call) -> PaymentCapture:
    assert call.state.authorisation_id is not None
    return await payments.capture(
        CapturePayment(
            idempotency_key=call.idempotency_key,
            order_id=call.state.order_id,
            authorisation_id=call.state.authorisation_id,
            amount_cents=call.state.amount_cents,
            currency=call.state.currency,
        )
    )


order_fulfilment: SagaDefinition[OrderState] = SagaDefinition(
    name="order_fulfilment",
    state=OrderState,
    state_version=STATE_VERSION,
    start=StartOn(OrderPlaced, key=lambda e: e.order_id, state=_placed),
    correlate={
        OrderCancellationRequested: lambda e: e.order_id,
        ShipmentDispatched: lambda e: e.order_id,
    },
    steps=(
        Step(
            "reserve_stock",
            port="inventory",
            action=reserve_stock,
            compensation=release_stock,
            on_success=lambda s, r: s.model_copy(update={"reservation_id": r.reservation_id}),
        ),
        Step(
            "authorise_payment",
            port="payments",
            action=authorise_payment,
            compensation=void_authorisation,
            on_success=lambda s, r: s.model_copy(update={"authorisation_id": r.authorisation_id}),
        ),
        Step(
            "book_shipment",
            port="shipping",
            action=book_shipment,
            compensation=cancel_shipment,
            on_success=lambda s, r: s.model_copy(update={"shipment_id": r.shipment_id}),
        ),
        Wait(
            "await_dispatch",
            event=ShipmentDispatched,
            deadline=lambda s: s.dispatch_by,
            timeout_reason="dispatch_deadline_missed",
        ),
        Step(
            "capture_payment",
            port="payments",
            action=capture_payment,
            pivot=True,
            on_success=lambda s, r: s.model_copy(update={"capture_id": r.capture_id}),
        ),
    ),
    cancel=(CancelOn(OrderCancellationRequested, reason="customer_cancelled"),),
    completes_with=OrderFulfilled,
    on_completed=lambda s: OrderFulfilled(
        order_id=s.order_id, shipment_id=s.shipment_id or "", capture_id=s.capture_id or ""
    ),
    compensates_with=OrderCancelled,
    on_compensated=lambda s, reason: OrderCancelled(order_id=s.order_id, reason=reason),
)
