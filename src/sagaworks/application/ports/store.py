"""The saga store: one transaction per batch of inputs, and the records it reads and writes.

Implemented by the PostgreSQL store and the in-memory one, under one
contract suite (`tests/contract`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from sagaworks.application.ports.messages import (
    BodyDigest,
    InboundMessage,
    OutboxRow,
    PendingMessage,
)
from sagaworks.domain.decide import Decision, HistoryEntry
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = [
    "DeadLetter",
    "DueTimer",
    "LockedSaga",
    "ParkedMessage",
    "SagaChange",
    "SagaClaim",
    "SagaTransaction",
    "Store",
    "TimerFailure",
]


@dataclass(frozen=True, slots=True)
class ParkedMessage:
    id: int
    saga_type: str
    inbound: InboundMessage
    reason: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class LockedSaga:
    instance: SagaInstance | None
    duplicate: bool = False
    has_parked: bool = False
    first_body_hash: bytes | None = None
    """For a duplicate: the body hash recorded with the message id first (None: not known)."""
    first_body: bytes | None = None
    """For a duplicate whose recorded hash differs from the claim's: the body recorded first.

    Only a conflict carries it, so a plain duplicate reads no body; None when not recorded.
    """
    trace_context: str | None = field(default=None, compare=False)
    """The W3C `traceparent` the saga was started in: its one trace (None: not traced)."""
    started_at: datetime | None = field(default=None, compare=False)
    """When the saga was created (None: not created yet); what it reports, not what it is."""


@dataclass(frozen=True, slots=True)
class SagaClaim:
    """One saga a batch locks, and the message (if any) to record in that saga"s inbox."""

    definition: SagaDefinition[Any]
    saga_id: UUID
    message_id: str | None = None
    known: SagaInstance | None = None
    """The saga as read before (without its lock): returned as is while still at its version."""
    body_hash: bytes | None = None
    """Recorded with `message_id`, so the same id with another body can be told apart."""
    body: bytes | None = None
    """Recorded with `body_hash`, so the letter of a later conflict keeps both bodies."""


@dataclass(frozen=True, slots=True)
class SagaChange:
    """An applied decision, ready to persist: with the outbox rows it sends, already encoded."""

    definition: SagaDefinition[Any]
    decision: Decision
    outbox: tuple[PendingMessage, ...]
    trace_context: str | None = None
    """The trace the change continues: its timers carry it, and a new saga keeps it."""


@dataclass(frozen=True, slots=True)
class DueTimer:
    id: int
    saga_type: str
    saga_id: UUID
    name: str
    attempts: int = 0
    """Failed applications so far (each rolled back); 0 for a timer that never failed."""
    fire_at: datetime | None = None
    """When it was due (None: not known), for the timer lag."""
    trace_context: str | None = None
    """The W3C `traceparent` of the saga's trace, which the timer continues when it fires."""


@dataclass(frozen=True, slots=True)
class TimerFailure:
    """A timer whose application failed and rolled back: try again at `retry_at`, or park it."""

    timer: DueTimer
    attempts: int
    """Failed applications, this one included."""
    error: str
    at: datetime
    retry_at: datetime | None
    """None: the bound is reached, the timer is parked with its error for an operator."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message sagaworks gave up on, with why; goes to the dead-letter store as it is.

    Built by `stored.dead_letter`, which groups it (`fingerprint`) by one rule for every store.
    """

    inbound: InboundMessage
    reason: str
    exception_type: str | None
    exception_message: str | None
    handler: str | None
    saga_type: str | None
    fingerprint: str
    whole_body: BodyDigest | None = None
    """Set when `inbound.body` is only the start of a body too large to keep whole."""
    first_body: bytes | None = None
    """For an `id_conflict`: the body processed first under the id (`inbound.body` is the new)."""


class SagaTransaction(Protocol):
    """One database transaction; every method runs inside it."""

    async def lock_saga(
        self,
        definition: SagaDefinition[Any],
        saga_id: UUID,
        *,
        message_id: str | None = None,
        body_hash: bytes | None = None,
        body: bytes | None = None,
    ) -> LockedSaga:
        """Serialise all work on one saga (even one not created yet), then load it.

        With `message_id`, also record the message (and `body_hash`, `body`) in the
        saga"s inbox; `LockedSaga.duplicate` says it had been processed before,
        `first_body_hash` what hash it was recorded with then, and `first_body` (only
        when that hash differs from `body_hash`) the body recorded then.
        """
        ...

    async def lock_sagas(self, claims: Sequence[SagaClaim]) -> list[LockedSaga]:
        """`lock_saga` for several sagas at once, each at most once; results in `claims` order.

        Locks are taken in one global order, so two batches sharing sagas cannot deadlock.
        """
        ...

    async def save(self, change: SagaChange) -> None:
        """Persist an applied decision: instance, history, outbox, timers."""
        ...

    async def save_all(self, changes: Sequence[SagaChange]) -> None:
        """`save` for the applied decisions of several sagas, each at most once."""
        ...

    async def park(
        self,
        saga_type: str,
        saga_id: UUID,
        correlation_key: str,
        message: InboundMessage,
        reason: str,
        expires_at: datetime,
    ) -> None:
        """Keep an event its saga cannot take yet (`no_saga`, `unexpected_event`)."""
        ...

    async def parked_for(self, saga_id: UUID) -> list[ParkedMessage]:
        """Events parked for one saga, oldest first, locked for this transaction."""
        ...

    async def unpark(self, ids: Sequence[int]) -> None: ...

    async def claim_due_timer(self, now: datetime) -> DueTimer | None:
        """Claim one due, unparked timer whose saga nobody else holds (`SKIP LOCKED`); delete it."""
        ...

    async def record_timer_failure(self, failure: TimerFailure) -> None:
        """Count a failed application (after its transaction rolled back) on the timer's row.

        Keeps the error, moves `fire_at` to `retry_at`, or parks the timer when
        `retry_at` is None. A timer gone meanwhile (cancelled, fired) is left gone.
        """
        ...

    async def append_history(
        self, saga_id: UUID, at: datetime, entries: Sequence[HistoryEntry]
    ) -> None:
        """Add entries to an existing saga's history without changing the saga (ignored inputs)."""
        ...

    async def expire_parked(self, now: datetime, limit: int) -> list[ParkedMessage]:
        """Remove parked messages past their bound (`SKIP LOCKED`) and return them.

        Only those whose saga does not exist or has ended: a living saga's wait for it.
        """
        ...

    async def dead_letter(self, letter: DeadLetter, now: datetime) -> None: ...

    def written_outbox(self) -> list[OutboxRow]:
        """Outbox rows this transaction wrote, to publish right after commit."""
        ...


class Store(Protocol):
    def transaction(self) -> AbstractAsyncContextManager[SagaTransaction]: ...

    async def load_sagas(
        self, wanted: Sequence[tuple[SagaDefinition[Any], UUID]]
    ) -> list[SagaInstance | None]:
        """Read sagas without locking them (to check a command is still current), in order."""
        ...

    def claim_unpublished(
        self, limit: int, older_than_s: float
    ) -> AbstractAsyncContextManager[list[OutboxRow]]:
        """Lock unpublished outbox rows (`SKIP LOCKED`); they are marked published on exit."""
        ...

    async def mark_published(self, ids: Sequence[int]) -> None: ...
