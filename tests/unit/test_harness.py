"""Order fulfilment driven end to end through `SagaHarness`: real use cases, no I/O."""

from __future__ import annotations

from datetime import timedelta

import pytest

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.ports import Authorisation, AuthorisePayment
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import (
    Ledger,
    SimulatedPayments,
    Simulation,
    simulated_ports,
)
from sagas.order_fulfilment.state import OrderState
from sagaworks import PortPolicy, PortUnavailable
from sagaworks.domain.instance import Status
from sagaworks.testing import FakeClock, SagaHarness

pytestmark = pytest.mark.unit

Harness = SagaHarness[OrderState]

FORWARD = [
    ("reserve_stock", "action"),
    ("authorise_payment", "action"),
    ("book_shipment", "action"),
]


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def harness(ledger: Ledger) -> Harness:
    return SagaHarness(order_fulfilment, simulated_ports(ledger=ledger))


def placed(harness: Harness, order_id: str = "o-1", customer_id: str = "c-1") -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer_id,
        lines=(OrderLine(sku="sku-1", quantity=2),),
        amount_cents=4_200,
        currency="EUR",
        dispatch_by=harness.clock.now() + timedelta(days=2),
    )


def dispatched(order_id: str = "o-1") -> ShipmentDispatched:
    return ShipmentDispatched(order_id=order_id, shipment_id="wh-1")


def steps(harness: Harness) -> list[tuple[str, str]]:
    return [(c.step, c.kind) for c in harness.commands]


def kinds(harness: Harness, order_id: str = "o-1") -> list[str]:
    return [entry.kind for entry in harness.history(order_id)]


async def test_happy_path_fulfils_the_order(harness: Harness, ledger: Ledger) -> None:
    handled = await harness.publish(placed(harness))
    assert handled.outcome == "applied"
    assert harness.status("o-1") is Status.RUNNING
    assert steps(harness) == FORWARD
    assert kinds(harness)[-1] == "waiting"
    assert harness.published == []

    await harness.publish(dispatched())

    assert harness.status("o-1") is Status.COMPLETED
    assert harness.published == [
        OrderFulfilled(order_id="o-1", shipment_id="shp-o-1", capture_id="cap-o-1")
    ]
    assert steps(harness) == [*FORWARD, ("capture_payment", "action")]
    assert harness.state("o-1").capture_id == "cap-o-1"
    assert kinds(harness)[-4:] == ["event_received", "step_started", "step_completed", "completed"]
    assert [seq.seq for seq in harness.history("o-1")] == list(
        range(1, len(harness.history("o-1")) + 1)
    )
    assert {op for op, _ in ledger.effects} == {"reserve", "authorise", "book", "capture"}
    assert ledger.duplicate_effects() == 0
    assert all(row.published_at is not None for row in harness.store.outbox())


async def test_a_declined_payment_releases_the_stock(harness: Harness, ledger: Ledger) -> None:
    await harness.publish(placed(harness, customer_id="declined-c-9"))

    assert harness.status("o-1") is Status.COMPENSATED
    assert harness.published == [OrderCancelled(order_id="o-1", reason="payment_declined")]
    # The refused authorisation had no effect, so only the reservation is undone.
    assert steps(harness) == [
        ("reserve_stock", "action"),
        ("authorise_payment", "action"),
        ("reserve_stock", "compensation"),
    ]
    assert ledger.count("release") == 1
    assert ledger.count("void") == 0
    assert ledger.count("book") == 0


async def test_a_missed_dispatch_deadline_compensates_in_reverse_order(
    harness: Harness, ledger: Ledger
) -> None:
    order = placed(harness)
    await harness.publish(order)

    assert await harness.advance(timedelta(days=1)) == 0
    assert harness.status("o-1") is Status.RUNNING
    assert await harness.advance(timedelta(days=2)) == 1

    assert harness.status("o-1") is Status.COMPENSATED
    assert harness.published == [OrderCancelled(order_id="o-1", reason="dispatch_deadline_missed")]
    assert steps(harness)[3:] == [
        ("book_shipment", "compensation"),
        ("authorise_payment", "compensation"),
        ("reserve_stock", "compensation"),
    ]
    # The clock stopped at the deadline: the saga missed it at dispatch_by, not a day later.
    (missed,) = [e for e in harness.history("o-1") if e.kind == "deadline_missed"]
    assert missed.at == order.dispatch_by
    assert harness.clock.now() == order.dispatch_by + timedelta(days=1)
    assert (ledger.count("cancel"), ledger.count("void"), ledger.count("release")) == (1, 1, 1)
    # The warehouse dispatching afterwards changes nothing.
    assert (await harness.publish(dispatched())).outcome == "ignored"
    assert harness.status("o-1") is Status.COMPENSATED


async def test_a_duplicate_delivery_is_applied_once(harness: Harness, ledger: Ledger) -> None:
    order = placed(harness)
    assert (await harness.publish(order, message_id="order-1")).outcome == "applied"
    assert (await harness.publish(order, message_id="order-1")).outcome == "duplicate"
    assert (await harness.publish(dispatched(), message_id="wh-1")).outcome == "applied"
    assert (await harness.publish(dispatched(), message_id="wh-1")).outcome == "duplicate"

    assert harness.status("o-1") is Status.COMPLETED
    assert steps(harness) == [*FORWARD, ("capture_payment", "action")]
    assert len(harness.published) == 1
    assert kinds(harness).count("started") == 1
    assert ledger.duplicate_effects() == 0


