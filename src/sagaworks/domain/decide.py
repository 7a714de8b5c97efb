"""`decide`: the whole saga state machine as one pure function.

Given a definition, the current instance (or none), one input and the time,
it returns the next instance and everything that must be committed with it:
outgoing messages, timers to set or cancel, and history entries. The
application layer persists a `Decision` atomically; nothing here does I/O, so
every transition is unit-testable and replayable.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from sagaworks.domain.definition import SagaDefinition, Step, Wait
from sagaworks.domain.instance import InFlight, SagaInstance, Status, saga_id_for
from sagaworks.domain.messages import Envelope, Message
from sagaworks.domain.operator import OperatorCommand, refusal

__all__ = [
    "COMMANDS_DOMAIN",
    "EVENTS_DOMAIN",
    "Decision",
    "EventReceived",
    "Failure",
    "HistoryEntry",
    "Input",
    "OperatorCommand",
    "Outgoing",
    "RunStep",
    "SagaNeedsAttention",
    "StepFinished",
    "TimerFired",
    "TimerSpec",
    "deadline_timer",
    "decide",
    "idempotency_key",
    "retry_timer",
]

COMMANDS_DOMAIN = "sagaworks.commands"
EVENTS_DOMAIN = "sagaworks.events"


class RunStep(Message, type="sagaworks.step.run", domain=COMMANDS_DOMAIN):
    """Command to call one step's action or compensation on its port."""

    saga_type: str
    saga_id: UUID
    step: str
    kind: Literal["action", "compensation"]
    attempt: int
    port: str


class SagaNeedsAttention(Message, type="sagaworks.saga.needs_attention", domain=EVENTS_DOMAIN):
    """A saga stopped and needs a person: a compensation or a post-pivot step failed for good."""

    saga_type: str
    saga_id: UUID
    correlation_key: str
    step: str
    error: str


@dataclass(frozen=True, slots=True)
class EventReceived:
    envelope: Envelope
    message: Message


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a port call failed. `retry_at` is when the port's policy allows another attempt."""

    reason: str
    business: bool
    retry_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class StepFinished:
    """The result of one port call for the step attempt in flight."""

    step: str
    kind: Literal["action", "compensation"]
    attempt: int
    result: Any = None
    failure: Failure | None = None
    message_id: str | None = None


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str


Input = EventReceived | StepFinished | TimerFired | OperatorCommand


@dataclass(frozen=True, slots=True)
class Outgoing:
    envelope: Envelope
    domain: str
    routing_key: str
    body: Message


@dataclass(frozen=True, slots=True)
class TimerSpec:
    name: str
    fire_at: datetime


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    kind: str
    step: str | None = None
    message_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Decision:
    """`applied`: persist it; `ignored`: record it as seen, with any `history`; `park`: keep it."""

    outcome: Literal["applied", "ignored", "park"]
    instance: SagaInstance | None
    at: datetime
    reason: str = ""
    outgoing: tuple[Outgoing, ...] = ()
    set_timers: tuple[TimerSpec, ...] = ()
    cancel_timers: tuple[str, ...] = ()
    history: tuple[HistoryEntry, ...] = ()


def idempotency_key(saga_id: UUID, step: str, kind: str) -> str:
    """Same for every attempt of one step's action (or compensation): a repeat has no new effect."""
    return f"{saga_id}:{step}:{kind}"


def deadline_timer(wait: str) -> str:
    return f"deadline:{wait}"


def retry_timer(step: str, kind: str, attempt: int) -> str:
    """Named per attempt, so a late duplicate firing of an old timer is recognised as stale."""
    return f"retry:{step}:{kind}:{attempt}"


def decide(
    definition: SagaDefinition[Any],
    instance: SagaInstance | None,
    given: Input,
    now: datetime,
) -> Decision:
    """The next state of one saga after `given`."""
    if instance is None:
        return _start(definition, given, now)
    t = _Transition(definition, instance, now, _cause(given))
    if isinstance(given, OperatorCommand):
        return _on_operator(t, given)
    if isinstance(given, EventReceived):
        return _noted(t, given, _on_event(t, given))
    if isinstance(given, StepFinished):
        return _on_step_finished(t, given)
    return _on_timer(t, given)


