"""`decide` driven by hand through every transition of order fulfilment. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel
from scenarios.order_inputs import (
    DISPATCH_BY,
    T0,
    Kind,
    failed,
    order_placed,
    succeeded,
)

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.state import OrderState
from sagaworks import CancelOn, SagaDefinition, StartOn, Step, Wait
from sagaworks.domain.decide import (
    COMMANDS_DOMAIN,
    EVENTS_DOMAIN,
    Decision,
    EventReceived,
    HistoryEntry,
    Input,
    Outgoing,
    RunStep,
    SagaNeedsAttention,
    TimerFired,
    TimerSpec,
    deadline_timer,
    decide,
    idempotency_key,
    retry_timer,
)
from sagaworks.domain.instance import InFlight, SagaInstance, Status, saga_id_for
from sagaworks.domain.messages import Envelope, Message

pytestmark = pytest.mark.unit

ORDER = "o-1"
SAGA_ID = saga_id_for("order_fulfilment", ORDER)
DEADLINE = deadline_timer("await_dispatch")

# --- input builders ---------------------------------------------------------------------------


def placed(order_id: str = ORDER) -> OrderPlaced:
    return order_placed(order_id)


def received(
    message: Message, *, id: str | None = None, correlation_id: str | None = None
) -> EventReceived:
    envelope = Envelope(
        id=id or f"in-{message.message_type}",
        type=message.message_type,
        source="tests",
        time=T0,
        correlation_id=correlation_id,
    )
    return EventReceived(envelope, message)


def dispatched(order_id: str = ORDER) -> EventReceived:
    return received(ShipmentDispatched(order_id=order_id, shipment_id="wh-77"))


def cancellation(order_id: str = ORDER) -> EventReceived:
    return received(OrderCancellationRequested(order_id=order_id))


# --- a hand-cranked saga ----------------------------------------------------------------------


@dataclass
class Saga:
    """Applies decisions like the application layer would, and keeps what they produced."""

    instance: SagaInstance | None = None
    now: datetime = T0
    definition: SagaDefinition[Any] = order_fulfilment
    decisions: list[Decision] = field(default_factory=list)
    outgoing: list[Outgoing] = field(default_factory=list)
    timers: dict[str, datetime] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)

    def feed(self, given: Input) -> Decision:
        self.now += timedelta(seconds=1)
        decision = decide(self.definition, self.instance, given, self.now)
        self.decisions.append(decision)
        assert decision.at == self.now
        if isinstance(given, TimerFired):
            self.timers.pop(given.name, None)  # a timer fires once; its row goes with the decision
        if decision.outcome == "applied":
            assert decision.instance is not None
            self.instance = decision.instance
            for name in decision.cancel_timers:
                self.timers.pop(name, None)
            for spec in decision.set_timers:
                self.timers[spec.name] = spec.fire_at
            self.outgoing.extend(decision.outgoing)
            self.history.extend(decision.history)
        return decision

    @property
    def i(self) -> SagaInstance:
        assert self.instance is not None
        return self.instance

    @property
    def state(self) -> OrderState:
        assert isinstance(self.i.state, OrderState)
        return self.i.state

    def status(self) -> Status:
        """A call, not an attribute, so that type checkers do not narrow it across feeds."""
        return self.i.status

    def done(self) -> tuple[str, ...]:
        """A call for the same reason as `status()`."""
        return self.i.done

    def commands(self) -> list[tuple[str, str, int]]:
        return [(c.step, c.kind, c.attempt) for c in run_steps(self.outgoing)]

    def events(self) -> list[Message]:
        return [o.body for o in self.outgoing if not isinstance(o.body, RunStep)]


def step_command(step: str, kind: Kind, attempt: int, port: str) -> RunStep:
    """The command this order's saga sends to run `step`."""
    return RunStep(
        saga_type="order_fulfilment",
        saga_id=SAGA_ID,
        step=step,
        kind=kind,
        attempt=attempt,
        port=port,
    )


def run_steps(outgoing: tuple[Outgoing, ...] | list[Outgoing]) -> list[RunStep]:
    return [o.body for o in outgoing if isinstance(o.body, RunStep)]


def only_command(decision: Decision) -> RunStep:
    commands = run_steps(decision.outgoing)
    assert len(commands) == 1, decision.outgoing
    assert len(decision.outgoing) == 1, decision.outgoing
    return commands[0]


def kinds(history: tuple[HistoryEntry, ...] | list[HistoryEntry]) -> list[str]:
    return [h.kind for h in history]


def assert_ignored(saga: Saga, given: Input, reason: str) -> None:
    before = saga.instance
    decision = saga.feed(given)
    assert (decision.outcome, decision.reason) == ("ignored", reason)
    assert decision.instance == before
    assert decision.outgoing == ()
    assert decision.set_timers == ()
    assert decision.cancel_timers == ()
    if isinstance(given, EventReceived):
        # Another service's event is never dropped without a trace: one entry says why.
        assert before is not None
        assert decision.history == (
            HistoryEntry(
                "ignored",
                None,
                given.envelope.id,
                {
                    "reason": reason,
                    "event": given.envelope.type,
                    "status": before.status.value,
                },
            ),
        )
    else:
        assert decision.history == ()


# --- getting a saga to a given stage ----------------------------------------------------------


HAPPY_INPUTS: list[Input] = [
    received(placed()),
    succeeded("reserve_stock"),
    succeeded("authorise_payment"),
    succeeded("book_shipment"),
    dispatched(),
    succeeded("capture_payment"),
]
"""What takes the saga straight through, in order."""


def _after(inputs: int) -> Callable[[], Saga]:
    """A builder of the saga fed the first `inputs` of `HAPPY_INPUTS`."""

    def stage() -> Saga:
        saga = Saga()
        for given in HAPPY_INPUTS[:inputs]:
            saga.feed(given)
        return saga

    return stage


