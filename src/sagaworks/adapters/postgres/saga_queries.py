"""Operators' reads of sagas: a `SagaFilter` in SQL, a saga's whole story, the stuck view.

`saga_conditions()` is the one translation of a filter to SQL; listing,
counting and freezing a bulk plan's targets all use it, so they select the
same sagas. The indexes it relies on come with migration 0007.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any
from uuid import UUID

from sqlalchemy import ColumnElement, Select, and_, column, func, or_, select, table, true
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagaworks.adapters.postgres.tables import (
    READ_MODELS_SCHEMA,
    dead_letters,
    outbox,
    parked_messages,
    port_breakers,
    saga_history,
    saga_instances,
    timers,
)
from sagaworks.application.operations.filters import SagaFilter, SagaSort
from sagaworks.application.ports import (
    BreakerReading,
    OutboxReading,
    ParkedReading,
    SagaDetail,
    SagaLetter,
    SagaPage,
    SagaSummary,
    StuckSaga,
    TimelineEntry,
    TimerReading,
)

__all__ = [
    "PostgresSagaQueries",
    "dead_letter_sagas",
    "saga_conditions",
    "stuck_sagas",
]

stuck_sagas = table(
    "stuck_sagas",
    column("saga_id"),
    column("saga_type"),
    column("correlation_key"),
    column("status"),
    column("current_step"),
    column("reason"),
    column("detail"),
    column("since"),
    column("command"),
    schema=READ_MODELS_SCHEMA,
)
"""`sagaworks_read.stuck_sagas` (migration 0007): one row per saga needing a person."""

dead_letter_sagas = table(
    "dead_letter_sagas", column("dead_letter_id"), column("saga_id"), schema=READ_MODELS_SCHEMA
)
"""`sagaworks_read.dead_letter_sagas`: which saga each dead letter belongs to."""

_s = saga_instances.c

_SORT_COLUMNS = {
    "updated": _s.updated_at,
    "created": _s.created_at,
    "type": _s.saga_type,
    "key": _s.correlation_key,
    "status": _s.status,
    "step": _s.current_step,
}


def saga_conditions(selection: SagaFilter) -> list[ColumnElement[bool]]:
    """The WHERE clauses on `saga_instances` that select what `selection` means."""
    where: list[ColumnElement[bool]] = []
    if selection.saga_types:
        where.append(_s.saga_type.in_(selection.saga_types))
    if selection.statuses:
        where.append(_s.status.in_(selection.statuses))
    if selection.current_steps:
        where.append(_s.current_step.in_(selection.current_steps))
    if selection.correlation_key is not None:
        where.append(_s.correlation_key == selection.correlation_key)
    if selection.correlation_key_prefix:
        where.append(
            _s.correlation_key.startswith(selection.correlation_key_prefix, autoescape=True)
        )
    if selection.older_than is not None:
        where.append(_s.created_at < func.now() - selection.older_than)
    if selection.younger_than is not None:
        where.append(_s.created_at >= func.now() - selection.younger_than)
    if selection.changed_before is not None:
        where.append(_s.updated_at < selection.changed_before)
    if selection.changed_after is not None:
        where.append(_s.updated_at >= selection.changed_after)
    if selection.stuck_reasons or selection.any_stuck:
        stuck = select(stuck_sagas.c.saga_id)
        if selection.stuck_reasons:
            stuck = stuck.where(stuck_sagas.c.reason.in_(selection.stuck_reasons))
        where.append(_s.id.in_(stuck))
    if selection.failure_group is not None:
        grouped = (
            select(dead_letter_sagas.c.saga_id)
            .join(dead_letters, dead_letters.c.id == dead_letter_sagas.c.dead_letter_id)
            .where(dead_letters.c.fingerprint == selection.failure_group)
            .where(dead_letters.c.status == "active")
        )
        where.append(_s.id.in_(grouped))
    if selection.failure is not None:
        recorded = func.coalesce(_s.progress["error"].astext, _s.progress["reason"].astext)
        where.append(recorded == selection.failure)
    return where


def _summary(row: Any) -> SagaSummary:
    return SagaSummary(
        id=row.id,
        saga_type=row.saga_type,
        correlation_key=row.correlation_key,
        status=row.status,
        current_step=row.current_step,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _stuck(row: Any) -> StuckSaga:
    return StuckSaga(
        saga_id=row.saga_id,
        saga_type=row.saga_type,
        correlation_key=row.correlation_key,
        status=row.status,
        current_step=row.current_step,
        reason=row.reason,
        detail=row.detail,
        since=row.since,
        command=row.command,
    )


_SUMMARY_COLUMNS = (
    _s.id,
    _s.saga_type,
    _s.correlation_key,
    _s.status,
    _s.current_step,
    _s.version,
    _s.created_at,
    _s.updated_at,
)


class PostgresSagaQueries:
    """Implements `SagaQueries` on the saga store's tables and the `sagaworks_read` views."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def find(
        self, selection: SagaFilter, sort: SagaSort, *, limit: int, offset: int
    ) -> SagaPage:
        key = _SORT_COLUMNS[sort.key]
        order = (key.desc(), _s.id.desc()) if sort.descending else (key.asc(), _s.id.asc())
        query = (
            select(*_SUMMARY_COLUMNS)
            .where(and_(true(), *saga_conditions(selection)))
            .order_by(*order)
            .limit(limit + 1)
            .offset(offset)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return SagaPage([_summary(r) for r in rows[:limit]], more=len(rows) > limit)

    async def matching(self, ref: str, saga_type: str | None) -> Sequence[SagaSummary]:
        by_key: ColumnElement[bool] = _s.correlation_key == ref
        if saga_type is not None:
            by_key = and_(by_key, _s.saga_type == saga_type)
        named = or_(by_key, _s.id == _as_uuid(ref)) if _as_uuid(ref) else by_key
        query = select(*_SUMMARY_COLUMNS).where(named).order_by(_s.saga_type).limit(50)
        async with self._engine.connect() as conn:
            return [_summary(r) for r in (await conn.execute(query)).all()]

    async def stuck(self, selection: SagaFilter, *, limit: int) -> Sequence[StuckSaga]:
        v = stuck_sagas.c
        query = select(stuck_sagas)
        if selection.stuck_reasons:
            query = query.where(v.reason.in_(selection.stuck_reasons))
        rest = replace(selection, stuck_reasons=(), any_stuck=False)
        if not rest.is_empty():
            query = query.where(
                v.saga_id.in_(select(_s.id).where(and_(true(), *saga_conditions(rest))))
            )
        query = query.order_by(v.since.asc(), v.saga_id).limit(limit)
        async with self._engine.connect() as conn:
            return [_stuck(r) for r in (await conn.execute(query)).all()]

    async def detail(self, saga_id: UUID) -> SagaDetail | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(*_SUMMARY_COLUMNS, _s.state, _s.progress).where(_s.id == saga_id)
                )
            ).one_or_none()
            if row is None:
                return None
            timeline = await _timeline(conn, saga_id)
            port = _port_in_flight(row.progress, timeline)
            return SagaDetail(
                summary=_summary(row),
                state=row.state,
                progress=row.progress,
                waiting_on_port=port,
                breakers=await _breakers(conn, port),
                timers=await _timers(conn, saga_id),
                parked=await _parked(conn, saga_id),
                outbox=await _outbox(conn, saga_id),
                dead_letters=await _letters(conn, saga_id),
                stuck=await _stuck_row(conn, saga_id),
                timeline=timeline,
            )


