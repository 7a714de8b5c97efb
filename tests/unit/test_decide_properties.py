"""Property tests: however one saga's inputs are ordered and duplicated, it ends well.

A tiny pure driver plays the application layer and the outside world: it holds
the inputs waiting for delivery, answers every `RunStep` with a `StepFinished`,
keeps timers, re-offers parked inputs after every applied decision, and lets
hypothesis choose which pending input is delivered next, which ones arrive twice
(timer firings included), when the customer cancels, and when a port call fails
transiently.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios.order_inputs import RESULTS, T0, Kind, order_placed

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    ShipmentDispatched,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks.domain.decide import (
    Decision,
    EventReceived,
    Failure,
    HistoryEntry,
    Input,
    RunStep,
    SagaNeedsAttention,
    StepFinished,
    TimerFired,
    decide,
)
from sagaworks.domain.instance import SagaInstance, Status, saga_id_for
from sagaworks.domain.messages import Envelope, Message

pytestmark = pytest.mark.unit

ORDER = "o-1"
PIVOT = "capture_payment"
ACTIONS = ("reserve_stock", "authorise_payment", "book_shipment", "capture_payment")
COMPENSABLE = ACTIONS[:3]
MAX_DELIVERIES = 1_000
TRANSIENT_ATTEMPTS = 2  # a call may fail transiently on attempts 1 and 2, never on the 3rd

FULFILLED = OrderFulfilled(order_id=ORDER, shipment_id="shp-1", capture_id="cap-1")


def _event(message: Message, id: str) -> EventReceived:
    return EventReceived(
        Envelope(id=id, type=message.message_type, source="tests", time=T0), message
    )


PLACED = _event(
    order_placed(ORDER, quantity=1, amount_cents=1_000),
    "evt-placed",
)
DISPATCHED = _event(ShipmentDispatched(order_id=ORDER, shipment_id="wh-1"), "evt-dispatched")
CANCELLED = _event(OrderCancellationRequested(order_id=ORDER), "evt-cancel")


@dataclass(frozen=True)
class Scenario:
    """What the outside world does; the driver's chooser decides when."""

    decline: bool = False
    dispatch: bool = True
    cancel_after: int | None = None
    transient: bool = False
    exhausted: frozenset[tuple[str, Kind]] = frozenset()


class Chooser(Protocol):
    def pick(self, n: int) -> int: ...
    def duplicate(self) -> bool: ...
    def transient_failure(self) -> bool: ...


class InOrder:
    """First come, first served, everything delivered once, no transient failures."""

    def pick(self, n: int) -> int:
        return 0

    def duplicate(self) -> bool:
        return False

    def transient_failure(self) -> bool:
        return False


@dataclass
class Drawn:
    data: st.DataObject

    def pick(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1), label="deliver")

    def duplicate(self) -> bool:
        return self.data.draw(st.booleans(), label="duplicate")

    def transient_failure(self) -> bool:
        return self.data.draw(st.booleans(), label="transient")


@dataclass(frozen=True)
class Pending:
    given: Input
    copy: bool = False  # a redelivery: never duplicated again, to keep runs finite


@dataclass
class Run:
    """Everything a run produced, for the properties to inspect."""

    instance: SagaInstance | None = None
    decisions: list[Decision] = field(default_factory=list)
    commands: list[RunStep] = field(default_factory=list)
    published: list[Message] = field(default_factory=list)
    message_ids: list[str] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    effects: list[tuple[str, Kind]] = field(default_factory=list)  # successful calls, in order
    # Calls that may have taken effect: the successful ones and the technical failures.
    maybe_effects: list[tuple[str, Kind]] = field(default_factory=list)
    timers_when_ended: dict[str, datetime] | None = None  # still set when it became terminal
    parked: list[Input] = field(default_factory=list)

    @property
    def status(self) -> Status:
        assert self.instance is not None
        return self.instance.status

    def steps_of(self, kind: str) -> list[str | None]:
        return [h.step for h in self.history if h.kind == kind]

    def terminal_events(self) -> list[Message]:
        return [m for m in self.published if isinstance(m, OrderFulfilled | OrderCancelled)]

    def alerts(self) -> list[SagaNeedsAttention]:
        return [m for m in self.published if isinstance(m, SagaNeedsAttention)]

    def announcements(self) -> list[Message]:
        """What the saga told the world about how it ended."""
        return [
            m
            for m in self.published
            if isinstance(m, OrderFulfilled | OrderCancelled | SagaNeedsAttention)
        ]

    def owed_compensation(self) -> list[str]:
        """The actions the saga added to `done`, in order: completed, or maybe done."""
        return [
            h.step
            for h in self.history
            if h.step is not None
            and h.step != PIVOT
            and (
                h.kind == "step_completed"
                or (h.kind in ("step_failed", "step_abandoned") and h.detail["outcome_unknown"])
            )
        ]


