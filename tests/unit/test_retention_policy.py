"""PruneDatabase's loop on a fake retention: cut-offs, batches, rests, dry runs, the lock."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from sagaworks.adapters.memory.clock import FakeClock
from sagaworks.application.ports import Prunable
from sagaworks.application.retention import Prune, Pruned, PruneDatabase, RetentionPolicy

pytestmark = pytest.mark.unit

NOW = datetime(2026, 6, 1, tzinfo=UTC)


class FakeRetention:
    """Rows by kind (their timestamps); deletes the oldest first, as the real one does."""

    def __init__(self, rows: dict[Prunable, list[datetime]], *, locked: bool = False) -> None:
        self.rows = rows
        self.locked = locked
        self.batches: list[tuple[Prunable, int]] = []

    async def count(self, what: Prunable, before: datetime) -> int:
        return sum(1 for at in self.rows.get(what, []) if at < before)

    async def delete_batch(self, what: Prunable, before: datetime, limit: int) -> int:
        old = sorted(at for at in self.rows.get(what, []) if at < before)[:limit]
        for at in old:
            self.rows[what].remove(at)
        self.batches.append((what, len(old)))
        return len(old)

    @asynccontextmanager
    async def exclusively(self) -> AsyncIterator[bool]:
        yield not self.locked


def prune(retention: FakeRetention, rests: list[float], **keep: timedelta | None) -> PruneDatabase:
    async def rest(seconds: float) -> None:
        rests.append(seconds)

    policy = RetentionPolicy(
        keep={Prunable(k): v for k, v in keep.items()},
        batch_size=3,
        pause=timedelta(milliseconds=10),
    )
    return PruneDatabase(retention, FakeClock(NOW), policy, sleep=rest)


async def test_old_rows_go_in_batches_with_a_rest_between_and_progress_after_each() -> None:
    old, new = NOW - timedelta(days=10), NOW - timedelta(hours=1)
    retention = FakeRetention({Prunable.INBOX: [old] * 7 + [new], Prunable.OUTBOX: [old]})
    rests: list[float] = []
    heard: list[Pruned] = []

    results = await prune(retention, rests, inbox=timedelta(days=7))(Prune(), heard.append)

    assert [(p.what, p.rows, p.batches, p.done) for p in results] == [(Prunable.INBOX, 7, 3, True)]
    assert results[0].before == NOW - timedelta(days=7)
    assert retention.rows[Prunable.INBOX] == [new]
    assert retention.rows[Prunable.OUTBOX] == [old], "no retention set: kept for ever"
    assert retention.batches == [(Prunable.INBOX, 3), (Prunable.INBOX, 3), (Prunable.INBOX, 1)]
    assert rests == [0.01, 0.01], "a rest between full batches, none after the last"
    assert [(p.rows, p.done) for p in heard] == [(3, False), (6, False), (7, True)]


async def test_a_dry_run_counts_and_only_limits_the_kinds() -> None:
    old = NOW - timedelta(days=40)
    retention = FakeRetention({Prunable.INBOX: [old] * 4, Prunable.SAGAS: [old] * 2})
    job = prune(retention, [], inbox=timedelta(days=7), sagas=timedelta(days=30))

    results = await job(Prune(dry_run=True, only=frozenset({Prunable.SAGAS})))

    assert [(p.what, p.rows, p.dry_run) for p in results] == [(Prunable.SAGAS, 2, True)]
    assert retention.batches == []
    assert len(retention.rows[Prunable.SAGAS]) == 2


async def test_a_scheduled_run_steps_aside_while_another_process_prunes() -> None:
    old = NOW - timedelta(days=40)
    busy = FakeRetention({Prunable.INBOX: [old]}, locked=True)
    free = FakeRetention({Prunable.INBOX: [old]})

    assert await prune(busy, [], inbox=timedelta(days=7)).if_nobody_else() is None
    assert busy.rows[Prunable.INBOX] == [old]
    ran = await prune(free, [], inbox=timedelta(days=7)).if_nobody_else()
    assert ran is not None
    assert [p.rows for p in ran] == [1]
