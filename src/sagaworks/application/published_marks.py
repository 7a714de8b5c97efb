"""Marking published outbox rows in batches, a tenth of a second after publishing them.

An `UPDATE outbox SET published_at` per message was one more connection
checkout, round trip and commit on every step; batched, hundreds of rows
share one. Nothing is lost meanwhile: a row not marked yet is only
*republished* by a sweeper, and only once it is older than the sweep grace
period (seconds, against a flush delay of a tenth of a second). A republished
message is deduplicated by its consumer's inbox, as after any crash between
publish and mark. This worker's own sweeps flush pending marks first.

A mark that fails (the database restarting) is kept and tried again a
second later, and by every later flush: an eager step's row carries a lease
the sweeper honours, so a row whose mark was dropped would stay unpublished
until the lease ran out and then be sent for nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from sagaworks.application.ports import Store

__all__ = ["PublishedMarks"]

_log = logging.getLogger("sagaworks.outbox")


class PublishedMarks:
    """Collects ids of published rows; one `mark_published` per `delay_s` (at most `batch` ids)."""

    def __init__(
        self, store: Store, *, delay_s: float = 0.1, retry_s: float = 1.0, batch: int = 1000
    ) -> None:
        self._store = store
        self._delay = delay_s
        self._retry = retry_s
        self._batch = batch
        self._pending: list[int] = []
        self._flusher: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()  # a sweep's flush waits for an UPDATE already sent

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, ids: Sequence[int]) -> None:
        self._pending.extend(ids)
        self._flush_in(self._delay)

    def _flush_in(self, delay_s: float) -> None:
        if self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later(delay_s))

    async def _flush_later(self, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
        finally:
            self._flusher = None
        await self.flush()

    async def flush(self) -> None:
        """Mark everything collected so far; on failure keep the rest and try again later."""
        async with self._flushing:
            while self._pending:
                ids, self._pending = self._pending[: self._batch], self._pending[self._batch :]
                try:
                    await self._store.mark_published(ids)
                except Exception as error:  # noqa: BLE001 - kept, and tried again
                    self._pending = ids + self._pending
                    _log.warning(
                        "marking outbox rows published failed; trying again",
                        extra={"rows": len(ids), "error": f"{type(error).__name__}: {error}"},
                    )
                    self._flush_in(self._retry)
                    return
