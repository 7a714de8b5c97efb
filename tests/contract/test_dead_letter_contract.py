"""What every `DeadLetterRepository` must do, run against the in-memory and PostgreSQL one.

Letters are written as the hot path writes them (`SagaTransaction.dead_letter`
on the same backend's store); the cases then read, filter, group, stage,
replay, edit, archive and purge them through the repository only, plus a
probe of the audit rows a purge leaves behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import pytest
from sqlalchemy import text

from sagaworks.adapters.memory.dead_letters import InMemoryDeadLetters
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.postgres.dead_letters import PostgresDeadLetters
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.store import PostgresStore
from sagaworks.application.ports import (
    AuditRecord,
    BodyDigest,
    DeadLetterFilter,
    DeadLetterRepository,
    InboundMessage,
    Store,
)
from sagaworks.application.stored import dead_letter, fingerprint

T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
BATCH = UUID(int=7)
HOST = "ops-box-1"

AuditRow = tuple[int | None, str, dict[str, Any]]
"""dead_letter_id, action, detail."""


class AuditRows(Protocol):
    async def __call__(self) -> list[AuditRow]: ...


@dataclass
class Backend:
    store: Store
    letters: DeadLetterRepository
    audit_rows: AuditRows


@pytest.fixture
async def backend(database_url_or_memory: str | None) -> AsyncIterator[Backend]:
    if database_url_or_memory is None:
        store = InMemoryStore()

        async def memory_rows() -> list[AuditRow]:
            return [(a.dead_letter_id, a.action, dict(a.detail)) for a in store.tables.audit]

        yield Backend(store, InMemoryDeadLetters(store, client_hostname=HOST), memory_rows)
        return
    engine = create_engine(database_url_or_memory, pool_size=2, max_overflow=2)

    async def postgres_rows() -> list[AuditRow]:
        query = "SELECT dead_letter_id, action, detail FROM dead_letter_audit ORDER BY id"
        async with engine.connect() as conn:
            return [(r[0], r[1], r[2]) for r in (await conn.execute(text(query))).all()]

    yield Backend(
        PostgresStore(engine), PostgresDeadLetters(engine, client_hostname=HOST), postgres_rows
    )
    await engine.dispose()


def audit(action: str, **detail: Any) -> AuditRecord:
    return AuditRecord("ops", action, BATCH, "ok", detail)


async def fail(
    backend: Backend,
    message_id: str,
    *,
    minutes: int = 0,
    queue: str = "q.orders",
    reason: str = "handler_failed",
    exception: str = "boom 42",
    exception_type: str = "ValueError",
    routing_key: str = "order.placed",
    saga_type: str | None = "order_fulfilment",
) -> int:
    """Dead-letter a delivery through the hot path; return the letter's id."""
    inbound = InboundMessage(
        message_id=message_id,
        message_type="order.placed",
        body=b'{"order_id": "o-1"}',
        headers={"x-trace": "t-1"},
        queue=queue,
        exchange="orders",
        routing_key=routing_key,
    )
    letter = dead_letter(
        inbound, reason, exception_type, exception, handler="h", saga_type=saga_type
    )
    async with backend.store.transaction() as tx:
        await tx.dead_letter(letter, T0 + timedelta(minutes=minutes))
    (found,) = [
        d
        for d in await backend.letters.find(DeadLetterFilter(statuses=()), limit=100)
        if d.message_id == message_id and d.queue == queue
    ]
    return found.id


async def test_a_letter_reads_back_as_it_was_written(backend: Backend) -> None:
    letter_id = await fail(backend, "m-1", minutes=3)
    letter = await backend.letters.get(letter_id)
    assert letter is not None
    assert (letter.message_id, letter.queue, letter.exchange, letter.routing_key) == (
        "m-1",
        "q.orders",
        "orders",
        "order.placed",
    )
    assert (letter.message_type, letter.saga_type, letter.body, letter.original_body) == (
        "order.placed",
        "order_fulfilment",
        b'{"order_id": "o-1"}',
        None,
    )
    assert (letter.reason, letter.exception_type, letter.exception_message, letter.handler) == (
        "handler_failed",
        "ValueError",
        "boom 42",
        "h",
    )
    assert letter.fingerprint == fingerprint("handler_failed", "ValueError", "boom 42", "h")
    assert letter.first_failed_at == letter.last_failed_at == T0 + timedelta(minutes=3)
    assert (letter.times_failed, letter.times_replayed, letter.status) == (1, 0, "active")
    assert letter.headers["x-trace"] == "t-1"
    assert await backend.letters.get(letter_id + 1000) is None


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (DeadLetterFilter(), ["a", "b", "c"]),
        (DeadLetterFilter(reason="schema_invalid"), ["b"]),
        (DeadLetterFilter(queue="q.payments"), ["c"]),
        (DeadLetterFilter(routing_key="order.cancelled"), ["b"]),
        (DeadLetterFilter(saga_type="other"), ["c"]),
        (DeadLetterFilter(since=T0 + timedelta(minutes=1)), ["b", "c"]),
        (DeadLetterFilter(until=T0 + timedelta(minutes=1)), ["a"]),
        (DeadLetterFilter(text="KEYERROR"), ["c"]),
        (DeadLetterFilter(text="100%"), ["b"]),
        (DeadLetterFilter(text="10_"), []),
    ],
)
async def test_filters_narrow_the_selection(
    backend: Backend, selection: DeadLetterFilter, expected: list[str]
) -> None:
    await fail(backend, "a", minutes=0)
    await fail(backend, "b", minutes=1, reason="schema_invalid", exception="100% wrong",
               routing_key="order.cancelled")  # fmt: skip
    await fail(backend, "c", minutes=2, queue="q.payments", exception_type="KeyError",
               saga_type="other")  # fmt: skip
    found = await backend.letters.find(selection, limit=10)
    assert sorted(d.message_id for d in found) == expected
    assert await backend.letters.count(selection) == len(expected)