def _as_uuid(ref: str) -> UUID | None:
    try:
        return UUID(ref.strip())
    except ValueError:
        return None


def _port_in_flight(progress: Any, timeline: Sequence[TimelineEntry]) -> str | None:
    flight = progress.get("in_flight") if isinstance(progress, dict) else None
    if not flight:
        return None
    for entry in reversed(timeline):
        if entry.kind == "step_started" and entry.step == flight.get("step"):
            port = entry.detail.get("port")
            return port if isinstance(port, str) else None
    return None


async def _timeline(conn: AsyncConnection, saga_id: UUID) -> list[TimelineEntry]:
    h = saga_history.c
    rows = await conn.execute(
        select(h.seq, h.at, h.kind, h.step, h.message_id, h.detail)
        .where(h.saga_id == saga_id)
        .order_by(h.seq)
    )
    return [TimelineEntry(r.seq, r.at, r.kind, r.step, r.message_id, r.detail) for r in rows]


async def _breakers(conn: AsyncConnection, port: str | None) -> list[BreakerReading]:
    if port is None:
        return []
    b = port_breakers.c
    rows = await conn.execute(
        select(b.port, b.worker, b.state, b.failures, b.changed_at)
        .where(b.port == port)
        .order_by(b.changed_at.desc())
    )
    return [BreakerReading(r.port, r.worker, r.state, r.failures, r.changed_at) for r in rows]


async def _timers(conn: AsyncConnection, saga_id: UUID) -> list[TimerReading]:
    t = timers.c
    rows = await conn.execute(
        select(t.name, t.fire_at, t.attempts, t.last_error, t.parked_at)
        .where(t.saga_id == saga_id)
        .order_by(t.fire_at)
    )
    return [TimerReading(r.name, r.fire_at, r.attempts, r.last_error, r.parked_at) for r in rows]


async def _parked(conn: AsyncConnection, saga_id: UUID) -> list[ParkedReading]:
    p = parked_messages.c
    rows = await conn.execute(
        select(p.message_id, p.message_type, p.reason, p.received_at, p.expires_at)
        .where(p.saga_id == saga_id)
        .order_by(p.received_at)
    )
    return [
        ParkedReading(r.message_id, r.message_type, r.reason, r.received_at, r.expires_at)
        for r in rows
    ]


async def _outbox(conn: AsyncConnection, saga_id: UUID) -> list[OutboxReading]:
    o = outbox.c
    rows = await conn.execute(
        select(o.message_id, o.routing_key, o.created_at, o.attempts, o.last_error)
        .where(o.saga_id == saga_id, o.published_at.is_(None))
        .order_by(o.id)
    )
    return [
        OutboxReading(r.message_id, r.routing_key, r.created_at, r.attempts, r.last_error)
        for r in rows
    ]


async def _letters(conn: AsyncConnection, saga_id: UUID) -> list[SagaLetter]:
    d = dead_letters.c
    query: Select[Any] = (
        select(
            d.id,
            d.message_id,
            d.reason,
            d.status,
            d.fingerprint,
            d.exception_type,
            d.exception_message,
            d.last_failed_at,
        )
        .join(dead_letter_sagas, dead_letter_sagas.c.dead_letter_id == d.id)
        .where(dead_letter_sagas.c.saga_id == saga_id)
        .order_by(d.last_failed_at)
    )
    letters = []
    for r in await conn.execute(query):
        error = ": ".join(x for x in (r.exception_type, r.exception_message) if x) or None
        letters.append(
            SagaLetter(
                r.id, r.message_id, r.reason, r.status, r.fingerprint, error, r.last_failed_at
            )
        )
    return letters


async def _stuck_row(conn: AsyncConnection, saga_id: UUID) -> StuckSaga | None:
    row = (
        await conn.execute(select(stuck_sagas).where(stuck_sagas.c.saga_id == saga_id))
    ).one_or_none()
    return _stuck(row) if row is not None else None
