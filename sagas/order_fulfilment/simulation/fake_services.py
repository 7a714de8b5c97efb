"""Fake inventory, payments and shipping services over HTTP, on loopback, for the demo and tests.

Each service speaks the protocol of docs/participants-http.md: it applies an
effect once per `Idempotency-Key` and replays its first definitive answer to
a repeated key, declines payments of customers whose id starts with
`declined-` (402), and is out of stock for SKUs starting with `sold-out-`
(409). An undo records the key it undoes even when nothing was done, and an
action arriving later with that key is refused (410, `already_undone`). A
test can make it misbehave for a while or for good:

- `unavailable_for(s)`: every call answers 503 (nothing is applied);
- `slow_for(s, delay_s)`: calls are applied, then answered `delay_s` late;
- `hold(operation, order_id=..., delay_s=...)`: calls are held (queued) for
  `delay_s` before they are applied, as a participant's backed-up queue does,
  whether or not the caller still waits;
- `fail(operation, order_id=..., for_s=..., status=503)`: one operation fails;
- `stop()` / `start(port)`: connections are refused in between.

Every call is recorded (`calls`, with its arrival time on the monotonic
clock), as is every distinct idempotency key per operation and every effect
per (operation, order), so a test can count what reached the service and
prove that nothing was charged, reserved or shipped twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from sagas.order_fulfilment.http_ports import IDEMPOTENCY_HEADER, HttpSettings
from sagas.order_fulfilment.ports import ALREADY_UNDONE
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX

__all__ = [
    "SOLD_OUT_SKU_PREFIX",
    "Call",
    "FakeParticipant",
    "FakeServices",
]

SOLD_OUT_SKU_PREFIX = "sold-out-"

Answer = tuple[int, dict[str, Any]]
Operation = Callable[[str, dict[str, Any]], Answer]
"""(order id, request body) -> (status, response body)."""


@dataclass(frozen=True)
class Call:
    """One request as the service received it."""

    operation: str
    key: str
    order_id: str
    at: float
    """`time.monotonic()` when the request arrived."""
    status: int


@dataclass
class _Fault:
    until: float | None
    """Monotonic deadline; None: for good."""
    operations: frozenset[str] | None = None
    order_id: str | None = None
    status: int | None = None
    delay_s: float = 0.0
    hold_s: float = 0.0

    def applies(self, operation: str, order_id: str, now: float) -> bool:
        return (
            (self.until is None or now < self.until)
            and (self.operations is None or operation in self.operations)
            and (self.order_id is None or self.order_id == order_id)
        )


@dataclass
class FakeParticipant:
    """One fake service: routes by path to operations, with faults and a record of calls."""

    name: str
    operations: dict[str, tuple[str, Operation]] = field(default_factory=dict)
    """path -> (operation name, what it does)."""
    calls: list[Call] = field(default_factory=list)
    effects: Counter[tuple[str, str]] = field(default_factory=Counter)
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    undone: set[str] = field(default_factory=set)
    """Keys an undo named, whether or not their action had taken effect."""
    port: int = 0
    _faults: list[_Fault] = field(default_factory=list)
    _held: set[asyncio.Task[Answer]] = field(default_factory=set)
    _runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, path: str, operation: str, does: Operation) -> None:
        self.operations[path] = (operation, does)

    # -- control ---------------------------------------------------------------------------------

    def unavailable_for(self, seconds: float | None, *, status: int = 503) -> None:
        """Answer `status` to every call for `seconds` (None: until `heal()`)."""
        self._faults.append(_Fault(_until(seconds), status=status))

    def slow_for(self, seconds: float | None, delay_s: float) -> None:
        """Apply calls as usual but answer `delay_s` late, for `seconds`."""
        self._faults.append(_Fault(_until(seconds), delay_s=delay_s))

    def hold(
        self,
        operation: str,
        *,
        delay_s: float,
        order_id: str | None = None,
        for_s: float | None = None,
    ) -> None:
        """Queue calls of `operation` arriving within `for_s` for `delay_s`, then apply them.

        A held call is applied when its time comes even if its caller gave up
        (timed out) long before: the late action that undo-before-do is about.
        """
        self._faults.append(
            _Fault(_until(for_s), frozenset({operation}), order_id=order_id, hold_s=delay_s)
        )

    def fail(
        self,
        operation: str,
        *,
        order_id: str | None = None,
        for_s: float | None = None,
        status: int = 503,
    ) -> None:
        """Answer `status` to `operation` (for one order, or all) for `for_s` (None: for good)."""
        self._faults.append(
            _Fault(_until(for_s), frozenset({operation}), order_id=order_id, status=status)
        )

    def heal(self) -> None:
        self._faults.clear()

    async def start(self, port: int | None = None) -> None:
        """Listen on 127.0.0.1 (`port`, else the previous one, else any free one)."""
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Close the listening socket and every open connection: new calls are refused.

        Held calls not applied yet are dropped, as a participant's queue would lose them.
        """
        for task in list(self._held):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- what it saw -----------------------------------------------------------------------------

    def keys(self, operation: str) -> set[str]:
        """Distinct idempotency keys `operation` was called with."""
        return {c.key for c in self.calls if c.operation == operation}

    def count(self, operation: str | None = None, *, since: float = 0.0) -> int:
        return sum(
            1
            for c in self.calls
            if (operation is None or c.operation == operation) and c.at >= since
        )

    def duplicate_effects(self) -> int:
        return sum(n - 1 for n in self.effects.values() if n > 1)

    def standing(self, operation: str) -> set[str]:
        """Keys of `operation` that took effect and were never undone: effects left behind."""
        return {
            key
            for (op, key), (status, _) in self.answers.items()
            if op == operation and 200 <= status < 300 and key not in self.undone
        }

    @property
    def holding(self) -> int:
        """Held calls not applied yet."""
        return len(self._held)

    # -- serving ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        arrived = time.monotonic()
        found = self.operations.get("/" + request.match_info["path"])
        if found is None:
            return web.json_response({"error": "not_found"}, status=404)
        operation, does = found
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        try:
            body = json.loads(await request.read())
        except ValueError:
            body = None
        if not key or not isinstance(body, dict) or not isinstance(body.get("order_id"), str):
            return web.json_response({"error": "bad_request"}, status=400)
        order_id = body["order_id"]
        faults = [f for f in self._faults if f.applies(operation, order_id, arrived)]
        refusal = next((f.status for f in faults if f.status is not None), None)
        hold = max((f.hold_s for f in faults), default=0.0)
        if refusal is not None:
            status, answer = refusal, {"error": "unavailable" if refusal >= 500 else "rejected"}
        elif hold:
            later = self._apply_later(hold, operation, key, order_id, body, does)
            task = asyncio.create_task(later)
            self._held.add(task)
            task.add_done_callback(self._held.discard)
            status, answer = await asyncio.shield(task)
        else:
            status, answer = self._answer(operation, key, order_id, body, does)
        self.calls.append(Call(operation, key, order_id, arrived, status))
        delay = max((f.delay_s for f in faults), default=0.0)
        if delay:
            await asyncio.sleep(delay)
        return web.json_response(answer, status=status)

    async def _apply_later(
        self,
        hold_s: float,
        operation: str,
        key: str,
        order_id: str,
        body: dict[str, Any],
        does: Operation,
    ) -> Answer:
        await asyncio.sleep(hold_s)
        return self._answer(operation, key, order_id, body, does)

    def _answer(
        self, operation: str, key: str, order_id: str, body: dict[str, Any], does: Operation
    ) -> Answer:
        """The first answer to a key is the answer to every repeat of it.

        An action whose key was undone before it arrived is refused, never applied.
        """
        known = self.answers.get((operation, key))
        if known is not None:
            return known
        if key in self.undone:
            refused = (410, {"error": ALREADY_UNDONE, "detail": f"{key} was undone first"})
            self.answers[(operation, key)] = refused
            return refused
        status, answer = does(order_id, body)
        self.answers[(operation, key)] = (status, answer)
        if 200 <= status < 300 and answer.get("undone", True):
            self.effects[(operation, order_id)] += 1
        return status, answer

    def succeeded(self, operation: str, key: str) -> bool:
        answer = self.answers.get((operation, key))
        return answer is not None and 200 <= answer[0] < 300


