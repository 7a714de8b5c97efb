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

__all__ = ["ConnectionPool"]


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
        pool = self._pool or await self._open()
        async with pool.acquire() as conn:
            yield cast(asyncpg.Connection, conn)

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