def _cause(given: Input) -> str | None:
    if isinstance(given, EventReceived):
        return given.envelope.id
    if isinstance(given, StepFinished | OperatorCommand):
        return given.message_id
    return None


class _Transition:
    """Accumulates one transition's effects; `decision()` freezes them."""

    def __init__(
        self,
        definition: SagaDefinition[Any],
        instance: SagaInstance,
        now: datetime,
        cause: str | None,
    ) -> None:
        self.d = definition
        self.i = instance
        self.now = now
        self.cause = cause
        self.outgoing: list[Outgoing] = []
        self.set_timers: list[TimerSpec] = []
        self.cancel_timers: list[str] = []
        self.history: list[HistoryEntry] = []

    def record(self, what: str, step: str | None = None, **detail: Any) -> None:
        self.history.append(HistoryEntry(what, step, self.cause, detail))

    def publish(self, body: Message, domain: str, routing_key: str) -> None:
        n = len(self.outgoing)
        envelope = Envelope(
            id=f"{self.i.id}/{self.i.version + 1}/{n}",
            type=body.message_type,
            source=f"sagaworks/{self.d.name}",
            time=self.now,
            correlation_id=self.i.correlation_id,
            causation_id=self.cause,
        )
        self.outgoing.append(Outgoing(envelope, domain, routing_key, body))

    def run(self, step: Step[Any], kind: Literal["action", "compensation"], attempt: int) -> None:
        self.i = replace(self.i, in_flight=InFlight(step.name, kind, attempt))
        command = RunStep(
            saga_type=self.d.name,
            saga_id=self.i.id,
            step=step.name,
            kind=kind,
            attempt=attempt,
            port=step.port,
        )
        self.publish(command, COMMANDS_DOMAIN, f"port.{step.port}.{self.d.name}")
        self.record("step_started", step.name, kind=kind, attempt=attempt, port=step.port)

    def decision(self) -> Decision:
        return Decision(
            outcome="applied",
            instance=replace(self.i, version=self.i.version + 1),
            at=self.now,
            outgoing=tuple(self.outgoing),
            set_timers=tuple(self.set_timers),
            cancel_timers=tuple(self.cancel_timers),
            history=tuple(self.history),
        )

    def ignore(self, reason: str) -> Decision:
        return Decision(outcome="ignored", instance=self.i, at=self.now, reason=reason)

    def park(self, reason: str) -> Decision:
        return Decision(outcome="park", instance=self.i, at=self.now, reason=reason)


def _start(definition: SagaDefinition[Any], given: Input, now: datetime) -> Decision:
    if not (isinstance(given, EventReceived) and isinstance(given.message, definition.start.event)):
        return Decision(outcome="park", instance=None, at=now, reason="no_saga")
    key = definition.start.key(given.message)
    instance = SagaInstance(
        id=saga_id_for(definition.name, key),
        saga_type=definition.name,
        correlation_key=key,
        correlation_id=given.envelope.correlation_id or key,
        status=Status.RUNNING,
        position=0,
        state=definition.start.state(given.message),
        version=0,
    )
    t = _Transition(definition, instance, now, given.envelope.id)
    t.record("started", event=given.envelope.type)
    _advance(t)
    return t.decision()


def _advance(t: _Transition) -> None:
    """Start the step at the current position, or complete the saga."""
    if t.i.position >= len(t.d.steps):
        t.i = replace(t.i, status=Status.COMPLETED, in_flight=None)
        _announce(t, t.d.on_completed(t.i.state), t.d.completes_with)
        t.record("completed")
        return
    item = t.d.steps[t.i.position]
    if isinstance(item, Step):
        t.run(item, "action", 1)
        return
    fire_at = item.fire_at(t.i.state, t.now)
    t.set_timers.append(TimerSpec(deadline_timer(item.name), fire_at))
    t.record("waiting", item.name, event=item.event.message_type, until=fire_at.isoformat())


def _announce(t: _Transition, message: Message, declared: type[Message]) -> None:
    if not isinstance(message, declared):
        raise TypeError(
            f'saga "{t.d.name}" declares it announces {declared.__name__} '
            f"but built a {type(message).__name__}"
        )
    t.publish(message, message.domain, message.routing_key)


