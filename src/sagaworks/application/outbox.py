"""Publishing committed outbox rows: at once after commit, and by the sweeper."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sagaworks.application.ports import OutboxRow, Publisher, Store, Telemetry
from sagaworks.application.published_marks import PublishedMarks

__all__ = ["OutboxRelay"]

_log = logging.getLogger("sagaworks.outbox")


class OutboxRelay:
    """At-least-once publication of the outbox; consumers dedupe on the message id."""

    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        sweep_grace_s: float = 2.0,
        marks: PublishedMarks | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._store = store
        self._publisher = publisher
        self._grace = sweep_grace_s
        self._marks = marks
        """Batches `mark_published` (see published_marks.py); None: one UPDATE per publish."""
        self._telemetry = telemetry
        """Told of every confirmed publish (the outbox lag); None: nobody is."""

    async def publish_now(self, rows: Sequence[OutboxRow]) -> bool:
        """Publish rows a transaction just committed; on failure the sweeper retries them."""
        if not rows:
            return True
        try:
            await self._publisher.publish(rows)
        except Exception as error:  # noqa: BLE001 - committed rows stay for the sweeper
            _log.warning(
                "outbox publish failed; the sweeper will retry",
                extra={"rows": len(rows), "error": f"{type(error).__name__}: {error}"},
            )
            return False
        if self._telemetry is not None:
            self._telemetry.outbox_published(rows, swept=False)
        if self._marks is not None:
            self._marks.add([r.id for r in rows])
        else:
            await self._store.mark_published([r.id for r in rows])
        return True

    async def settled(self, ids: Sequence[int]) -> None:
        """Rows nobody needs to publish any more: eager steps whose results committed.

        Marked with the published ones; until then (or if this process dies first) the
        sweeper would publish them once their lease ran out, and the step's consumer
        would find it no longer current.
        """
        if self._marks is not None:
            self._marks.add(list(ids))
        else:
            await self._store.mark_published(list(ids))

    async def sweep(self, batch: int = 500, *, older_than_s: float | None = None) -> int:
        """Publish rows nobody published (a crash between commit and publish). Returns a count."""
        grace = self._grace if older_than_s is None else older_than_s
        if self._marks is not None:
            await self._marks.flush()  # never republish what this worker already published
        async with self._store.claim_unpublished(batch, grace) as rows:
            if rows:
                await self._publisher.publish(rows)
                if self._telemetry is not None:
                    self._telemetry.outbox_published(rows, swept=True)
            return len(rows)
