"""The in-memory store's rows, one frozen record per table row, and how values are stored.

Values take the same trips as in PostgreSQL (`jsonb`, `timestamptz`), so a
model that does not survive storage fails in memory too.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import count
from typing import Any, TypeVar
from uuid import UUID

from sagaworks.application.ports import (
    AuditEntry,
    InboundMessage,
    OutboxRow,
    ParkedMessage,
    StoredDeadLetter,
)
from sagaworks.application.stored import saga_from_row
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = [
    "BreakerRecord",
    "HistoryRecord",
    "InboxRecord",
    "OutboxRecord",
    "ParkedRecord",
    "SagaRecord",
    "Tables",
    "TimerRecord",
    "apply_changes",
    "as_json",
    "instance_of",
    "overlay",
    "utc",
]


_K = TypeVar("_K")
_V = TypeVar("_V")


def instance_of(definition: SagaDefinition[Any], record: SagaRecord) -> SagaInstance:
    return saga_from_row(
        definition,
        record.id,
        correlation_key=record.correlation_key,
        status=record.status,
        state=record.state,
        version=record.version,
        progress=record.progress,
    )


def apply_changes(table: dict[_K, _V], changes: Iterable[tuple[_K, _V | None]]) -> None:
    """Write `changes` into `table`; `None` deletes the row."""
    for key, value in changes:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def overlay(table: Mapping[_K, _V], changes: Mapping[_K, _V | None]) -> dict[_K, _V]:
    """`table` as a transaction that made `changes` sees it."""
    view = dict(table)
    apply_changes(view, changes.items())
    return view


def utc(moment: datetime) -> datetime:
    """`timestamptz` semantics: stored as an instant, read back in UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def as_json(value: Any, *, lenient: bool = False) -> Any:
    """What a value looks like after a trip through a `jsonb` column."""
    return json.loads(json.dumps(value, default=str if lenient else None))


@dataclass(frozen=True, slots=True)
class SagaRecord:
    """One row of `saga_instances`; `state` is the JSON the state model was dumped to."""

    id: UUID
    saga_type: str
    correlation_key: str
    status: str
    current_step: str | None
    state: str
    state_schema_version: int
    version: int
    progress: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One row of `saga_history`: `seq` runs 1, 2, 3... per saga without gaps."""

    id: int
    saga_id: UUID
    seq: int
    at: datetime
    kind: str
    step: str | None
    message_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    """One row of `outbox`; `published_at` is None until the relay published it."""

    id: int
    message_id: str
    saga_id: UUID | None
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes
    created_at: datetime
    published_at: datetime | None = None
    trace_context: str | None = None
    lease_until: datetime | None = None
    """An eager step's lease: the sweeper leaves the row alone until then."""

    def row(self) -> OutboxRow:
        return OutboxRow(
            self.id,
            self.message_id,
            self.exchange,
            self.routing_key,
            self.headers,
            self.body,
            self.trace_context,
            self.created_at,
        )


@dataclass(frozen=True, slots=True)
class TimerRecord:
    """One row of `timers`; `parked_at` is set once it failed to apply too often."""

    id: int
    saga_id: UUID
    name: str
    fire_at: datetime
    created_at: datetime
    attempts: int = 0
    last_error: str | None = None
    parked_at: datetime | None = None
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class ParkedRecord:
    """One row of `parked_messages`; `meta` holds the delivery's attributes as stored JSON."""

    id: int
    consumer: str
    saga_type: str
    saga_id: UUID
    correlation_key: str
    message_id: str
    message_type: str
    meta: dict[str, Any]
    body: bytes
    reason: str
    received_at: datetime
    expires_at: datetime

    def message(self) -> ParkedMessage:
        inbound = InboundMessage.from_meta(self.message_id, self.message_type, self.body, self.meta)
        return ParkedMessage(self.id, self.saga_type, inbound, self.reason, self.expires_at)


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """One row of `port_breakers`: a port's breaker in one worker, for dashboards."""

    port: str
    worker: str
    state: str
    failures: int
    times_opened: int
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class InboxRecord:
    """A processed message: the saga it was for, its body hash and body (None: not recorded)."""

    saga_id: UUID | None
    body_hash: bytes | None = None
    body: bytes | None = None


@dataclass
class Tables:
    """Committed rows. Dead letters are unique per (queue, message_id), as in PostgreSQL."""

    sagas: dict[UUID, SagaRecord] = field(default_factory=dict)
    history: dict[UUID, list[HistoryRecord]] = field(default_factory=dict)
    inbox: dict[tuple[str, str], InboxRecord] = field(default_factory=dict)
    outbox: dict[int, OutboxRecord] = field(default_factory=dict)
    outbox_ids: dict[str, int] = field(default_factory=dict)
    timers: dict[tuple[UUID, str], TimerRecord] = field(default_factory=dict)
    parked: dict[int, ParkedRecord] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str], StoredDeadLetter] = field(default_factory=dict)
    audit: list[AuditEntry] = field(default_factory=list)
    breakers: dict[tuple[str, str], BreakerRecord] = field(default_factory=dict)
    _sequences: dict[str, Iterator[int]] = field(default_factory=dict)

    def next_id(self, table: str) -> int:
        """The table's next id from its own sequence, which, as PostgreSQL's, is not rolled back."""
        return next(self._sequences.setdefault(table, count(1)))

    def add_outbox(self, record: OutboxRecord) -> None:
        self.outbox[record.id] = record
        self.outbox_ids[record.message_id] = record.id
