"""The dead-letter store for operators: filtered reads, groups, replay staging, audit.

SQLAlchemy Core on the table objects of `tables.py`, bound parameters only.
Each method is one transaction, so an operator change and its audit row
commit together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, delete, func, insert, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from sagaworks.adapters.postgres.tables import dead_letter_audit, dead_letters, outbox
from sagaworks.application.ports import (
    AuditEntry,
    AuditRecord,
    BodyDigest,
    DeadLetterFilter,
    FailureGroup,
    OutboxRow,
    StoredDeadLetter,
    decode_raw_fields,
)

__all__ = ["PostgresDeadLetters"]

_d = dead_letters.c


def _conditions(selection: DeadLetterFilter) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if selection.ids:
        where.append(_d.id.in_(selection.ids))
    if selection.statuses:
        where.append(_d.status.in_(selection.statuses))
    for column, value in (
        (_d.reason, selection.reason),
        (_d.fingerprint, selection.fingerprint),
        (_d.saga_type, selection.saga_type),
        (_d.routing_key, selection.routing_key),
        (_d.queue, selection.queue),
    ):
        if value is not None:
            where.append(column == value)
    if selection.since is not None:
        where.append(_d.last_failed_at >= selection.since)
    if selection.until is not None:
        where.append(_d.last_failed_at < selection.until)
    if selection.text:
        where.append(
            or_(
                _d.exception_message.icontains(selection.text, autoescape=True),
                _d.exception_type.icontains(selection.text, autoescape=True),
            )
        )
    return where


def _filtered(query: Select[Any], selection: DeadLetterFilter) -> Select[Any]:
    conditions = _conditions(selection)
    return query.where(and_(*conditions)) if conditions else query


def _letter(row: Any) -> StoredDeadLetter:
    return StoredDeadLetter(
        id=row.id,
        message_id=row.message_id,
        queue=row.queue,
        exchange=row.exchange,
        routing_key=row.routing_key,
        message_type=row.message_type,
        saga_type=row.saga_type,
        headers=row.headers,
        body=bytes(row.body),
        original_body=None if row.original_body is None else bytes(row.original_body),
        reason=row.reason,
        exception_type=row.exception_type,
        exception_message=row.exception_message,
        handler=row.handler,
        fingerprint=row.fingerprint,
        first_failed_at=row.first_failed_at,
        last_failed_at=row.last_failed_at,
        times_failed=row.times_failed,
        times_replayed=row.times_replayed,
        status=row.status,
        raw_fields=decode_raw_fields(row.raw_fields or {}),
        whole_body=None
        if row.body_length is None
        else BodyDigest(row.body_length, row.body_sha256),
        first_body=None if row.first_body is None else bytes(row.first_body),
    )


class PostgresDeadLetters:
    """Implements `DeadLetterRepository`."""

    def __init__(self, engine: AsyncEngine, *, client_hostname: str | None = None) -> None:
        self._engine = engine
        self._client_hostname = client_hostname
        """Written on every audit row; the role and client address are stamped by a trigger."""

    async def find(
        self, selection: DeadLetterFilter, *, limit: int, offset: int = 0
    ) -> list[StoredDeadLetter]:
        query = _filtered(select(dead_letters), selection)
        query = query.order_by(_d.last_failed_at.desc(), _d.id.desc()).limit(limit).offset(offset)
        async with self._engine.connect() as conn:
            return [_letter(r) for r in await conn.execute(query)]

    async def count(self, selection: DeadLetterFilter) -> int:
        query = _filtered(select(func.count()).select_from(dead_letters), selection)
        async with self._engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def ids(self, selection: DeadLetterFilter) -> list[int]:
        query = _filtered(select(_d.id), selection).order_by(_d.id)
        async with self._engine.connect() as conn:
            return list((await conn.execute(query)).scalars())

    async def groups(self, selection: DeadLetterFilter, *, limit: int) -> list[FailureGroup]:
        summary = (
            _filtered(
                select(
                    _d.fingerprint,
                    func.count().label("count"),
                    func.min(_d.first_failed_at).label("first"),
                    func.max(_d.last_failed_at).label("last"),
                    func.max(_d.id).label("example_id"),
                ),
                selection,
            )
            .group_by(_d.fingerprint)
            .order_by(func.count().desc(), func.max(_d.last_failed_at).desc())
            .limit(limit)
        )
        async with self._engine.connect() as conn:
            rows = (await conn.execute(summary)).all()
            examples = {
                r.id: r
                for r in await conn.execute(
                    select(
                        _d.id, _d.reason, _d.handler, _d.exception_type, _d.exception_message
                    ).where(_d.id.in_([r.example_id for r in rows]))
                )
            }
        return [
            FailureGroup(
                fingerprint=row.fingerprint,
                count=row.count,
                first_failed_at=row.first,
                last_failed_at=row.last,
                reason=examples[row.example_id].reason,
                handler=examples[row.example_id].handler,
                exception_type=examples[row.example_id].exception_type,
                exception_message=examples[row.example_id].exception_message,
            )
            for row in rows
        ]

    async def get(self, letter_id: int) -> StoredDeadLetter | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(select(dead_letters).where(_d.id == letter_id))).first()
        return None if row is None else _letter(row)

    async def history(self, letter_id: int) -> list[AuditEntry]:
        a = dead_letter_audit.c
        query = select(dead_letter_audit).where(a.dead_letter_id == letter_id).order_by(a.id)
        async with self._engine.connect() as conn:
            return [
                AuditEntry(
                    id=r.id,
                    at=r.at,
                    operator=r.operator,
                    action=r.action,
                    batch_id=r.batch_id,
                    dead_letter_id=r.dead_letter_id,
                    outcome=r.outcome,
                    detail=r.detail,
                    db_role=r.db_role,
                    client_addr=None if r.client_addr is None else str(r.client_addr),
                    client_hostname=r.client_hostname,
                )
                for r in await conn.execute(query)
            ]

    async def stage_replay(
        self, letter: StoredDeadLetter, outbox_key: str, headers: Mapping[str, Any]
    ) -> OutboxRow:
        write = (
            pg_insert(outbox)
            .values(
                message_id=outbox_key,
                exchange="",
                routing_key=letter.queue,
                headers=dict(headers),
                body=letter.body,
            )
            .on_conflict_do_nothing(index_elements=[outbox.c.message_id])
        )
        read = select(
            outbox.c.id, outbox.c.exchange, outbox.c.routing_key, outbox.c.headers, outbox.c.body
        ).where(outbox.c.message_id == outbox_key)
        async with self._engine.begin() as conn:
            await conn.execute(write)
            row = (await conn.execute(read)).one()
        return OutboxRow(
            id=row.id,
            message_id=outbox_key,
            exchange=row.exchange,
            routing_key=row.routing_key,
            headers=row.headers,
            body=bytes(row.body),
        )

    async def confirm_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(outbox)
                .where(outbox.c.id == outbox_id, outbox.c.published_at.is_(None))
                .values(published_at=func.now())
            )
            await conn.execute(
                update(dead_letters)
                .where(_d.id == letter_id)
                .values(status="replayed", times_replayed=_d.times_replayed + 1)
            )
            await _audit(conn, [letter_id], audit, self._client_hostname)

    async def abandon_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                delete(outbox).where(outbox.c.id == outbox_id, outbox.c.published_at.is_(None))
            )
            await _audit(conn, [letter_id], audit, self._client_hostname)

    async def save_body(self, letter_id: int, body: bytes, audit: AuditRecord) -> None:
        async with self._engine.begin() as conn:
            await conn.execute(
                update(dead_letters)
                .where(_d.id == letter_id)
                .values(original_body=func.coalesce(_d.original_body, _d.body), body=body)
            )
            await _audit(conn, [letter_id], audit, self._client_hostname)

    async def audit(self, letter_ids: Sequence[int | None], audit: AuditRecord) -> None:
        async with self._engine.begin() as conn:
            await _audit(conn, letter_ids, audit, self._client_hostname)

    async def archive(self, letter_ids: Sequence[int], audit: AuditRecord) -> int:
        async with self._engine.begin() as conn:
            archived = list(
                (
                    await conn.execute(
                        update(dead_letters)
                        .where(_d.id.in_(letter_ids), _d.status != "archived")
                        .values(status="archived")
                        .returning(_d.id)
                    )
                ).scalars()
            )
            await _audit(conn, archived, audit, self._client_hostname)
        return len(archived)

    async def purge(self, letter_ids: Sequence[int], audit: AuditRecord) -> int:
        async with self._engine.begin() as conn:
            gone = (
                await conn.execute(
                    delete(dead_letters)
                    .where(_d.id.in_(letter_ids))
                    .returning(_d.id, _d.message_id, _d.queue)
                )
            ).all()
            if gone:
                # The letters are gone: the audit rows name them in `detail` instead.
                await conn.execute(
                    insert(dead_letter_audit),
                    [
                        _audit_values(
                            None,
                            audit,
                            self._client_hostname,
                            {"id": r.id, "message_id": r.message_id, "queue": r.queue},
                        )
                        for r in gone
                    ],
                )
        return len(gone)


def _audit_values(
    letter_id: int | None,
    audit: AuditRecord,
    client_hostname: str | None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "client_hostname": client_hostname,
        "operator": audit.operator,
        "action": audit.action,
        "batch_id": audit.batch_id,
        "dead_letter_id": letter_id,
        "outcome": audit.outcome,
        "detail": json.loads(json.dumps({**audit.detail, **(extra or {})}, default=str)),
    }


async def _audit(
    conn: AsyncConnection,
    letter_ids: Sequence[int | None],
    audit: AuditRecord,
    client_hostname: str | None,
) -> None:
    if letter_ids:
        await conn.execute(
            insert(dead_letter_audit),
            [_audit_values(i, audit, client_hostname) for i in letter_ids],
        )
