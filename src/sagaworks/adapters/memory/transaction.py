"""One in-memory transaction: it sees its own writes, nobody else does until it commits.

It locks what PostgreSQL would lock (the saga's advisory lock, the rows it
touches, the unique keys it inserts) until it ends; `claim_due_timer` and
`expire_parked` skip what another transaction holds, as `SKIP LOCKED` does.
An error discards everything it wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from sagaworks.adapters.memory.locks import Locks, Owner, round_trip
from sagaworks.adapters.memory.records import (
    HistoryRecord,
    InboxRecord,
    OutboxRecord,
    ParkedRecord,
    SagaRecord,
    Tables,
    TimerRecord,
    apply_changes,
    as_json,
    instance_of,
    overlay,
    utc,
)
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
    StoredDeadLetter,
    TimerFailure,
)
from sagaworks.application.stored import lock_key, refuse_repeats
from sagaworks.domain.decide import Decision, HistoryEntry
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import Status

__all__ = ["MemoryTransaction"]

_DUE_TIMER_BATCH = 20
"""How many due timers `claim_due_timer` looks at, as the PostgreSQL query's `LIMIT 20`."""


@dataclass
class _Changes:
    """What one transaction wrote; `None` marks a deleted row."""

    sagas: dict[UUID, SagaRecord] = field(default_factory=dict)
    history: dict[UUID, list[HistoryRecord]] = field(default_factory=dict)
    inbox: dict[tuple[str, str], InboxRecord] = field(default_factory=dict)
    forgotten: set[tuple[str, str]] = field(default_factory=set)
    """Inbox rows deleted: a parked message that expired was never applied."""
    outbox: dict[int, OutboxRecord] = field(default_factory=dict)
    timers: dict[tuple[UUID, str], TimerRecord | None] = field(default_factory=dict)
    parked: dict[int, ParkedRecord | None] = field(default_factory=dict)
    dead_letters: dict[tuple[str, str], StoredDeadLetter] = field(default_factory=dict)