def drive(scenario: Scenario, chooser: Chooser) -> Run:
    run = Run()
    queue: list[Pending] = [Pending(PLACED)]
    if scenario.dispatch:
        queue.append(Pending(DISPATCHED))
    parked: list[Pending] = []
    timers: dict[str, datetime] = {}
    cancel_pending = scenario.cancel_after is not None
    applied = 0
    now = T0

    def answer(command: RunStep) -> StepFinished:
        step, kind, attempt = command.step, command.kind, command.attempt
        message_id = f"result:{step}:{kind}:{attempt}"
        if (step, kind) in scenario.exhausted:
            failure = Failure(f"{step}_{kind}_failed", business=False)
        elif scenario.decline and (step, kind) == ("authorise_payment", "action"):
            failure = Failure("payment_declined", business=True)
        elif scenario.transient and attempt <= TRANSIENT_ATTEMPTS and chooser.transient_failure():
            failure = Failure("timeout", business=False, retry_at=now + timedelta(seconds=30))
        else:
            run.effects.append((step, kind))
            run.maybe_effects.append((step, kind))
            result = RESULTS[step] if kind == "action" else None
            return StepFinished(step, kind, attempt, result=result, message_id=message_id)
        if not failure.business:
            run.maybe_effects.append((step, kind))  # it timed out: it may have happened
        return StepFinished(step, kind, attempt, failure=failure, message_id=message_id)

    for _ in range(MAX_DELIVERIES):
        if (
            cancel_pending
            and scenario.cancel_after is not None
            and applied >= scenario.cancel_after
        ):
            queue.append(Pending(CANCELLED))
            cancel_pending = False
        # Retry timers may fire at any time; a deadline only once nothing else can happen
        # first (the dispatch, when it comes, comes before the deadline).
        due = [n for n in timers if n.startswith("retry:")]
        if not queue and not due:
            due = list(timers)
        if not queue and not due:
            if cancel_pending:
                queue.append(Pending(CANCELLED))
                cancel_pending = False
                continue
            break
        index = chooser.pick(len(queue) + len(due))
        if index < len(queue):
            item = queue.pop(index)
        else:
            name = due[index - len(queue)]
            del timers[name]
            item = Pending(TimerFired(name))
        # Messages and timer firings may arrive twice; a timer cancelled by a decision may also
        # still fire once afterwards (see cancel_timers below).
        if not item.copy and chooser.duplicate():
            queue.append(Pending(item.given, copy=True))

        now += timedelta(seconds=1)
        decision = decide(order_fulfilment, run.instance, item.given, now)
        run.decisions.append(decision)
        assert decision.at == now
        if item.copy and isinstance(item.given, TimerFired):
            # The real timer already fired or was cancelled: a second firing changes nothing.
            assert (decision.outcome, decision.reason) == ("ignored", "stale_timer"), item
        if decision.outcome == "park":
            parked.append(item)
            continue
        if decision.outcome == "ignored":
            continue
        assert decision.instance is not None
        applied += 1
        run.instance = decision.instance
        run.history.extend(decision.history)
        for name in decision.cancel_timers:
            if timers.pop(name, None) is not None and chooser.duplicate():
                queue.append(Pending(TimerFired(name), copy=True))  # raced with the cancel
        for spec in decision.set_timers:
            timers[spec.name] = spec.fire_at
        if run.instance.status.terminal and run.timers_when_ended is None:
            run.timers_when_ended = dict(timers)
        for out in decision.outgoing:
            run.message_ids.append(out.envelope.id)
            if isinstance(out.body, RunStep):
                run.commands.append(out.body)
                queue.append(Pending(answer(out.body)))
            else:
                run.published.append(out.body)
        queue.extend(parked)  # the application re-offers parked inputs after every change
        parked.clear()
    else:
        pytest.fail(f"no end after {MAX_DELIVERIES} deliveries: a hot loop ({scenario})")

    run.parked = [p.given for p in parked]
    return run


