"""PruneDatabase: delete what the engine no longer needs, in small batches, never in one go.

Each kind of row (`Prunable`) has its own cut-off (now minus how long it is
kept; None keeps it for ever). The cut-off is fixed when the run starts, so a
run ends even while new rows keep arriving; rows are deleted a batch at a
time, each batch its own short transaction, with a pause between batches
so the hot path always gets its turn. A dry run counts instead of deleting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sagaworks.application.ports import Clock, Prunable, Retention

__all__ = ["Prune", "PruneDatabase", "Pruned", "RetentionPolicy"]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    keep: Mapping[Prunable, timedelta | None]
    """How long each kind of row is kept; None (or absent): for ever."""
    batch_size: int = 1000
    """Rows deleted per transaction."""
    pause: timedelta = timedelta(milliseconds=50)
    """Rest between two batches."""


@dataclass(frozen=True, slots=True)
class Prune:
    """What to prune: every kind with a retention, or only some; `dry_run` only counts."""

    dry_run: bool = False
    only: frozenset[Prunable] | None = None


@dataclass(frozen=True, slots=True)
class Pruned:
    """Progress and result for one kind of row."""

    what: Prunable
    before: datetime
    """The cut-off: rows older than this are deleted."""
    rows: int = 0
    """Deleted so far (a dry run: that would be deleted)."""
    batches: int = 0
    done: bool = False
    dry_run: bool = False


@dataclass
class PruneDatabase:
    retention: Retention
    clock: Clock
    policy: RetentionPolicy
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep)

    async def __call__(
        self, request: Prune, progress: Callable[[Pruned], None] | None = None
    ) -> list[Pruned]:
        """Prune each kind in turn; `progress` hears of every batch. Returns one entry per kind."""
        now = self.clock.now()
        results = []
        for what in Prunable:
            kept = self.policy.keep.get(what)
            if kept is None or (request.only is not None and what not in request.only):
                continue
            pruned = Pruned(what, now - kept, dry_run=request.dry_run)
            if request.dry_run:
                pruned = replace(pruned, rows=await self.retention.count(what, pruned.before))
            else:
                pruned = await self._delete(pruned, progress)
            pruned = replace(pruned, done=True)
            if progress is not None:
                progress(pruned)
            results.append(pruned)
        return results

    async def if_nobody_else(self) -> list[Pruned] | None:
        """Prune everything unless another process is pruning now (then None): for schedules."""
        async with self.retention.exclusively() as mine:
            if not mine:
                return None
            return await self(Prune())

    async def _delete(self, pruned: Pruned, progress: Callable[[Pruned], None] | None) -> Pruned:
        size = self.policy.batch_size
        while True:
            deleted = await self.retention.delete_batch(pruned.what, pruned.before, size)
            pruned = replace(pruned, rows=pruned.rows + deleted, batches=pruned.batches + 1)
            if deleted < size:
                return pruned
            if progress is not None:
                progress(pruned)
            await self.sleep(self.policy.pause.total_seconds())