started, reserved, authorised, awaiting_dispatch, capturing, completed = map(_after, range(1, 7))


# --- start ------------------------------------------------------------------------------------


def test_order_placed_starts_the_saga_and_reserves_stock() -> None:
    saga = Saga()
    decision = saga.feed(received(placed(), id="evt-1", correlation_id="corr-9"))

    assert decision.outcome == "applied"
    instance = saga.i
    assert instance.id == SAGA_ID
    assert (instance.saga_type, instance.correlation_key) == ("order_fulfilment", ORDER)
    assert instance.correlation_id == "corr-9"
    assert (instance.status, instance.position, instance.version) == (Status.RUNNING, 0, 1)
    assert instance.in_flight == InFlight("reserve_stock", "action", 1)
    assert instance.done == ()
    assert saga.state.order_id == ORDER
    assert saga.state.dispatch_by == DISPATCH_BY
    assert saga.state.reservation_id is None

    command = only_command(decision)
    assert command == step_command("reserve_stock", "action", 1, "inventory")
    out = decision.outgoing[0]
    assert out.domain == COMMANDS_DOMAIN
    assert out.routing_key == "port.inventory.order_fulfilment"
    assert out.envelope.type == "sagaworks.step.run"
    assert out.envelope.source == "sagaworks/order_fulfilment"
    assert out.envelope.correlation_id == "corr-9"
    assert out.envelope.causation_id == "evt-1"
    assert out.envelope.time == saga.now
    assert kinds(decision.history) == ["started", "step_started"]
    assert all(h.message_id == "evt-1" for h in decision.history)
    assert decision.history[1] == HistoryEntry(
        "step_started",
        "reserve_stock",
        "evt-1",
        {"kind": "action", "attempt": 1, "port": "inventory"},
    )


def test_correlation_id_defaults_to_the_correlation_key() -> None:
    saga = started()

    assert saga.i.correlation_id == ORDER
    assert saga.outgoing[0].envelope.correlation_id == ORDER


# --- happy path -------------------------------------------------------------------------------


def test_happy_path_reserves_authorises_books_waits_captures_and_announces() -> None:
    saga = started()

    d = saga.feed(succeeded("reserve_stock", message_id="res-msg"))
    assert only_command(d).step == "authorise_payment"
    assert only_command(d).port == "payments"
    assert d.outgoing[0].routing_key == "port.payments.order_fulfilment"
    assert d.outgoing[0].envelope.causation_id == "res-msg"
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 1)
    assert saga.i.done == ("reserve_stock",)
    assert saga.state.reservation_id == "res-1"

    d = saga.feed(succeeded("authorise_payment"))
    assert (only_command(d).step, only_command(d).port) == ("book_shipment", "shipping")
    assert saga.state.authorisation_id == "auth-1"

    d = saga.feed(succeeded("book_shipment"))
    assert d.outgoing == ()
    assert d.set_timers == (TimerSpec(DEADLINE, DISPATCH_BY),)
    assert saga.i.in_flight is None
    assert saga.i.position == order_fulfilment.index_of("await_dispatch")
    assert saga.i.done == ("reserve_stock", "authorise_payment", "book_shipment")
    assert saga.state.shipment_id == "shp-1"
    assert d.history[-1] == HistoryEntry(
        "waiting",
        "await_dispatch",
        None,
        {"event": "shipment.dispatched", "until": DISPATCH_BY.isoformat()},
    )

    d = saga.feed(dispatched())
    assert d.cancel_timers == (DEADLINE,)
    assert only_command(d) == step_command("capture_payment", "action", 1, "payments")
    assert saga.status() is Status.RUNNING

    d = saga.feed(succeeded("capture_payment"))
    assert saga.status() is Status.COMPLETED
    assert saga.i.in_flight is None
    assert saga.i.position == len(order_fulfilment.steps)
    assert saga.state.capture_id == "cap-1"
    assert len(d.outgoing) == 1
    out = d.outgoing[0]
    assert out.body == OrderFulfilled(order_id=ORDER, shipment_id="shp-1", capture_id="cap-1")
    assert (out.domain, out.routing_key) == ("orders", "order.fulfilled")
    assert out.envelope.type == "order.fulfilled"

    assert saga.timers == {}
    assert saga.events() == [out.body]
    assert saga.commands() == [
        ("reserve_stock", "action", 1),
        ("authorise_payment", "action", 1),
        ("book_shipment", "action", 1),
        ("capture_payment", "action", 1),
    ]
    assert kinds(saga.history) == [
        "started",
        "step_started",
        "step_completed",
        "step_started",
        "step_completed",
        "step_started",
        "step_completed",
        "waiting",
        "event_received",
        "step_started",
        "step_completed",
        "completed",
    ]
    assert [h.step for h in saga.history if h.kind == "step_completed"] == [
        "reserve_stock",
        "authorise_payment",
        "book_shipment",
        "capture_payment",
    ]


# --- payment declined -------------------------------------------------------------------------


def test_payment_decline_releases_stock_only_and_cancels_the_order() -> None:
    saga = reserved()

    d = saga.feed(failed("authorise_payment", "payment_declined", business=True))
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "payment_declined"
    assert saga.i.done == ("reserve_stock",)
    assert only_command(d) == step_command("reserve_stock", "compensation", 1, "inventory")
    assert kinds(d.history) == ["step_failed", "compensation_started", "step_started"]
    assert d.history[0] == HistoryEntry(
        "step_failed",
        "authorise_payment",
        None,
        {"reason": "payment_declined", "outcome_unknown": False},
    )

    d = saga.feed(succeeded("reserve_stock", kind="compensation"))
    assert saga.status() is Status.COMPENSATED
    assert not saga.i.done
    assert saga.i.in_flight is None
    assert [o.body for o in d.outgoing] == [
        OrderCancelled(order_id=ORDER, reason="payment_declined")
    ]
    assert (d.outgoing[0].domain, d.outgoing[0].routing_key) == ("orders", "order.cancelled")
    assert kinds(d.history) == ["compensation_completed", "compensated"]

    assert saga.commands() == [
        ("reserve_stock", "action", 1),
        ("authorise_payment", "action", 1),
        ("reserve_stock", "compensation", 1),
    ]
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="payment_declined")]


