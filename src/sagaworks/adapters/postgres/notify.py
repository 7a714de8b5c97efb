"""`LISTEN sagaworks_outbox`: wakes the sweeper for committed rows no worker is publishing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.tables import OUTBOX_CHANNEL

__all__ = ["outbox_notifications"]


@asynccontextmanager
async def outbox_notifications(engine: AsyncEngine) -> AsyncIterator[asyncio.Event]:
    """An event set on every outbox notification; the holder clears it after each sweep."""
    woken = asyncio.Event()

    def on_notify(*_: Any) -> None:
        woken.set()

    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        pg = cast(asyncpg.Connection, raw.driver_connection)
        await pg.add_listener(OUTBOX_CHANNEL, on_notify)
        try:
            yield woken
        finally:
            if not pg.is_closed():
                await pg.remove_listener(OUTBOX_CHANNEL, on_notify)
