"""The saga store in memory, with the PostgreSQL store's semantics.

Why it is more than a few dicts: tests that run on it must not pass where the
real store would fail. So a transaction sees its own writes but nobody else
does until it exits without error (an error discards everything); every
write locks what PostgreSQL would lock, until the transaction ends: the
saga's advisory lock, the rows it touches and the unique keys it inserts.
`claim_due_timer`, `expire_parked` and `claim_unpublished` skip what another
transaction holds, as `SKIP LOCKED` does. Values take the same JSON round
trips as in PostgreSQL (state, progress, headers, details), so a state model
that does not survive storage fails here too. Ids come from per-table
sequences that, like PostgreSQL's, are not rolled back. Every statement
yields to the event loop once, as a round trip to the database does, so
concurrent deliveries interleave as they would in production; a deadlock
fails one transaction instead of hanging the test.

The readers at the end of `InMemoryStore` (`history`, `outbox`, `timers`...)
show committed rows only; tests and the harness use them to look inside.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Hashable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from itertools import count
from typing import Any, TypeVar
from uuid import UUID

from sagaworks.application.ports import (
    Clock,
    DeadLetter,
    DueTimer,
    InboundMessage,
    LockedSaga,
    OutboxRow,
    ParkedMessage,
    SagaChange,
    SagaClaim,
)
from sagaworks.domain.decide import Decision
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import InFlight, SagaInstance, Status

__all__ = [
    "DeadLetterRecord",
    "DeadlockDetected",
    "HistoryRecord",
    "InMemoryStore",
    "OutboxRecord",
    "ParkedRecord",
    "SagaRecord",
    "TimerRecord",
]

_K = TypeVar("_K")
_V = TypeVar("_V")

_DUE_TIMER_BATCH = 20
"""How many due timers `claim_due_timer` looks at, as the PostgreSQL query's `LIMIT 20`."""


class DeadlockDetected(RuntimeError):
    """Two transactions wait for each other; PostgreSQL would abort one of them too."""


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

    def row(self) -> OutboxRow:
        return OutboxRow(
            self.id, self.message_id, self.exchange, self.routing_key, self.headers, self.body
        )


@dataclass(frozen=True, slots=True)
class TimerRecord:
    id: int
    saga_id: UUID
    name: str
    fire_at: datetime
    created_at: datetime


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
class DeadLetterRecord:
    """One row of `dead_letters`, unique per (queue, message_id).

    A failure counts again only when its headers differ from the stored ones
    (a redelivered dead letter carries the same death record), as in PostgreSQL.
    """

    id: int
    message_id: str
    queue: str
    exchange: str
    routing_key: str
    message_type: str | None
    saga_type: str | None
    headers: dict[str, Any]
    body: bytes
    reason: str
    exception_type: str | None
    exception_message: str | None
    handler: str | None
    fingerprint: str
    first_failed_at: datetime
    last_failed_at: datetime
    times_failed: int = 1
    times_replayed: int = 0
    status: str = "active"


def _utc(moment: datetime) -> datetime:
    """`timestamptz` semantics: stored as an instant, read back in UTC."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def _json(value: Any, *, lenient: bool = False) -> Any:
    """What a value looks like after a trip through a `jsonb` column."""
    return json.loads(json.dumps(value, default=str if lenient else None))


def _inbound_meta(inbound: InboundMessage) -> dict[str, Any]:
    result: dict[str, Any] = _json(inbound.meta(), lenient=True)
    return result


def _instance(definition: SagaDefinition[Any], record: SagaRecord) -> SagaInstance:
    progress = record.progress
    flight = progress.get("in_flight")
    return SagaInstance(
        id=record.id,
        saga_type=definition.name,
        correlation_key=record.correlation_key,
        correlation_id=progress.get("correlation_id") or record.correlation_key,
        status=Status(record.status),
        position=int(progress["position"]),
        state=definition.state.model_validate(json.loads(record.state)),
        version=record.version,
        in_flight=InFlight.from_json(flight) if flight else None,
        done=tuple(progress.get("done", ())),
        reason=progress.get("reason"),
        error=progress.get("error"),
    )


def _lock_order(saga_id: UUID) -> int:
    """The PostgreSQL adapter's advisory lock key, so both stores lock a batch in one order."""
    return int.from_bytes(saga_id.bytes[:8], "big", signed=True)