def test_a_business_failure_is_never_retried_even_with_a_retry_time() -> None:
    saga = reserved()

    d = saga.feed(
        failed("authorise_payment", "payment_declined", business=True, retry_at=T0 + timedelta(1))
    )

    assert d.set_timers == ()
    assert saga.status() is Status.COMPENSATING
    assert only_command(d).kind == "compensation"


def test_a_business_failure_of_the_first_step_compensates_nothing() -> None:
    saga = started()

    d = saga.feed(failed("reserve_stock", "out_of_stock", business=True))

    assert saga.status() is Status.COMPENSATED
    assert [o.body for o in d.outgoing] == [OrderCancelled(order_id=ORDER, reason="out_of_stock")]
    assert saga.commands() == [("reserve_stock", "action", 1)]


# --- customer cancellation --------------------------------------------------------------------


def test_cancellation_before_the_reservation_result_compensates_it_when_it_arrives() -> None:
    saga = started()

    d = saga.feed(cancellation())
    assert d.outcome == "applied"
    assert d.outgoing == ()
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "customer_cancelled"
    assert saga.i.in_flight == InFlight("reserve_stock", "action", 1)
    assert kinds(d.history) == ["compensation_started"]

    d = saga.feed(succeeded("reserve_stock"))
    assert saga.state.reservation_id == "res-1"
    assert only_command(d) == step_command("reserve_stock", "compensation", 1, "inventory")

    d = saga.feed(succeeded("reserve_stock", kind="compensation"))
    assert saga.status() is Status.COMPENSATED
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="customer_cancelled")]
    assert ("authorise_payment", "action", 1) not in saga.commands()


def test_cancellation_before_a_refused_reservation_ends_without_compensating() -> None:
    saga = started()
    saga.feed(cancellation())

    d = saga.feed(failed("reserve_stock", "out_of_stock", business=True))

    assert saga.status() is Status.COMPENSATED
    assert kinds(d.history) == ["step_failed", "compensated"]
    assert d.history[0].detail == {"reason": "out_of_stock", "outcome_unknown": False}
    assert [o.body for o in d.outgoing] == [
        OrderCancelled(order_id=ORDER, reason="customer_cancelled")
    ]
    assert saga.commands() == [("reserve_stock", "action", 1)]


def test_cancellation_after_reservation_undoes_authorisation_then_reservation() -> None:
    saga = reserved()

    saga.feed(cancellation())
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 1)

    d = saga.feed(succeeded("authorise_payment"))
    assert (only_command(d).step, only_command(d).kind) == ("authorise_payment", "compensation")
    d = saga.feed(succeeded("authorise_payment", kind="compensation"))
    assert (only_command(d).step, only_command(d).kind) == ("reserve_stock", "compensation")
    saga.feed(succeeded("reserve_stock", kind="compensation"))

    assert saga.status() is Status.COMPENSATED
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="customer_cancelled")]
    assert [h.step for h in saga.history if h.kind == "compensation_completed"] == [
        "authorise_payment",
        "reserve_stock",
    ]


def test_cancellation_while_awaiting_dispatch_cancels_the_deadline_and_compensates() -> None:
    saga = awaiting_dispatch()
    assert saga.timers == {DEADLINE: DISPATCH_BY}

    d = saga.feed(cancellation())
    assert d.cancel_timers == (DEADLINE,)
    assert saga.timers == {}
    assert only_command(d) == step_command("book_shipment", "compensation", 1, "shipping")

    assert_ignored(saga, dispatched(), "too_late")
    assert_ignored(saga, TimerFired(DEADLINE), "stale_timer")

    saga.feed(succeeded("book_shipment", kind="compensation"))
    saga.feed(succeeded("authorise_payment", kind="compensation"))
    saga.feed(succeeded("reserve_stock", kind="compensation"))

    assert saga.status() is Status.COMPENSATED
    assert saga.commands()[-3:] == [
        ("book_shipment", "compensation", 1),
        ("authorise_payment", "compensation", 1),
        ("reserve_stock", "compensation", 1),
    ]
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="customer_cancelled")]
    assert_ignored(saga, dispatched(), "saga_compensated")


def test_cancellation_after_capture_started_is_refused_and_the_saga_completes() -> None:
    saga = capturing()
    version = saga.i.version

    d = saga.feed(cancellation())
    assert d.outcome == "applied"
    assert d.outgoing == ()
    assert d.cancel_timers == ()
    assert saga.status() is Status.RUNNING
    assert saga.i.version == version + 1
    assert saga.i.in_flight == InFlight("capture_payment", "action", 1)
    assert d.history == (
        HistoryEntry(
            "cancellation_refused",
            "capture_payment",
            "in-order.cancellation_requested",
            {"reason": "customer_cancelled"},
        ),
    )

    saga.feed(succeeded("capture_payment"))
    assert saga.status() is Status.COMPLETED
    assert saga.events() == [
        OrderFulfilled(order_id=ORDER, shipment_id="shp-1", capture_id="cap-1")
    ]


# --- deadline ---------------------------------------------------------------------------------


