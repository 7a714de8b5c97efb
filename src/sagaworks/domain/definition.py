"""The saga DSL: typed, declarative, validated when the definition is built.

A definition reads like the business process: what starts it, the ordered
steps (each an action on a named port with its compensation), the waits for
outside events with their deadlines, what cancels it, and what it announces
when it ends. Nothing here runs I/O; actions are called by the application
layer through the ports the bootstrap wires in.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, Literal, TypeVar
from uuid import UUID

from pydantic import BaseModel

from sagaworks.domain.errors import DefinitionError
from sagaworks.domain.messages import Message

__all__ = [
    "CancelOn",
    "Deadline",
    "SagaDefinition",
    "StartOn",
    "Step",
    "StepInput",
    "Wait",
]

S = TypeVar("S", bound=BaseModel)
E = TypeVar("E", bound=Message)

_NAME = re.compile(r"[a-z][a-z0-9_]{0,62}")

Deadline = timedelta | Callable[[Any], datetime]
"""How long a wait may last: a fixed span, or an absolute time computed from the state."""


@dataclass(frozen=True, slots=True)
class StepInput(Generic[S]):
    """The one typed object a step's action or compensation receives."""

    saga_id: UUID
    correlation_key: str
    step: str
    kind: Literal["action", "compensation"]
    attempt: int
    idempotency_key: str
    action_key: str
    """The idempotency key of this step's action: what a compensation undoes, if it happened."""
    state: S


@dataclass(frozen=True, slots=True)
class Step(Generic[S]):
    """Call `action` on the port named `port`; undo it with `compensation` if the saga fails.

    A step without a compensation must say `pivot=True`: it is the point of no
    return, after which the saga is no longer cancelled and a failure needs a
    person rather than compensation.
    """

    name: str
    port: str
    action: Callable[[Any, StepInput[S]], Awaitable[Any]]
    compensation: Callable[[Any, StepInput[S]], Awaitable[object]] | None = None
    on_success: Callable[[S, Any], S] | None = None
    pivot: bool = False


@dataclass(frozen=True, slots=True)
class Wait(Generic[S, E]):
    """Wait for `event`, at most until `deadline`; on timeout compensate with `timeout_reason`."""

    name: str
    event: type[E]
    deadline: Deadline
    timeout_reason: str
    on_event: Callable[[S, E], S] | None = None

    def fire_at(self, state: S, now: datetime) -> datetime:
        if isinstance(self.deadline, timedelta):
            return now + self.deadline
        return self.deadline(state)


@dataclass(frozen=True, slots=True)
class StartOn(Generic[S, E]):
    """The event that starts a saga, its correlation key, and the initial state."""

    event: type[E]
    key: Callable[[E], str]
    state: Callable[[E], S]


@dataclass(frozen=True, slots=True)
class CancelOn(Generic[E]):
    """An event that cancels the saga before its pivot step, compensating with `reason`."""

    event: type[E]
    reason: str


@dataclass(frozen=True)
class SagaDefinition(Generic[S]):
    """An immutable, validated saga. Build it once at import; share it freely."""

    name: str
    state: type[S]
    state_version: int
    start: StartOn[S, Any]
    steps: tuple[Step[S] | Wait[S, Any], ...]
    completes_with: type[Message]
    on_completed: Callable[[S], Message]
    compensates_with: type[Message]
    on_compensated: Callable[[S, str], Message]
    correlate: Mapping[type[Message], Callable[[Any], str]] = field(default_factory=dict)
    cancel: tuple[CancelOn[Any], ...] = ()

    def __post_init__(self) -> None:
        _validate(self)

    def index_of(self, name: str) -> int:
        for i, item in enumerate(self.steps):
            if item.name == name:
                return i
        raise KeyError(name)

    def step(self, name: str) -> Step[S]:
        item = self.steps[self.index_of(name)]
        if not isinstance(item, Step):
            raise KeyError(name)
        return item

    def consumed_events(self) -> tuple[type[Message], ...]:
        """Every inbound event type, the start event first."""
        seen: dict[str, type[Message]] = {self.start.event.message_type: self.start.event}
        for event in self.correlate:
            seen.setdefault(event.message_type, event)
        return tuple(seen.values())

    def event_type(self, message_type: str) -> type[Message] | None:
        for event in self.consumed_events():
            if event.message_type == message_type:
                return event
        return None

    def correlation_key(self, message: Message) -> str:
        if isinstance(message, self.start.event):
            return self.start.key(message)
        return self.correlate[type(message)](message)

    def published_events(self) -> tuple[type[Message], ...]:
        return (self.completes_with, self.compensates_with)

    def ports(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(s.port for s in self.steps if isinstance(s, Step)))

    def pivot_index(self) -> int | None:
        for i, item in enumerate(self.steps):
            if isinstance(item, Step) and item.pivot:
                return i
        return None


