"""Marks of published outbox rows: batched, and kept when the database fails to take them."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sagaworks.application.published_marks import PublishedMarks

pytestmark = pytest.mark.unit


class _Marks:
    """Records each `mark_published` call; the first `failures` calls fail."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.calls: list[list[int]] = []
        self.marked: list[int] = []

    async def mark_published(self, ids: Sequence[int]) -> None:
        self.calls.append(list(ids))
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("the database is restarting")
        self.marked.extend(ids)


def _marks(store: _Marks, **options: float) -> PublishedMarks:
    return PublishedMarks(store, **options)  # type: ignore[arg-type]


async def test_rows_added_together_are_marked_in_one_statement() -> None:
    store = _Marks()
    marks = _marks(store, delay_s=0.01)

    marks.add([1, 2])
    marks.add([3])
    await asyncio.sleep(0.05)

    assert store.calls == [[1, 2, 3]]
    assert marks.pending == 0


async def test_a_failed_mark_is_kept_and_tried_again() -> None:
    store = _Marks(failures=1)
    marks = _marks(store, delay_s=0.01, retry_s=0.02)

    marks.add([7, 8])
    await asyncio.sleep(0.015)
    assert store.marked == []
    assert marks.pending == 2

    await asyncio.sleep(0.05)

    assert store.marked == [7, 8]
    assert marks.pending == 0


async def test_a_flush_after_a_failure_marks_what_was_kept_first() -> None:
    store = _Marks(failures=1)
    marks = _marks(store, delay_s=10.0, retry_s=10.0)
    marks.add([1])

    await marks.flush()
    marks.add([2])
    await marks.flush()

    assert store.calls == [[1], [1, 2]]
    assert store.marked == [1, 2]
