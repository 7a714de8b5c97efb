"""The dead-letter repository in memory, over the rows of an `InMemoryStore`.

The hot path writes dead letters through the store's transactions; this reads
them and applies operators' changes, each method as one statement that takes
the row locks PostgreSQL would take, with its audit rows in the same commit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

from sagaworks.adapters.memory.locks import Owner, round_trip
from sagaworks.adapters.memory.records import OutboxRecord, as_json, utc
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.application.ports import (
    AuditEntry,
    AuditRecord,
    DeadLetterFilter,
    FailureGroup,
    OutboxRow,
    StoredDeadLetter,
)

__all__ = ["InMemoryDeadLetters"]


def _matches(letter: StoredDeadLetter, selection: DeadLetterFilter) -> bool:
    text = (selection.text or "").lower()
    return (
        (not selection.ids or letter.id in selection.ids)
        and (not selection.statuses or letter.status in selection.statuses)
        and all(
            wanted is None or value == wanted
            for value, wanted in (
                (letter.reason, selection.reason),
                (letter.fingerprint, selection.fingerprint),
                (letter.saga_type, selection.saga_type),
                (letter.routing_key, selection.routing_key),
                (letter.queue, selection.queue),
            )
        )
        and (selection.since is None or letter.last_failed_at >= selection.since)
        and (selection.until is None or letter.last_failed_at < selection.until)
        and (
            not text
            or text in (letter.exception_message or "").lower()
            or text in (letter.exception_type or "").lower()
        )
    )


class InMemoryDeadLetters:
    """Implements `DeadLetterRepository` on the dead letters and outbox of `store`."""

    def __init__(self, store: InMemoryStore, *, client_hostname: str | None = None) -> None:
        self._store = store
        self._tables = store.tables
        self._client_hostname = client_hostname

    def _selected(self, selection: DeadLetterFilter) -> list[StoredDeadLetter]:
        """Matching letters, oldest id first."""
        chosen = (d for d in self._tables.dead_letters.values() if _matches(d, selection))
        return sorted(chosen, key=lambda d: d.id)

    def _by_id(self, letter_ids: Iterable[int | None]) -> list[StoredDeadLetter]:
        wanted = set(letter_ids)
        return [d for d in self._tables.dead_letters.values() if d.id in wanted]

    @asynccontextmanager
    async def _statement(self, letter_ids: Iterable[int | None] = ()) -> AsyncIterator[None]:
        """One autocommit statement holding the locks of the letters it changes."""
        owner = Owner()
        try:
            await round_trip()
            for letter in sorted(self._by_id(letter_ids), key=lambda d: d.id):
                await self._store.locks.acquire(
                    ("dead_letters", letter.queue, letter.message_id), owner
                )
            yield
        finally:
            self._store.locks.release_all(owner)

    def _put(self, letter: StoredDeadLetter) -> None:
        self._tables.dead_letters[(letter.queue, letter.message_id)] = letter

    def _audit(
        self,
        letter_ids: Sequence[int | None],
        audit: AuditRecord,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        at = utc(self._store.clock.now())
        for letter_id in letter_ids:
            self._tables.audit.append(
                AuditEntry(
                    id=self._tables.next_id("dead_letter_audit"),
                    at=at,
                    operator=audit.operator,
                    action=audit.action,
                    batch_id=audit.batch_id,
                    dead_letter_id=letter_id,
                    outcome=audit.outcome,
                    detail=as_json({**audit.detail, **(extra or {})}, lenient=True),
                    client_hostname=self._client_hostname,
                )
            )

    async def find(
        self, selection: DeadLetterFilter, *, limit: int, offset: int = 0
    ) -> list[StoredDeadLetter]:
        await round_trip()
        newest = sorted(
            self._selected(selection), key=lambda d: (d.last_failed_at, d.id), reverse=True
        )
        return newest[offset : offset + limit]

    async def count(self, selection: DeadLetterFilter) -> int:
        await round_trip()
        return len(self._selected(selection))

    async def ids(self, selection: DeadLetterFilter) -> list[int]:
        await round_trip()
        return [d.id for d in self._selected(selection)]

    async def groups(self, selection: DeadLetterFilter, *, limit: int) -> list[FailureGroup]:
        await round_trip()
        grouped: dict[str, list[StoredDeadLetter]] = {}
        for letter in self._selected(selection):
            grouped.setdefault(letter.fingerprint, []).append(letter)
        groups = []
        for group, letters in grouped.items():
            example = letters[-1]
            groups.append(
                FailureGroup(
                    fingerprint=group,
                    count=len(letters),
                    first_failed_at=min(d.first_failed_at for d in letters),
                    last_failed_at=max(d.last_failed_at for d in letters),
                    reason=example.reason,
                    handler=example.handler,
                    exception_type=example.exception_type,
                    exception_message=example.exception_message,
                )
            )
        groups.sort(key=lambda g: (g.count, g.last_failed_at), reverse=True)
        return groups[:limit]

    async def get(self, letter_id: int) -> StoredDeadLetter | None:
        await round_trip()
        found = self._by_id([letter_id])
        return found[0] if found else None

    async def history(self, letter_id: int) -> list[AuditEntry]:
        await round_trip()
        return [a for a in self._tables.audit if a.dead_letter_id == letter_id]

    async def stage_replay(
        self, letter: StoredDeadLetter, outbox_key: str, headers: Mapping[str, Any]
    ) -> OutboxRow:
        owner = Owner()
        try:
            await round_trip()
            await self._store.locks.acquire(("outbox.message_id", outbox_key), owner)
            outbox_id = self._tables.outbox_ids.get(outbox_key)
            if outbox_id is None or outbox_id not in self._tables.outbox:
                record = OutboxRecord(
                    self._tables.next_id("outbox"),
                    outbox_key,
                    None,
                    "",
                    letter.queue,
                    as_json(dict(headers)),
                    letter.body,
                    utc(self._store.clock.now()),
                )
                self._tables.add_outbox(record)
                outbox_id = record.id
            return self._tables.outbox[outbox_id].row()
        finally:
            self._store.locks.release_all(owner)

    async def confirm_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        async with self._statement([letter_id]):
            record = self._tables.outbox.get(outbox_id)
            if record is not None and record.published_at is None:
                now = utc(self._store.clock.now())
                self._tables.outbox[outbox_id] = replace(record, published_at=now)
            for letter in self._by_id([letter_id]):
                self._put(
                    replace(letter, status="replayed", times_replayed=letter.times_replayed + 1)
                )
            self._audit([letter_id], audit)

    async def abandon_replay(self, letter_id: int, outbox_id: int, audit: AuditRecord) -> None:
        async with self._statement():
            record = self._tables.outbox.get(outbox_id)
            if record is not None and record.published_at is None:
                del self._tables.outbox[outbox_id]
                del self._tables.outbox_ids[record.message_id]
            self._audit([letter_id], audit)

    async def save_body(self, letter_id: int, body: bytes, audit: AuditRecord) -> None:
        async with self._statement([letter_id]):
            for letter in self._by_id([letter_id]):
                original = letter.body if letter.original_body is None else letter.original_body
                self._put(replace(letter, original_body=original, body=body))
            self._audit([letter_id], audit)

    async def audit(self, letter_ids: Sequence[int | None], audit: AuditRecord) -> None:
        async with self._statement():
            self._audit(letter_ids, audit)

    async def archive(self, letter_ids: Sequence[int], audit: AuditRecord) -> int:
        async with self._statement(letter_ids):
            archived = [d for d in self._by_id(letter_ids) if d.status != "archived"]
            for letter in archived:
                self._put(replace(letter, status="archived"))
            self._audit([d.id for d in archived], audit)
        return len(archived)

    async def purge(self, letter_ids: Sequence[int], audit: AuditRecord) -> int:
        async with self._statement(letter_ids):
            gone = self._by_id(letter_ids)
            ids = {d.id for d in gone}
            for letter in gone:
                del self._tables.dead_letters[(letter.queue, letter.message_id)]
            # As `ON DELETE SET NULL`: earlier audit rows stay, no longer naming the letter.
            self._tables.audit[:] = [
                replace(a, dead_letter_id=None) if a.dead_letter_id in ids else a
                for a in self._tables.audit
            ]
            for letter in gone:
                extra = {"id": letter.id, "message_id": letter.message_id, "queue": letter.queue}
                self._audit([None], audit, extra)
        return len(gone)