def _validate(d: SagaDefinition[Any]) -> None:
    if not _NAME.fullmatch(d.name):
        raise DefinitionError(d.name, "name must be snake_case letters, digits and _ (<= 63)")
    if not (isinstance(d.state, type) and issubclass(d.state, BaseModel)):
        raise DefinitionError(d.name, "state must be a pydantic model class")
    if d.state_version < 1:
        raise DefinitionError(d.name, "state_version must be 1 or more")
    if not d.steps:
        raise DefinitionError(d.name, "a saga needs at least one step")
    waits = [w.event for w in d.steps if isinstance(w, Wait)]
    declared = (
        d.start.event,
        *d.correlate,
        *(c.event for c in d.cancel),
        *waits,
        *d.published_events(),
    )
    for event in declared:
        if not (isinstance(event, type) and issubclass(event, Message) and event.is_declared()):
            raise DefinitionError(
                d.name,
                f"{getattr(event, '__name__', event)!r} is not a declared Message "
                "(subclass Message with type=... and domain=...)",
            )
    seen: set[str] = set()
    awaited: set[str] = set()
    pivot_seen: str | None = None
    for item in d.steps:
        if not _NAME.fullmatch(item.name):
            raise DefinitionError(d.name, "step names must be snake_case", step=item.name)
        if item.name in seen:
            raise DefinitionError(d.name, "duplicate step name", step=item.name)
        seen.add(item.name)
        if isinstance(item, Step):
            _validate_step(d, item, pivot_seen)
            if item.pivot:
                pivot_seen = item.name
        else:
            _validate_wait(d, item)
            if item.event.message_type in awaited:
                raise DefinitionError(
                    d.name,
                    f'a second wait for "{item.event.message_type}": the saga cannot tell '
                    "which wait an event is for; wait once",
                    step=item.name,
                )
            awaited.add(item.event.message_type)
    for cancel in d.cancel:
        if cancel.event not in d.correlate:
            raise DefinitionError(
                d.name,
                f'cancelling event "{cancel.event.message_type}" has no correlation: '
                "add it to correlate=",
            )
        if cancel.event is d.start.event:
            raise DefinitionError(d.name, "the start event cannot also cancel the saga")
        for item in d.steps:
            if isinstance(item, Wait) and item.event is cancel.event:
                raise DefinitionError(
                    d.name,
                    f'waits for "{cancel.event.message_type}", which cancels the saga: '
                    "the wait could never be satisfied",
                    step=item.name,
                )


def _validate_step(d: SagaDefinition[Any], item: Step[Any], pivot_seen: str | None) -> None:
    if not _NAME.fullmatch(item.port):
        raise DefinitionError(d.name, f'port name "{item.port}" must be snake_case', step=item.name)
    if item.pivot and pivot_seen is not None:
        raise DefinitionError(
            d.name, f'a saga has one pivot step; "{pivot_seen}" is already one', step=item.name
        )
    if item.pivot and item.compensation is not None:
        raise DefinitionError(
            d.name, "a pivot step is the point of no return and has no compensation", step=item.name
        )
    if item.compensation is not None and pivot_seen is not None:
        raise DefinitionError(
            d.name,
            f'comes after the pivot "{pivot_seen}", so it is never compensated: '
            "drop its compensation",
            step=item.name,
        )
    if item.compensation is None and not item.pivot and pivot_seen is None:
        raise DefinitionError(
            d.name,
            "missing compensation: give compensation=... or mark the step pivot=True",
            step=item.name,
        )


def _validate_wait(d: SagaDefinition[Any], item: Wait[Any, Any]) -> None:
    if item.event is d.start.event:
        raise DefinitionError(
            d.name,
            f'waits for the start event "{item.event.message_type}", which can never reach a '
            "running saga: the steps after it are unreachable",
            step=item.name,
        )
    if item.event not in d.correlate:
        raise DefinitionError(
            d.name,
            f'waits for unknown message type "{item.event.message_type}": add it to correlate=',
            step=item.name,
        )
    if isinstance(item.deadline, timedelta) and item.deadline <= timedelta(0):
        raise DefinitionError(d.name, "a wait's deadline must be positive", step=item.name)
    if not item.timeout_reason:
        raise DefinitionError(d.name, "a wait needs a timeout_reason", step=item.name)
