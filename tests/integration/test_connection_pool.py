"""The hot path's pool waits for a connection, and for its own closing, only so long."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from sagaworks.adapters.postgres.deadlines import SessionDeadlines
from sagaworks.adapters.postgres.pool import ConnectionPool, NoFreeConnection

pytestmark = pytest.mark.integration


async def test_a_full_pool_says_so_after_a_statement_deadline_and_a_connect(
    migrated_database_url: str,
) -> None:
    deadlines = SessionDeadlines(statement_timeout_s=0.5, idle_in_transaction_timeout_s=5.0)
    pool = ConnectionPool(migrated_database_url, size=1, connect_timeout_s=0.5, deadlines=deadlines)
    try:
        async with pool.acquire() as held:
            assert await held.fetchval("SELECT 1") == 1
            started = time.monotonic()
            with pytest.raises(NoFreeConnection, match="all 1 were in use") as refused:
                async with pool.acquire():
                    pytest.fail("the only connection is held")
            waited = time.monotonic() - started
        assert isinstance(refused.value, TimeoutError), "callers wait it out as an outage"
        assert "SAGAWORKS_DB_POOL_SIZE" in str(refused.value)
        assert 0.5 + 2.5 - 0.1 <= waited < 30, "the wait is the connect plus a statement's limit"
        async with pool.acquire() as again:
            assert await again.fetchval("SELECT 2") == 2, "the held connection came back"
    finally:
        await pool.close()


async def test_closing_terminates_a_connection_still_checked_out(
    migrated_database_url: str,
) -> None:
    pool = ConnectionPool(migrated_database_url, size=2, connect_timeout_s=5.0)
    checked_out: asyncio.Future[asyncpg.Connection] = asyncio.get_running_loop().create_future()
    forever = asyncio.Event()

    async def hold_and_never_release() -> None:
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")
            checked_out.set_result(conn)
            await forever.wait()

    holder = asyncio.create_task(hold_and_never_release())
    try:
        held = await asyncio.wait_for(checked_out, 10)
        async with asyncio.timeout(30):
            await pool.close()
        with pytest.raises(asyncpg.InterfaceError):
            await held.fetchval("SELECT 1")  # the connection nobody gave back was taken away
    finally:
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