def _noted(t: _Transition, given: EventReceived, decision: Decision) -> Decision:
    """An event another service sent is never dropped without a trace: an ignored one is noted.

    The entry changes nothing else (same instance and version); the store appends it.
    """
    if decision.outcome != "ignored":
        return decision
    entry = HistoryEntry(
        "ignored",
        None,
        given.envelope.id,
        {"reason": decision.reason, "event": given.envelope.type, "status": t.i.status.value},
    )
    return replace(decision, history=(entry,))


def _on_event(t: _Transition, given: EventReceived) -> Decision:
    message = given.message
    if isinstance(message, t.d.start.event):
        return t.ignore("already_started")
    if t.i.status.terminal:
        return t.ignore(f"saga_{t.i.status.value}")
    if t.i.paused:
        return t.park("paused")
    for cancel in t.d.cancel:
        if isinstance(message, cancel.event):
            return _on_cancel(t, cancel.reason)
    return _on_awaited_event(t, given)


def _on_cancel(t: _Transition, reason: str) -> Decision:
    if t.i.status is Status.COMPENSATING:
        return t.ignore("already_compensating")
    pivot = t.d.pivot_index()
    if pivot is not None and t.i.position >= pivot:
        t.record("cancellation_refused", t.d.steps[pivot].name, reason=reason)
        return t.decision()
    _compensate(t, reason)
    return t.decision()


def _on_awaited_event(t: _Transition, given: EventReceived) -> Decision:
    waits = [
        (i, w)
        for i, w in enumerate(t.d.steps)
        if isinstance(w, Wait) and isinstance(given.message, w.event)
    ]
    if not waits:
        return t.ignore("not_awaited")
    index, wait = waits[0]
    if t.i.status is Status.COMPENSATING or t.i.position > index:
        return t.ignore("too_late")
    if t.i.position < index:
        return t.park("unexpected_event")
    state = wait.on_event(t.i.state, given.message) if wait.on_event else t.i.state
    t.i = replace(t.i, state=state, position=index + 1)
    t.cancel_timers.append(deadline_timer(wait.name))
    t.record("event_received", wait.name, event=given.envelope.type)
    _advance(t)
    return t.decision()


def _on_step_finished(t: _Transition, given: StepFinished) -> Decision:
    flight = t.i.in_flight
    if (
        flight is None
        or flight.retry_at is not None
        or (flight.step, flight.kind, flight.attempt) != (given.step, given.kind, given.attempt)
    ):
        return t.ignore("stale_step_result")
    if t.i.paused:
        return _result_while_paused(t, given)
    step = t.d.step(given.step)
    failure = given.failure
    if failure is None:
        _succeeded(t, step, given)
    elif given.kind == "compensation" or step.pivot or _past_pivot(t):
        if _retryable(failure):
            _schedule_retry(t, flight, failure)
        else:
            t.i = replace(t.i, stopped=flight)
            _needs_attention(t, step.name, failure.reason)
    elif t.i.status is Status.COMPENSATING:
        _action_failed(t, step, failure)
        _next_compensation(t)
    elif _retryable(failure):
        _schedule_retry(t, flight, failure)
    else:
        _action_failed(t, step, failure)
        _compensate(t, failure.reason)
    return t.decision()


def _retryable(failure: Failure) -> bool:
    return failure.retry_at is not None and not failure.business


def _action_failed(t: _Transition, step: Step[Any], failure: Failure) -> None:
    """A refused action had no effect; one that failed technically may have, so it is undone."""
    maybe_done = not failure.business
    done = (*t.i.done, step.name) if maybe_done else t.i.done
    t.i = replace(t.i, in_flight=None, done=done)
    t.record("step_failed", step.name, reason=failure.reason, outcome_unknown=maybe_done)


def _past_pivot(t: _Transition) -> bool:
    pivot = t.d.pivot_index()
    return pivot is not None and t.i.position > pivot