def check_invariants(run: Run) -> None:
    """What must hold for every run, whatever the scenario."""
    assert run.instance is not None
    # I5: live — nothing is pending any more, so the saga must have ended.
    assert run.status.terminal, (run.status, run.instance)
    assert run.timers_when_ended == {}, "a finished saga left timers behind"
    assert run.instance.in_flight is None
    # I2: no transition twice — each step call is asked for once per attempt.
    calls = Counter((c.step, c.kind, c.attempt) for c in run.commands)
    assert all(n == 1 for n in calls.values()), calls
    for (step, kind, attempt), _ in calls.items():
        assert attempt == 1 or (step, kind, attempt - 1) in calls
    # Outgoing messages have unique ids; the version counts the applied decisions.
    assert len(set(run.message_ids)) == len(run.message_ids)
    assert run.instance.version == sum(d.outcome == "applied" for d in run.decisions)
    # Exactly one OrderFulfilled/OrderCancelled, unless a person must step in: then exactly
    # one SagaNeedsAttention instead.
    terminal = run.terminal_events()
    alerts = run.alerts()
    if run.status is Status.NEEDS_ATTENTION:
        assert terminal == []
        assert run.instance.error
        assert len(alerts) == 1, alerts
        assert alerts[0].saga_type == order_fulfilment.name
        assert alerts[0].saga_id == run.instance.id == saga_id_for(order_fulfilment.name, ORDER)
        assert alerts[0].correlation_key == ORDER
        assert alerts[0].error == run.instance.error
        assert run.history[-1].kind == "needs_attention"
        assert run.history[-1].step == alerts[0].step
    else:
        assert alerts == []
        assert len(terminal) == 1, terminal
    if run.status is Status.COMPLETED:
        assert terminal == [FULFILLED]
        assert run.steps_of("step_completed") == list(ACTIONS)
        assert run.steps_of("compensation_completed") == []
    # Every successful call the world made was recorded by the saga, exactly once.
    actions = [step for step, kind in run.effects if kind == "action"]
    undone = [step for step, kind in run.effects if kind == "compensation"]
    assert run.steps_of("step_completed") == actions
    assert run.steps_of("compensation_completed") == undone
    # Once compensation starts, no action is started again: not even a retry of one in flight.
    kinds = [h.kind for h in run.history]
    if "compensation_started" in kinds:
        after = run.history[kinds.index("compensation_started") :]
        assert all(h.detail["kind"] == "compensation" for h in after if h.kind == "step_started"), (
            after
        )
    # Compensation undoes, newest first and each exactly once, every action that succeeded or
    # failed technically (it may have taken effect); a refused action had no effect.
    owed = run.owed_compensation()
    assert len(set(owed)) == len(owed), owed
    maybe_done = {s for s, kind in run.maybe_effects if kind == "action" and s != PIVOT}
    assert set(owed) == maybe_done, (owed, run.maybe_effects)
    assert {s for s in actions if s != PIVOT} <= set(owed)
    if run.status is Status.COMPENSATED:
        assert isinstance(terminal[0], OrderCancelled)
        assert PIVOT not in actions
        assert undone == list(reversed(owed))
        assert run.instance.done == ()
    else:
        assert undone == list(reversed(owed))[: len(undone)]


def outcome(run: Run) -> tuple[Status, str | None, list[Message]]:
    assert run.instance is not None
    return run.status, run.instance.reason, run.announcements()


@st.composite
def scenarios(draw: st.DrawFn, *, failures: bool = False) -> Scenario:
    exhausted: frozenset[tuple[str, Kind]] = frozenset()
    if failures:
        exhausted = draw(
            st.frozensets(
                st.sampled_from(
                    [(s, "action") for s in ACTIONS] + [(s, "compensation") for s in COMPENSABLE]
                ),
                max_size=2,
            )
        )
    return Scenario(
        decline=draw(st.booleans()),
        dispatch=draw(st.booleans()),
        cancel_after=draw(st.none() | st.integers(0, 12)),
        transient=draw(st.booleans()),
        exhausted=exhausted,
    )


PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- the in-order runs the properties compare against -----------------------------------------


@pytest.mark.parametrize(
    ("scenario", "expected"),
    [
        (Scenario(), (Status.COMPLETED, None, [FULFILLED])),
        (
            Scenario(decline=True),
            (
                Status.COMPENSATED,
                "payment_declined",
                [OrderCancelled(order_id=ORDER, reason="payment_declined")],
            ),
        ),
        (
            Scenario(dispatch=False),
            (
                Status.COMPENSATED,
                "dispatch_deadline_missed",
                [OrderCancelled(order_id=ORDER, reason="dispatch_deadline_missed")],
            ),
        ),
        (
            Scenario(cancel_after=0),
            (
                Status.COMPENSATED,
                "customer_cancelled",
                [OrderCancelled(order_id=ORDER, reason="customer_cancelled")],
            ),
        ),
        (
            Scenario(exhausted=frozenset({("reserve_stock", "compensation")}), decline=True),
            (
                Status.NEEDS_ATTENTION,
                "payment_declined",
                [
                    SagaNeedsAttention(
                        saga_type="order_fulfilment",
                        saga_id=saga_id_for("order_fulfilment", ORDER),
                        correlation_key=ORDER,
                        step="reserve_stock",
                        error="reserve_stock_compensation_failed",
                    )
                ],
            ),
        ),
        (
            Scenario(exhausted=frozenset({("book_shipment", "action")})),
            (
                Status.COMPENSATED,
                "book_shipment_action_failed",
                [OrderCancelled(order_id=ORDER, reason="book_shipment_action_failed")],
            ),
        ),
        (
            Scenario(exhausted=frozenset({(PIVOT, "action")})),
            (
                Status.NEEDS_ATTENTION,
                None,
                [
                    SagaNeedsAttention(
                        saga_type="order_fulfilment",
                        saga_id=saga_id_for("order_fulfilment", ORDER),
                        correlation_key=ORDER,
                        step=PIVOT,
                        error="capture_payment_action_failed",
                    )
                ],
            ),
        ),
    ],
    ids=[
        "happy",
        "declined",
        "no-dispatch",
        "cancelled-at-once",
        "stuck-compensation",
        "failed-booking",
        "failed-pivot",
    ],
)
def test_in_order_runs(
    scenario: Scenario, expected: tuple[Status, str | None, list[Message]]
) -> None:
    run = drive(scenario, InOrder())

    check_invariants(run)
    assert outcome(run) == expected


