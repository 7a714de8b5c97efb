"""Recoverability against the real broker and database, with fake HTTP participants on loopback.

Each test runs one worker with the HTTP port adapters against the fake
inventory, payments and shipping services (`sagas.order_fulfilment.simulation.fake_services`),
breaks a participant the way real ones break (503s, slow answers, refused
connections, declines, failing compensations, a request it rejects) and
checks how every saga ends, what reached the participant and what did not.
The policies are the production shape with short times, so a test takes
seconds, not minutes; the payment outage lasts the 20 s the issue names.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from broker_tools import USER

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.http_ports import http_ports
from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.simulation.fake_services import FakeServices
from sagas.order_fulfilment.simulation.shop import Warehouse, publish
from sagaworks import Message, PortPolicy
from sagaworks.adapters.rabbitmq.topology import events_exchange_name, exchange_name
from sagaworks.application.ports import BreakerChange, InboundMessage
from sagaworks.application.results import Handled
from sagaworks.bootstrap import System, bootstrap
from sagaworks.domain.instance import saga_id_for
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = [pytest.mark.integration]

FAST = PortPolicy(
    call_timeout_s=0.5,
    immediate_attempts=2,
    immediate_wait_s=0.02,
    immediate_wait_max_s=0.05,
    delayed_retries=8,
    delayed_base_s=0.2,
    delayed_max_s=1.0,
    breaker_failures=3,
    breaker_reset_s=2.0,
)
"""Every port's policy in these tests: the production shape, with short times."""

TERMINAL = ("completed", "compensated", "needs_attention")


@dataclass
class Seen:
    """A breaker change as the test saw it, on the same monotonic clock as the fakes' calls."""

    at: float
    change: BreakerChange