def _until(seconds: float | None) -> float | None:
    return None if seconds is None else time.monotonic() + seconds


class FakeServices:
    """The three participants, each on its own loopback port."""

    def __init__(self, on_booked: Callable[[str, str], None] | None = None) -> None:
        self.on_booked = on_booked
        """Called with (order id, shipment id) when a shipment is booked (the warehouse hook)."""
        self.inventory = FakeParticipant("inventory")
        self.payments = FakeParticipant("payments")
        self.shipping = FakeParticipant("shipping")
        inv, pay, ship = self.inventory, self.payments, self.shipping
        inv.route("/reservations", "reserve", _reserve)
        inv.route("/reservations/releases", "release", _undo(inv, "reserve"))
        pay.route("/authorisations", "authorise", _authorise)
        pay.route("/authorisations/voids", "void", _undo(pay, "authorise"))
        pay.route("/captures", "capture", _made("capture_id", "cap"))
        ship.route("/shipments", "book", self._book)
        ship.route("/shipments/cancellations", "cancel", _undo(ship, "book"))

    @property
    def participants(self) -> tuple[FakeParticipant, ...]:
        return (self.inventory, self.payments, self.shipping)

    def settings(self, **overrides: Any) -> HttpSettings:
        """Settings of HTTP ports pointing at these services."""
        values: dict[str, Any] = {
            "inventory_url": self.inventory.base_url,
            "payments_url": self.payments.base_url,
            "shipping_url": self.shipping.base_url,
        }
        values.update(overrides)
        return HttpSettings(**values)

    async def start(self) -> None:
        for participant in self.participants:
            await participant.start()

    async def stop(self) -> None:
        for participant in self.participants:
            await participant.stop()

    def duplicate_effects(self) -> int:
        return sum(p.duplicate_effects() for p in self.participants)

    def _book(self, order_id: str, body: dict[str, Any]) -> Answer:
        shipment_id = f"shp-{order_id}"
        if self.on_booked is not None:
            self.on_booked(order_id, shipment_id)
        return 201, {"shipment_id": shipment_id}


