"""`LISTEN sagaworks_outbox`: wakes the sweeper for committed rows no worker is publishing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import driver_connection
from sagaworks.adapters.postgres.tables import OUTBOX_CHANNEL

__all__ = ["PostgresOutboxWakeUps"]


class _Notified:
    """Set by every notification; cleared each time the sweeper is woken."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def wait(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), timeout_s)
        self.event.clear()


class PostgresOutboxWakeUps:
    """Implements `OutboxWakeUps` with a listening connection of the engine's pool."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[_Notified]:
        notified = _Notified()

        def on_notify(*_: Any) -> None:
            notified.event.set()

        async with driver_connection(self._engine) as pg:
            await pg.add_listener(OUTBOX_CHANNEL, on_notify)
            try:
                yield notified
            finally:
                if not pg.is_closed():
                    await pg.remove_listener(OUTBOX_CHANNEL, on_notify)