def _succeeded(t: _Transition, step: Step[Any], given: StepFinished) -> None:
    if given.kind == "compensation":
        t.i = replace(t.i, in_flight=None, done=tuple(s for s in t.i.done if s != step.name))
        t.record("compensation_completed", step.name, attempt=given.attempt)
        _next_compensation(t)
        return
    state = step.on_success(t.i.state, given.result) if step.on_success else t.i.state
    t.i = replace(t.i, state=state, in_flight=None, done=(*t.i.done, step.name))
    t.record("step_completed", step.name, attempt=given.attempt)
    if t.i.status is Status.COMPENSATING:
        _next_compensation(t)
        return
    t.i = replace(t.i, position=t.i.position + 1)
    _advance(t)


def _schedule_retry(t: _Transition, flight: InFlight, failure: Failure) -> None:
    assert failure.retry_at is not None
    t.i = replace(t.i, in_flight=replace(flight, retry_at=failure.retry_at))
    name = retry_timer(flight.step, flight.kind, flight.attempt)
    t.set_timers.append(TimerSpec(name, failure.retry_at))
    t.record(
        "retry_scheduled",
        flight.step,
        kind=flight.kind,
        attempt=flight.attempt,
        reason=failure.reason,
        retry_at=failure.retry_at.isoformat(),
    )


def _needs_attention(t: _Transition, step: str, error: str) -> None:
    """Stop and ask a person: announced on sagaworks' events exchange for alerting."""
    t.i = replace(t.i, status=Status.NEEDS_ATTENTION, in_flight=None, error=error)
    t.record("needs_attention", step, error=error)
    alert = SagaNeedsAttention(
        saga_type=t.d.name,
        saga_id=t.i.id,
        correlation_key=t.i.correlation_key,
        step=step,
        error=error,
    )
    t.publish(alert, EVENTS_DOMAIN, f"saga.needs_attention.{t.d.name}")


def _compensate(t: _Transition, reason: str) -> None:
    t.i = replace(t.i, status=Status.COMPENSATING, reason=reason)
    t.record("compensation_started", reason=reason)
    current = t.d.steps[t.i.position] if t.i.position < len(t.d.steps) else None
    if isinstance(current, Wait):
        t.cancel_timers.append(deadline_timer(current.name))
    flight = t.i.in_flight
    if flight is not None and flight.retry_at is not None:
        t.cancel_timers.append(retry_timer(flight.step, flight.kind, flight.attempt))
        t.i = replace(t.i, in_flight=None, done=(*t.i.done, flight.step))
        t.record("step_abandoned", flight.step, attempt=flight.attempt, outcome_unknown=True)
    _next_compensation(t)


def _next_compensation(t: _Transition) -> None:
    """Compensate the newest completed step; when none is left, the saga is compensated."""
    if t.i.in_flight is not None:
        return
    for name in reversed(t.i.done):
        step = t.d.step(name)
        if step.compensation is not None:
            t.run(step, "compensation", 1)
            return
    t.i = replace(t.i, status=Status.COMPENSATED)
    _announce(t, t.d.on_compensated(t.i.state, t.i.reason or "compensated"), t.d.compensates_with)
    t.record("compensated", reason=t.i.reason)


def _on_timer(t: _Transition, given: TimerFired) -> Decision:
    if t.i.status.terminal:
        return t.ignore("stale_timer")
    if t.i.paused:
        return _timer_while_paused(t, given)
    flight = t.i.in_flight
    if (
        flight is not None
        and flight.retry_at is not None
        and given.name == retry_timer(flight.step, flight.kind, flight.attempt)
    ):
        t.run(t.d.step(flight.step), flight.kind, flight.attempt + 1)
        return t.decision()
    current = t.d.steps[t.i.position] if t.i.position < len(t.d.steps) else None
    if (
        isinstance(current, Wait)
        and t.i.status is Status.RUNNING
        and given.name == deadline_timer(current.name)
    ):
        t.record("deadline_missed", current.name)
        if _past_pivot(t):
            _needs_attention(t, current.name, current.timeout_reason)
        else:
            _compensate(t, current.timeout_reason)
        return t.decision()
    return t.ignore("stale_timer")