def test_a_failed_booking_is_compensated_before_the_steps_that_succeeded() -> None:
    run = drive(Scenario(exhausted=frozenset({("book_shipment", "action")})), InOrder())

    check_invariants(run)
    assert run.owed_compensation() == ["reserve_stock", "authorise_payment", "book_shipment"]
    assert [s for s, kind in run.effects if kind == "compensation"] == [
        "book_shipment",
        "authorise_payment",
        "reserve_stock",
    ]


def test_the_driver_delivers_early_dispatch_and_parks_it() -> None:
    run = drive(Scenario(), InOrder())

    parks = [d.reason for d in run.decisions if d.outcome == "park"]
    assert parks
    assert set(parks) == {"unexpected_event"}


def test_the_same_choices_give_the_same_messages() -> None:
    first = drive(Scenario(decline=True), InOrder())
    second = drive(Scenario(decline=True), InOrder())

    assert first.message_ids == second.message_ids
    assert first.published == second.published


# --- properties -------------------------------------------------------------------------------


@PROPERTY
@given(data=st.data(), decline=st.booleans(), dispatch=st.booleans(), transient=st.booleans())
def test_any_order_without_cancellation_ends_like_the_in_order_run(
    data: st.DataObject, decline: bool, dispatch: bool, transient: bool
) -> None:
    scenario = Scenario(decline=decline, dispatch=dispatch, transient=transient)

    run = drive(scenario, Drawn(data))

    check_invariants(run)
    assert outcome(run) == outcome(drive(scenario, InOrder()))
    if not decline and dispatch:
        assert run.status is Status.COMPLETED
        assert [m for m in run.published if isinstance(m, OrderFulfilled)] == [FULFILLED]
    elif decline:
        assert outcome(run)[:2] == (Status.COMPENSATED, "payment_declined")
    else:
        assert outcome(run)[:2] == (Status.COMPENSATED, "dispatch_deadline_missed")


@PROPERTY
@given(data=st.data(), scenario=scenarios())
def test_a_cancellation_at_any_point_completes_or_compensates(
    data: st.DataObject, scenario: Scenario
) -> None:
    run = drive(scenario, Drawn(data))

    check_invariants(run)
    uncancelled = outcome(drive(Scenario(scenario.decline, scenario.dispatch), InOrder()))
    cancelled = (
        Status.COMPENSATED,
        "customer_cancelled",
        [OrderCancelled(order_id=ORDER, reason="customer_cancelled")],
    )
    if scenario.cancel_after is None:
        assert outcome(run) == uncancelled
    else:
        assert outcome(run) in (uncancelled, cancelled)
    if run.status is Status.COMPLETED:
        assert not scenario.decline
        assert scenario.dispatch
    if outcome(run) == cancelled:
        assert "capture_payment" not in [c.step for c in run.commands]


@PROPERTY
@given(data=st.data(), scenario=scenarios(failures=True))
def test_exhausted_retries_still_end_in_a_terminal_status(
    data: st.DataObject, scenario: Scenario
) -> None:
    run = drive(scenario, Drawn(data))

    check_invariants(run)
    called = {(c.step, c.kind) for c in run.commands}
    failed_for_good = called & scenario.exhausted
    if run.status is Status.COMPLETED:
        assert not failed_for_good
    if run.status is Status.NEEDS_ATTENTION:
        assert any(kind == "compensation" or step == PIVOT for step, kind in failed_for_good)
        assert run.instance is not None
        assert run.instance.error in {f"{step}_{kind}_failed" for step, kind in failed_for_good}
    if (PIVOT, "action") in failed_for_good:
        assert run.status is Status.NEEDS_ATTENTION