def test_missed_dispatch_deadline_compensates_in_reverse_order() -> None:
    saga = awaiting_dispatch()

    d = saga.feed(TimerFired(DEADLINE))
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "dispatch_deadline_missed"
    assert kinds(d.history) == ["deadline_missed", "compensation_started", "step_started"]
    assert d.history[0].step == "await_dispatch"
    assert (only_command(d).step, only_command(d).port) == ("book_shipment", "shipping")

    d = saga.feed(succeeded("book_shipment", kind="compensation"))
    assert (only_command(d).step, only_command(d).port) == ("authorise_payment", "payments")
    d = saga.feed(succeeded("authorise_payment", kind="compensation"))
    assert (only_command(d).step, only_command(d).port) == ("reserve_stock", "inventory")
    d = saga.feed(succeeded("reserve_stock", kind="compensation"))

    assert saga.status() is Status.COMPENSATED
    assert [o.body for o in d.outgoing] == [
        OrderCancelled(order_id=ORDER, reason="dispatch_deadline_missed")
    ]
    assert not saga.i.done
    assert all(kind == "compensation" for _, kind, _ in saga.commands()[3:])
    assert_ignored(saga, TimerFired(DEADLINE), "stale_timer")


# --- stale and out-of-order inputs ------------------------------------------------------------


def compensating() -> Saga:
    saga = awaiting_dispatch()
    saga.feed(cancellation())
    return saga


IGNORED: list[Any] = [
    pytest.param(compensating, cancellation(), "already_compensating", id="second-cancellation"),
    pytest.param(reserved, succeeded("reserve_stock"), "stale_step_result", id="duplicate-result"),
    pytest.param(
        reserved,
        failed("reserve_stock", "boom", business=True),
        "stale_step_result",
        id="duplicate-failure",
    ),
    *(
        pytest.param(reserved, given, "stale_step_result", id=name)
        for name, given in [
            ("later-attempt", succeeded("authorise_payment", attempt=2)),
            ("earlier-attempt", succeeded("authorise_payment", attempt=0)),
            ("wrong-kind", succeeded("authorise_payment", kind="compensation")),
            ("wrong-step", succeeded("book_shipment")),
        ]
    ),
    pytest.param(
        awaiting_dispatch,
        succeeded("book_shipment"),
        "stale_step_result",
        id="result-while-waiting",
    ),
    *(
        pytest.param(reserved, TimerFired(name), "stale_timer", id=f"timer-{name}")
        for name in [
            DEADLINE,
            retry_timer("authorise_payment", "action", 1),
            retry_timer("authorise_payment", "action", 0),
            retry_timer("reserve_stock", "action", 1),
            "something:else",
        ]
    ),
    pytest.param(capturing, TimerFired(DEADLINE), "stale_timer", id="deadline-after-dispatch"),
    pytest.param(capturing, dispatched(), "too_late", id="duplicate-dispatch"),
    *(
        pytest.param(completed, given, reason, id=f"after-completion-{name}")
        for name, given, reason in [
            ("dispatch", dispatched(), "saga_completed"),
            ("cancellation", cancellation(), "saga_completed"),
            ("deadline", TimerFired(DEADLINE), "stale_timer"),
            ("result", succeeded("capture_payment"), "stale_step_result"),
        ]
    ),
    *(
        pytest.param(
            stage, received(placed(), id="evt-again"), "already_started", id=f"placed-again-{name}"
        )
        for name, stage in [
            ("started", started),
            ("awaiting-dispatch", awaiting_dispatch),
            ("completed", completed),
        ]
    ),
]
"""(stage, input, reason) of every input that changes nothing at that stage."""


@pytest.mark.parametrize(("stage", "given", "reason"), IGNORED)
def test_an_input_that_does_not_fit_the_stage_is_ignored(
    stage: Callable[[], Saga], given: Input, reason: str
) -> None:
    assert_ignored(stage(), given, reason)


def test_dispatch_before_the_wait_is_parked_then_accepted() -> None:
    saga = reserved()

    decision = saga.feed(dispatched())
    assert (decision.outcome, decision.reason) == ("park", "unexpected_event")
    assert decision.instance == saga.instance
    assert (decision.outgoing, decision.set_timers, decision.history) == ((), (), ())

    saga.feed(succeeded("authorise_payment"))
    saga.feed(succeeded("book_shipment"))
    decision = saga.feed(dispatched())
    assert decision.outcome == "applied"
    assert only_command(decision).step == "capture_payment"


@pytest.mark.parametrize(
    "given",
    [
        dispatched(),
        cancellation(),
        succeeded("reserve_stock"),
        TimerFired(DEADLINE),
    ],
    ids=["dispatch", "cancellation", "step-result", "timer"],
)
def test_anything_but_the_start_event_without_a_saga_is_parked(given: Input) -> None:
    decision = decide(order_fulfilment, None, given, T0)

    assert (decision.outcome, decision.reason, decision.instance) == ("park", "no_saga", None)
    assert decision.outgoing == ()


# --- technical failures and retries -----------------------------------------------------------


def test_a_technical_failure_schedules_a_retry_then_runs_attempt_two() -> None:
    saga = reserved()
    retry_at = T0 + timedelta(seconds=30)
    name = retry_timer("authorise_payment", "action", 1)

    d = saga.feed(failed("authorise_payment", "timeout", business=False, retry_at=retry_at))
    assert d.outgoing == ()
    assert d.set_timers == (TimerSpec(name, retry_at),)
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 1, retry_at)
    assert saga.status() is Status.RUNNING
    assert d.history == (
        HistoryEntry(
            "retry_scheduled",
            "authorise_payment",
            None,
            {
                "kind": "action",
                "attempt": 1,
                "reason": "timeout",
                "retry_at": retry_at.isoformat(),
            },
        ),
    )

    assert_ignored(saga, succeeded("authorise_payment"), "stale_step_result")

    d = saga.feed(TimerFired(name))
    assert only_command(d) == step_command("authorise_payment", "action", 2, "payments")
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 2)

    assert_ignored(saga, TimerFired(name), "stale_timer")
    assert_ignored(saga, succeeded("authorise_payment"), "stale_step_result")

    d = saga.feed(succeeded("authorise_payment", attempt=2))
    assert only_command(d).step == "book_shipment"
    assert saga.commands() == [
        ("reserve_stock", "action", 1),
        ("authorise_payment", "action", 1),
        ("authorise_payment", "action", 2),
        ("book_shipment", "action", 1),
    ]