def _once(saga_ids: Iterable[UUID]) -> None:
    """A batch names each saga once; a second entry would be a second, conflicting write."""
    seen: set[UUID] = set()
    for saga_id in saga_ids:
        if saga_id in seen:
            raise ValueError(f"saga {saga_id} appears more than once in one batch")
        seen.add(saga_id)


async def _round_trip() -> None:
    """Let other tasks run, as they do while a statement travels to PostgreSQL and back.

    Without it a whole use case could run without ever yielding, and tests of
    concurrent deliveries would never interleave the way they do in production.
    """
    await asyncio.sleep(0)


class _UtcClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


class _Owner:
    """Whoever holds locks: a transaction, or one autocommit statement."""

    def __init__(self) -> None:
        self.held: set[Hashable] = set()
        self.waiting_for: Hashable | None = None


class _Locks:
    """Exclusive, re-entrant locks on keys, released together when their owner ends.

    Waiters wait on futures of the running loop, so one store can be used from
    several event loops in turn (as pytest may do).
    """

    def __init__(self) -> None:
        self._owners: dict[Hashable, _Owner] = {}
        self._waiters: dict[Hashable, list[asyncio.Future[None]]] = {}

    def try_acquire(self, key: Hashable, owner: _Owner) -> bool:
        holder = self._owners.get(key)
        if holder is not None and holder is not owner:
            return False
        if holder is None and self._waiters.get(key):
            return False  # someone queued first (released, but not yet woken)
        self._owners[key] = owner
        owner.held.add(key)
        return True

    async def acquire(self, key: Hashable, owner: _Owner) -> None:
        while not self.try_acquire(key, owner):
            self._check_deadlock(key, owner)
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(key, []).append(waiter)
            owner.waiting_for = key
            try:
                await waiter
            except BaseException:
                self._forget(key, waiter)
                if self._owners.get(key) is None:
                    self._wake(key)  # woken but leaving: hand the lock to the next in line
                raise
            finally:
                owner.waiting_for = None
            self._forget(key, waiter)
            if self._owners.get(key) is None:
                self._owners[key] = owner
                owner.held.add(key)
                return

    def _forget(self, key: Hashable, waiter: asyncio.Future[None]) -> None:
        queue = self._waiters.get(key, [])
        if waiter in queue:
            queue.remove(waiter)
        if not queue:
            self._waiters.pop(key, None)

    def _wake(self, key: Hashable) -> None:
        for waiter in self._waiters.get(key, ()):
            if not waiter.done():
                waiter.set_result(None)
                return

    def _check_deadlock(self, key: Hashable, owner: _Owner) -> None:
        holder = self._owners.get(key)
        seen: set[int] = set()
        while holder is not None and id(holder) not in seen:
            if holder is owner:
                raise DeadlockDetected(f"deadlock detected waiting for {key!r}")
            seen.add(id(holder))
            waited = holder.waiting_for
            holder = None if waited is None else self._owners.get(waited)

    def release_all(self, owner: _Owner) -> None:
        for key in owner.held:
            if self._owners.get(key) is owner:
                del self._owners[key]
                self._wake(key)
        owner.held.clear()


@dataclass
class _Tables:
    sagas: dict[UUID, SagaRecord] = field(default_factory=dict)
    history: dict[UUID, list[HistoryRecord]] = field(default_factory=dict)
    inbox: dict[tuple[str, str], UUID | None] = field(default_factory=dict)
    outbox: dict[int, OutboxRecord] = field(default_factory=dict)
    outbox_ids: dict[str, int] = field(default_factory=dict)
    timers: dict[tuple[UUID, str], TimerRecord] = field(default_factory=dict)
    parked: dict[int, ParkedRecord] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str], DeadLetterRecord] = field(default_factory=dict)


@dataclass
class _Changes:
    """What one transaction wrote; `None` marks a deleted row."""

    sagas: dict[UUID, SagaRecord] = field(default_factory=dict)
    history: dict[UUID, list[HistoryRecord]] = field(default_factory=dict)
    inbox: dict[tuple[str, str], UUID | None] = field(default_factory=dict)
    forgotten: set[tuple[str, str]] = field(default_factory=set)
    """Inbox rows deleted: a parked message that expired was never applied."""
    outbox: dict[int, OutboxRecord] = field(default_factory=dict)
    timers: dict[tuple[UUID, str], TimerRecord | None] = field(default_factory=dict)
    parked: dict[int, ParkedRecord | None] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str], DeadLetterRecord] = field(default_factory=dict)