async def test_every_message_delivered_twice_at_once_still_has_each_effect_once(
    ledger: Ledger,
) -> None:
    harness = SagaHarness(order_fulfilment, simulated_ports(ledger=ledger), redeliver=True)
    await harness.publish(placed(harness))
    await harness.publish(dispatched())

    assert harness.status("o-1") is Status.COMPLETED
    assert len(harness.published) == 1
    # Both copies of each command reached the port; the idempotency key kept one effect.
    assert ledger.calls["reserve"] == 2
    assert ledger.effects[("reserve", "o-1")] == 1
    assert ledger.duplicate_effects() == 0
    outcomes = [d.handled.outcome for d in harness.deliveries]
    assert outcomes.count("applied") == outcomes.count("duplicate") == len(outcomes) // 2


async def test_an_event_that_arrives_early_is_parked_and_applied_later(harness: Harness) -> None:
    await harness.publish(placed(harness), settle=False)
    early = await harness.publish(dispatched(), settle=False)
    assert early.outcome == "parked"
    assert len(harness.store.parked()) == 1

    await harness.run_until_idle()

    assert harness.status("o-1") is Status.COMPLETED
    assert harness.store.parked() == []


async def test_a_cancellation_while_waiting_compensates(harness: Harness) -> None:
    await harness.publish(placed(harness))
    await harness.publish(OrderCancellationRequested(order_id="o-1"))

    assert harness.status("o-1") is Status.COMPENSATED
    assert harness.published == [OrderCancelled(order_id="o-1", reason="customer_cancelled")]
    assert harness.store.timers() == []  # the dispatch deadline went with it


class FlakyPayments(SimulatedPayments):
    """Answers 503 to the first `failures` authorisations."""

    def __init__(self, ledger: Ledger, failures: int) -> None:
        super().__init__("payments", Simulation(), ledger)
        self.failures = failures

    async def authorise(self, command: AuthorisePayment) -> Authorisation:
        if self.failures:
            self.failures -= 1
            raise PortUnavailable("payments answered 503")
        return await super().authorise(command)


async def test_a_transient_failure_is_retried_when_the_clock_reaches_the_retry(
    ledger: Ledger,
) -> None:
    ports = simulated_ports(ledger=ledger)
    ports["payments"] = FlakyPayments(ledger, failures=1)
    policy = PortPolicy(delayed_retries=3, delayed_base_s=10.0, delayed_max_s=10.0)
    harness = SagaHarness(order_fulfilment, ports, clock=FakeClock(), policies={"payments": policy})
    await harness.publish(placed(harness))

    instance = harness.instance("o-1")
    assert instance is not None
    assert instance.in_flight is not None
    assert instance.in_flight.retry_at is not None
    assert kinds(harness)[-1] == "retry_scheduled"

    assert await harness.advance(10) == 1
    assert kinds(harness)[-1] == "waiting"
    assert ("authorise_payment", "action") in steps(harness)
    assert [c.attempt for c in harness.commands if c.step == "authorise_payment"] == [1, 2]


async def test_a_failed_publish_is_swept_and_the_saga_goes_on(harness: Harness) -> None:
    harness.publisher.fail(times=1)
    await harness.publish(placed(harness))

    assert harness.publisher.failures == 1
    assert harness.status("o-1") is Status.RUNNING
    assert kinds(harness)[-1] == "waiting"


async def test_a_saga_waits_out_a_broker_outage_and_resumes_when_it_ends(
    harness: Harness,
) -> None:
    harness.publisher.fail(times=None)
    await harness.publish(placed(harness))

    # The start committed, but its command never left the outbox.
    assert kinds(harness) == ["started", "step_started"]
    assert harness.commands == []
    assert [row.published_at for row in harness.store.outbox()] == [None]

    harness.publisher.heal()
    await harness.run_until_idle()

    assert kinds(harness)[-1] == "waiting"
    assert steps(harness) == FORWARD


async def test_an_event_for_no_saga_is_dead_lettered_once_it_has_waited_long_enough(
    harness: Harness,
) -> None:
    handled = await harness.publish(dispatched("o-404"), message_id="wh-404")
    assert (handled.outcome, handled.reason) == ("parked", "no_saga")

    await harness.advance(harness.settings.park_for_s - 1)
    assert harness.dead_letters == []
    await harness.advance(1)

    (letter,) = harness.dead_letters
    assert (letter.message_id, letter.reason, letter.saga_type) == (
        "wh-404",
        "no_saga",
        "order_fulfilment",
    )
    assert harness.store.parked() == []


async def test_an_event_the_saga_does_not_consume_is_refused(harness: Harness) -> None:
    with pytest.raises(LookupError, match="does not consume"):
        await harness.publish(OrderFulfilled(order_id="o-1", shipment_id="s", capture_id="c"))