def test_idempotency_keys_stay_the_same_across_attempts() -> None:
    saga = reserved()
    retry_at = T0 + timedelta(seconds=30)
    saga.feed(failed("authorise_payment", "timeout", business=False, retry_at=retry_at))
    saga.feed(TimerFired(retry_timer("authorise_payment", "action", 1)))

    first, second = (c for c in run_steps(saga.outgoing) if c.step == "authorise_payment")
    assert (first.attempt, second.attempt) == (1, 2)
    key = idempotency_key(first.saga_id, first.step, first.kind)
    assert key == idempotency_key(second.saga_id, second.step, second.kind)

    others = {
        idempotency_key(SAGA_ID, "authorise_payment", "compensation"),
        idempotency_key(SAGA_ID, "reserve_stock", "action"),
        idempotency_key(saga_id_for("order_fulfilment", "o-2"), "authorise_payment", "action"),
    }
    assert key not in others
    assert len(others) == 3


def test_exhausted_retries_of_an_action_compensate_it_too_with_the_failure_reason() -> None:
    """A technical failure may have taken effect, so the failed step is undone first."""
    saga = authorised()

    d = saga.feed(failed("book_shipment", "shipping_unavailable", business=False))
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "shipping_unavailable"
    assert saga.i.done == ("reserve_stock", "authorise_payment", "book_shipment")
    assert kinds(d.history) == ["step_failed", "compensation_started", "step_started"]
    assert d.history[0] == HistoryEntry(
        "step_failed",
        "book_shipment",
        None,
        {"reason": "shipping_unavailable", "outcome_unknown": True},
    )
    assert only_command(d) == step_command("book_shipment", "compensation", 1, "shipping")
    d = saga.feed(succeeded("book_shipment", kind="compensation"))
    assert (only_command(d).step, only_command(d).kind) == ("authorise_payment", "compensation")
    saga.feed(succeeded("authorise_payment", kind="compensation"))
    saga.feed(succeeded("reserve_stock", kind="compensation"))

    assert saga.status() is Status.COMPENSATED
    assert saga.done() == ()
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="shipping_unavailable")]
    assert saga.commands()[-3:] == [
        ("book_shipment", "compensation", 1),
        ("authorise_payment", "compensation", 1),
        ("reserve_stock", "compensation", 1),
    ]


def test_a_final_technical_failure_of_the_first_step_compensates_that_step() -> None:
    saga = started()

    d = saga.feed(failed("reserve_stock", "inventory_timeout", business=False))

    assert saga.status() is Status.COMPENSATING
    assert saga.i.done == ("reserve_stock",)
    assert d.set_timers == ()
    assert d.history[0].detail == {"reason": "inventory_timeout", "outcome_unknown": True}
    assert (only_command(d).step, only_command(d).kind) == ("reserve_stock", "compensation")

    d = saga.feed(succeeded("reserve_stock", kind="compensation"))
    assert saga.status() is Status.COMPENSATED
    assert [o.body for o in d.outgoing] == [
        OrderCancelled(order_id=ORDER, reason="inventory_timeout")
    ]


@pytest.mark.parametrize(
    "retry_at", [None, T0 + timedelta(seconds=30)], ids=["final", "retry-allowed"]
)
def test_a_technical_failure_after_a_cancellation_is_not_retried_but_compensated(
    retry_at: datetime | None,
) -> None:
    saga = reserved()
    saga.feed(cancellation())
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 1)

    d = saga.feed(failed("authorise_payment", "timeout", business=False, retry_at=retry_at))

    assert d.set_timers == ()
    assert saga.timers == {}
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "customer_cancelled"
    assert saga.i.done == ("reserve_stock", "authorise_payment")
    assert kinds(d.history) == ["step_failed", "step_started"]
    assert d.history[0].detail == {"reason": "timeout", "outcome_unknown": True}
    assert only_command(d) == step_command("authorise_payment", "compensation", 1, "payments")
    assert_ignored(saga, TimerFired(retry_timer("authorise_payment", "action", 1)), "stale_timer")

    saga.feed(succeeded("authorise_payment", kind="compensation"))
    saga.feed(succeeded("reserve_stock", kind="compensation"))
    assert saga.status() is Status.COMPENSATED
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="customer_cancelled")]
    assert ("authorise_payment", "action", 2) not in saga.commands()


def test_a_business_failure_after_a_cancellation_is_not_compensated() -> None:
    saga = reserved()
    saga.feed(cancellation())

    d = saga.feed(
        failed("authorise_payment", "payment_declined", business=True, retry_at=T0 + timedelta(1))
    )

    assert d.set_timers == ()
    assert saga.i.done == ("reserve_stock",)
    assert d.history[0].detail == {"reason": "payment_declined", "outcome_unknown": False}
    assert (only_command(d).step, only_command(d).kind) == ("reserve_stock", "compensation")
    saga.feed(succeeded("reserve_stock", kind="compensation"))
    assert saga.status() is Status.COMPENSATED
    assert ("authorise_payment", "compensation", 1) not in saga.commands()


