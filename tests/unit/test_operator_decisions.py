"""Operator actions as inputs to `decide()`: what each does, and why each is refused. No I/O."""

from __future__ import annotations

from datetime import timedelta

import pytest
from scenarios.order_inputs import T0, failed, order_placed, succeeded
from test_decide import Saga, cancellation, dispatched, kinds, received, run_steps

from sagaworks.domain.decide import (
    Decision,
    OperatorCommand,
    RunStep,
    TimerFired,
    retry_timer,
)
from sagaworks.domain.instance import InFlight, Status
from sagaworks.domain.operator import PlannedCompensation, compensation_plan

pytestmark = pytest.mark.unit


def command(action: str, *, step: str | None = None, note: str | None = None) -> OperatorCommand:
    return OperatorCommand(
        action,  # type: ignore[arg-type]
        operator="alice",
        reason="ticket 42",
        message_id=f"operator:{action}",
        audit_id="a-1",
        step=step,
        note=note,
    )


def started() -> Saga:
    saga = Saga()
    saga.feed(received(order_placed("o-1")))
    return saga


def retrying_payment() -> Saga:
    saga = started()
    saga.feed(succeeded("reserve_stock"))
    saga.feed(
        failed("authorise_payment", "down", business=False, retry_at=T0 + timedelta(minutes=10))
    )
    return saga


def capture_failed() -> Saga:
    """Past the pivot: capture refused for good, the saga needs attention."""
    saga = started()
    for step in ("reserve_stock", "authorise_payment", "book_shipment"):
        saga.feed(succeeded(step))
    saga.feed(dispatched())
    saga.feed(failed("capture_payment", "card_expired", business=True))
    assert saga.status() is Status.NEEDS_ATTENTION
    return saga


def release_failed() -> Saga:
    """A compensation refused for good while compensating."""
    saga = started()
    saga.feed(succeeded("reserve_stock"))
    saga.feed(failed("authorise_payment", "declined", business=True))
    saga.feed(failed("reserve_stock", "gone", business=True, kind="compensation"))
    assert saga.status() is Status.NEEDS_ATTENTION
    return saga


def refused(decision: Decision) -> str:
    assert decision.outcome == "ignored", decision
    assert decision.outgoing == ()
    assert kinds(decision.history) == ["operator_refused"]
    return decision.reason


def test_retry_drops_the_pending_delay_and_runs_the_next_attempt_now() -> None:
    saga = retrying_payment()
    assert retry_timer("authorise_payment", "action", 1) in saga.timers
    decision = saga.feed(command("retry"))
    assert decision.outcome == "applied"
    assert decision.cancel_timers == (retry_timer("authorise_payment", "action", 1),)
    assert saga.commands()[-1] == ("authorise_payment", "action", 2)
    assert saga.i.in_flight == InFlight("authorise_payment", "action", 2)
    assert kinds(decision.history) == ["operator_retry", "step_started"]
    who = decision.history[0].detail
    assert (who["operator"], who["reason"], who["audit_id"]) == ("alice", "ticket 42", "a-1")
    assert decision.history[0].message_id == "operator:retry"
    # The result of the attempt that was waiting is now stale.
    assert saga.feed(succeeded("authorise_payment", attempt=1)).reason == "stale_step_result"
    assert saga.feed(succeeded("authorise_payment", attempt=2)).outcome == "applied"


def test_retry_with_nothing_in_flight_is_refused_and_says_what_the_saga_waits_for() -> None:
    saga = started()
    for step in ("reserve_stock", "authorise_payment", "book_shipment"):
        saga.feed(succeeded(step))
    reason = refused(saga.feed(command("retry")))
    assert "no step or compensation is in flight" in reason
    assert "shipment.dispatched" in reason


def test_resume_runs_the_failed_step_again_and_leaves_needs_attention() -> None:
    saga = capture_failed()
    decision = saga.feed(command("resume"))
    assert decision.outcome == "applied"
    assert saga.status() is Status.RUNNING
    assert saga.i.error is None
    assert saga.i.stopped is None
    assert saga.commands()[-1] == ("capture_payment", "action", 2)
    saga.feed(succeeded("capture_payment", attempt=2))
    assert saga.status() is Status.COMPLETED


def test_resume_of_a_failed_compensation_compensates_again() -> None:
    saga = release_failed()
    saga.feed(command("resume"))
    assert saga.status() is Status.COMPENSATING
    assert saga.commands()[-1] == ("reserve_stock", "compensation", 2)
    saga.feed(succeeded("reserve_stock", kind="compensation", attempt=2))
    assert saga.status() is Status.COMPENSATED


def test_resume_is_only_for_sagas_that_need_attention() -> None:
    reason = refused(retrying_payment().feed(command("resume")))
    assert "only a saga that needs attention can be resumed" in reason
    assert "saga retry" in reason


