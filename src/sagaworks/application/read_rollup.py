"""RollUpHistory: fold settled saga history into the per-minute rows the dashboards read.

History rows carry the time of their transition, and a transaction commits
a moment after it; history younger than `SETTLE` is left for the next run,
so a row is never counted before it is visible. A run takes `SPAN` of
history per transaction until it has caught up, so a worker back after a
long pause catches up in short transactions, not one long one.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sagaworks.application.ports import HistoryRollup, RolledUp, RollUp

__all__ = ["SETTLE", "SPAN", "RollUpHistory"]

SETTLE = timedelta(seconds=10)
"""A worker statement's deadline (`SAGAWORKS_DB_STATEMENT_TIMEOUT_S`): transitions commit
milliseconds after their time; one committed later than this is left out of the rollup."""
SPAN = timedelta(minutes=5)


@dataclass
class RollUpHistory:
    rollup: HistoryRollup
    keep: timedelta
    """How long the per-minute rows are kept (the views read the last hour)."""

    async def __call__(self) -> list[RolledUp] | None:
        """Catch up; None when another process is rolling up (the views stay right meanwhile)."""
        done: list[RolledUp] = []
        step = RollUp(settle=SETTLE, span=SPAN, keep=self.keep)
        while True:
            rolled = await self.rollup.roll_up(step)
            if rolled is None:
                return done or None
            done.append(rolled)
            if rolled.caught_up:
                return done
