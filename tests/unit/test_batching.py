"""Group commit (`application/batching.py`): who shares a batch, who waits, who fails alone."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from sagaworks.application.batching import Batcher

pytestmark = pytest.mark.unit


class Recorder:
    """A batch function that remembers its batches and can be held open or made to fail."""

    def __init__(self, *, poison: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight = 0
        self.most_in_flight = 0
        self._poison = poison

    async def __call__(self, requests: Sequence[str]) -> list[str]:
        self.batches.append(list(requests))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await self.gate.wait()
            if self._poison in requests:
                raise ValueError(f"{self._poison} breaks its batch")
            return [r.upper() for r in requests]
        finally:
            self.in_flight -= 1


def by_saga(request: str) -> str:
    return request.split(":")[0]


async def test_requests_that_arrive_together_share_one_batch() -> None:
    run = Recorder()
    batcher = Batcher(run, size=10, concurrency=1)
    results = await asyncio.gather(*(batcher.submit(r) for r in ("a", "b", "c")))
    assert results == ["A", "B", "C"]
    assert run.batches == [["a", "b", "c"]]


async def test_a_lone_request_waits_for_nobody() -> None:
    run = Recorder()
    batcher = Batcher(run, size=10, concurrency=1)
    assert await asyncio.wait_for(batcher.submit("a"), 1) == "A"
    assert await asyncio.wait_for(batcher.submit("b"), 1) == "B"
    assert run.batches == [["a"], ["b"]]


async def test_requests_arriving_during_a_batch_form_the_next_one_within_the_size() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, size=2, concurrency=1)
    first = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)
    later = [asyncio.ensure_future(batcher.submit(r)) for r in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    assert run.batches == [["a"]], "a second batch started while the only slot was taken"
    run.gate.set()
    assert await asyncio.gather(first, *later) == ["A", "B", "C", "D"]
    assert run.batches == [["a"], ["b", "c"], ["d"]]
    assert run.most_in_flight == 1


async def test_concurrency_bounds_the_batches_in_flight() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, size=1, concurrency=2)
    pending = [asyncio.ensure_future(batcher.submit(r)) for r in "abcd"]
    await asyncio.sleep(0.01)
    assert run.in_flight == 2
    run.gate.set()
    assert await asyncio.gather(*pending) == ["A", "B", "C", "D"]
    assert run.most_in_flight == 2


async def test_one_key_is_never_in_two_batches_at_once_nor_twice_in_one() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, size=10, concurrency=3, key=by_saga)
    first = [asyncio.ensure_future(batcher.submit(r)) for r in ("s1:a", "s1:b", "s2:a")]
    await asyncio.sleep(0.01)
    # s1:b waits: its saga is in the batch in flight, though two slots are free.
    assert run.batches == [["s1:a", "s2:a"]]
    again = asyncio.ensure_future(batcher.submit("s3:a"))
    await asyncio.sleep(0.01)
    assert run.batches == [["s1:a", "s2:a"], ["s3:a"]]
    run.gate.set()
    await asyncio.gather(*first, again)
    assert run.batches[2] == ["s1:b"]
    for batch in run.batches:
        keys = [by_saga(r) for r in batch]
        assert len(keys) == len(set(keys))


async def test_a_failing_batch_is_retried_one_request_at_a_time() -> None:
    run = Recorder(poison="b")
    batcher = Batcher(run, size=10, concurrency=1)
    outcomes = await asyncio.gather(
        *(batcher.submit(r) for r in ("a", "b", "c")), return_exceptions=True
    )
    assert (outcomes[0], outcomes[2]) == ("A", "C")
    assert isinstance(outcomes[1], ValueError)
    assert "b breaks" in str(outcomes[1])
    assert run.batches == [["a", "b", "c"], ["a"], ["b"], ["c"]]


async def test_a_cancelled_submitter_leaves_the_others_their_results() -> None:
    run = Recorder()
    run.gate.clear()
    batcher = Batcher(run, size=10, concurrency=1)
    busy = asyncio.ensure_future(batcher.submit("a"))
    await asyncio.sleep(0.01)
    gone = asyncio.ensure_future(batcher.submit("b"))
    kept = asyncio.ensure_future(batcher.submit("c"))
    await asyncio.sleep(0.01)
    gone.cancel()
    run.gate.set()
    assert await asyncio.gather(busy, kept) == ["A", "C"]
    assert run.batches == [["a"], ["c"]], "a cancelled request was still run"


async def test_a_batch_returning_the_wrong_number_of_results_fails_loudly() -> None:
    async def short(requests: Sequence[str]) -> list[str]:
        return list(requests)[:-1]

    batcher = Batcher(short, size=10, concurrency=1)
    with pytest.raises(RuntimeError, match="a batch of 1 returned 0 results"):
        await batcher.submit("a")


def test_size_and_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be ≥ 1"):
        Batcher(Recorder(), size=0, concurrency=1)
