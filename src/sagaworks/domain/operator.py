"""What a person may do to one saga, and why an action is refused: pure rules, no I/O.

An operator's action reaches a saga as one more input to `decide()`, like an
event or a port's result: `OperatorCommand`. Before it changes anything,
`refusal()` says whether the saga can take it, in words that name what is
wrong and what to do instead; `compensation_plan()` says what a cancellation
would undo, so `--dry-run` can show it before anyone commits to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from sagaworks.domain.definition import SagaDefinition, Step, Wait
from sagaworks.domain.instance import SagaInstance, Status

__all__ = [
    "ACTIONS",
    "Action",
    "OperatorCommand",
    "PlannedCompensation",
    "compensation_plan",
    "current_item",
    "refusal",
]

Action = Literal["retry", "resume", "cancel", "resolve", "pause", "unpause"]
ACTIONS: tuple[Action, ...] = get_args(Action)


@dataclass(frozen=True, slots=True)
class OperatorCommand:
    """A person acting on one saga: what, who and why.

    `message_id` is recorded in the saga's inbox like a message's id, so the
    same request twice acts once; `audit_id` ties the history row to the audit row.
    """

    action: Action
    operator: str
    reason: str
    message_id: str
    audit_id: str
    step: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class PlannedCompensation:
    """One compensation a cancellation would run, in order; `why` says why it is undone."""

    step: str
    port: str
    why: Literal["done", "outcome_unknown", "if_in_flight_succeeds"]


def current_item(
    definition: SagaDefinition[Any], instance: SagaInstance
) -> Step[Any] | Wait[Any, Any] | None:
    """The step or wait at the saga's position; None once every step is done."""
    if instance.position < len(definition.steps):
        return definition.steps[instance.position]
    return None


def compensation_plan(
    definition: SagaDefinition[Any], instance: SagaInstance
) -> list[PlannedCompensation]:
    """The compensations a cancellation now would run, newest completed step first.

    A step whose delayed retry is pending is abandoned and undone (its outcome is
    unknown); a step in flight is undone after it finishes, if it succeeded.
    """
    plan: list[PlannedCompensation] = []
    flight = instance.in_flight
    if flight is not None and flight.kind == "action":
        step = definition.step(flight.step)
        if step.compensation is not None:
            why: Literal["outcome_unknown", "if_in_flight_succeeds"] = (
                "outcome_unknown" if flight.retry_at is not None else "if_in_flight_succeeds"
            )
            plan.append(PlannedCompensation(step.name, step.port, why))
    for name in reversed(instance.done):
        step = definition.step(name)
        if step.compensation is not None:
            plan.append(PlannedCompensation(name, step.port, "done"))
    return plan


def refusal(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    """Why the saga cannot take `command` now, and what to do instead; None: it can."""
    status = instance.status
    if status in {Status.COMPLETED, Status.COMPENSATED}:
        return (
            f"the saga is {status.value}: a finished saga takes no more actions "
            f"(its timeline stays readable with `sagaworks saga show {instance.id}`)"
        )
    action = command.action
    if instance.paused and action not in {"pause", "unpause"}:
        return (
            "the saga is paused: unpause it first "
            f"(`sagaworks saga unpause {instance.id} --reason ...`)"
        )
    checks = {
        "retry": _refuse_retry,
        "resume": _refuse_resume,
        "cancel": _refuse_cancel,
        "resolve": _refuse_resolve,
        "pause": _refuse_pause,
        "unpause": _refuse_unpause,
    }
    return checks[action](definition, instance, command)


def _where(definition: SagaDefinition[Any], instance: SagaInstance) -> str:
    if instance.stopped is not None:
        return (
            f'{instance.stopped.kind} of step "{instance.stopped.step}" failed ({instance.error})'
        )
    item = current_item(definition, instance)
    if item is None:
        return "it is past its last step"
    if isinstance(item, Wait):
        return f'it waits for "{item.event.message_type}" (wait "{item.name}")'
    return f'it is at step "{item.name}"'


def _refuse_retry(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    if instance.status is Status.NEEDS_ATTENTION:
        return (
            f"the saga needs attention ({_where(definition, instance)}): nothing is in flight "
            "to retry; fix the cause, then `sagaworks saga resume`, or declare the step done "
            "by hand with `sagaworks saga resolve`"
        )
    if instance.in_flight is None:
        return f"no step or compensation is in flight to retry: {_where(definition, instance)}"
    return None


def _refuse_resume(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    if instance.status is not Status.NEEDS_ATTENTION:
        hint = " (`sagaworks saga retry` runs a step in flight now)" if instance.in_flight else ""
        return (
            f"only a saga that needs attention can be resumed; this one is "
            f"{instance.status.value}{hint}"
        )
    if instance.stopped is None:
        item = current_item(definition, instance)
        name = item.name if item is not None else "?"
        return (
            f'the saga stopped at wait "{name}" after its deadline passed: a wait cannot be run '
            f"again; once the event is handled by hand, `sagaworks saga resolve {instance.id} "
            f"{name}`"
        )
    return None


def _refuse_cancel(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    pivot = definition.pivot_index()
    if pivot is not None and instance.position >= pivot:
        return (
            f'the saga is past its pivot step "{definition.steps[pivot].name}" (the point of no '
            "return): it can no longer be compensated; it can only go forward "
            "(`sagaworks saga resume` or `resolve`)"
        )
    if instance.status is Status.COMPENSATING:
        return f"the saga is already compensating ({instance.reason})"
    if instance.status is Status.NEEDS_ATTENTION:
        return (
            f"the saga was compensating when it stopped ({_where(definition, instance)}); "
            "resume or resolve that compensation instead"
        )
    return None


def _refuse_resolve(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    names = [item.name for item in definition.steps]
    if command.step not in names:
        return (
            f'saga type "{definition.name}" has no step "{command.step}"; '
            f"its steps are {', '.join(names)}"
        )
    if not command.note:
        return "resolve needs --note: say what was done by hand, for whoever reads the timeline"
    stopped, flight = instance.stopped, instance.in_flight
    if stopped is not None and stopped.step == command.step:
        return None
    if flight is not None and flight.step == command.step:
        return None
    item = current_item(definition, instance)
    if (
        instance.status is Status.NEEDS_ATTENTION
        and stopped is None
        and isinstance(item, Wait)
        and item.name == command.step
    ):
        return None
    return (
        f'step "{command.step}" has not failed and is not in flight, so there is nothing to '
        f"resolve: {_where(definition, instance)}"
    )


def _refuse_pause(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    if instance.paused:
        return "the saga is already paused"
    if instance.status is Status.NEEDS_ATTENTION:
        return "the saga needs attention and runs nothing until a person acts: nothing to pause"
    return None


def _refuse_unpause(
    definition: SagaDefinition[Any], instance: SagaInstance, command: OperatorCommand
) -> str | None:
    return None if instance.paused else "the saga is not paused"
