"""`OutboxWakeUps` without a database: nothing announces commits, so the sweeper just waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

__all__ = ["IntervalWakeUps"]


class _Interval:
    async def wait(self, timeout_s: float) -> None:
        await asyncio.sleep(timeout_s)


class IntervalWakeUps:
    """Implements `OutboxWakeUps`: the sweeper wakes once per interval, never earlier."""

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[_Interval]:
        yield _Interval()