async def test_find_is_newest_first_and_pages_ids_are_oldest_first(backend: Backend) -> None:
    ids = [await fail(backend, f"m-{n}", minutes=10 - n) for n in range(4)]
    everything = DeadLetterFilter()
    newest_first = [d.id for d in await backend.letters.find(everything, limit=10)]
    assert newest_first == ids
    assert [d.id for d in await backend.letters.find(everything, limit=2, offset=1)] == ids[1:3]
    assert await backend.letters.ids(everything) == sorted(ids)
    assert await backend.letters.ids(DeadLetterFilter(ids=(ids[1], ids[3]))) == sorted(
        [ids[1], ids[3]]
    )


async def test_statuses_filter_and_an_empty_one_means_any(backend: Backend) -> None:
    kept = await fail(backend, "kept")
    gone = await fail(backend, "gone")
    assert await backend.letters.archive([gone], audit("archive")) == 1
    assert await backend.letters.ids(DeadLetterFilter()) == [kept]
    assert await backend.letters.ids(DeadLetterFilter(statuses=("archived",))) == [gone]
    assert await backend.letters.ids(DeadLetterFilter(statuses=())) == [kept, gone]


async def test_groups_by_fingerprint_largest_first_with_the_newest_as_example(
    backend: Backend,
) -> None:
    await fail(backend, "a1", minutes=0, exception="timeout after 10 s")
    await fail(backend, "a2", minutes=5, exception="timeout after 30 s")
    await fail(backend, "b1", minutes=9, exception_type="KeyError", exception="sku")
    groups = await backend.letters.groups(DeadLetterFilter(), limit=10)
    assert [(g.count, g.exception_type) for g in groups] == [(2, "ValueError"), (1, "KeyError")]
    big = groups[0]
    assert (big.first_failed_at, big.last_failed_at) == (T0, T0 + timedelta(minutes=5))
    assert (big.reason, big.handler, big.exception_message) == (
        "handler_failed",
        "h",
        "timeout after 30 s",
    )
    assert len(await backend.letters.groups(DeadLetterFilter(), limit=1)) == 1


async def test_a_replay_is_staged_once_and_confirmed_with_its_audit(backend: Backend) -> None:
    letter_id = await fail(backend, "m-1")
    letter = await backend.letters.get(letter_id)
    assert letter is not None
    staged = await backend.letters.stage_replay(letter, "replay-1", {"x-replayed": "1"})
    assert (staged.exchange, staged.routing_key, staged.body) == ("", "q.orders", letter.body)
    assert staged.message_id == "replay-1"
    assert staged.headers == {"x-replayed": "1"}
    again = await backend.letters.stage_replay(letter, "replay-1", {"x-replayed": "2"})
    assert again == staged
    await backend.letters.confirm_replay(letter_id, staged.id, audit("replay", n=1))
    async with backend.store.claim_unpublished(10, 0) as unpublished:
        assert unpublished == []
    replayed = await backend.letters.get(letter_id)
    assert replayed is not None
    assert (replayed.status, replayed.times_replayed) == ("replayed", 1)
    (entry,) = await backend.letters.history(letter_id)
    assert (entry.operator, entry.action, entry.batch_id, entry.outcome) == (
        "ops",
        "replay",
        BATCH,
        "ok",
    )
    assert (entry.dead_letter_id, dict(entry.detail)) == (letter_id, {"n": 1})
    assert entry.client_hostname == HOST  # besides the declared operator: where it ran


async def test_an_abandoned_replay_leaves_no_row_to_send(backend: Backend) -> None:
    letter_id = await fail(backend, "m-1")
    letter = await backend.letters.get(letter_id)
    assert letter is not None
    staged = await backend.letters.stage_replay(letter, "replay-1", {})
    await backend.letters.abandon_replay(letter_id, staged.id, audit("replay_failed"))
    async with backend.store.claim_unpublished(10, 0) as unpublished:
        assert unpublished == []
    assert await backend.letters.get(letter_id) == letter
    assert [e.action for e in await backend.letters.history(letter_id)] == ["replay_failed"]
    restaged = await backend.letters.stage_replay(letter, "replay-1", {})
    assert restaged.id != staged.id