@pytest.mark.parametrize("attempt", [1, 2])
def test_cancellation_during_a_pending_retry_abandons_the_step_and_compensates_it(
    attempt: int,
) -> None:
    """The failed attempt may have taken effect, so the abandoned step is undone first."""
    saga = reserved()
    for n in range(1, attempt):
        saga.feed(failed("authorise_payment", "timeout", business=False, retry_at=T0, attempt=n))
        saga.feed(TimerFired(retry_timer("authorise_payment", "action", n)))
    name = retry_timer("authorise_payment", "action", attempt)
    saga.feed(
        failed(
            "authorise_payment",
            "timeout",
            business=False,
            retry_at=T0 + timedelta(minutes=1),
            attempt=attempt,
        )
    )
    assert saga.timers == {name: T0 + timedelta(minutes=1)}

    d = saga.feed(cancellation())
    assert d.cancel_timers == (name,)
    assert saga.timers == {}
    assert saga.status() is Status.COMPENSATING
    assert saga.i.done == ("reserve_stock", "authorise_payment")
    assert kinds(d.history) == ["compensation_started", "step_abandoned", "step_started"]
    assert d.history[1] == HistoryEntry(
        "step_abandoned",
        "authorise_payment",
        "in-order.cancellation_requested",
        {"attempt": attempt, "outcome_unknown": True},
    )
    assert only_command(d) == step_command("authorise_payment", "compensation", 1, "payments")

    assert_ignored(saga, TimerFired(name), "stale_timer")
    assert_ignored(saga, succeeded("authorise_payment", attempt=attempt), "stale_step_result")
    d = saga.feed(succeeded("authorise_payment", kind="compensation"))
    assert (only_command(d).step, only_command(d).kind) == ("reserve_stock", "compensation")
    saga.feed(succeeded("reserve_stock", kind="compensation"))

    assert saga.status() is Status.COMPENSATED
    assert saga.done() == ()
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="customer_cancelled")]
    assert ("authorise_payment", "action", attempt + 1) not in saga.commands()


def test_a_late_duplicate_of_an_older_attempts_retry_timer_is_stale() -> None:
    saga = reserved()
    first = retry_timer("authorise_payment", "action", 1)
    second = retry_timer("authorise_payment", "action", 2)
    assert first != second

    d = saga.feed(
        failed("authorise_payment", "timeout", business=False, retry_at=T0 + timedelta(seconds=30))
    )
    assert d.set_timers == (TimerSpec(first, T0 + timedelta(seconds=30)),)

    d = saga.feed(TimerFired(first))
    assert (only_command(d).step, only_command(d).attempt) == ("authorise_payment", 2)

    d = saga.feed(
        failed(
            "authorise_payment",
            "timeout",
            business=False,
            retry_at=T0 + timedelta(minutes=5),
            attempt=2,
        )
    )
    assert d.set_timers == (TimerSpec(second, T0 + timedelta(minutes=5)),)
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 2, T0 + timedelta(minutes=5))
    assert d.history[0].detail["attempt"] == 2

    assert_ignored(saga, TimerFired(first), "stale_timer")  # a late duplicate: no RunStep
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 2, T0 + timedelta(minutes=5))
    assert saga.timers == {second: T0 + timedelta(minutes=5)}

    d = saga.feed(TimerFired(second))
    assert (only_command(d).step, only_command(d).attempt) == ("authorise_payment", 3)
    saga.feed(succeeded("authorise_payment", attempt=3))
    assert [a for s, _, a in saga.commands() if s == "authorise_payment"] == [1, 2, 3]
    assert saga.i.in_flight == InFlight("book_shipment", "action", 1)


def test_a_failing_compensation_is_retried_then_completes() -> None:
    saga = reserved()
    saga.feed(failed("authorise_payment", "payment_declined", business=True))
    retry_at = T0 + timedelta(minutes=5)
    name = retry_timer("reserve_stock", "compensation", 1)

    d = saga.feed(
        failed("reserve_stock", "timeout", business=False, retry_at=retry_at, kind="compensation")
    )
    assert d.set_timers == (TimerSpec(name, retry_at),)
    assert saga.i.in_flight == InFlight("reserve_stock", "compensation", 1, retry_at)
    assert saga.status() is Status.COMPENSATING

    d = saga.feed(TimerFired(name))
    assert (only_command(d).kind, only_command(d).attempt) == ("compensation", 2)
    assert_ignored(saga, TimerFired(name), "stale_timer")
    saga.feed(succeeded("reserve_stock", kind="compensation", attempt=2))

    assert saga.status() is Status.COMPENSATED
    assert saga.events() == [OrderCancelled(order_id=ORDER, reason="payment_declined")]


def assert_alert(
    decision: Decision,
    *,
    step: str,
    error: str,
    saga_type: str = "order_fulfilment",
    key: str = ORDER,
    causation_id: str | None = None,
) -> None:
    """The decision announces, and only announces, that the saga needs a person."""
    assert len(decision.outgoing) == 1, decision.outgoing
    out = decision.outgoing[0]
    assert out.body == SagaNeedsAttention(
        saga_type=saga_type,
        saga_id=saga_id_for(saga_type, key),
        correlation_key=key,
        step=step,
        error=error,
    )
    assert (out.domain, out.routing_key) == (EVENTS_DOMAIN, f"saga.needs_attention.{saga_type}")
    assert EVENTS_DOMAIN == "sagaworks.events"
    assert out.envelope.type == "sagaworks.saga.needs_attention"
    assert out.envelope.source == f"sagaworks/{saga_type}"
    assert out.envelope.correlation_id == key
    assert out.envelope.causation_id == causation_id
    assert out.envelope.time == decision.at
    assert decision.instance is not None
    assert out.envelope.id == f"{decision.instance.id}/{decision.instance.version}/0"


