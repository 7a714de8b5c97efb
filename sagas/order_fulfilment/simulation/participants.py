"""In-process participants for the demo, the benchmark and the tests.

Each simulated port behaves like a careful real service: it applies an
effect once per idempotency key (a repeated key returns the first result),
can be slow and can fail transiently at a configured rate. An undo records
the key it undoes even when nothing was done, and an action arriving later
with that key is refused (`BusinessFailure("already_undone")`): undo before
do leaves nothing behind. It also records every effect by (operation,
order), so a test can prove that no order was charged, reserved or shipped
twice.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sagas.order_fulfilment.ports import (
    ALREADY_UNDONE,
    Authorisation,
    AuthorisePayment,
    BookShipment,
    CancelShipment,
    CapturePayment,
    PaymentCapture,
    ReleaseStock,
    ReserveStock,
    ShipmentBooking,
    StockReservation,
    VoidAuthorisation,
)
from sagaworks import BusinessFailure, PortUnavailable

__all__ = [
    "DECLINED_CUSTOMER_PREFIX",
    "Ledger",
    "SimulatedInventory",
    "SimulatedPayments",
    "SimulatedShipping",
    "Simulation",
    "simulated_ports",
]

DECLINED_CUSTOMER_PREFIX = "declined-"
"""Payments for customers whose id starts with this are declined."""


@dataclass
class Simulation:
    """How the simulated participants behave."""

    latency_s: float = 0.0
    failure_rate: float = 0.0
    seed: int | None = None
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate < 1.0:
            raise ValueError("failure_rate must be in [0, 1)")
        self.rng = random.Random(self.seed)  # noqa: S311 - simulation, not security


@dataclass
class Ledger:
    """Every effect applied, by idempotency key and by (operation, order)."""

    results: dict[str, Any] = field(default_factory=dict)
    effects: Counter[tuple[str, str]] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    undone: set[str] = field(default_factory=set)
    """Keys an undo named, whether or not their action had taken effect."""

    def duplicate_effects(self) -> int:
        """Effects applied more than once for one order: zero when idempotency holds."""
        return sum(n - 1 for n in self.effects.values() if n > 1)

    def count(self, operation: str) -> int:
        return sum(1 for (op, _) in self.effects if op == operation)


class _Participant:
    def __init__(self, name: str, simulation: Simulation, ledger: Ledger) -> None:
        self._name = name
        self._sim = simulation
        self.ledger = ledger

    async def _apply(
        self,
        operation: str,
        key: str,
        order_id: str,
        effect: Callable[[], Any],
        *,
        counts: bool = True,
    ) -> Any:
        self.ledger.calls[operation] += 1
        if self._sim.latency_s:
            await asyncio.sleep(self._sim.latency_s)
        if self._sim.failure_rate and self._sim.rng.random() < self._sim.failure_rate:
            raise PortUnavailable(f"{self._name} answered 503 (simulated)")
        if key in self.ledger.undone and key not in self.ledger.results:
            self.ledger.results[key] = BusinessFailure(ALREADY_UNDONE, f"{key} was undone first")
        if key not in self.ledger.results:
            self.ledger.results[key] = effect()
            if counts:
                self.ledger.effects[(operation, order_id)] += 1
        known = self.ledger.results[key]
        if isinstance(known, BusinessFailure):
            raise known
        return known

    async def _undo(self, operation: str, key: str, order_id: str, undoes: str) -> None:
        """Undo the request `undoes` if it took effect, and refuse it if it comes later."""

        def undo() -> None:
            self.ledger.undone.add(undoes)
            done = self.ledger.results.get(undoes)
            if done is not None and not isinstance(done, BusinessFailure):
                self.ledger.effects[(operation, order_id)] += 1

        await self._apply(operation, key, order_id, undo, counts=False)


class SimulatedInventory(_Participant):
    async def reserve(self, command: ReserveStock) -> StockReservation:
        result: StockReservation = await self._apply(
            "reserve",
            command.idempotency_key,
            command.order_id,
            lambda: StockReservation(reservation_id=f"res-{command.order_id}"),
        )
        return result

    async def release(self, command: ReleaseStock) -> None:
        await self._undo("release", command.idempotency_key, command.order_id, command.undoes)


class SimulatedPayments(_Participant):
    async def authorise(self, command: AuthorisePayment) -> Authorisation:
        def authorise() -> Authorisation | BusinessFailure:
            if command.customer_id.startswith(DECLINED_CUSTOMER_PREFIX):
                return BusinessFailure("payment_declined", f"card of {command.customer_id}")
            return Authorisation(authorisation_id=f"auth-{command.order_id}")

        result: Authorisation = await self._apply(
            "authorise", command.idempotency_key, command.order_id, authorise
        )
        return result

    async def void(self, command: VoidAuthorisation) -> None:
        await self._undo("void", command.idempotency_key, command.order_id, command.undoes)

    async def capture(self, command: CapturePayment) -> PaymentCapture:
        result: PaymentCapture = await self._apply(
            "capture",
            command.idempotency_key,
            command.order_id,
            lambda: PaymentCapture(capture_id=f"cap-{command.order_id}"),
        )
        return result


class SimulatedShipping(_Participant):
    def __init__(
        self,
        simulation: Simulation,
        ledger: Ledger,
        on_booked: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__("shipping", simulation, ledger)
        self._on_booked = on_booked

    async def book(self, command: BookShipment) -> ShipmentBooking:
        def book() -> ShipmentBooking:
            booking = ShipmentBooking(shipment_id=f"shp-{command.order_id}")
            if self._on_booked is not None:
                self._on_booked(command.order_id, booking.shipment_id)
            return booking

        result: ShipmentBooking = await self._apply(
            "book", command.idempotency_key, command.order_id, book
        )
        return result

    async def cancel(self, command: CancelShipment) -> None:
        await self._undo("cancel", command.idempotency_key, command.order_id, command.undoes)


def simulated_ports(
    simulation: Simulation | None = None,
    ledger: Ledger | None = None,
    on_booked: Callable[[str, str], None] | None = None,
) -> dict[str, object]:
    """The three ports by name, sharing one ledger."""
    sim = simulation or Simulation()
    book = ledger or Ledger()
    return {
        "inventory": SimulatedInventory("inventory", sim, book),
        "payments": SimulatedPayments("payments", sim, book),
        "shipping": SimulatedShipping(sim, book, on_booked),
    }