async def test_an_edit_keeps_the_first_original_body(backend: Backend) -> None:
    letter_id = await fail(backend, "m-1")
    await backend.letters.save_body(letter_id, b"second", audit("edit"))
    await backend.letters.save_body(letter_id, b"third", audit("edit"))
    edited = await backend.letters.get(letter_id)
    assert edited is not None
    assert (edited.body, edited.original_body) == (b"third", b'{"order_id": "o-1"}')
    assert [e.action for e in await backend.letters.history(letter_id)] == ["edit", "edit"]


async def test_audit_rows_may_name_no_letter_and_keep_details_as_json(backend: Backend) -> None:
    letter_id = await fail(backend, "m-1")
    await backend.letters.audit([letter_id, None], audit("inspect", at=T0))
    (entry,) = await backend.letters.history(letter_id)
    assert dict(entry.detail) == {"at": str(T0)}
    assert [(i, a) for i, a, _ in await backend.audit_rows()] == [
        (letter_id, "inspect"),
        (None, "inspect"),
    ]


async def test_archive_counts_only_what_it_changed(backend: Backend) -> None:
    one = await fail(backend, "m-1")
    two = await fail(backend, "m-2")
    assert await backend.letters.archive([one], audit("archive")) == 1
    assert await backend.letters.archive([one, two], audit("archive")) == 1
    assert [e.action for e in await backend.letters.history(one)] == ["archive"]
    archived = await backend.letters.get(two)
    assert archived is not None
    assert archived.status == "archived"


async def test_purge_deletes_and_leaves_audit_rows_naming_the_message(backend: Backend) -> None:
    one = await fail(backend, "m-1")
    two = await fail(backend, "m-2")
    await backend.letters.archive([one], audit("archive"))
    assert await backend.letters.purge([one, one + two + 1000], audit("purge")) == 1
    assert await backend.letters.get(one) is None
    assert await backend.letters.get(two) is not None
    assert await backend.letters.history(one) == []
    assert await backend.audit_rows() == [
        (None, "archive", {}),
        (None, "purge", {"id": one, "message_id": "m-1", "queue": "q.orders"}),
    ]
    assert await backend.letters.purge([one], audit("purge")) == 0


async def test_escaped_fields_and_a_cut_body_read_back_with_their_originals(
    backend: Backend,
) -> None:
    raw = {"message_id": b"m-\x00-1", "headers/x-note": b"\xff\xfe"}
    inbound = InboundMessage(
        message_id="m-\\u0000-1",
        message_type="order.placed",
        body=b"x" * 4096,
        headers={"x-note": "\\xff\\xfe"},
        queue="q.orders",
        exchange="orders",
        routing_key="order.placed",
        raw_fields=raw,
    )
    whole = BodyDigest(2 * 1024 * 1024, "ab" * 32)
    letter = dead_letter(
        inbound, "oversized", "MessageTooLarge", "body is \x00 big", whole_body=whole
    )
    async with backend.store.transaction() as tx:
        await tx.dead_letter(letter, T0)
    (found,) = await backend.letters.find(DeadLetterFilter(statuses=()), limit=10)
    assert (found.message_id, found.headers, found.body) == (
        "m-\\u0000-1",
        {"x-note": "\\xff\\xfe"},
        b"x" * 4096,
    )
    assert found.raw_fields == raw
    assert found.whole_body == whole
    assert found.exception_message == "body is \\u0000 big"
    plain = await backend.letters.get(await fail(backend, "plain"))
    assert plain is not None
    assert (plain.raw_fields, plain.whole_body) == ({}, None)


async def test_an_id_conflict_reads_back_with_both_bodies_and_replays_the_new_one(
    backend: Backend,
) -> None:
    inbound = InboundMessage(
        message_id="m-conflict",
        message_type="order.placed",
        body=b'{"amount_cents": 999999}',
        headers={},
        queue="q.orders",
        exchange="orders",
        routing_key="order.placed",
    )
    letter = dead_letter(
        inbound, "id_conflict", "MessageIdConflict", "another body", first_body=b'{"a": 1}'
    )
    async with backend.store.transaction() as tx:
        await tx.dead_letter(letter, T0)
    (found,) = await backend.letters.find(DeadLetterFilter(statuses=()), limit=10)
    assert (found.body, found.first_body) == (b'{"amount_cents": 999999}', b'{"a": 1}')
    await backend.letters.save_body(found.id, b"edited", audit("edit"))
    edited = await backend.letters.get(found.id)
    assert edited is not None
    assert (edited.body, edited.original_body, edited.first_body) == (
        b"edited",
        b'{"amount_cents": 999999}',
        b'{"a": 1}',
    )
    staged = await backend.letters.stage_replay(edited, "replay-1", {})
    assert staged.body == b"edited", "a replay sends the letter's body, never the first one"
    plain = await backend.letters.get(await fail(backend, "plain"))
    assert plain is not None
    assert plain.first_body is None