def test_cancel_compensates_what_was_done_with_the_operators_reason() -> None:
    saga = retrying_payment()
    plan = compensation_plan(saga.definition, saga.i)
    assert plan == [
        PlannedCompensation("authorise_payment", "payments", "outcome_unknown"),
        PlannedCompensation("reserve_stock", "inventory", "done"),
    ]
    decision = saga.feed(command("cancel"))
    assert decision.outcome == "applied"
    assert saga.status() is Status.COMPENSATING
    assert saga.i.reason == "ticket 42"
    assert kinds(decision.history)[:2] == ["operator_cancel", "compensation_started"]
    assert saga.commands()[-1] == ("authorise_payment", "compensation", 1)


def test_cancel_plan_of_a_step_in_flight_undoes_it_only_if_it_succeeds() -> None:
    saga = started()
    saga.feed(succeeded("reserve_stock"))
    plan = compensation_plan(saga.definition, saga.i)
    assert [p.why for p in plan] == ["if_in_flight_succeeds", "done"]


def test_cancel_past_the_pivot_is_refused_with_the_pivot_named() -> None:
    reason = refused(capture_failed().feed(command("cancel")))
    assert 'past its pivot step "capture_payment"' in reason


def test_cancel_of_a_compensating_saga_is_refused() -> None:
    saga = started()
    saga.feed(cancellation())
    assert "already compensating" in refused(saga.feed(command("cancel")))


def test_finished_sagas_refuse_every_action_and_say_why() -> None:
    saga = started()
    saga.feed(failed("reserve_stock", "no_stock", business=True))
    assert saga.status() is Status.COMPENSATED
    for action in ("retry", "resume", "cancel", "pause", "unpause"):
        reason = refused(saga.feed(command(action)))
        assert reason.startswith("the saga is compensated: a finished saga takes no more")


def test_resolve_a_failed_step_past_the_pivot_completes_the_saga() -> None:
    saga = capture_failed()
    decision = saga.feed(command("resolve", step="capture_payment", note="captured in the PSP"))
    assert decision.outcome == "applied"
    assert decision.history[0].detail["note"] == "captured in the PSP"
    assert saga.status() is Status.COMPLETED


def test_resolve_a_failed_compensation_moves_on_to_the_next() -> None:
    saga = release_failed()
    saga.feed(command("resolve", step="reserve_stock", note="released in the WMS"))
    assert saga.status() is Status.COMPENSATED


def test_resolve_a_retrying_step_drops_its_timer_and_runs_the_next_step() -> None:
    saga = retrying_payment()
    decision = saga.feed(command("resolve", step="authorise_payment", note="authorised by phone"))
    assert retry_timer("authorise_payment", "action", 1) in decision.cancel_timers
    assert saga.commands()[-1] == ("book_shipment", "action", 1)


def test_resolve_refuses_unknown_steps_steps_not_failed_and_a_missing_note() -> None:
    saga = retrying_payment()
    assert 'has no step "nope"' in refused(saga.feed(command("resolve", step="nope", note="x")))
    assert "nothing to resolve" in refused(
        saga.feed(command("resolve", step="book_shipment", note="x"))
    )
    assert "needs --note" in refused(saga.feed(command("resolve", step="authorise_payment")))


def test_paused_saga_keeps_events_ignores_results_and_holds_timers() -> None:
    saga = started()
    saga.feed(succeeded("reserve_stock"))
    assert saga.feed(command("pause")).outcome == "applied"
    assert saga.i.paused
    # An event is kept (parked) for later; a port result is not applied.
    assert (saga.feed(cancellation()).outcome, saga.decisions[-1].reason) == ("park", "paused")
    result = saga.feed(succeeded("authorise_payment"))
    assert (result.outcome, result.reason) == ("ignored", "paused")
    assert kinds(result.history) == ["step_result_ignored"]
    # A timer claimed just as it was paused is set again, due, for later.
    held = saga.feed(TimerFired("deadline:await_dispatch"))
    assert [t.name for t in held.set_timers] == ["deadline:await_dispatch"]
    assert held.outgoing == ()
    # Other actions wait for the unpause.
    assert "unpause it first" in refused(saga.feed(command("retry")))
    assert "already paused" in refused(saga.feed(command("pause")))


def test_unpause_sends_the_step_in_flight_again() -> None:
    saga = started()
    saga.feed(succeeded("reserve_stock"))
    saga.feed(command("pause"))
    decision = saga.feed(command("unpause"))
    assert not saga.i.paused
    commands = run_steps(decision.outgoing)
    assert [(c.step, c.attempt) for c in commands] == [("authorise_payment", 2)]
    assert isinstance(commands[0], RunStep)
    assert "not paused" in refused(saga.feed(command("unpause")))


def test_pause_refused_for_a_saga_that_needs_attention() -> None:
    assert "nothing to pause" in refused(capture_failed().feed(command("pause")))
