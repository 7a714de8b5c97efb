"""A realistic mix of orders for the demo and the benchmark, each with its expected outcome.

Pure planning: which messages each simulated service sends, when, and how
the saga should end. Declines, cancellations at several stages, missed
dispatch deadlines, duplicate deliveries and events that arrive before the
saga is ready for them are all part of the mix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX
from sagaworks import Message

__all__ = ["KINDS", "Kind", "OrderPlan", "Send", "plan_orders"]

Kind = Literal[
    "happy",
    "early_dispatch",
    "duplicates",
    "declined",
    "cancel_before_placed",
    "cancel_after_placed",
    "cancel_while_waiting",
    "missed_deadline",
]

KINDS: dict[Kind, int] = {
    "happy": 40,
    "early_dispatch": 10,
    "duplicates": 10,
    "declined": 10,
    "cancel_before_placed": 5,
    "cancel_after_placed": 8,
    "cancel_while_waiting": 7,
    "missed_deadline": 10,
}
"""Relative weight of each kind of order in the mix."""


@dataclass(frozen=True)
class Send:
    """Publish `message` with `message_id` after `delay_s`."""

    delay_s: float
    message: Message
    message_id: str


@dataclass(frozen=True)
class OrderPlan:
    order_id: str
    kind: Kind
    expected: tuple[str, str]
    """(outcome event type, reason) the saga must end with; reason is "" for fulfilment."""
    order_service: tuple[Send, ...]
    """Sent by the order service when the run starts."""
    warehouse: tuple[Send, ...] = field(default=())
    """Sent by the warehouse once the shipment of this order is booked."""


def plan_orders(
    count: int, run_id: str, now: datetime, *, seed: int = 7, missed_deadline_s: float = 2.0
) -> list[OrderPlan]:
    rng = random.Random(seed)  # noqa: S311 - simulation, not security
    kinds = list(KINDS)
    weights = list(KINDS.values())
    return [
        _plan(f"{run_id}-{i:05d}", rng.choices(kinds, weights)[0], now, rng, missed_deadline_s)
        for i in range(count)
    ]


def _plan(
    order_id: str, kind: Kind, now: datetime, rng: random.Random, missed_deadline_s: float
) -> OrderPlan:
    customer = f"{DECLINED_CUSTOMER_PREFIX}{order_id}" if kind == "declined" else f"c-{order_id}"
    deadline = now + timedelta(seconds=missed_deadline_s if kind == "missed_deadline" else 120)
    placed = Send(
        0.0,
        OrderPlaced(
            order_id=order_id,
            customer_id=customer,
            lines=(OrderLine(sku=f"sku-{rng.randint(1, 50)}", quantity=rng.randint(1, 3)),),
            amount_cents=rng.randint(500, 50_000),
            currency="EUR",
            dispatch_by=deadline,
        ),
        f"{order_id}/placed",
    )
    cancel = OrderCancellationRequested(order_id=order_id)
    dispatched = ShipmentDispatched(order_id=order_id, shipment_id=f"shp-{order_id}")
    fulfilled = (OrderFulfilled.message_type, "")
    cancelled = (OrderCancelled.message_type, "customer_cancelled")
    dispatch = (Send(rng.uniform(0.05, 0.3), dispatched, f"{order_id}/dispatched"),)
    match kind:
        case "happy":
            return OrderPlan(order_id, kind, fulfilled, (placed,), dispatch)
        case "early_dispatch":
            return OrderPlan(
                order_id,
                kind,
                fulfilled,
                (placed,),
                (Send(0.0, dispatched, dispatch[0].message_id),),
            )
        case "duplicates":
            again = Send(rng.uniform(0.0, 0.2), placed.message, placed.message_id)
            return OrderPlan(order_id, kind, fulfilled, (placed, again), dispatch + dispatch)
        case "declined":
            return OrderPlan(
                order_id, kind, (OrderCancelled.message_type, "payment_declined"), (placed,)
            )
        case "cancel_before_placed":
            early = Send(0.0, cancel, f"{order_id}/cancel")
            late = Send(rng.uniform(0.05, 0.3), placed.message, placed.message_id)
            return OrderPlan(order_id, kind, cancelled, (early, late))
        case "cancel_after_placed":
            later = Send(rng.uniform(0.0, 0.1), cancel, f"{order_id}/cancel")
            return OrderPlan(order_id, kind, cancelled, (placed, later))
        case "cancel_while_waiting":
            waiting = Send(rng.uniform(0.1, 0.3), cancel, f"{order_id}/cancel")
            return OrderPlan(order_id, kind, cancelled, (placed,), (waiting,))
        case "missed_deadline":
            return OrderPlan(
                order_id,
                kind,
                (OrderCancelled.message_type, "dispatch_deadline_missed"),
                (placed,),
            )