@pytest.mark.parametrize("business", [False, True], ids=["exhausted", "refused"])
def test_a_compensation_that_fails_for_good_needs_attention(business: bool) -> None:
    saga = reserved()
    saga.feed(failed("authorise_payment", "payment_declined", business=True))

    d = saga.feed(failed("reserve_stock", "inventory_down", business=business, kind="compensation"))

    assert saga.status() is Status.NEEDS_ATTENTION
    assert saga.i.error == "inventory_down"
    assert saga.i.in_flight is None
    assert saga.i.done == ("reserve_stock",)
    assert_alert(d, step="reserve_stock", error="inventory_down")
    assert d.set_timers == ()
    assert d.history == (
        HistoryEntry("needs_attention", "reserve_stock", None, {"error": "inventory_down"}),
    )
    assert [type(e) for e in saga.events()] == [SagaNeedsAttention]
    assert_ignored(saga, cancellation(), "saga_needs_attention")
    assert_ignored(saga, TimerFired(retry_timer("reserve_stock", "compensation", 1)), "stale_timer")
    assert_ignored(saga, succeeded("reserve_stock", kind="compensation"), "stale_step_result")


def test_a_refused_compensation_is_not_retried_even_with_a_retry_time() -> None:
    saga = reserved()
    saga.feed(failed("authorise_payment", "payment_declined", business=True))

    d = saga.feed(
        failed(
            "reserve_stock",
            "not_allowed",
            business=True,
            retry_at=T0 + timedelta(minutes=1),
            kind="compensation",
        )
    )

    assert saga.status() is Status.NEEDS_ATTENTION
    assert d.set_timers == ()
    assert_alert(d, step="reserve_stock", error="not_allowed")


@pytest.mark.parametrize("business", [False, True], ids=["exhausted", "refused"])
def test_a_failing_pivot_needs_attention_and_compensates_nothing(business: bool) -> None:
    saga = capturing()

    d = saga.feed(failed("capture_payment", "capture_rejected", business=business))

    assert saga.status() is Status.NEEDS_ATTENTION
    assert saga.i.error == "capture_rejected"
    assert saga.i.done == ("reserve_stock", "authorise_payment", "book_shipment")
    assert_alert(d, step="capture_payment", error="capture_rejected")
    assert kinds(d.history) == ["needs_attention"]
    assert [type(e) for e in saga.events()] == [SagaNeedsAttention]
    assert not any(isinstance(e, OrderCancelled | OrderFulfilled) for e in saga.events())
    assert all(kind == "action" for _, kind, _ in saga.commands())


def test_the_pivot_is_retried_on_a_technical_failure() -> None:
    saga = capturing()
    retry_at = T0 + timedelta(seconds=10)

    saga.feed(failed("capture_payment", "timeout", business=False, retry_at=retry_at))
    assert saga.timers == {retry_timer("capture_payment", "action", 1): retry_at}

    refused = saga.feed(cancellation())
    assert kinds(refused.history) == ["cancellation_refused"]
    assert refused.cancel_timers == ()
    assert saga.timers == {retry_timer("capture_payment", "action", 1): retry_at}

    d = saga.feed(TimerFired(retry_timer("capture_payment", "action", 1)))
    assert (only_command(d).step, only_command(d).attempt) == ("capture_payment", 2)
    saga.feed(succeeded("capture_payment", attempt=2))
    assert saga.status() is Status.COMPLETED


# --- bookkeeping: versions and message ids ----------------------------------------------------


def _eventful_run() -> Saga:
    saga = Saga()
    script: list[Input] = [
        received(placed()),
        dispatched(),  # parked: too early
        succeeded("reserve_stock"),
        succeeded("reserve_stock"),  # duplicate: ignored
        failed("authorise_payment", "timeout", business=False, retry_at=T0 + timedelta(1)),
        TimerFired(retry_timer("authorise_payment", "action", 1)),
        succeeded("authorise_payment", attempt=2),
        succeeded("book_shipment"),
        dispatched(),
        cancellation(),  # refused
        succeeded("capture_payment"),
    ]
    for given in script:
        saga.feed(given)
    return saga


def test_version_increments_by_one_per_applied_decision_only() -> None:
    saga = _eventful_run()

    versions = [d.instance.version for d in saga.decisions if d.instance is not None]
    applied = [d for d in saga.decisions if d.outcome == "applied"]
    assert [d.outcome for d in saga.decisions].count("applied") == 9
    assert [d.instance.version for d in applied if d.instance] == list(range(1, 10))
    previous = 0
    for decision, version in zip(saga.decisions, versions, strict=True):
        expected = previous + 1 if decision.outcome == "applied" else previous
        assert version == expected, decision
        previous = version
    assert saga.status() is Status.COMPLETED


def test_outgoing_message_ids_are_deterministic_and_unique() -> None:
    first, second = _eventful_run(), _eventful_run()

    ids = [o.envelope.id for o in first.outgoing]
    assert ids == [o.envelope.id for o in second.outgoing]
    assert len(set(ids)) == len(ids) == 6
    assert all(i.startswith(f"{SAGA_ID}/") for i in ids)
    assert [o.body for o in first.outgoing] == [o.body for o in second.outgoing]


def test_message_ids_differ_between_sagas() -> None:
    one = Saga()
    one.feed(received(placed("o-1")))
    two = Saga()
    two.feed(received(placed("o-2")))

    assert one.outgoing[0].envelope.id != two.outgoing[0].envelope.id
    assert one.i.id != two.i.id


def test_decide_does_not_mutate_its_input_instance() -> None:
    saga = reserved()
    before = saga.i

    decision = decide(order_fulfilment, before, succeeded("authorise_payment"), T0)

    assert decision.instance is not None
    assert decision.instance is not before
    assert before.in_flight == InFlight("authorise_payment", "action", 1)
    assert before.version == 2


def test_every_decision_carries_the_time_of_its_transition() -> None:
    later = T0 + timedelta(hours=3)

    no_saga = decide(order_fulfilment, None, cancellation(), later)
    assert (no_saga.outcome, no_saga.at) == ("park", later)

    start = decide(order_fulfilment, None, received(placed()), later)
    assert (start.outcome, start.at) == ("applied", later)
    assert start.outgoing[0].envelope.time == later

    again = decide(order_fulfilment, start.instance, received(placed()), later + timedelta(1))
    assert (again.outcome, again.at) == ("ignored", later + timedelta(1))

    early = decide(order_fulfilment, start.instance, dispatched(), later + timedelta(2))
    assert (early.outcome, early.at) == ("park", later + timedelta(2))


