"""The hot path's connections: a plain asyncpg pool, opened lazily in the loop that uses it.

Checking a connection out of SQLAlchemy's pool costs a `pre_ping` round trip,
a greenlet hop and a `ROLLBACK` on return; on the hot path (two or three
checkouts per message) that was about a third of the worker's CPU. This pool
does neither: a connection that died is noticed by the statement that uses
it (a transient error the worker retries), and asyncpg still rolls back a
transaction left open, e.g. by a cancelled handler, before reuse. We set no
session state, so nothing else needs resetting.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import asyncpg

from sagaworks.adapters.postgres.deadlines import SessionDeadlines
from sagaworks.adapters.postgres.dsn import parse_database_url

__all__ = ["ConnectionPool", "NoFreeConnection"]

_CLOSE_WAIT_S = 5.0
"""How long closing waits for connections still checked out before it terminates them."""


class NoFreeConnection(TimeoutError):
    """Every connection of the pool stayed checked out for the whole wait.

    A `TimeoutError`, so callers that wait out a database outage wait this out too.
    """


def _json_decoder(value: bytes) -> Any:
    return json.loads(value.decode())


def _jsonb_encoder(value: str) -> bytes:
    return b"\x01" + value.encode()  # the binary jsonb format's version byte


def _jsonb_decoder(value: bytes) -> Any:
    return json.loads(value[1:].decode())


async def _codecs(conn: asyncpg.Connection) -> None:
    """JSON in and out exactly as on SQLAlchemy's connections: the store relies on it."""
    await conn.set_type_codec(
        "json", encoder=str.encode, decoder=_json_decoder, schema="pg_catalog", format="binary"
    )
    await conn.set_type_codec(
        "jsonb",
        encoder=_jsonb_encoder,
        decoder=_jsonb_decoder,
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """asyncpg's default reset is a round trip per release; an open transaction is still undone."""


class ConnectionPool:
    """At most `size` asyncpg connections to `url`, made on first use.

    `url` is read by `parse_database_url`, as the engine's is: same TLS, same checks.
    With `deadlines`, no statement waits forever on a silent network (deadlines.py).
    """

    def __init__(
        self,
        url: str,
        *,
        size: int,
        connect_timeout_s: float,
        deadlines: SessionDeadlines | None = None,
    ) -> None:
        self._url = parse_database_url(url).dsn
        self._size = size
        self._timeout = connect_timeout_s
        self._deadlines = deadlines
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._out = 0
        """Connections handed out and not yet back in the pool."""

    async def _open(self) -> asyncpg.Pool:
        async with self._lock:
            if self._pool is None:
                self._pool = await asyncpg.create_pool(
                    self._url,
                    min_size=0,
                    max_size=self._size,
                    timeout=self._timeout,
                    init=_codecs,
                    reset=_keep_session,
                    command_timeout=(
                        None if self._deadlines is None else self._deadlines.command_timeout_s
                    ),
                    server_settings={
                        **({} if self._deadlines is None else self._deadlines.server_settings()),
                        "application_name": "sagaworks",
                        # A generic plan made while the tables were small (a new database,
                        # or one autovacuum has not analysed yet) keeps scanning them whole
                        # as they grow; planned per execution, statements track their size.
                        # The hot path runs a few statements per batch, so this costs little.
                        "plan_cache_mode": "force_custom_plan",
                    },
                )
            return self._pool

    @asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection, waited for no longer than a statement may run plus a connect.

        The deadline is set only when every connection is out: asyncpg enforces it
        with a task of its own per call, which the common case has no need to pay for.
        """
        pool = self._pool or await self._open()
        if self._out < self._size:
            conn = await pool.acquire()
        else:
            wait_s = self._timeout + (
                0.0 if self._deadlines is None else self._deadlines.command_timeout_s
            )
            try:
                conn = await pool.acquire(timeout=wait_s)
            except TimeoutError as error:
                raise NoFreeConnection(
                    f"no database connection came free within {wait_s:g} s: all {self._size} "
                    "were in use (SAGAWORKS_DB_POOL_SIZE); the database is slow or the pool "
                    "too small"
                ) from error
        self._out += 1
        try:
            yield cast(asyncpg.Connection, conn)
        finally:
            try:
                await pool.release(conn)
            finally:
                self._out -= 1

    async def close(self) -> None:
        """Close the connections; those still checked out after a short wait are terminated."""
        if self._pool is None:
            return
        pool, self._pool = self._pool, None
        try:
            async with asyncio.timeout(_CLOSE_WAIT_S):
                await pool.close()
        except TimeoutError:
            pool.terminate()