def _result_while_paused(t: _Transition, given: StepFinished) -> Decision:
    """A result that arrives while paused is not applied; unpausing runs the step again.

    The port applies a repeated call once (same idempotency key), so nothing is lost.
    """
    entry = HistoryEntry(
        "step_result_ignored",
        given.step,
        given.message_id,
        {"reason": "paused", "kind": given.kind, "attempt": given.attempt},
    )
    return Decision(outcome="ignored", instance=t.i, at=t.now, reason="paused", history=(entry,))


def _timer_while_paused(t: _Transition, given: TimerFired) -> Decision:
    """A timer claimed just as the saga was paused is kept, due, for when it is unpaused."""
    t.set_timers.append(TimerSpec(given.name, t.now))
    t.record("timer_held", timer=given.name)
    return t.decision()


def _on_operator(t: _Transition, given: OperatorCommand) -> Decision:
    """A person's action: refused with the reason why, or applied and recorded with who and why."""
    refused = refusal(t.d, t.i, given)
    if refused is not None:
        entry = HistoryEntry(
            "operator_refused",
            given.step,
            given.message_id,
            {"action": given.action, **_who(given), "refused": refused},
        )
        return Decision(outcome="ignored", instance=t.i, at=t.now, reason=refused, history=(entry,))
    t.record(f"operator_{given.action}", given.step, **_who(given))
    if given.action == "retry":
        _operator_retry(t)
    elif given.action == "resume":
        _operator_resume(t)
    elif given.action == "cancel":
        _compensate(t, given.reason)
    elif given.action == "resolve":
        assert given.step is not None
        _operator_resolve(t, given.step)
    else:
        _operator_pause(t, paused=given.action == "pause")
    return t.decision()


def _who(given: OperatorCommand) -> dict[str, Any]:
    detail: dict[str, Any] = {
        "operator": given.operator,
        "reason": given.reason,
        "audit_id": given.audit_id,
    }
    if given.note:
        detail["note"] = given.note
    return detail


def _operator_retry(t: _Transition) -> None:
    """Run the step in flight again now, dropping a pending delayed retry."""
    flight = t.i.in_flight
    assert flight is not None
    if flight.retry_at is not None:
        t.cancel_timers.append(retry_timer(flight.step, flight.kind, flight.attempt))
    t.run(t.d.step(flight.step), flight.kind, flight.attempt + 1)


def _operator_resume(t: _Transition) -> None:
    """Back into the flow at the step (or compensation) that stopped the saga."""
    stopped = t.i.stopped
    assert stopped is not None
    status = Status.COMPENSATING if stopped.kind == "compensation" else Status.RUNNING
    t.i = replace(t.i, status=status, error=None, stopped=None)
    t.run(t.d.step(stopped.step), stopped.kind, stopped.attempt + 1)


def _operator_resolve(t: _Transition, name: str) -> None:
    """A person did the step (or its compensation) by hand: move on as if it had succeeded.

    The state is left as it was: a step's `on_success` needs the port's result,
    which a person's declaration does not have.
    """
    flight = t.i.in_flight
    kind = "action"
    if flight is not None and flight.step == name:
        kind = flight.kind
        if flight.retry_at is not None:
            t.cancel_timers.append(retry_timer(flight.step, flight.kind, flight.attempt))
    elif t.i.stopped is not None:
        kind = t.i.stopped.kind
    compensating = t.i.status is Status.COMPENSATING or kind == "compensation"
    status = Status.COMPENSATING if compensating else Status.RUNNING
    t.i = replace(t.i, status=status, in_flight=None, stopped=None, error=None)
    if kind == "compensation":
        t.i = replace(t.i, done=tuple(s for s in t.i.done if s != name))
        _next_compensation(t)
        return
    if isinstance(t.d.steps[t.d.index_of(name)], Step):
        t.i = replace(t.i, done=(*t.i.done, name))
    if compensating:
        _next_compensation(t)
        return
    t.i = replace(t.i, position=t.i.position + 1)
    _advance(t)


def _operator_pause(t: _Transition, *, paused: bool) -> None:
    """Pause: nothing new starts. Unpause: the step in flight is sent again (its result was
    not applied while paused); due timers fire and kept events are applied, in order."""
    t.i = replace(t.i, paused=paused)
    flight = t.i.in_flight
    if not paused and flight is not None and flight.retry_at is None:
        t.run(t.d.step(flight.step), flight.kind, flight.attempt + 1)
