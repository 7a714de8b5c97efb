"""`sagaworks demo`: the order-fulfilment saga driven end to end, as a shop would run it.

It migrates the configured database, declares the topology, starts a worker
and the participants in this process (simulated, or fake HTTP services on
loopback with `--ports http`), then lets a simulated order service publish a
realistic mix of orders over RabbitMQ and waits until every saga has ended.
Outcomes are read from PostgreSQL; duplicate effects from what the
participants recorded.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aio_pika

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.demo.participants import DemoPorts, demo_participants
from sagas.order_fulfilment.messages import OrderPlaced
from sagas.order_fulfilment.simulation.order_mix import OrderPlan, plan_orders
from sagas.order_fulfilment.simulation.shop import OrderService, Warehouse, simulated_publishers
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.postgres.queries import dead_letter_reasons, saga_status_counts
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.bootstrap import bootstrap, own_user, preflight
from sagaworks.domain.messages import Message
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

__all__ = ["DemoReport", "run_demo"]

TERMINAL = ("completed", "compensated", "needs_attention")


@dataclass
class DemoReport:
    orders: int
    completed: int = 0
    compensated: int = 0
    needs_attention: int = 0
    dead_lettered: int = 0
    not_terminal: int = 0
    duplicate_effects: int = 0
    unexpected_outcomes: int = 0
    elapsed_s: float = 0.0
    by_kind: dict[str, dict[str, int]] = field(default_factory=dict)
    dead_letter_reasons: dict[str, int] = field(default_factory=dict)
    effects: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.not_terminal == 0 and self.duplicate_effects == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "orders": self.orders,
            "completed": self.completed,
            "compensated": self.compensated,
            "needs_attention": self.needs_attention,
            "dead_lettered": self.dead_lettered,
            "not_terminal": self.not_terminal,
            "duplicate_effects": self.duplicate_effects,
            "unexpected_outcomes": self.unexpected_outcomes,
            "elapsed_s": round(self.elapsed_s, 3),
            "by_kind": self.by_kind,
            "dead_letter_reasons": self.dead_letter_reasons,
            "effects": self.effects,
        }


Progress = Callable[[int, int], None]
"""Called with (sagas ended, orders) while the demo runs."""


async def run_demo(
    settings: Settings,
    orders: int,
    *,
    timeout_s: float = 180.0,
    seed: int = 7,
    missed_deadline_s: float = 2.0,
    progress: Progress | None = None,
    ports: DemoPorts = DemoPorts.SIMULATED,
) -> DemoReport:
    await upgrade(settings.effective_migration_url(), "head")
    await preflight(settings)
    run_id = f"demo-{secrets.token_hex(3)}"
    plans = plan_orders(
        orders, run_id, datetime.now(UTC), seed=seed, missed_deadline_s=missed_deadline_s
    )
    by_order = {p.order_id: p for p in plans}
    prefix = settings.exchange_prefix
    user = own_user(settings)
    settings = simulated_publishers(settings, user)
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    channel = await connection.channel(publisher_confirms=True)
    warehouse = Warehouse(
        channel,
        lambda domain: exchange_name(prefix, domain),
        lambda order_id, _shipment: _warehouse_sends(by_order, order_id),
        user,
    )
    participants = await demo_participants(ports, seed, warehouse.on_booked)
    system = await bootstrap(settings, [order_fulfilment], participants.ports)
    worker = Worker(system)
    started = time.monotonic()
    order_service = OrderService(channel, exchange_name(prefix, OrderPlaced.domain), user)
    try:
        await worker.start()
        await order_service.start()
        await asyncio.gather(*(_send_all(order_service, p) for p in plans))
        counts = await _wait_for_end(system, run_id, orders, timeout_s, progress)
        elapsed = time.monotonic() - started
        assert system.engine is not None
        letters = await dead_letter_reasons(system.engine, f"{run_id}-")
        await _settle_outcome_events(order_service, orders)
    finally:
        await warehouse.stop()
        await worker.stop()
        await system.aclose()
        await participants.aclose()
        await connection.close()
    unexpected, by_kind = _compare(plans, order_service.outcomes)
    return DemoReport(
        orders=orders,
        completed=counts.get("completed", 0),
        compensated=counts.get("compensated", 0),
        needs_attention=counts.get("needs_attention", 0),
        dead_lettered=sum(letters.values()),
        not_terminal=orders - sum(counts.get(s, 0) for s in TERMINAL),
        duplicate_effects=participants.duplicate_effects(),
        unexpected_outcomes=unexpected,
        elapsed_s=elapsed,
        by_kind=by_kind,
        dead_letter_reasons=letters,
        effects=dict(participants.effects()),
    )


async def _settle_outcome_events(order_service: OrderService, orders: int) -> None:
    """Outcome events trail the commits that produced them by a broker hop: wait briefly."""
    deadline = time.monotonic() + 5.0
    while len(order_service.outcomes) < orders and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _send_all(order_service: OrderService, plan: OrderPlan) -> None:
    for send in plan.order_service:
        if send.delay_s:
            await asyncio.sleep(send.delay_s)
        await order_service.send(send.message, send.message_id, plan.order_id)


def _warehouse_sends(
    by_order: dict[str, OrderPlan], order_id: str
) -> list[tuple[float, Message, str]]:
    plan = by_order.get(order_id)
    if plan is None:
        return []
    return [(s.delay_s, s.message, s.message_id) for s in plan.warehouse]


async def _wait_for_end(
    system: Any, run_id: str, orders: int, timeout_s: float, progress: Progress | None
) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = await saga_status_counts(system.engine, order_fulfilment.name, f"{run_id}-")
        ended = sum(counts.get(s, 0) for s in TERMINAL)
        if progress is not None:
            progress(ended, orders)
        if ended >= orders or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(0.25)


def _compare(
    plans: list[OrderPlan], outcomes: dict[str, tuple[str, str]]
) -> tuple[int, dict[str, dict[str, int]]]:
    unexpected = 0
    by_kind: dict[str, Counter[str]] = {}
    for plan in plans:
        outcome = outcomes.get(plan.order_id)
        if outcome is None:
            label = "no outcome event"
            unexpected += 1
        else:
            kind, detail = outcome
            label = kind if kind.endswith("fulfilled") else f"{kind} ({detail})"
            expected_kind, expected_detail = plan.expected
            if kind != expected_kind or (expected_detail and detail != expected_detail):
                unexpected += 1
        by_kind.setdefault(plan.kind, Counter())[label] += 1
    return unexpected, {k: dict(v) for k, v in sorted(by_kind.items())}