class MemoryTransaction(Owner):
    """Implements `SagaTransaction`: reads see committed data plus this transaction's writes."""

    def __init__(self, tables: Tables, locks: Locks, clock: Clock) -> None:
        super().__init__()
        self._tables = tables
        self._locks = locks
        self._clock = clock
        self._changes = _Changes()
        self._written: list[OutboxRow] = []
        self._open = True
        self._busy = False

    # -- reading through this transaction ------------------------------------------------------

    def _saga(self, saga_id: UUID) -> SagaRecord | None:
        return self._changes.sagas.get(saga_id) or self._tables.sagas.get(saga_id)

    def _paused(self, saga_id: UUID) -> bool:
        saga = self._saga(saga_id)
        return saga is not None and bool(saga.progress.get("paused", False))

    def _inbox(self, key: tuple[str, str]) -> InboxRecord | None:
        if key in self._changes.forgotten:
            return None
        return self._changes.inbox.get(key) or self._tables.inbox.get(key)

    def _timers(self) -> dict[tuple[UUID, str], TimerRecord]:
        return overlay(self._tables.timers, self._changes.timers)

    def _lives(self, saga_id: UUID) -> bool:
        """The saga exists and has not ended: events kept for it wait for it."""
        saga = self._saga(saga_id)
        return saga is not None and not Status(saga.status).ended

    def _parked(self) -> dict[int, ParkedRecord]:
        return overlay(self._tables.parked, self._changes.parked)

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
            await round_trip()
        except BaseException:
            self._busy = False
            raise

    def _leave(self) -> None:
        self._busy = False

    # -- SagaTransaction ------------------------------------------------------------------------

    async def lock_saga(
        self,
        definition: SagaDefinition[Any],
        saga_id: UUID,
        *,
        message_id: str | None = None,
        body_hash: bytes | None = None,
        body: bytes | None = None,
    ) -> LockedSaga:
        await self._enter()
        try:
            await self._locks.acquire(("advisory", saga_id), self)
            first: InboxRecord | None = None
            if message_id is not None:
                key = (definition.name, message_id)
                await self._locks.acquire(("inbox", *key), self)
                first = self._inbox(key)
                if first is None:
                    self._changes.inbox[key] = InboxRecord(saga_id, body_hash, body)
                    self._changes.forgotten.discard(key)
            record = self._saga(saga_id)
            has_parked = any(p.saga_id == saga_id for p in self._parked().values())
            instance = None if record is None else instance_of(definition, record)
            trace = None if record is None else record.trace_context
            started = None if record is None else record.created_at
            if first is None:
                return LockedSaga(instance, False, has_parked, None, None, trace, started)
            conflict = None not in (first.body_hash, body_hash) and first.body_hash != body_hash
            first_body = first.body if conflict else None
            return LockedSaga(
                instance, True, has_parked, first.body_hash, first_body, trace, started
            )
        finally:
            self._leave()

    async def lock_sagas(self, claims: Sequence[SagaClaim]) -> list[LockedSaga]:
        refuse_repeats(c.saga_id for c in claims)
        locked: dict[UUID, LockedSaga] = {}
        for claim in sorted(claims, key=lambda c: (lock_key(c.saga_id), c.saga_id)):
            locked[claim.saga_id] = await self.lock_saga(
                claim.definition,
                claim.saga_id,
                message_id=claim.message_id,
                body_hash=claim.body_hash,
                body=claim.body,
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
        refuse_repeats(c.decision.instance.id for c in changes if c.decision.instance is not None)
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
        at = utc(decision.at)
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
        progress = as_json(instance.progress_json())
        details = [as_json(h.detail, lenient=True) for h in decision.history]
        headers = [as_json(p.headers) for p in pending]
        existing = await self._previous(definition, decision)
        created_at = at if existing is None else existing.created_at
        trace = change.trace_context if existing is None else existing.trace_context
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
            trace_context=trace,
        )
        base = self._last_seq(instance.id)
        entries = changes.history.setdefault(instance.id, [])
        for n, (entry, detail) in enumerate(zip(decision.history, details, strict=True), 1):
            entries.append(
                HistoryRecord(
                    self._tables.next_id("saga_history"),
                    instance.id,
                    base + n,
                    at,
                    entry.kind,
                    entry.step,
                    entry.message_id,
                    detail,
                )
            )
        now = utc(self._clock.now())
        for p, stored_headers in zip(pending, headers, strict=True):
            record = OutboxRecord(
                self._tables.next_id("outbox"),
                p.message_id,
                instance.id,
                p.exchange,
                p.routing_key,
                stored_headers,
                p.body,
                now,
                trace_context=p.trace_context,
                lease_until=None if p.lease_s is None else now + timedelta(seconds=p.lease_s),
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
                replace(
                    old,
                    fire_at=utc(spec.fire_at),
                    attempts=0,
                    last_error=None,
                    parked_at=None,
                    trace_context=change.trace_context,
                )
                if old is not None
                else TimerRecord(
                    self._tables.next_id("timers"),
                    instance.id,
                    spec.name,
                    utc(spec.fire_at),
                    now,
                    trace_context=change.trace_context,
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
                id=self._tables.next_id("parked_messages"),
                consumer=saga_type,
                saga_type=saga_type,
                saga_id=saga_id,
                correlation_key=correlation_key,
                message_id=message.message_id,
                message_type=message.message_type,
                meta=as_json(message.meta(), lenient=True),
                body=bytes(message.body),
                reason=reason,
                received_at=utc(self._clock.now()),
                expires_at=utc(expires_at),
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
            moment = utc(now)
            due = sorted(
                (
                    t
                    for t in self._timers().values()
                    if t.fire_at <= moment
                    and t.parked_at is None
                    and self._saga(t.saga_id) is not None
                    and not self._paused(t.saga_id)
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
                return DueTimer(
                    timer.id,
                    saga.saga_type,
                    timer.saga_id,
                    timer.name,
                    current.attempts,
                    current.fire_at,
                    current.trace_context,
                )
            return None
        finally:
            self._leave()

    async def record_timer_failure(self, failure: TimerFailure) -> None:
        await self._enter()
        try:
            timer = failure.timer
            key = (timer.saga_id, timer.name)
            await self._locks.acquire(("timers", *key), self)
            current = self._timers().get(key)
            if current is None or current.id != timer.id:
                return
            self._changes.timers[key] = replace(
                current,
                attempts=failure.attempts,
                last_error=failure.error,
                fire_at=current.fire_at if failure.retry_at is None else utc(failure.retry_at),
                parked_at=utc(failure.at) if failure.retry_at is None else None,
            )
        finally:
            self._leave()

    async def append_history(
        self, saga_id: UUID, at: datetime, entries: Sequence[HistoryEntry]
    ) -> None:
        await self._enter()
        try:
            if self._saga(saga_id) is None:
                raise RuntimeError(f"saga {saga_id} does not exist; history needs its saga")
            details = [as_json(h.detail, lenient=True) for h in entries]
            base = self._last_seq(saga_id)
            rows = self._changes.history.setdefault(saga_id, [])
            for n, (entry, detail) in enumerate(zip(entries, details, strict=True), 1):
                rows.append(
                    HistoryRecord(
                        self._tables.next_id("saga_history"),
                        saga_id,
                        base + n,
                        utc(at),
                        entry.kind,
                        entry.step,
                        entry.message_id,
                        detail,
                    )
                )
        finally:
            self._leave()

    async def expire_parked(self, now: datetime, limit: int) -> list[ParkedMessage]:
        await self._enter()
        try:
            moment = utc(now)
            candidates = sorted(
                (
                    p
                    for p in self._parked().values()
                    if p.expires_at <= moment and not self._lives(p.saga_id)
                ),
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
            moment = utc(now)
            group = letter.fingerprint
            headers = as_json(dict(inbound.headers), lenient=True)
            existing = self._changes.dead_letters.get(key) or self._tables.dead_letters.get(key)
            if existing is not None and existing.headers == headers:
                return  # the same failure delivered again (same death record): counted once
            if existing is None:
                record = StoredDeadLetter(
                    id=self._tables.next_id("dead_letters"),
                    message_id=inbound.message_id,
                    queue=inbound.queue,
                    exchange=inbound.exchange,
                    routing_key=inbound.routing_key,
                    message_type=inbound.message_type or None,
                    saga_type=letter.saga_type,
                    headers=headers,
                    body=bytes(inbound.body),
                    original_body=None,
                    reason=letter.reason,
                    exception_type=letter.exception_type,
                    exception_message=letter.exception_message,
                    handler=letter.handler,
                    fingerprint=group,
                    first_failed_at=moment,
                    last_failed_at=moment,
                    times_failed=1,
                    times_replayed=0,
                    status="active",
                    raw_fields=dict(inbound.raw_fields),
                    whole_body=letter.whole_body,
                    first_body=letter.first_body,
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

    def commit(self) -> None:
        tables, changes = self._tables, self._changes
        tables.sagas.update(changes.sagas)
        for saga_id, entries in changes.history.items():
            tables.history.setdefault(saga_id, []).extend(entries)
        for key in changes.forgotten:
            tables.inbox.pop(key, None)
        tables.inbox.update(changes.inbox)
        for record in changes.outbox.values():
            tables.add_outbox(record)
        apply_changes(tables.timers, changes.timers.items())
        apply_changes(tables.parked, changes.parked.items())
        tables.dead_letters.update(changes.dead_letters)

    def end(self) -> None:
        self._open = False
        self._locks.release_all(self)
