"""What the engine reports about its work, for whatever records traces and metrics.

The use cases say what happened (a port call and its outcome, a timer fired
late, a saga finished, outbox rows published) in their own words; the
observability adapter turns it into OpenTelemetry spans and metrics, or does
nothing when telemetry is off. Trace contexts travel as W3C `traceparent`
strings, so nothing here names a telemetry library.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol
from uuid import UUID

from sagaworks.application.ports.messages import OutboxRow
from sagaworks.application.ports.store import DueTimer

__all__ = ["FinishedSaga", "StepCall", "StepCallRecord", "Telemetry"]


@dataclass(frozen=True, slots=True)
class StepCall:
    """One call of a step's action or compensation on its port."""

    saga_type: str
    saga_id: UUID
    step: str
    port: str
    kind: Literal["action", "compensation"]
    attempt: int
    trace_context: str | None
    """The `traceparent` of the delivery that asked for the call: the call's span is its child."""


class StepCallRecord(Protocol):
    """How a port call ended; a call left without either raised (the record keeps the error)."""

    def succeeded(self) -> None: ...

    def failed(self, error: str, *, business: bool, retry_scheduled: bool) -> None:
        """`business`: the participant refused; else transient, retried later when scheduled."""
        ...


@dataclass(frozen=True, slots=True)
class FinishedSaga:
    """A saga that reached an end: completed, compensated, or needing a person."""

    saga_type: str
    status: str
    duration_s: float | None
    """From its start to this end (None: its start time is not known)."""


class Telemetry(Protocol):
    def step_call(self, call: StepCall) -> AbstractContextManager[StepCallRecord]:
        """Around one port call: its span, latency, outcome, failures and retries."""
        ...

    def timer_fired(self, timer: DueTimer, now: datetime) -> AbstractContextManager[str | None]:
        """Around applying a due timer: yields the `traceparent` its change continues."""
        ...

    def sagas_finished(self, finished: Sequence[FinishedSaga]) -> None: ...

    def outbox_published(self, rows: Sequence[OutboxRow], *, swept: bool) -> None:
        """Rows the broker confirmed; `swept`: by the sweeper, after nobody published them."""
        ...
