"""Group commit: requests that arrive together share one round trip.

A batch starts as soon as a slot is free and takes whatever has arrived by
the next turn of the event loop, so a lone request waits for nobody, and
under load batches grow by themselves while earlier ones are in flight. Two
requests with the same key never share a batch nor run in overlapping
batches: a saga's messages are applied one transaction after another, and
batches never wait on each other's locks. A batch that fails is retried one
request at a time, so a poison request fails alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """Runs submitted requests through `run`, at most `size` per batch and `concurrency` at once."""

    def __init__(
        self,
        run: Callable[[Sequence[T]], Awaitable[Sequence[R]]],
        *,
        size: int,
        concurrency: int,
        key: Callable[[T], Hashable] | None = None,
    ) -> None:
        if size < 1 or concurrency < 1:
            raise ValueError(f"batch size and concurrency must be ≥ 1, got {size}, {concurrency}")
        self._run = run
        self._size = size
        self._concurrency = concurrency
        self._key = key
        self._pending: deque[tuple[T, asyncio.Future[R]]] = deque()
        self._busy: set[Hashable] = set()
        self._running: set[asyncio.Task[None]] = set()
        self._scheduled = False

    async def submit(self, request: T) -> R:
        """The request's result once its batch committed; its own exception if it failed."""
        loop = asyncio.get_running_loop()
        result: asyncio.Future[R] = loop.create_future()
        self._pending.append((request, result))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start)
        return await result

    def _start(self) -> None:
        self._scheduled = False
        while self._pending and len(self._running) < self._concurrency:
            batch = self._take()
            if not batch:
                return
            task = asyncio.get_running_loop().create_task(self._settle(batch))
            self._running.add(task)

    def _take(self) -> list[tuple[T, asyncio.Future[R]]]:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        waiting: list[tuple[T, asyncio.Future[R]]] = []
        while self._pending and len(batch) < self._size:
            request, result = self._pending.popleft()
            if result.done():  # its submitter was cancelled
                continue
            key = self._key(request) if self._key is not None else None
            if key is not None and key in self._busy:
                waiting.append((request, result))
                continue
            if key is not None:
                self._busy.add(key)
            batch.append((request, result))
        self._pending.extendleft(reversed(waiting))
        return batch

    async def _settle(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            try:
                _deliver(batch, await self._run([request for request, _ in batch]))
            except Exception as error:  # noqa: BLE001 - retried alone below, or its submitter's
                if len(batch) == 1:
                    _fail(batch[0][1], error)
                    return
                for request, result in batch:
                    try:
                        _deliver([(request, result)], await self._run([request]))
                    except Exception as alone:  # noqa: BLE001 - this request's own failure
                        _fail(result, alone)
        finally:
            if self._key is not None:
                for request, _ in batch:
                    self._busy.discard(self._key(request))
            current = asyncio.current_task()
            if current is not None:
                self._running.discard(current)
            if self._pending and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._start)


def _deliver(batch: list[tuple[T, asyncio.Future[R]]], results: Sequence[R]) -> None:
    if len(results) != len(batch):
        raise RuntimeError(f"a batch of {len(batch)} returned {len(results)} results")
    for (_, result), value in zip(batch, results, strict=True):
        if not result.done():
            result.set_result(value)


def _fail(result: asyncio.Future[R], error: Exception) -> None:
    if not result.done():
        result.set_exception(error)