class _Transaction(_Owner):
    """Implements `SagaTransaction`: reads see committed data plus this transaction's writes."""

    def __init__(self, store: InMemoryStore) -> None:
        super().__init__()
        self._store = store
        self._tables = store._tables
        self._locks = store._locks
        self._changes = _Changes()
        self._written: list[OutboxRow] = []
        self._open = True
        self._busy = False

    # -- reading through this transaction ------------------------------------------------------

    def _saga(self, saga_id: UUID) -> SagaRecord | None:
        return self._changes.sagas.get(saga_id) or self._tables.sagas.get(saga_id)

    def _inbox_has(self, key: tuple[str, str]) -> bool:
        if key in self._changes.forgotten:
            return False
        return key in self._changes.inbox or key in self._tables.inbox

    def _timers(self) -> dict[tuple[UUID, str], TimerRecord]:
        view = dict(self._tables.timers)
        for key, timer in self._changes.timers.items():
            if timer is None:
                view.pop(key, None)
            else:
                view[key] = timer
        return view

    def _parked(self) -> dict[int, ParkedRecord]:
        view = dict(self._tables.parked)
        for key, parked in self._changes.parked.items():
            if parked is None:
                view.pop(key, None)
            else:
                view[key] = parked
        return view

    def _outbox_has(self, message_id: str) -> bool:
        return message_id in self._tables.outbox_ids or any(
            r.message_id == message_id for r in self._changes.outbox.values()
        )

    def _last_seq(self, saga_id: UUID) -> int:
        rows = [*self._tables.history.get(saga_id, ()), *self._changes.history.get(saga_id, ())]
        return max((r.seq for r in rows), default=0)

    # -- one statement at a time, like one connection -------------------------------------------

    async def _enter(self) -> None:
        if not self._open:
            raise RuntimeError("this transaction has ended; open a new one")
        if self._busy:
            raise RuntimeError(
                "another operation is in progress in this transaction; await it first"
            )
        self._busy = True
        try:
            await _round_trip()
        except BaseException:
            self._busy = False
            raise

    def _leave(self) -> None:
        self._busy = False

    # -- SagaTransaction ------------------------------------------------------------------------

    async def lock_saga(
        self, definition: SagaDefinition[Any], saga_id: UUID, *, message_id: str | None = None
    ) -> LockedSaga:
        await self._enter()
        try:
            await self._locks.acquire(("advisory", saga_id), self)
            duplicate = False
            if message_id is not None:
                key = (definition.name, message_id)
                await self._locks.acquire(("inbox", *key), self)
                duplicate = self._inbox_has(key)
                if not duplicate:
                    self._changes.inbox[key] = saga_id
                    self._changes.forgotten.discard(key)
            record = self._saga(saga_id)
            has_parked = any(p.saga_id == saga_id for p in self._parked().values())
            instance = None if record is None else _instance(definition, record)
            return LockedSaga(instance, duplicate, has_parked)
        finally:
            self._leave()

    async def lock_sagas(self, claims: Sequence[SagaClaim]) -> list[LockedSaga]:
        _once(c.saga_id for c in claims)
        locked: dict[UUID, LockedSaga] = {}
        for claim in sorted(claims, key=lambda c: (_lock_order(c.saga_id), c.saga_id)):
            locked[claim.saga_id] = await self.lock_saga(
                claim.definition, claim.saga_id, message_id=claim.message_id
            )
        return [locked[c.saga_id] for c in claims]

    async def save(self, change: SagaChange) -> None:
        await self._enter()
        try:
            await self._save(change)
        finally:
            self._leave()

    async def save_all(self, changes: Sequence[SagaChange]) -> None:
        """Every version is checked before anything is written: a stale one leaves no trace."""
        _once(c.decision.instance.id for c in changes if c.decision.instance is not None)
        await self._enter()
        try:
            for change in changes:
                await self._previous(change.definition, change.decision)
            for change in changes:
                await self._save(change)
        finally:
            self._leave()

    async def _previous(
        self, definition: SagaDefinition[Any], decision: Decision
    ) -> SagaRecord | None:
        """Lock the saga's row and check it is the version `decision` was made on; return it."""
        instance = decision.instance
        assert instance is not None
        await self._locks.acquire(("saga_instances", instance.id), self)
        existing = self._saga(instance.id)
        if instance.version == 1:
            if existing is not None:
                raise RuntimeError(
                    f"saga {instance.id} already exists (version {existing.version}); "
                    "a new saga is saved at version 1 only once"
                )
        elif (
            existing is None
            or existing.saga_type != definition.name
            or existing.correlation_key != instance.correlation_key
            or existing.version != instance.version - 1
        ):
            raise RuntimeError(
                f"saga {instance.id} changed under its lock (expected version "
                f"{instance.version - 1}); another writer bypassed the advisory lock"
            )
        return existing

    async def _save(self, change: SagaChange) -> None:
        definition, decision = change.definition, change.decision
        instance = decision.instance
        assert instance is not None
        assert decision.outcome == "applied"
        at = _utc(decision.at)
        cancelled = set(decision.cancel_timers) - {t.name for t in decision.set_timers}
        pending = sorted(change.outbox, key=lambda p: p.message_id)
        current = (
            definition.steps[instance.position].name
            if instance.position < len(definition.steps)
            else None
        )
        # Everything is computed and checked before anything is written: one statement in
        # PostgreSQL, so it either writes all of instance, history, outbox and timers, or none.
        state = instance.state.model_dump_json()
        progress = _json(instance.progress_json())
        details = [_json(h.detail, lenient=True) for h in decision.history]
        headers = [_json(p.headers) for p in pending]
        existing = await self._previous(definition, decision)
        created_at = at if existing is None else existing.created_at
        for p in pending:
            await self._locks.acquire(("outbox.message_id", p.message_id), self)
        ids = [p.message_id for p in pending]
        clash = sorted({m for m in ids if ids.count(m) > 1 or self._outbox_has(m)})
        if clash:
            raise RuntimeError(f"outbox already holds message id(s) {', '.join(clash)}")
        timer_names = sorted(cancelled | {t.name for t in decision.set_timers})
        for name in timer_names:
            await self._locks.acquire(("timers", instance.id, name), self)

        changes = self._changes
        store = self._store
        changes.sagas[instance.id] = SagaRecord(
            id=instance.id,
            saga_type=definition.name,
            correlation_key=instance.correlation_key,
            status=instance.status.value,
            current_step=current,
            state=state,
            state_schema_version=definition.state_version,
            version=instance.version,
            progress=progress,
            created_at=created_at,
            updated_at=at,
        )
        base = self._last_seq(instance.id)
        entries = changes.history.setdefault(instance.id, [])
        for n, (entry, detail) in enumerate(zip(decision.history, details, strict=True), 1):
            entries.append(
                HistoryRecord(
                    next(store._history_ids),
                    instance.id,
                    base + n,
                    at,
                    entry.kind,
                    entry.step,
                    entry.message_id,
                    detail,
                )
            )
        now = _utc(store._clock.now())
        for p, stored_headers in zip(pending, headers, strict=True):
            record = OutboxRecord(
                next(store._outbox_ids),
                p.message_id,
                instance.id,
                p.exchange,
                p.routing_key,
                stored_headers,
                p.body,
                now,
            )
            changes.outbox[record.id] = record
            self._written.append(record.row())
        timers = self._timers()
        for name in sorted(cancelled):
            if (instance.id, name) in timers:
                changes.timers[(instance.id, name)] = None
        for spec in decision.set_timers:
            key = (instance.id, spec.name)
            old = timers.get(key)
            changes.timers[key] = (
                replace(old, fire_at=_utc(spec.fire_at))
                if old is not None
                else TimerRecord(
                    next(store._timer_ids), instance.id, spec.name, _utc(spec.fire_at), now
                )
            )

    async def park(
        self,
        saga_type: str,
        saga_id: UUID,
        correlation_key: str,
        message: InboundMessage,
        reason: str,
        expires_at: datetime,
    ) -> None:
        await self._enter()
        try:
            key = (saga_type, message.message_id)
            await self._locks.acquire(("parked.key", *key), self)
            if any((p.consumer, p.message_id) == key for p in self._parked().values()):
                return
            record = ParkedRecord(
                id=next(self._store._parked_ids),
                consumer=saga_type,
                saga_type=saga_type,
                saga_id=saga_id,
                correlation_key=correlation_key,
                message_id=message.message_id,
                message_type=message.message_type,
                meta=_inbound_meta(message),
                body=bytes(message.body),
                reason=reason,
                received_at=_utc(self._store._clock.now()),
                expires_at=_utc(expires_at),
            )
            self._changes.parked[record.id] = record
        finally:
            self._leave()

    async def parked_for(self, saga_id: UUID) -> list[ParkedMessage]:
        await self._enter()
        try:
            wanted = sorted(p.id for p in self._parked().values() if p.saga_id == saga_id)
            for parked_id in wanted:
                await self._locks.acquire(("parked", parked_id), self)
            # Rows another transaction deleted while this one waited are gone, as after FOR UPDATE.
            view = self._parked()
            return [view[i].message() for i in wanted if i in view]
        finally:
            self._leave()

    async def unpark(self, ids: Sequence[int]) -> None:
        await self._enter()
        try:
            for parked_id in sorted(set(ids)):
                await self._locks.acquire(("parked", parked_id), self)
                if parked_id in self._parked():
                    self._changes.parked[parked_id] = None
        finally:
            self._leave()

    async def claim_due_timer(self, now: datetime) -> DueTimer | None:
        await self._enter()
        try:
            moment = _utc(now)
            due = sorted(
                (
                    t
                    for t in self._timers().values()
                    if t.fire_at <= moment and self._saga(t.saga_id) is not None
                ),
                key=lambda t: (t.fire_at, t.id),
            )[:_DUE_TIMER_BATCH]
            for timer in due:
                if not self._locks.try_acquire(("advisory", timer.saga_id), self):
                    continue
                key = (timer.saga_id, timer.name)
                await self._locks.acquire(("timers", *key), self)
                current = self._timers().get(key)
                saga = self._saga(timer.saga_id)
                if current is None or current.id != timer.id or saga is None:
                    continue
                self._changes.timers[key] = None
                return DueTimer(timer.id, saga.saga_type, timer.saga_id, timer.name)
            return None
        finally:
            self._leave()

    async def expire_parked(self, now: datetime, limit: int) -> list[ParkedMessage]:
        await self._enter()
        try:
            moment = _utc(now)
            candidates = sorted(
                (p for p in self._parked().values() if p.expires_at <= moment),
                key=lambda p: (p.expires_at, p.id),
            )
            expired: list[ParkedRecord] = []
            for parked in candidates:
                if len(expired) >= limit:
                    break
                if self._locks.try_acquire(("parked", parked.id), self):
                    expired.append(parked)
            for parked in expired:
                self._changes.parked[parked.id] = None
                self._changes.forgotten.add((parked.consumer, parked.message_id))
                self._changes.inbox.pop((parked.consumer, parked.message_id), None)
            return [p.message() for p in expired]
        finally:
            self._leave()

    async def dead_letter(self, letter: DeadLetter, now: datetime) -> None:
        await self._enter()
        try:
            inbound = letter.inbound
            key = (inbound.queue, inbound.message_id)
            await self._locks.acquire(("dead_letters", *key), self)
            moment = _utc(now)
            group = letter.fingerprint
            headers = _json(dict(inbound.headers), lenient=True)
            existing = self._changes.dead_letters.get(key) or self._tables.dead_letters.get(key)
            if existing is not None and existing.headers == headers:
                return  # the same failure delivered again (same death record): counted once
            if existing is None:
                record = DeadLetterRecord(
                    id=next(self._store._dead_letter_ids),
                    message_id=inbound.message_id,
                    queue=inbound.queue,
                    exchange=inbound.exchange,
                    routing_key=inbound.routing_key,
                    message_type=inbound.message_type or None,
                    saga_type=letter.saga_type,
                    headers=headers,
                    body=bytes(inbound.body),
                    reason=letter.reason,
                    exception_type=letter.exception_type,
                    exception_message=letter.exception_message,
                    handler=letter.handler,
                    fingerprint=group,
                    first_failed_at=moment,
                    last_failed_at=moment,
                )
            else:
                record = replace(
                    existing,
                    times_failed=existing.times_failed + 1,
                    last_failed_at=moment,
                    reason=letter.reason,
                    exception_type=letter.exception_type,
                    exception_message=letter.exception_message,
                    fingerprint=group,
                    handler=letter.handler,
                    headers=headers,
                    status="active",
                )
            self._changes.dead_letters[key] = record
        finally:
            self._leave()

    def written_outbox(self) -> list[OutboxRow]:
        return list(self._written)

    # -- ending ---------------------------------------------------------------------------------

    def _commit(self) -> None:
        tables, changes = self._tables, self._changes
        tables.sagas.update(changes.sagas)
        for saga_id, entries in changes.history.items():
            tables.history.setdefault(saga_id, []).extend(entries)
        for key in changes.forgotten:
            tables.inbox.pop(key, None)
        tables.inbox.update(changes.inbox)
        for outbox_id, record in changes.outbox.items():
            tables.outbox[outbox_id] = record
            tables.outbox_ids[record.message_id] = outbox_id
        _apply(tables.timers, changes.timers.items())
        _apply(tables.parked, changes.parked.items())
        tables.dead_letters.update(changes.dead_letters)

    def _end(self) -> None:
        self._open = False
        self._locks.release_all(self)


