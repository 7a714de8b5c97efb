"""What operators read about sagas, as a Protocol and plain records.

Only the operator commands read through this port; the engine's hot path
never does. Everything here is a snapshot: by the time it is printed, a
worker may have moved the saga on (the version says which snapshot it is).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

if TYPE_CHECKING:
    from sagaworks.application.operations.filters import SagaFilter, SagaSort

__all__ = [
    "BreakerReading",
    "OutboxReading",
    "ParkedReading",
    "SagaDetail",
    "SagaLetter",
    "SagaPage",
    "SagaQueries",
    "SagaSummary",
    "StuckSaga",
    "TimelineEntry",
    "TimerReading",
]


@dataclass(frozen=True, slots=True)
class SagaSummary:
    """One line of `saga list`."""

    id: UUID
    saga_type: str
    correlation_key: str
    status: str
    current_step: str | None
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SagaPage:
    """One page of a listing; `more` says whether another page follows."""

    items: Sequence[SagaSummary]
    more: bool


@dataclass(frozen=True, slots=True)
class StuckSaga:
    """One row of the stuck view: a saga, the first reason that applies, and what to run."""

    saga_id: UUID
    saga_type: str
    correlation_key: str
    status: str | None
    """None for events parked for a saga that has not started."""
    current_step: str | None
    reason: str
    detail: str
    since: datetime
    command: str


@dataclass(frozen=True, slots=True)
class TimelineEntry:
    """One history row; any kind, operators' included."""

    seq: int
    at: datetime
    kind: str
    step: str | None
    message_id: str | None
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class TimerReading:
    name: str
    fire_at: datetime
    attempts: int
    last_error: str | None
    parked_at: datetime | None


@dataclass(frozen=True, slots=True)
class ParkedReading:
    message_id: str
    message_type: str
    reason: str
    received_at: datetime
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class OutboxReading:
    message_id: str
    routing_key: str
    created_at: datetime
    attempts: int
    last_error: str | None


@dataclass(frozen=True, slots=True)
class SagaLetter:
    """A dead letter that belongs to the saga."""

    id: int
    message_id: str
    reason: str
    status: str
    fingerprint: str
    error: str | None
    last_failed_at: datetime


@dataclass(frozen=True, slots=True)
class BreakerReading:
    """A port's breaker as one worker process last recorded it."""

    port: str
    worker: str
    state: str
    failures: int
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class SagaDetail:
    """Everything `saga show` prints about one saga."""

    summary: SagaSummary
    state: Mapping[str, Any]
    progress: Mapping[str, Any]
    waiting_on_port: str | None
    """The port of the call in flight, from the step's last start in the timeline."""
    breakers: Sequence[BreakerReading]
    timers: Sequence[TimerReading]
    parked: Sequence[ParkedReading]
    outbox: Sequence[OutboxReading]
    """Rows not yet published."""
    dead_letters: Sequence[SagaLetter]
    stuck: StuckSaga | None
    timeline: Sequence[TimelineEntry]


class SagaQueries(Protocol):
    """Read-only questions operators ask about sagas."""

    async def find(
        self, selection: SagaFilter, sort: SagaSort, *, limit: int, offset: int
    ) -> SagaPage: ...

    async def matching(self, ref: str, saga_type: str | None) -> Sequence[SagaSummary]:
        """Sagas whose id is `ref`, or whose business key is (of `saga_type` when given)."""
        ...

    async def detail(self, saga_id: UUID) -> SagaDetail | None: ...

    async def stuck(self, selection: SagaFilter, *, limit: int) -> Sequence[StuckSaga]:
        """Rows of the stuck view for the sagas `selection` picks, longest stuck first."""
        ...
