"""The saga engine end to end: real workers, the real broker and database, simulated participants.

Every test gets a fresh database, its own exchange/queue prefix and its own
workers (see `engine_harness`). Orders are published like the order service
and the warehouse publish them; outcomes are read from PostgreSQL (status,
reason, history), from the outcome events on the `orders` exchange, and from
the participants' ledger (effects per operation: each applied exactly once).
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from engine_harness import (
    EngineHarness,
    FlakyPublisher,
    HistoryEntry,
    RepeatingPublisher,
    SagaRow,
)
from scenarios.order_fulfilment import (
    ALL_ACTIONS,
    HAPPY_HISTORY,
    SCENARIOS,
    Scenario,
    assert_gapless,
    assert_undone_in_reverse,
    kinds,
)

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX
from sagaworks.application.ports import OutboxRow
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

HarnessFactory = Callable[..., Awaitable[EngineHarness]]


@pytest.fixture
async def harness_factory(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[HarnessFactory]:
    """Builds an opened harness with settings overrides; closes (and cleans up) at teardown."""
    opened: list[EngineHarness] = []

    async def make(**overrides: Any) -> EngineHarness:
        values: dict[str, Any] = {
            "database_url": migrated_database_url,
            # A prefix of this test's own, under the session's private prefix.
            "exchange_prefix": f"{run_id}.{secrets.token_hex(3)}.",
            "park_for_s": 30.0,
            "grace_period_s": 5.0,
            "timer_poll_interval_s": 0.1,
            "db_pool_size": 5,
        }
        values.update(overrides)
        harness = EngineHarness(settings_factory(**values), migrated_database_url)
        opened.append(harness)
        await harness.open()
        return harness

    yield make
    failures: list[BaseException] = []
    for harness in reversed(opened):
        try:
            await harness.close()
        except Exception as error:
            failures.append(error)
    if failures:
        raise failures[0]


@pytest.fixture
async def harness(harness_factory: HarnessFactory) -> EngineHarness:
    """One worker with default test settings."""
    h = await harness_factory()
    await h.start_worker()
    return h


def placed(
    order_id: str, *, customer_id: str | None = None, dispatch_in_s: float = 120.0
) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer_id or f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=2), OrderLine(sku="sku-7", quantity=1)),
        amount_cents=4_250,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(seconds=dispatch_in_s),
    )


def dispatched(order_id: str) -> ShipmentDispatched:
    return ShipmentDispatched(order_id=order_id, shipment_id=f"shp-{order_id}")


def cancellation(order_id: str) -> OrderCancellationRequested:
    return OrderCancellationRequested(order_id=order_id)


async def place(harness: EngineHarness, order: OrderPlaced) -> str:
    message_id = f"{order.order_id}/placed"
    await harness.publish(order, message_id, correlation_id=order.order_id)
    return message_id


def dispatch_after_booking(harness: EngineHarness, order_id: str, delay_s: float = 0.05) -> str:
    message_id = f"{order_id}/dispatched"
    harness.plans[order_id] = [(delay_s, dispatched(order_id), message_id)]
    return message_id


async def assert_settled(harness: EngineHarness, saga: SagaRow) -> None:
    """Nothing of a finished saga is left behind: no timers, parked events or unsent messages."""
    timers = await harness.db.fetch("SELECT name FROM timers WHERE saga_id = $1", saga.saga_id)
    assert timers == []
    parked = await harness.db.fetch(
        "SELECT message_id FROM parked_messages WHERE saga_id = $1", saga.saga_id
    )
    assert parked == []

    async def all_published() -> bool:
        unpublished: int = await harness.db.fetchval(
            "SELECT count(*) FROM outbox WHERE saga_id = $1 AND published_at IS NULL",
            saga.saga_id,
        )
        return unpublished == 0

    await harness.eventually(all_published, what=f"outbox of {saga.saga_id} published")


async def assert_outcome(
    harness: EngineHarness, saga: SagaRow, order_id: str, message_type: str, body: dict[str, Any]
) -> None:
    outcome = await harness.wait_for_outcome(order_id)
    assert outcome.message_type == message_type
    assert outcome.body == {"order_id": order_id, **body}
    # Deterministic id: the saga, the version that produced it, the message's index.
    assert outcome.message_id == f"{saga.saga_id}/{saga.version}/0"
    assert outcome.correlation_id == order_id
    assert outcome.headers["cloudEvents_type"] == message_type
    await asyncio.sleep(0.1)
    assert len(harness.outcomes_for(order_id)) == 1, harness.outcomes_for(order_id)


async def assert_fulfilled_event(harness: EngineHarness, saga: SagaRow, order_id: str) -> None:
    await assert_outcome(
        harness,
        saga,
        order_id,
        "order.fulfilled",
        {"shipment_id": f"shp-{order_id}", "capture_id": f"cap-{order_id}"},
    )


# -- 1. the shared scenarios: happy path, decline, cancellations, deadline, duplicates ----------


async def drive(harness: EngineHarness, scenario: Scenario, oid: str) -> OrderPlaced:
    """Make the scenario's moves on the real engine; returns the order placed.

    What follows the placement (the warehouse's dispatch, the customer's
    cancellation) is planned before it, to happen after the booking; a missed
    deadline is one 1.5 s away.
    """
    moves = scenario.moves
    declined = "place_declined" in moves
    order = placed(
        oid,
        customer_id=f"{DECLINED_CUSTOMER_PREFIX}{oid}" if declined else None,
        dispatch_in_s=1.5 if "miss_deadline" in moves else 120.0,
    )
    first_place = next(i for i, m in enumerate(moves) if m.startswith("place"))
    if "dispatch" in moves[first_place:]:
        dispatch_after_booking(harness, oid)
    if "cancel" in moves[first_place:]:
        # The parcel is not dispatched; the customer cancels while the saga waits for it.
        harness.plans[oid] = [(0.3, cancellation(oid), f"{oid}/cancel")]
    if "cancel" in moves[:first_place]:
        cancel_id = f"{oid}/cancel"
        await harness.publish(cancellation(oid), cancel_id, correlation_id=oid)
        (handled,) = await harness.wait_for_handled(cancel_id)
        assert handled.outcome == "parked"
        assert handled.handled is not None
        assert handled.handled.reason == "no_saga"
        (parked,) = await harness.parked(oid)
        assert (parked["message_id"], parked["reason"]) == (cancel_id, "no_saga")
        assert await harness.saga(oid) is None
    for move in moves[first_place:]:
        if move.startswith("place"):
            await place(harness, order)
    return order


async def happy_path(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    assert saga.version == 6
    assert saga.state["reservation_id"] == f"res-{oid}"
    assert saga.state["authorisation_id"] == f"auth-{oid}"
    assert saga.state["shipment_id"] == f"shp-{oid}"
    assert saga.state["capture_id"] == f"cap-{oid}"
    assert history[0].message_id == f"{oid}/placed"
    assert history[0].detail == {"event": "order.placed"}
    (received,) = [h for h in history if h.kind == "event_received"]
    assert received.message_id == f"{oid}/dispatched"


async def duplicates(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    placed_id = f"{oid}/placed"
    records = await harness.wait_for_handled(placed_id, 3)
    assert sorted(r.outcome for r in records) == ["applied", "duplicate", "duplicate"]
    assert [h.kind for h in history].count("started") == 1
    inbox = await harness.db.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", placed_id)
    assert inbox == 1
    assert harness.ledger.duplicate_effects() == 0


async def payment_declined(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    failed = history[4]
    assert failed.detail == {"reason": "payment_declined", "outcome_unknown": False}
    assert history[5].detail == {"reason": "payment_declined"}
    assert history[6].detail == {"kind": "compensation", "attempt": 1, "port": "inventory"}


async def cancelled_before_the_order_arrives(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    assert history[2].message_id == f"{oid}/cancel"
    assert history[2].detail == {"reason": "customer_cancelled"}


async def cancelled_while_awaiting_dispatch(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    assert history[8].message_id == f"{oid}/cancel"


async def dispatch_deadline_missed(
    harness: EngineHarness, oid: str, order: OrderPlaced, saga: SagaRow, history: list[HistoryEntry]
) -> None:
    waiting, missed = history[7], history[8]
    assert datetime.fromisoformat(waiting.detail["until"]) == order.dispatch_by
    assert missed.at >= order.dispatch_by
    assert missed.message_id is None  # caused by the timer, not by a message
    assert history[9].detail == {"reason": "dispatch_deadline_missed"}


Extra = Callable[[EngineHarness, str, OrderPlaced, SagaRow, list[HistoryEntry]], Awaitable[None]]

EXTRA: dict[str, Extra] = {
    "happy_path": happy_path,
    "duplicates": duplicates,
    "payment_declined": payment_declined,
    "cancelled_before_the_order_arrives": cancelled_before_the_order_arrives,
    "cancelled_while_awaiting_dispatch": cancelled_while_awaiting_dispatch,
    "dispatch_deadline_missed": dispatch_deadline_missed,
}
"""What the real engine shows of each scenario beyond what the scenario itself asserts."""


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
async def test_order_fulfilment_scenario(harness: EngineHarness, scenario: Scenario) -> None:
    oid = f"o-{scenario.id}"
    order = await drive(harness, scenario, oid)

    saga = await harness.wait_for_status(oid, scenario.status, timeout_s=15)

    assert saga.reason == scenario.reason
    history = await harness.history(oid)
    assert kinds(history) == scenario.history
    assert_gapless(history)
    assert harness.effects(oid) == scenario.effects
    if scenario.undone:
        assert assert_undone_in_reverse(history, harness.effects(oid)) == scenario.undone
    await assert_outcome(harness, saga, oid, scenario.outcome, scenario.outcome_for(oid))
    await assert_settled(harness, saga)
    await EXTRA[scenario.id](harness, oid, order, saga, history)


# -- 2. cancellation at the other stages -----------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "step"),
    [("reserve", "reserve_stock"), ("authorise", "authorise_payment")],
    ids=["reserving", "authorising"],
)
async def test_cancellation_right_after_placement_compensates(
    harness: EngineHarness, operation: str, step: str
) -> None:
    oid = f"o-cancel-{operation}"
    cancel_id = f"{oid}/cancel"
    gate = harness.gates[operation] = asyncio.Event()  # hold the saga at this step
    dispatch_after_booking(harness, oid)  # never reached: cancelled first
    await place(harness, placed(oid))
    await harness.wait_for_history(oid, "step_started", step)

    await harness.publish(cancellation(oid), cancel_id, correlation_id=oid)
    await harness.wait_for_history(oid, "compensation_started")
    gate.set()
    saga = await harness.wait_for_status(oid, "compensated")

    assert saga.reason == "customer_cancelled"
    history = await harness.history(oid)
    assert_gapless(history)
    position = HAPPY_HISTORY.index(("step_started", step)) + 1
    # The step in flight finishes, then it and every step before it are undone, newest first.
    done = [s for (k, s) in HAPPY_HISTORY[:position] if k == "step_started"]
    undo: list[tuple[str, str | None]] = []
    for undone in reversed(done):
        undo += [("step_started", undone), ("compensation_completed", undone)]
    assert kinds(history) == [
        *HAPPY_HISTORY[:position],
        ("compensation_started", None),
        ("step_completed", step),
        *undo,
        ("compensated", None),
    ]
    (started,) = [h for h in history if h.kind == "compensation_started"]
    assert started.message_id == cancel_id
    assert assert_undone_in_reverse(history, harness.effects(oid)) == done
    await assert_outcome(harness, saga, oid, "order.cancelled", {"reason": "customer_cancelled"})
    await assert_settled(harness, saga)


async def test_cancellation_after_capture_started_is_refused(harness: EngineHarness) -> None:
    oid = "o-cancel-late"
    cancel_id = f"{oid}/cancel"
    capture = harness.gates["capture"] = asyncio.Event()  # hold the capture back
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    await harness.wait_for_history(oid, "step_started", "capture_payment")

    await harness.publish(cancellation(oid), cancel_id, correlation_id=oid)
    refused = await harness.wait_for_history(oid, "cancellation_refused")
    capture.set()
    saga = await harness.wait_for_status(oid, "completed")

    assert (refused.step, refused.message_id) == ("capture_payment", cancel_id)
    assert refused.detail == {"reason": "customer_cancelled"}
    history = await harness.history(oid)
    assert kinds(history) == [
        *HAPPY_HISTORY[:10],
        ("cancellation_refused", "capture_payment"),
        *HAPPY_HISTORY[10:],
    ]
    assert_gapless(history)
    assert saga.reason is None
    await assert_fulfilled_event(harness, saga, oid)
    assert harness.effects(oid) == ALL_ACTIONS

    # Once completed, a further cancellation changes nothing at all.
    late_id = f"{oid}/cancel-again"
    await harness.publish(cancellation(oid), late_id, correlation_id=oid)
    (late,) = await harness.wait_for_handled(late_id)
    assert late.handled is not None
    assert (late.outcome, late.handled.reason) == ("ignored", "saga_completed")
    after = await harness.saga(oid)
    assert after is not None
    assert (after.status, after.version) == ("completed", saga.version)
    assert (after.state, after.progress) == (saga.state, saga.progress)
    # ...but it leaves a trace: one history entry saying it was ignored, and why.
    *before, ignored = await harness.history(oid)
    assert before == history
    assert (ignored.seq, ignored.kind, ignored.step, ignored.message_id) == (
        len(history) + 1,
        "ignored",
        None,
        late_id,
    )
    assert ignored.detail == {
        "reason": "saga_completed",
        "event": "order.cancellation_requested",
        "status": "completed",
    }
    await assert_settled(harness, saga)


async def test_a_step_command_delivered_twice_at_once_has_one_effect(
    harness_factory: HarnessFactory,
) -> None:
    """Both deliveries of a repeated command call the port; the idempotency key makes one effect."""
    harness = await harness_factory()
    repeating: list[RepeatingPublisher] = []

    def wrap(real: Any) -> RepeatingPublisher:
        repeating.append(RepeatingPublisher(real, lambda row: row.routing_key.startswith("port.")))
        return repeating[0]

    await harness.start_worker(publisher_wrapper=wrap)
    oid = "o-command-twice"
    reserve = harness.gates["reserve"] = asyncio.Event()
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))

    async def both_deliveries_at_the_port() -> bool:
        return harness.arrivals["reserve"] >= 2

    await harness.eventually(both_deliveries_at_the_port, what="two concurrent reserve calls")
    reserve.set()
    saga = await harness.wait_for_status(oid, "completed")

    assert saga.reason is None
    assert saga.version == 6
    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    assert harness.ledger.calls["reserve"] == 2
    assert harness.effects(oid) == ALL_ACTIONS
    commands = {row.message_id for row in repeating[0].repeated}
    assert len(commands) == 4
    for command in commands:
        records = await harness.wait_for_handled(command, 2)
        outcomes = sorted(r.outcome for r in records)
        assert outcomes in (["applied", "duplicate"], ["applied", "stale"]), (command, outcomes)
    (first_step,) = [c for c in commands if c.endswith("/1/0")]
    assert sorted(r.outcome for r in harness.handled_for(first_step)) == ["applied", "duplicate"]
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)


# -- 6. re-ordered events --------------------------------------------------------------------


async def test_early_dispatch_is_parked_then_applied(harness: EngineHarness) -> None:
    oid = "o-early"
    dispatch_id = f"{oid}/dispatched"
    reserve = harness.gates["reserve"] = asyncio.Event()  # keep the saga at its first step
    await place(harness, placed(oid))
    await harness.wait_for_history(oid, "step_started", "reserve_stock")

    await harness.publish(dispatched(oid), dispatch_id)
    (handled,) = await harness.wait_for_handled(dispatch_id)
    assert handled.handled is not None
    assert (handled.outcome, handled.handled.reason) == ("parked", "unexpected_event")
    (parked,) = await harness.parked(oid)
    assert (parked["message_id"], parked["reason"]) == (dispatch_id, "unexpected_event")

    reserve.set()
    saga = await harness.wait_for_status(oid, "completed")

    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    (received,) = [h for h in history if h.kind == "event_received"]
    assert received.message_id == dispatch_id
    assert saga.reason is None
    assert await harness.parked(oid) == []
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)


async def test_dispatch_published_at_booking_time_is_not_lost(harness: EngineHarness) -> None:
    """The warehouse dispatches the moment it books: before the saga has recorded the booking."""
    oid = "o-instant"
    dispatch_after_booking(harness, oid, delay_s=0.0)
    await place(harness, placed(oid))

    saga = await harness.wait_for_status(oid, "completed")

    assert saga.reason is None
    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)


# -- 7. two workers, concurrent events -------------------------------------------------------


@pytest.mark.slow
async def test_two_workers_and_concurrent_events_lose_nothing(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(db_pool_size=8)
    await harness.start_worker()
    await harness.start_worker()
    orders = [f"o-many-{i:03d}" for i in range(50)]
    sends: list[tuple[Any, str, str | None]] = []
    for oid in orders:
        order = placed(oid)
        sends += [(order, f"{oid}/placed", oid)] * 2
        sends += [(dispatched(oid), f"{oid}/dispatched", None)] * 2
    random.Random(7).shuffle(sends)

    await asyncio.gather(*(harness.publish(m, mid, correlation_id=c) for m, mid, c in sends))

    for oid in orders:
        await harness.wait_for_status(oid, timeout_s=60)
    for oid in orders:
        saga = await harness.saga(oid)
        assert saga is not None, oid
        assert saga.status == "completed", (oid, saga)
        history = await harness.history(oid)
        assert kinds(history) == HAPPY_HISTORY, oid
        assert_gapless(history)
        transitions = {h.message_id for h in history}
        assert None not in transitions
        assert saga.version == len(transitions) == 6, (oid, saga.version, transitions)
        await assert_settled(harness, saga)
    effects = Counter(op for (op, _order) in harness.ledger.effects.elements())
    assert effects == {"reserve": 50, "authorise": 50, "book": 50, "capture": 50}
    assert harness.ledger.duplicate_effects() == 0
    inbox = await harness.db.fetch(
        "SELECT message_id, count(*) AS n FROM inbox WHERE message_id LIKE 'o-many-%' "
        "GROUP BY message_id"
    )
    assert len(inbox) == 100
    assert {r["n"] for r in inbox} == {1}
    # Both workers competed for the same queues, and events did arrive out of order.
    assert {h.worker for h in harness.handled} == {0, 1}
    parked = Counter(
        h.handled.reason for h in harness.handled if h.outcome == "parked" if h.handled
    )
    assert parked, "some dispatches reached a saga before it could take them"
    assert set(parked) <= {"no_saga", "unexpected_event"}
    assert not [h for h in harness.handled if h.error], "no delivery failed"

    async def every_outcome() -> bool:
        return all(harness.outcomes_for(oid) for oid in orders)

    await harness.eventually(every_outcome, what="an outcome event for every order")
    assert {o.message_type for o in harness.outcomes} == {"order.fulfilled"}


async def test_a_burst_of_orders_is_applied_many_sagas_per_transaction(
    harness: EngineHarness,
) -> None:
    await harness.start_worker()
    orders = [f"o-burst-{i:03d}" for i in range(40)]
    for oid in orders:
        dispatch_after_booking(harness, oid, delay_s=0.0)
    await asyncio.gather(*(place(harness, placed(oid)) for oid in orders))

    for oid in orders:
        saga = await harness.wait_for_status(oid, "completed", timeout_s=30)
        history = await harness.history(oid)
        assert kinds(history) == HAPPY_HISTORY, oid
        assert_gapless(history)
        await assert_settled(harness, saga)
    assert harness.ledger.duplicate_effects() == 0
    # A transaction stamps every transition it writes with one time: fewer distinct
    # times than sagas means sagas shared transactions.
    shared = await harness.db.fetchval(
        "SELECT count(DISTINCT at) FROM saga_history WHERE message_id LIKE 'o-burst-%/placed'"
    )
    assert shared < len(orders), "every order.placed had a transaction of its own"


async def test_a_message_that_breaks_its_batch_fails_alone(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(delivery_limit=2)
    stuck = "o-batch-stuck"
    # The command the stuck order's first transition writes already has an outbox row, so
    # every transaction that tries to write that transition fails on the unique message id.
    taken = f"{harness.saga_id(stuck)}/1/0"
    await harness.db.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body, published_at) "
        "VALUES ($1, 'elsewhere', 'nowhere', ''::bytea, now())",
        taken,
    )
    try:
        await harness.start_worker()
        orders = [f"o-batch-{i:02d}" for i in range(20)]
        for oid in orders:
            dispatch_after_booking(harness, oid, delay_s=0.0)
        await asyncio.gather(*(place(harness, placed(oid)) for oid in [*orders, stuck]))

        for oid in orders:
            saga = await harness.wait_for_status(oid, "completed", timeout_s=30)
            assert kinds(await harness.history(oid)) == HAPPY_HISTORY, oid
            await assert_settled(harness, saga)

        async def dead_lettered() -> asyncpg.Record | None:
            return await harness.dead_letter(f"{stuck}/placed")

        letter = await harness.eventually(dead_lettered, what="the stuck order dead-lettered")
        assert letter["queue"] == harness.saga_queue
        assert await harness.saga(stuck) is None
        failed = {h.message_id for h in harness.handled if h.error}
        assert failed == {f"{stuck}/placed"}, "only the message that breaks its batch fails"
        assert harness.ledger.duplicate_effects() == 0
    finally:
        await harness.db.execute("DELETE FROM outbox WHERE message_id = $1", taken)


# -- 8. parked past its bound ----------------------------------------------------------------


@pytest.mark.slow
async def test_event_for_a_saga_that_never_starts_is_dead_lettered(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(park_for_s=1)
    await harness.start_worker()
    oid = "o-never-placed"
    message_id = f"{oid}/dispatched"
    event = dispatched(oid)

    await harness.publish(event, message_id)
    (handled,) = await harness.wait_for_handled(message_id)
    assert handled.handled is not None
    assert (handled.outcome, handled.handled.reason) == ("parked", "no_saga")

    letter = await harness.eventually(
        lambda: harness.dead_letter(message_id), what="the dead letter", timeout_s=15
    )

    assert letter["reason"] == "no_saga"
    assert letter["message_id"] == message_id
    assert letter["queue"] == harness.saga_queue
    assert letter["exchange"] == f"{harness.prefix}warehouse"
    assert letter["routing_key"] == "shipment.dispatched"
    assert letter["message_type"] == "shipment.dispatched"
    assert letter["saga_type"] == "order_fulfilment"
    assert bytes(letter["body"]) == event.model_dump_json().encode()
    assert (letter["times_failed"], letter["status"]) == (1, "active")
    assert letter["last_failed_at"] - letter["first_failed_at"] == timedelta(0)
    assert await harness.parked(oid) == []
    assert await harness.saga(oid) is None
    # It was never applied, so it is not remembered as processed: once the order exists,
    # sending it again with its original id to the queue that failed (what a replay of the
    # dead letter does) completes the saga instead of being dropped as a duplicate.
    inbox = await harness.db.fetchval(
        "SELECT count(*) FROM inbox WHERE message_id = $1", message_id
    )
    assert inbox == 0
    await place(harness, placed(oid))
    await harness.wait_for_history(oid, "waiting")
    await harness.publish_to_queue(harness.saga_queue, event, message_id)
    saga = await harness.wait_for_status(oid, "completed")
    assert kinds(await harness.history(oid)) == HAPPY_HISTORY
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_fulfilled_event(harness, saga, oid)


# -- 9. crash between commit and publish -----------------------------------------------------


async def test_rows_not_published_after_commit_are_published_by_the_sweeper(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(outbox_sweep_interval_s=0.2)
    stuck_step, stuck_outcome = "o-crash-step", "o-crash-outcome"
    step_saga = str(harness.saga_id(stuck_step)).encode()

    def crash_on(row: OutboxRow) -> bool:
        book_command = row.routing_key == "port.shipping.order_fulfilment"
        fulfilled = row.routing_key == "order.fulfilled"
        return (book_command and step_saga in row.body) or (
            fulfilled and json.loads(row.body)["order_id"] == stuck_outcome
        )

    flaky: list[FlakyPublisher] = []

    def wrap(real: Any) -> FlakyPublisher:
        flaky.append(FlakyPublisher(real, crash_on))
        return flaky[0]

    await harness.start_worker(publisher_wrapper=wrap)
    publisher = flaky[0]
    for oid in (stuck_step, stuck_outcome):
        dispatch_after_booking(harness, oid)
        await place(harness, placed(oid))

    async def two_crashes() -> bool:
        return len(publisher.failed) >= 2

    await harness.eventually(two_crashes, what="both simulated crashes")
    # At that moment nothing was published: the rows wait in the outbox.
    ids = [row.id for row in publisher.failed]
    rows = await harness.db.fetch(
        "SELECT id, published_at FROM outbox WHERE id = ANY($1::bigint[])", ids
    )
    assert {r["id"] for r in rows} == set(ids)
    assert all(r["published_at"] is None for r in rows)
    history = await harness.history(stuck_step)
    assert kinds(history)[-1] == ("step_started", "book_shipment")
    assert harness.outcomes_for(stuck_outcome) == []
    assert "book" not in harness.effects(stuck_step)

    for oid in (stuck_step, stuck_outcome):
        saga = await harness.wait_for_status(oid, "completed", timeout_s=15)
        assert saga.reason is None
        assert kinds(await harness.history(oid)) == HAPPY_HISTORY
        assert harness.effects(oid) == ALL_ACTIONS
        await assert_outcome(
            harness,
            saga,
            oid,
            "order.fulfilled",
            {"shipment_id": f"shp-{oid}", "capture_id": f"cap-{oid}"},
        )
    assert {r.id for r in publisher.published} >= set(ids), "the sweeper published them"

    async def outbox_drained() -> bool:
        left: int = await harness.db.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        return left == 0

    await harness.eventually(outbox_drained, what="no unpublished outbox rows")


# -- 10. poison messages ---------------------------------------------------------------------


async def test_poison_messages_are_dead_lettered_on_first_delivery(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(max_message_bytes=1024)
    await harness.start_worker()
    valid = json.loads(placed("o-poison").model_dump_json())
    poison = {
        "poison/malformed": (
            "order.placed",
            b'{"order_id": "o-poison", "lines": [',
            "malformed_json",
        ),
        "poison/schema": (
            "order.placed",
            json.dumps({"order_id": "o-poison", "amount_cents": -1}).encode(),
            "schema_invalid",
        ),
        "poison/unknown": ("order.refunded", json.dumps(valid).encode(), "unknown_type"),
        "poison/oversized": (
            "order.placed",
            json.dumps({**valid, "padding": "x" * 2048}).encode(),
            "oversized",
        ),
    }
    exception_types = {
        "malformed_json": "ValidationError",
        "schema_invalid": "ValidationError",
        "unknown_type": "UnknownMessageType",
        "oversized": "MessageTooLarge",
    }
    for message_id, (message_type, body, _reason) in poison.items():
        await harness.publish_raw(
            "orders", "order.placed", body, message_id=message_id, message_type=message_type
        )
    oid = "o-after-poison"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))

    saga = await harness.wait_for_status(oid, "completed")

    assert kinds(await harness.history(oid)) == HAPPY_HISTORY
    for message_id, (message_type, body, reason) in poison.items():
        (handled,) = await harness.wait_for_handled(message_id)
        assert handled.outcome == "dead_lettered", message_id
        assert handled.delivery_count == 0, "dead-lettered on its first delivery"
        letter = await harness.dead_letter(message_id)
        assert letter is not None, message_id
        assert letter["reason"] == reason
        assert letter["exception_type"] == exception_types[reason]
        assert letter["exception_message"]
        assert (letter["queue"], letter["exchange"], letter["routing_key"]) == (
            harness.saga_queue,
            f"{harness.prefix}orders",
            "order.placed",
        )
        assert letter["message_type"] == message_type
        assert bytes(letter["body"]) == body
        assert letter["times_failed"] == 1
    assert await harness.saga("o-poison") is None
    assert saga.reason is None
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)
    # Settled by sagaworks itself: nothing waits for a redelivery or went to the broker's DLQ.
    assert await harness.queue_depth(harness.saga_queue) == 0
    assert await harness.queue_depth(harness.systems[0].topology.dead_letter_queue) == 0


# -- timers that fail to apply -----------------------------------------------------------------


async def test_a_timer_that_fails_to_apply_backs_off_and_parks_without_delaying_the_others(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(
        timer_max_attempts=3, timer_retry_base_s=0.5, timer_retry_max_s=1.0
    )
    await harness.start_worker()
    orders = [f"o-timer-{n}" for n in range(21)]
    for oid in orders:
        await place(harness, placed(oid, dispatch_in_s=3600))  # nobody dispatches
    for oid in orders:
        await harness.wait_for_history(oid, "waiting", "await_dispatch", timeout_s=30)

    # One saga's state no longer loads; its deadline is due first, every other one right after.
    poisoned, *others = orders
    poisoned_id = harness.saga_id(poisoned)
    await harness.db.execute(
        "UPDATE saga_instances SET state = '{\"poisoned\": true}' WHERE id = $1", poisoned_id
    )
    await harness.db.execute(
        "UPDATE timers SET fire_at = now() - CASE WHEN saga_id = $1 "
        "THEN interval '1 hour' ELSE interval '0' END",
        poisoned_id,
    )

    for oid in others:
        saga = await harness.wait_for_status(oid, "compensated", timeout_s=30)
        assert saga.reason == "dispatch_deadline_missed"

    async def parked() -> Any:
        return await harness.db.fetchrow(
            "SELECT attempts, last_error, fire_at, parked_at, created_at FROM timers "
            "WHERE saga_id = $1 AND parked_at IS NOT NULL",
            poisoned_id,
        )

    timer = await harness.eventually(parked, what="the failing timer parked", timeout_s=30)
    assert timer["attempts"] == 3
    assert timer["last_error"].startswith("ValidationError: ")
    # Backed off: tried at the hour-old due time, then 0.5 s and 1 s after its failures.
    assert timer["fire_at"] > timer["created_at"]
    assert timer["parked_at"] >= timer["fire_at"]
    await asyncio.sleep(1.5)  # parked: not tried again
    again = await harness.db.fetchrow(
        "SELECT attempts, parked_at FROM timers WHERE saga_id = $1", poisoned_id
    )
    assert (again["attempts"], again["parked_at"]) == (3, timer["parked_at"])
    still = await harness.db.fetchval(
        "SELECT status FROM saga_instances WHERE id = $1", poisoned_id
    )
    assert still == "running"