def _apply(table: dict[_K, _V], changes: Iterable[tuple[_K, _V | None]]) -> None:
    for key, value in changes:
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


class InMemoryStore:
    """Implements `Store` in memory; see the module docstring for what it keeps faithful."""

    def __init__(self, *, clock: Clock | None = None) -> None:
        self._clock: Clock = clock or _UtcClock()
        self._tables = _Tables()
        self._locks = _Locks()
        self._history_ids = count(1)
        self._outbox_ids = count(1)
        self._timer_ids = count(1)
        self._parked_ids = count(1)
        self._dead_letter_ids = count(1)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Transaction]:
        tx = _Transaction(self)
        try:
            await _round_trip()
            yield tx
            await _round_trip()
        except BaseException:
            tx._end()
            raise
        tx._commit()
        tx._end()

    async def load_sagas(
        self, wanted: Sequence[tuple[SagaDefinition[Any], UUID]]
    ) -> list[SagaInstance | None]:
        await _round_trip()
        return [self.saga(definition, saga_id) for definition, saga_id in wanted]

    @asynccontextmanager
    async def claim_unpublished(
        self, limit: int, older_than_s: float
    ) -> AsyncIterator[list[OutboxRow]]:
        owner = _Owner()
        try:
            await _round_trip()
            cutoff = _utc(self._clock.now()) - timedelta(seconds=older_than_s)
            claimed: list[OutboxRecord] = []
            for record in sorted(self._tables.outbox.values(), key=lambda r: r.id):
                if len(claimed) >= limit:
                    break
                if record.published_at is not None or record.created_at > cutoff:
                    continue
                if self._locks.try_acquire(("outbox", record.id), owner):
                    claimed.append(record)
            yield [r.row() for r in claimed]
            self._mark([r.id for r in claimed])
        finally:
            self._locks.release_all(owner)

    async def mark_published(self, ids: Sequence[int]) -> None:
        owner = _Owner()
        try:
            await _round_trip()
            for outbox_id in sorted(set(ids)):
                await self._locks.acquire(("outbox", outbox_id), owner)
            self._mark(ids)
        finally:
            self._locks.release_all(owner)

    def _mark(self, ids: Iterable[int]) -> None:
        now = _utc(self._clock.now())
        for outbox_id in ids:
            record = self._tables.outbox.get(outbox_id)
            if record is not None:
                self._tables.outbox[outbox_id] = replace(record, published_at=now)

    # -- committed data, for tests and the harness ---------------------------------------------

    def saga_record(self, saga_id: UUID) -> SagaRecord | None:
        return self._tables.sagas.get(saga_id)

    def saga(self, definition: SagaDefinition[Any], saga_id: UUID) -> SagaInstance | None:
        """A committed saga, read without awaiting."""
        record = self._tables.sagas.get(saga_id)
        return None if record is None else _instance(definition, record)

    def history(self, saga_id: UUID) -> list[HistoryRecord]:
        return list(self._tables.history.get(saga_id, ()))

    def outbox(self) -> list[OutboxRecord]:
        return sorted(self._tables.outbox.values(), key=lambda r: r.id)

    def timers(self, saga_id: UUID | None = None) -> list[TimerRecord]:
        chosen = (t for t in self._tables.timers.values() if saga_id in (None, t.saga_id))
        return sorted(chosen, key=lambda t: (t.fire_at, t.id))

    def parked(self, saga_id: UUID | None = None) -> list[ParkedRecord]:
        chosen = (p for p in self._tables.parked.values() if saga_id in (None, p.saga_id))
        return sorted(chosen, key=lambda p: p.id)

    def dead_letters(self) -> list[DeadLetterRecord]:
        return sorted(self._tables.dead_letters.values(), key=lambda d: d.id)

    def inbox(self) -> dict[tuple[str, str], UUID | None]:
        """Processed (consumer, message_id) pairs and the saga each was for."""
        return dict(self._tables.inbox)