@dataclass
class Rig:
    """One worker with HTTP ports, the fake services, and probes."""

    settings: Settings
    services: FakeServices
    system: System
    worker: Worker
    db: asyncpg.Connection
    client: AbstractRobustConnection
    channel: AbstractChannel
    changes: list[Seen] = field(default_factory=list)
    deliveries: list[tuple[str, int]] = field(default_factory=list)
    """(message id, x-delivery-count) of every step command a port consumer handled."""
    events: list[AbstractIncomingMessage] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.settings.exchange_prefix

    async def place(self, order_id: str, *, customer_id: str | None = None) -> None:
        order = OrderPlaced(
            order_id=order_id,
            customer_id=customer_id or f"c-{order_id}",
            lines=(OrderLine(sku="sku-1", quantity=2),),
            amount_cents=4_250,
            currency="EUR",
            dispatch_by=datetime.now(UTC) + timedelta(seconds=300),
        )
        await self.send(order, f"{order_id}/placed", order_id)

    async def cancel(self, order_id: str) -> None:
        await self.send(
            OrderCancellationRequested(order_id=order_id), f"{order_id}/cancel", order_id
        )

    async def send(self, message: Message, message_id: str, correlation_id: str) -> None:
        exchange = await self.channel.get_exchange(
            exchange_name(self.prefix, message.domain), ensure=False
        )
        await publish(
            exchange,
            message,
            message_id,
            source="tests",
            user_id=USER,
            correlation_id=correlation_id,
        )

    async def status(self, order_id: str) -> str | None:
        status: str | None = await self.db.fetchval(
            "SELECT status FROM saga_instances WHERE saga_type = $1 AND correlation_key = $2",
            order_fulfilment.name,
            order_id,
        )
        return status

    async def history(self, order_id: str) -> list[tuple[str, str | None, dict[str, Any]]]:
        rows = await self.db.fetch(
            "SELECT h.kind, h.step, h.detail FROM saga_history h JOIN saga_instances s "
            "ON s.id = h.saga_id WHERE s.correlation_key = $1 ORDER BY h.seq",
            order_id,
        )
        return [(r["kind"], r["step"], json.loads(r["detail"])) for r in rows]

    async def wait_for(
        self, check: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 30.0
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
            await asyncio.sleep(0.05)

    async def wait_for_status(self, order_id: str, *wanted: str, timeout_s: float = 30.0) -> str:
        async def reached() -> bool:
            return await self.status(order_id) in (wanted or TERMINAL)

        await self.wait_for(reached, f"saga {order_id} to be {wanted or TERMINAL}", timeout_s)
        status = await self.status(order_id)
        assert status is not None
        return status

    def opened(self, port: str) -> list[Seen]:
        return [s for s in self.changes if s.change.port == port and s.change.state == "open"]

    def open_windows(self, port: str) -> list[tuple[float, float]]:
        """(opened at, half-open at) of every time the breaker of `port` was open."""
        windows, opened = [], None
        for seen in (s for s in self.changes if s.change.port == port):
            if seen.change.state == "open":
                opened = seen.at
            elif opened is not None:
                windows.append((opened, seen.at))
                opened = None
        if opened is not None:
            windows.append((opened, time.monotonic()))
        return windows

    async def queue_depth(self, name: str) -> int:
        async with self.client.channel() as channel:
            queue = await channel.declare_queue(name, passive=True)
            return int(queue.declaration_result.message_count or 0)

    async def dead_letters(self) -> int:
        stored: int = await self.db.fetchval("SELECT count(*) FROM dead_letters")
        return stored + await self.queue_depth(self.system.topology.dead_letter_queue)


RigFactory = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig_factory(
    settings_factory: Callable[..., Settings], migrated_database_url: str
) -> AsyncIterator[RigFactory]:
    made: list[tuple[Rig, Warehouse]] = []

    async def make(policies: dict[str, PortPolicy] | None = None, **overrides: Any) -> Rig:
        settings = settings_factory(database_url=migrated_database_url, **overrides)
        client = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
        channel = await client.channel(publisher_confirms=True)
        prefix = settings.exchange_prefix
        warehouse = Warehouse(
            channel,
            lambda domain: exchange_name(prefix, domain),
            lambda order_id, shipment_id: (
                [
                    (
                        0.05,
                        ShipmentDispatched(order_id=order_id, shipment_id=shipment_id),
                        f"{order_id}/dispatched",
                    )
                ]
                if not order_id.startswith("keep-")
                else []
            ),
            USER,
        )
        services = FakeServices(on_booked=warehouse.on_booked)
        await services.start()
        chosen = {"inventory": FAST, "payments": FAST, "shipping": FAST, **(policies or {})}
        ports = http_ports(services.settings(), chosen)
        system = await bootstrap(settings, [order_fulfilment], ports)
        db = await asyncpg.connect(migrated_database_url.replace("+asyncpg", ""))
        rig = Rig(settings, services, system, Worker.__new__(Worker), db, client, channel)
        assert system.breakers is not None
        system.breakers.listen(lambda change: rig.changes.append(Seen(time.monotonic(), change)))
        handle_step_command = system.handle_step_command

        async def recorded(inbound: InboundMessage) -> Handled:
            rig.deliveries.append((inbound.message_id, inbound.delivery_count))
            return await handle_step_command(inbound)

        system.handle_step_command = recorded  # type: ignore[assignment]
        rig.worker = Worker(system)
        await rig.worker.start()
        events = await channel.declare_queue(exclusive=True)
        await events.bind(events_exchange_name(prefix), "breaker.#")
        await events.consume(functools.partial(_keep, rig.events), no_ack=True)
        made.append((rig, warehouse))
        return rig

    yield make

    for rig, warehouse in made:
        await rig.worker.stop()
        await warehouse.stop()
        await rig.system.aclose()
        await rig.services.stop()
        async with rig.client.channel() as channel:
            topology = rig.system.topology
            for name in (
                *(q.name for q in topology.queues),
                topology.dead_letter_queue,
                topology.unstorable_queue,
            ):
                await channel.queue_delete(name)
            for name in (*topology.exchanges, topology.dead_letter_exchange):
                await channel.exchange_delete(name)
        await rig.client.close()
        await rig.db.close()


async def _keep(into: list[AbstractIncomingMessage], message: AbstractIncomingMessage) -> None:
    into.append(message)


def payment_keys_per_order(rig: Rig, operation: str) -> dict[str, int]:
    keys: dict[str, set[str]] = {}
    for call in rig.services.payments.calls:
        if call.operation == operation:
            keys.setdefault(call.order_id, set()).add(call.key)
    return {order: len(k) for order, k in keys.items()}


# -- the payment outage ----------------------------------------------------------------------


@pytest.mark.slow
async def test_a_payment_outage_pauses_payments_only_and_every_saga_completes_after_it(
    rig_factory: RigFactory,
) -> None:
    # One delivery in hand per consumer: the calls the fake receives are then exactly the
    # calls the breaker let through, so "no call while open" is counted without slack.
    rig = await rig_factory(prefetch=1)
    payments = rig.services.payments
    booked_before = ["keep-before-1", "keep-before-2"]
    for order in booked_before:
        await rig.place(order)
    for order in booked_before:
        await rig.wait_for(lambda o=order: _booked(rig, o), f"{order} booked and awaiting dispatch")

    outage_s = 20.0
    payments.unavailable_for(outage_s)
    outage_started = time.monotonic()
    during = [f"during-{i}" for i in range(8)]
    await rig.place(during[0])
    await rig.wait_for(_is_open(rig, "payments"), "the payments breaker to open")
    for order in booked_before:
        await rig.cancel(order)  # their compensation needs shipping, then payments
    for order in during[1:]:
        await rig.place(order)
        await asyncio.sleep(1.0)
    inventory_during = rig.services.inventory.count("reserve", since=outage_started)
    shipping_during = rig.services.shipping.count("cancel", since=outage_started)
    assert time.monotonic() - outage_started < outage_s, "the orders must be placed mid-outage"

    for order in during:
        assert await rig.wait_for_status(order, timeout_s=outage_s + 30) == "completed", order
    for order in booked_before:
        assert await rig.wait_for_status(order) == "compensated", order

    first_open = rig.opened("payments")[0]
    calls_before_open = payments.count(since=outage_started) - payments.count(since=first_open.at)
    windows = rig.open_windows("payments")
    calls_while_open = sum(
        1 for c in payments.calls for start, end in windows if start < c.at < end
    )
    trials = len(windows) - 1
    print(
        f"\npayments: {len(payments.calls)} calls, {calls_before_open} before the breaker "
        f"opened, {calls_while_open} while open over {len(windows)} open windows; "
        f"inventory reserves during the outage: {inventory_during}, shipping cancellations: "
        f"{shipping_during}"
    )
    assert first_open.change.failures == FAST.breaker_failures
    assert calls_before_open == FAST.breaker_failures
    assert calls_while_open == 0
    assert trials >= int(outage_s / FAST.breaker_reset_s) - 2, "one trial per reset timeout"
    assert inventory_during == len(during), "inventory work went on during the outage"
    assert shipping_during == len(booked_before), "shipping work went on during the outage"
    assert rig.changes[-1].change.state == "closed"
    assert await rig.dead_letters() == 0
    assert {count for _, count in rig.deliveries} == {0}, "no delivery was ever redelivered"
    assert payment_keys_per_order(rig, "authorise") == dict.fromkeys(during + booked_before, 1)
    assert payment_keys_per_order(rig, "capture") == dict.fromkeys(during, 1)
    assert rig.services.duplicate_effects() == 0
    for order in during:
        assert payments.effects[("authorise", order)] == 1
        assert payments.effects[("capture", order)] == 1
    retried = [
        order
        for order in during
        if any(kind == "retry_scheduled" for kind, _, _ in await rig.history(order))
    ]
    assert len(retried) <= 1, "only the request that failed before the breaker opened retries"
    row = await rig.db.fetchrow(
        "SELECT state, times_opened, worker FROM port_breakers WHERE port = 'payments'"
    )
    assert row is not None
    assert (row["state"], row["times_opened"]) == ("closed", len(windows))
    assert row["worker"] == rig.system.breakers.worker  # type: ignore[union-attr]
    await rig.wait_for(
        lambda: _true(len(rig.events) >= len(rig.changes)), "every breaker change as an event"
    )
    assert [m.type for m in rig.events[:3]] == [
        "sagaworks.breaker.opened",
        "sagaworks.breaker.half_open",
        "sagaworks.breaker.opened",
    ]
    assert rig.events[-1].type == "sagaworks.breaker.closed"
    assert rig.events[-1].routing_key == "breaker.closed.payments"


async def _booked(rig: Rig, order_id: str) -> bool:
    return any(kind == "waiting" for kind, _, _ in await rig.history(order_id))


def _is_open(rig: Rig, port: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(rig.opened(port))

    return check


async def _true(value: bool) -> bool:
    return value


# -- slow answers and refused connections ----------------------------------------------------


async def test_answers_slower_than_the_call_timeout_count_as_failures(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory(prefetch=1)
    rig.services.payments.slow_for(4.0, delay_s=FAST.call_timeout_s * 3)
    orders = [f"slow-{i}" for i in range(3)]
    for order in orders:
        await rig.place(order)

    for order in orders:
        assert await rig.wait_for_status(order) == "completed", order

    assert rig.opened("payments"), "timeouts opened the breaker"
    assert rig.opened("payments")[0].change.failures == FAST.breaker_failures
    # The slow calls were applied, then answered too late; the retries replayed them.
    assert payment_keys_per_order(rig, "authorise") == dict.fromkeys(orders, 1)
    assert rig.services.duplicate_effects() == 0
    assert await rig.dead_letters() == 0


async def test_refused_connections_count_as_failures(rig_factory: RigFactory) -> None:
    rig = await rig_factory(prefetch=1)
    payments = rig.services.payments
    await payments.stop()
    orders = [f"refused-{i}" for i in range(3)]
    for order in orders:
        await rig.place(order)
    await rig.wait_for(_is_open(rig, "payments"), "the payments breaker to open")
    await asyncio.sleep(FAST.breaker_reset_s * 1.5)
    await payments.start()

    for order in orders:
        assert await rig.wait_for_status(order) == "completed", order

    assert rig.opened("payments")[0].change.failures == FAST.breaker_failures
    assert len(rig.opened("payments")) >= 2, "a trial on a refused connection re-opened it"
    assert payment_keys_per_order(rig, "authorise") == dict.fromkeys(orders, 1)
    assert await rig.dead_letters() == 0


# -- business refusals and compensations -----------------------------------------------------


async def test_a_decline_is_not_retried_and_compensates_at_once(rig_factory: RigFactory) -> None:
    rig = await rig_factory()

    await rig.place("declined-order", customer_id="declined-customer")

    assert await rig.wait_for_status("declined-order") == "compensated"
    history = await rig.history("declined-order")
    assert rig.services.payments.count("authorise") == 1
    assert not [h for h in history if h[0] == "retry_scheduled"]
    failed = [h for h in history if h[0] == "step_failed"]
    assert [(h[1], h[2]["reason"]) for h in failed] == [("authorise_payment", "payment_declined")]
    assert rig.services.inventory.effects[("release", "declined-order")] == 1
    assert rig.services.payments.count("void") == 0, "nothing was authorised, nothing to void"
    assert not rig.changes, "a decline is an answer: the breaker stays closed"


async def test_a_compensation_that_fails_for_a_while_then_succeeds_completes(
    rig_factory: RigFactory,
) -> None:
    rig = await rig_factory()
    order = "keep-void-flaky"
    await rig.place(order)
    await rig.wait_for(lambda: _booked(rig, order), "booked")
    rig.services.payments.fail("void", for_s=3.0)

    await rig.cancel(order)

    assert await rig.wait_for_status(order) == "compensated"
    history = await rig.history(order)
    retries = [h for h in history if h[0] == "retry_scheduled" and h[1] == "authorise_payment"]
    assert retries, "the void was retried with backoff"
    assert all(h[2]["kind"] == "compensation" for h in retries)
    assert [h[1] for h in history if h[0] == "compensation_completed"] == [
        "book_shipment",
        "authorise_payment",
        "reserve_stock",
    ]
    assert rig.services.payments.effects[("void", order)] == 1
    assert len(rig.services.payments.keys("void")) == 1


async def test_a_compensation_that_always_fails_ends_in_needs_attention(
    rig_factory: RigFactory,
) -> None:
    # A single request that keeps failing: with a breaker threshold above its attempts the
    # retry bound decides (see docs/recoverability.md for a whole port that is down).
    patient = PortPolicy(
        call_timeout_s=0.5,
        immediate_attempts=2,
        immediate_wait_s=0.02,
        immediate_wait_max_s=0.05,
        delayed_retries=3,
        delayed_base_s=0.2,
        delayed_max_s=0.5,
        breaker_failures=20,
        breaker_reset_s=2.0,
    )
    rig = await rig_factory(policies={"payments": patient})
    order = "keep-void-broken"
    await rig.place(order)
    await rig.wait_for(lambda: _booked(rig, order), "booked")
    rig.services.payments.fail("void", order_id=order)

    await rig.cancel(order)

    assert await rig.wait_for_status(order) == "needs_attention"
    history = await rig.history(order)
    attention = [h for h in history if h[0] == "needs_attention"]
    assert [(h[1], h[2]["error"]) for h in attention] == [
        ("authorise_payment", attention[0][2]["error"])
    ]
    assert "503" in attention[0][2]["error"]
    voids = rig.services.payments.count("void")
    assert voids == patient.immediate_attempts * (patient.delayed_retries + 1)
    await asyncio.sleep(1.0)
    assert rig.services.payments.count("void") == voids, "no hot loop after giving up"
    row = await rig.db.fetchrow(
        "SELECT progress FROM saga_instances WHERE correlation_key = $1", order
    )
    assert row is not None
    assert "503" in json.loads(row["progress"])["error"]


# -- a handler crash that is not a port failure ----------------------------------------------


async def test_a_rejected_request_is_redelivered_up_to_the_limit_then_dead_lettered(
    rig_factory: RigFactory,
) -> None:
    limit = 3
    rig = await rig_factory(delivery_limit=limit)
    bad, good = "rejected-order", "fine-order"
    rig.services.payments.fail("authorise", order_id=bad, status=400)

    await rig.place(bad)
    await rig.place(good)

    assert await rig.wait_for_status(good) == "completed"
    payments_queue = f"{rig.prefix}sagaworks.port.payments"

    async def dead_lettered() -> bool:
        return await rig.dead_letters() == 1 and await rig.queue_depth(payments_queue) == 0

    await rig.wait_for(dead_lettered, "the rejected command to be dead-lettered")
    bad_calls = [c for c in rig.services.payments.calls if c.order_id == bad]
    # The worker that committed the command ran it first (an eager step); its failure sent the
    # command to the queue. RabbitMQ dead-letters a message once it was returned more than
    # x-delivery-limit times.
    assert len(bad_calls) == 1 + limit + 1, "the eager call, then one call per delivery"
    (rejected,) = {message_id for message_id, n in rig.deliveries if n > 0}
    assert rejected.startswith(str(saga_id_for(order_fulfilment.name, bad)))
    counts = [n for message_id, n in rig.deliveries if message_id == rejected]
    assert counts == list(range(limit + 1)), "x-delivery-count of each delivery"
    assert await rig.status(bad) == "running", "the saga waits for the letter to be replayed"
    assert not rig.changes, "a rejected request says nothing about the port's health"


# -- undo before do --------------------------------------------------------------------------


async def test_an_action_held_past_the_retry_budget_lands_after_its_undo_and_is_refused(
    rig_factory: RigFactory,
) -> None:
    # A breaker threshold above the attempts: the retry budget decides, not an open breaker.
    impatient = PortPolicy(
        call_timeout_s=0.5,
        immediate_attempts=2,
        immediate_wait_s=0.02,
        immediate_wait_max_s=0.05,
        delayed_retries=2,
        delayed_base_s=0.2,
        delayed_max_s=0.5,
        breaker_failures=50,
        breaker_reset_s=2.0,
    )
    attempts = impatient.immediate_attempts * (impatient.delayed_retries + 1)
    budget_s = attempts * impatient.call_timeout_s + impatient.delayed_retries * 0.5
    rig = await rig_factory(policies={"payments": impatient})
    payments = rig.services.payments
    held, other = "held-payment", "unheld-payment"
    held_saga, other_saga = (str(saga_id_for(order_fulfilment.name, o)) for o in (held, other))
    payments.hold("authorise", order_id=held, delay_s=budget_s + 8.0)

    await rig.place(held)
    await rig.place(other)

    assert await rig.wait_for_status(held) == "compensated"
    assert not [k for op, k in payments.answers if op == "authorise" and held_saga in k], (
        "the saga compensated while every attempt was still held"
    )
    history = await rig.history(held)
    failed = [h for h in history if h[0] == "step_failed"]
    assert [(h[1], h[2]["outcome_unknown"]) for h in failed] == [("authorise_payment", True)]
    assert [h[1] for h in history if h[0] == "compensation_completed"] == [
        "authorise_payment",
        "reserve_stock",
    ]
    (void_key,) = payments.keys("void")
    assert payments.answers[("void", void_key)] == (200, {"undone": False})

    await rig.wait_for(lambda: _true(payments.holding == 0), "the held calls to land", 30.0)
    late = [c for c in payments.calls if c.operation == "authorise" and c.order_id == held]
    assert len(late) == attempts, "every held attempt landed after the undo"
    assert {c.status for c in late} == {410}, "and each was refused"
    assert payments.effects[("authorise", held)] == 0
    assert {k.split(":")[0] for k in payments.standing("authorise")} == {other_saga}
    assert {k.split(":")[0] for k in rig.services.inventory.standing("reserve")} == {other_saga}
    assert await rig.wait_for_status(other) == "completed"
    assert await rig.status(held) == "compensated", "the late refusal changed nothing"
    assert await rig.dead_letters() == 0


# -- events parked while their saga lives -----------------------------------------------------


async def test_an_event_parked_for_a_slow_saga_outlives_the_window_until_its_saga_takes_it(
    rig_factory: RigFactory,
) -> None:
    # Payments fail for longer than the parking window; a patient policy keeps retrying.
    patient = PortPolicy(
        call_timeout_s=0.5,
        immediate_attempts=1,
        delayed_retries=60,
        delayed_base_s=0.2,
        delayed_max_s=0.5,
        breaker_failures=1000,
        breaker_reset_s=2.0,
    )
    park_for_s = 2.0
    rig = await rig_factory(
        policies={"payments": patient}, park_for_s=park_for_s, parked_expiry_interval_s=0.2
    )
    slow, cancelled = "keep-slow", "keep-cancelled"
    rig.services.payments.fail("authorise", order_id=slow, for_s=4 * park_for_s)
    rig.services.payments.fail("authorise", order_id=cancelled)
    for order in (slow, cancelled):
        await rig.place(order)
    for order in (slow, cancelled):
        await rig.wait_for(lambda o=order: _retrying(rig, o), f"{order} retrying its payment")
        dispatched = ShipmentDispatched(order_id=order, shipment_id=f"shp-{order}")
        await rig.send(dispatched, f"{order}/dispatched", order)
    await rig.wait_for(lambda: _parked_count(rig, 2), "both dispatches parked")
    parked_at = {
        r["message_id"]: r["received_at"]
        for r in await rig.db.fetch("SELECT message_id, received_at FROM parked_messages")
    }
    await asyncio.sleep(park_for_s * 1.5)
    await rig.cancel(cancelled)

    assert await rig.wait_for_status(slow, timeout_s=60) == "completed"
    taken = await rig.db.fetchval(
        "SELECT h.at FROM saga_history h JOIN saga_instances s ON s.id = h.saga_id "
        "WHERE s.correlation_key = $1 AND h.kind = 'event_received'",
        slow,
    )
    waited = (taken - parked_at[f"{slow}/dispatched"]).total_seconds()
    assert waited > 2 * park_for_s, "the dispatch waited well past the window, then was applied"
    assert await rig.wait_for_status(cancelled) == "compensated"

    async def lettered() -> bool:
        return await rig.db.fetchval("SELECT count(*) FROM dead_letters") == 1

    await rig.wait_for(lettered, "the cancelled order's dispatch to be dead-lettered")
    letter = await rig.db.fetchrow(
        "SELECT message_id, reason, exception_type, exception_message, saga_type FROM dead_letters"
    )
    assert letter is not None
    assert (letter["message_id"], letter["reason"], letter["exception_type"]) == (
        f"{cancelled}/dispatched",
        "saga_ended",
        "SagaEnded",
    )
    assert "ended compensated (customer_cancelled)" in letter["exception_message"]
    assert letter["saga_type"] == order_fulfilment.name
    assert await rig.db.fetchval("SELECT count(*) FROM parked_messages") == 0


async def _retrying(rig: Rig, order_id: str) -> bool:
    return any(
        kind == "retry_scheduled" and step == "authorise_payment"
        for kind, step, _ in await rig.history(order_id)
    )


async def _parked_count(rig: Rig, count: int) -> bool:
    return bool(await rig.db.fetchval("SELECT count(*) FROM parked_messages") == count)