# --- a wait and a step after the pivot --------------------------------------------------------
# A small saga: `a` (compensated), the pivot `piv`, a wait `w`, then `after` (no compensation).


class Kicked(Message, type="tiny.kicked", domain="tiny"):
    key: str


class Arrived(Message, type="tiny.arrived", domain="tiny"):
    key: str


class Halted(Message, type="tiny.halted", domain="tiny"):
    key: str


class Ended(Message, type="tiny.ended", domain="tiny"):
    key: str
    outcome: str


class TinyState(BaseModel):
    key: str


async def _noop(port: object, call: object) -> None:
    return None


TINY: SagaDefinition[TinyState] = SagaDefinition(
    name="tiny",
    state=TinyState,
    state_version=1,
    start=StartOn(Kicked, key=lambda e: e.key, state=lambda e: TinyState(key=e.key)),
    correlate={Arrived: lambda e: e.key, Halted: lambda e: e.key},
    cancel=(CancelOn(Halted, reason="halted"),),
    steps=(
        Step("a", port="alpha", action=_noop, compensation=_noop),
        Step("piv", port="alpha", action=_noop, pivot=True),
        Wait("w", event=Arrived, deadline=timedelta(hours=1), timeout_reason="never_arrived"),
        Step("after", port="beta", action=_noop),
    ),
    completes_with=Ended,
    on_completed=lambda s: Ended(key=s.key, outcome="done"),
    compensates_with=Ended,
    on_compensated=lambda s, reason: Ended(key=s.key, outcome=reason),
)
TINY_KEY = "k-1"
TINY_DEADLINE = deadline_timer("w")


def tiny_waiting() -> Saga:
    saga = Saga(definition=TINY)
    saga.feed(received(Kicked(key=TINY_KEY)))
    saga.feed(succeeded("a"))
    saga.feed(succeeded("piv"))
    assert saga.i.position == TINY.index_of("w")
    assert saga.timers == {TINY_DEADLINE: saga.now + timedelta(hours=1)}
    return saga


def tiny_after() -> Saga:
    saga = tiny_waiting()
    d = saga.feed(received(Arrived(key=TINY_KEY)))
    assert only_command(d).step == "after"
    return saga


def test_the_small_saga_completes_when_everything_works() -> None:
    saga = tiny_after()

    saga.feed(succeeded("after"))

    assert saga.status() is Status.COMPLETED
    assert saga.events() == [Ended(key=TINY_KEY, outcome="done")]


def test_a_missed_deadline_after_the_pivot_needs_attention_not_compensation() -> None:
    saga = tiny_waiting()

    d = saga.feed(TimerFired(TINY_DEADLINE))

    assert saga.status() is Status.NEEDS_ATTENTION
    assert saga.i.error == "never_arrived"
    assert saga.i.in_flight is None
    assert saga.i.done == ("a", "piv")
    assert kinds(d.history) == ["deadline_missed", "needs_attention"]
    assert d.history[1] == HistoryEntry("needs_attention", "w", None, {"error": "never_arrived"})
    assert_alert(d, step="w", error="never_arrived", saga_type="tiny", key=TINY_KEY)
    assert all(kind == "action" for _, kind, _ in saga.commands())
    assert saga.timers == {}
    assert [type(e) for e in saga.events()] == [SagaNeedsAttention]

    assert_ignored(saga, received(Arrived(key=TINY_KEY)), "saga_needs_attention")
    assert_ignored(saga, TimerFired(TINY_DEADLINE), "stale_timer")


def test_a_cancellation_while_waiting_after_the_pivot_is_refused() -> None:
    saga = tiny_waiting()

    d = saga.feed(received(Halted(key=TINY_KEY)))

    assert kinds(d.history) == ["cancellation_refused"]
    assert d.cancel_timers == ()
    assert saga.status() is Status.RUNNING
    assert TINY_DEADLINE in saga.timers


def test_a_step_after_the_pivot_is_retried_then_needs_attention() -> None:
    saga = tiny_after()
    retry_at = T0 + timedelta(seconds=30)

    d = saga.feed(failed("after", "beta_down", business=False, retry_at=retry_at))
    assert d.set_timers == (TimerSpec(retry_timer("after", "action", 1), retry_at),)
    assert saga.status() is Status.RUNNING

    d = saga.feed(TimerFired(retry_timer("after", "action", 1)))
    assert (only_command(d).step, only_command(d).attempt) == ("after", 2)

    d = saga.feed(failed("after", "beta_down", business=False, attempt=2))
    assert saga.status() is Status.NEEDS_ATTENTION
    assert saga.i.error == "beta_down"
    assert saga.i.done == ("a", "piv")
    assert kinds(d.history) == ["needs_attention"]
    assert_alert(d, step="after", error="beta_down", saga_type="tiny", key=TINY_KEY)
    assert all(kind == "action" for _, kind, _ in saga.commands())


@pytest.mark.parametrize(
    "retry_at", [None, T0 + timedelta(seconds=30)], ids=["no-retry", "retry-offered"]
)
def test_a_refused_step_after_the_pivot_needs_attention_at_once(
    retry_at: datetime | None,
) -> None:
    saga = tiny_after()

    d = saga.feed(failed("after", "refused", business=True, retry_at=retry_at))

    assert saga.status() is Status.NEEDS_ATTENTION
    assert d.set_timers == ()
    assert_alert(d, step="after", error="refused", saga_type="tiny", key=TINY_KEY)
    assert all(kind == "action" for _, kind, _ in saga.commands())
