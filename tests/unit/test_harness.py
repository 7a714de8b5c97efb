"""Order fulfilment driven end to end through `SagaHarness`: real use cases, no I/O.

The scenarios of `tests/scenarios/order_fulfilment.py` run here as they run on
the real engine; the other cases are the harness's own (its clock, its
publisher's failures, redelivery).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from itertools import pairwise

import pytest
from scenarios.order_fulfilment import (
    SCENARIOS,
    Scenario,
    assert_gapless,
    assert_undone_in_reverse,
)
from scenarios.order_fulfilment import kinds as kinds_and_steps

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderFulfilled,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.ports import Authorisation, AuthorisePayment
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import (
    DECLINED_CUSTOMER_PREFIX,
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


async def drive(harness: Harness, scenario: Scenario, order: OrderPlaced) -> None:
    """Make the scenario's moves, each delivered and run until the harness is idle."""
    oid = order.order_id
    placed_yet = False
    for move in scenario.moves:
        if move in ("place", "place_declined", "place_again"):
            handled = await harness.publish(order, message_id=f"{oid}/placed")
            assert handled.outcome == ("duplicate" if move == "place_again" else "applied")
            placed_yet = True
        elif move == "dispatch":
            handled = await harness.publish(dispatched(oid), message_id=f"{oid}/dispatched")
            assert handled.outcome == "applied"
        elif move == "cancel":
            handled = await harness.publish(OrderCancellationRequested(order_id=oid))
            assert (handled.outcome, handled.reason) == (
                ("applied", "") if placed_yet else ("parked", "no_saga")
            )
        else:
            # The deadline is two days away: a day passes in vain, then it is missed.
            assert await harness.advance(timedelta(days=1)) == 0
            assert harness.status(oid) is Status.RUNNING
            assert await harness.advance(timedelta(days=2)) == 1


async def happy_path(harness: Harness, order: OrderPlaced) -> None:
    assert steps(harness) == [*FORWARD, ("capture_payment", "action")]
    assert harness.state("o-1").capture_id == "cap-o-1"


async def duplicates(harness: Harness, order: OrderPlaced) -> None:
    assert (await harness.publish(dispatched(), message_id="o-1/dispatched")).outcome == "duplicate"
    assert steps(harness) == [*FORWARD, ("capture_payment", "action")]
    assert len(harness.published) == 1


async def payment_declined(harness: Harness, order: OrderPlaced) -> None:
    # The refused authorisation had no effect, so only the reservation is undone.
    assert steps(harness) == [
        ("reserve_stock", "action"),
        ("authorise_payment", "action"),
        ("reserve_stock", "compensation"),
    ]


async def dispatch_deadline_missed(harness: Harness, order: OrderPlaced) -> None:
    assert steps(harness)[3:] == [
        ("book_shipment", "compensation"),
        ("authorise_payment", "compensation"),
        ("reserve_stock", "compensation"),
    ]
    # The clock stopped at the deadline: the saga missed it at dispatch_by, not a day later.
    (missed,) = [e for e in harness.history("o-1") if e.kind == "deadline_missed"]
    assert missed.at == order.dispatch_by
    assert harness.clock.now() == order.dispatch_by + timedelta(days=1)
    # The warehouse dispatching afterwards changes nothing.
    assert (await harness.publish(dispatched())).outcome == "ignored"
    assert harness.status("o-1") is Status.COMPENSATED


async def nothing_more(harness: Harness, order: OrderPlaced) -> None:
    pass


EXTRA: dict[str, Callable[[Harness, OrderPlaced], Awaitable[None]]] = {
    "happy_path": happy_path,
    "duplicates": duplicates,
    "payment_declined": payment_declined,
    "dispatch_deadline_missed": dispatch_deadline_missed,
}
"""What the harness shows of a scenario beyond what the scenario itself asserts."""


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
async def test_order_fulfilment_scenario(
    harness: Harness, ledger: Ledger, scenario: Scenario
) -> None:
    declined = "place_declined" in scenario.moves
    order = placed(harness, customer_id=f"{DECLINED_CUSTOMER_PREFIX}c-9" if declined else "c-1")
    await drive(harness, scenario, order)

    instance = harness.instance("o-1")
    assert instance is not None
    assert (instance.status.value, instance.reason) == (scenario.status, scenario.reason)
    history = harness.history("o-1")
    assert kinds_and_steps(history) == scenario.history
    assert_gapless(history)
    effects = {op: n for (op, order_id), n in ledger.effects.items() if order_id == "o-1"}
    assert effects == scenario.effects
    assert ledger.duplicate_effects() == 0
    if scenario.undone:
        assert assert_undone_in_reverse(history, effects) == scenario.undone
    (outcome,) = harness.published
    assert (outcome.message_type, outcome.model_dump(mode="json")) == (
        scenario.outcome,
        scenario.outcome_for("o-1"),
    )
    # Nothing is left behind: no timers (the dispatch deadline included), parked or unsent rows.
    assert harness.store.timers() == []
    assert harness.store.parked() == []
    assert all(row.published_at is not None for row in harness.store.outbox())
    await EXTRA.get(scenario.id, nothing_more)(harness, order)


async def test_a_placed_order_waits_for_its_dispatch_with_nothing_published(
    harness: Harness,
) -> None:
    handled = await harness.publish(placed(harness))
    assert handled.outcome == "applied"
    assert harness.status("o-1") is Status.RUNNING
    assert steps(harness) == FORWARD
    assert kinds(harness)[-1] == "waiting"
    assert harness.published == []


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


async def test_two_runs_of_a_scenario_schedule_the_same_jittered_retries() -> None:
    policy = PortPolicy(delayed_retries=5, delayed_base_s=10.0, delayed_max_s=600.0)

    async def retry_times() -> list[datetime]:
        ledger = Ledger()
        ports = simulated_ports(ledger=ledger)
        ports["payments"] = FlakyPayments(ledger, failures=4)
        harness = SagaHarness(
            order_fulfilment, ports, clock=FakeClock(), policies={"payments": policy}
        )
        await harness.publish(placed(harness))
        times = []
        while (instance := harness.instance("o-1")) and instance.in_flight is not None:
            retry_at = instance.in_flight.retry_at
            if retry_at is None:
                break
            times.append(retry_at)
            await harness.advance(retry_at - harness.clock.now())
        attempts = [c.attempt for c in harness.commands if c.step == "authorise_payment"]
        assert attempts == [1, 2, 3, 4, 5]
        return times

    first, second = await retry_times(), await retry_times()

    assert len(first) == 4
    assert first == second
    # Jittered, not fixed: the delays are not the bare exponential ceilings.
    delays = [(b - a).total_seconds() for a, b in pairwise([FakeClock().now(), *first])]
    assert delays != [10.0, 20.0, 40.0, 80.0]


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
