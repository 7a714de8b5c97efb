"""What the use cases need from the outside world, as Protocols.

The Postgres and in-memory adapters implement `Store`; the RabbitMQ adapter
and an in-memory one implement `Publisher`; PostgreSQL's LISTEN/NOTIFY and an
in-memory timer implement `OutboxWakeUps`. Use cases never see a driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar
from uuid import UUID

from sagaworks.domain.decide import Decision
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = [
    "Clock",
    "DeadLetter",
    "DueTimer",
    "InboundMessage",
    "LockedSaga",
    "OutboxRow",
    "OutboxWakeUp",
    "OutboxWakeUps",
    "ParkedMessage",
    "PendingMessage",
    "PortCaller",
    "PriorFailure",
    "Publisher",
    "SagaChange",
    "SagaClaim",
    "SagaTransaction",
    "Store",
]

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> datetime: ...


@dataclass(frozen=True, slots=True)
class PriorFailure:
    """One earlier failure of a delivery, as the transport recorded it; "" when it did not say."""

    reason: str
    """Why it left the queue: `rejected`, `expired`, `maxlen`, `delivery_limit`, …"""
    queue: str
    exchange: str
    routing_keys: tuple[str, ...]
    count: int
    """How often it failed this way in this queue (0: not recorded)."""
    time: datetime | None


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One delivery, transport-neutral: what a use case needs to know about it.

    `headers` are carried, not read: they hold the message as the transport
    delivered it (envelope attributes included), so a stored delivery can be
    sent again as it came. Everything a use case reads has a field of its own.
    """

    message_id: str
    message_type: str
    body: bytes
    headers: Mapping[str, Any]
    queue: str
    exchange: str
    routing_key: str
    source: str = ""
    time: datetime | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None
    delivery_count: int = 0
    failures: tuple[PriorFailure, ...] = ()
    """Where and why it failed before it came here, newest first (dead letters have some)."""

    def meta(self) -> dict[str, Any]:
        """How every store keeps a delivery (a parked event) besides id, type and body: JSON."""
        return {
            "headers": dict(self.headers),
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "source": self.source,
            "time": self.time.isoformat() if self.time else None,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "user_id": self.user_id,
        }

    @classmethod
    def from_meta(
        cls, message_id: str, message_type: str, body: bytes, meta: Mapping[str, Any]
    ) -> InboundMessage:
        """The delivery a store kept with `meta()`, exactly as it arrived."""
        time = meta.get("time")
        return cls(
            message_id=message_id,
            message_type=message_type,
            body=body,
            headers=meta.get("headers", {}),
            queue=meta.get("queue", ""),
            exchange=meta.get("exchange", ""),
            routing_key=meta.get("routing_key", ""),
            source=meta.get("source", ""),
            time=datetime.fromisoformat(time) if time else None,
            correlation_id=meta.get("correlation_id"),
            causation_id=meta.get("causation_id"),
            user_id=meta.get("user_id"),
        )


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A committed message waiting to be published (`id` is the outbox row id).

    `headers` is the envelope in neutral form (see `wire.py`), which the
    publisher maps onto its transport.
    """

    id: int
    message_id: str
    exchange: str
    routing_key: str
    headers: Mapping[str, Any]
    body: bytes


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """An outbox row before it has an id, encoded by `wire.Wire`: what a store writes."""

    message_id: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes


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


@dataclass(frozen=True, slots=True)
class SagaClaim:
    """One saga a batch locks, and the message (if any) to record in that saga's inbox."""

    definition: SagaDefinition[Any]
    saga_id: UUID
    message_id: str | None = None
    known: SagaInstance | None = None
    """The saga as read before (without its lock): returned as is while still at its version."""


@dataclass(frozen=True, slots=True)
class SagaChange:
    """An applied decision, ready to persist: with the outbox rows it sends, already encoded."""

    definition: SagaDefinition[Any]
    decision: Decision
    outbox: tuple[PendingMessage, ...]


@dataclass(frozen=True, slots=True)
class DueTimer:
    id: int
    saga_type: str
    saga_id: UUID
    name: str


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


class SagaTransaction(Protocol):
    """One database transaction; every method runs inside it."""

    async def lock_saga(
        self, definition: SagaDefinition[Any], saga_id: UUID, *, message_id: str | None = None
    ) -> LockedSaga:
        """Serialise all work on one saga (even one not created yet), then load it.

        With `message_id`, also record the message in the saga's inbox;
        `LockedSaga.duplicate` says it had been processed before.
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
        """Claim one due timer whose saga nobody else holds (`SKIP LOCKED`), and delete it."""
        ...

    async def expire_parked(self, now: datetime, limit: int) -> list[ParkedMessage]:
        """Remove parked messages past their bound (`SKIP LOCKED`) and return them."""
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


class Publisher(Protocol):
    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish persistently and wait for every confirm; raise if any is not confirmed."""
        ...


class PortCaller(Protocol):
    """Calls a port through its resilience policy (timeout, retries, breaker)."""

    async def call(self, port: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Raises `circuit.CircuitOpen` when the port's breaker refused: not a step failure."""
        ...

    def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
        """When a delayed retry of a failed attempt may run; None when the budget is spent."""
        ...


class OutboxWakeUp(Protocol):
    async def wait(self, timeout_s: float) -> None:
        """Return once rows were committed since the last call, or after `timeout_s`."""
        ...


class OutboxWakeUps(Protocol):
    """Wakes the outbox sweeper when rows are committed, so it need not wait a whole interval."""

    def listen(self) -> AbstractAsyncContextManager[OutboxWakeUp]:
        """Listen for commits while the context is open."""
        ...