def _reserve(order_id: str, body: dict[str, Any]) -> Answer:
    skus = [line.get("sku", "") for line in body.get("lines", [])]
    if any(sku.startswith(SOLD_OUT_SKU_PREFIX) for sku in skus):
        return 409, {"error": "out_of_stock", "detail": ", ".join(skus)}
    return 201, {"reservation_id": f"res-{order_id}"}


def _authorise(order_id: str, body: dict[str, Any]) -> Answer:
    customer = str(body.get("customer_id", ""))
    if customer.startswith(DECLINED_CUSTOMER_PREFIX):
        return 402, {"error": "payment_declined", "detail": f"card of {customer}"}
    return 201, {"authorisation_id": f"auth-{order_id}"}


def _made(field_name: str, prefix: str) -> Operation:
    def make(order_id: str, body: dict[str, Any]) -> Answer:
        return 201, {field_name: f"{prefix}-{order_id}"}

    return make


def _undo(participant: FakeParticipant, action: str) -> Operation:
    """Undo the request named by `undoes`, and remember its key so it never takes effect later."""

    def undo(order_id: str, body: dict[str, Any]) -> Answer:
        undoes = str(body.get("undoes", ""))
        participant.undone.add(undoes)
        return 200, {"undone": participant.succeeded(action, undoes)}

    return undo
