"""Async SQLAlchemy engines for PostgreSQL (asyncpg), and clear errors when one cannot connect.

Engines are only ever built by a caller (bootstrap, CLI, migrations), never at
import time: a pooled engine belongs to the event loop that first uses it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import cast

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from sagaworks.adapters.postgres.deadlines import SessionDeadlines
from sagaworks.adapters.postgres.dsn import parse_database_url
from sagaworks.adapters.postgres.errors import DatabaseUnreachable
from sagaworks.settings import Settings

__all__ = [
    "TRANSIENT_DATABASE_ERRORS",
    "connect",
    "create_engine",
    "create_engine_from_settings",
    "describe_connect_failure",
    "driver_connection",
    "probe_database",
    "session_deadlines",
    "sqlstate",
    "to_asyncpg_url",
]

TRANSIENT_DATABASE_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
)
"""The database is briefly unavailable or lost a race: the work itself is fine, try it again."""

_ASYNCPG_SCHEME = "postgresql+asyncpg://"
_ACCEPTED_SCHEMES = (_ASYNCPG_SCHEME, "postgresql://", "postgres://")
_URL_REMEDY = "fix the database URL (SAGAWORKS_DATABASE_URL or SAGAWORKS_MIGRATION_DATABASE_URL)"


def to_asyncpg_url(url: str) -> str:
    """Return `url` with the `postgresql+asyncpg://` scheme; host, path and query are kept."""
    for scheme in _ACCEPTED_SCHEMES:
        if url.startswith(scheme):
            return _ASYNCPG_SCHEME + url[len(scheme) :]
    scheme = url.split("://", 1)[0] if "://" in url else "nothing"
    raise ValueError(
        f"database URLs must start with postgresql://, postgres:// or postgresql+asyncpg://, "
        f"not {scheme}://"
    )


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    max_overflow: int = 5,
    connect_timeout_s: float = 5.0,
    deadlines: SessionDeadlines | None = None,
) -> AsyncEngine:
    """Build a pooled asyncpg engine; connections are checked before use and named `sagaworks`.

    Connections are opened by `asyncpg.connect()` on the DSN `parse_database_url`
    gives, as the hot-path pool's are, so TLS parameters mean the same on both.
    With `deadlines`, no statement waits forever on a silent network (deadlines.py).
    """
    target = parse_database_url(url)
    server_settings = {"application_name": "sagaworks"}
    if deadlines is not None:
        server_settings.update(deadlines.server_settings())

    async def open_connection() -> asyncpg.Connection:
        return await asyncpg.connect(
            target.dsn,
            timeout=connect_timeout_s,
            command_timeout=None if deadlines is None else deadlines.command_timeout_s,
            server_settings=server_settings,
        )

    return create_async_engine(
        to_asyncpg_url(url),
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        async_creator=open_connection,
    )


def create_engine_from_settings(
    settings: Settings, *, for_migrations: bool = False, deadlines: bool = False
) -> AsyncEngine:
    """The worker engine; with `for_migrations`, one connection as the migration role.

    With `deadlines` (a worker's engine), statements get the session deadlines of
    the settings; operator tools and migrations run without them.
    """
    if for_migrations:
        return create_engine(
            settings.effective_migration_url(),
            pool_size=1,
            max_overflow=0,
            connect_timeout_s=settings.db_connect_timeout_s,
        )
    return create_engine(
        settings.database_url.get_secret_value(),
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_pool_max_overflow,
        connect_timeout_s=settings.db_connect_timeout_s,
        deadlines=session_deadlines(settings) if deadlines else None,
    )


def session_deadlines(settings: Settings) -> SessionDeadlines:
    """The worker's statement and idle-in-transaction limits, from the settings."""
    return SessionDeadlines(
        statement_timeout_s=settings.db_statement_timeout_s,
        idle_in_transaction_timeout_s=settings.db_idle_in_transaction_timeout_s,
    )


def sqlstate(exc: BaseException) -> str | None:
    """The PostgreSQL SQLSTATE carried by a SQLAlchemy/asyncpg error, if any."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    code = getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _server_message(exc: BaseException) -> str:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    return str(orig).splitlines()[0] if str(orig) else type(orig).__name__


def describe_connect_failure(url: str, exc: BaseException) -> DatabaseUnreachable | None:
    """Turn an error raised while opening a connection into `DatabaseUnreachable`.

    Returns None when `exc` is not a connection failure, so the caller re-raises it.
    """
    parsed = make_url(to_asyncpg_url(url))
    where = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    if isinstance(exc, TimeoutError):
        return DatabaseUnreachable(
            url,
            f"{where} did not answer in time",
            "check the host, the port and any firewall, or raise SAGAWORKS_DB_CONNECT_TIMEOUT_S",
        )
    if isinstance(exc, socket.gaierror):
        return DatabaseUnreachable(url, f"host {parsed.host!r} is not known", _URL_REMEDY)
    if isinstance(exc, ConnectionRefusedError):
        return DatabaseUnreachable(
            url,
            f"connection to {where} refused",
            f"start PostgreSQL or {_URL_REMEDY}",
        )
    if isinstance(exc, ssl.SSLCertVerificationError):
        return DatabaseUnreachable(
            url,
            f"the certificate presented by {where} does not verify ({exc.verify_message})",
            "check that sslrootcert names the CA that signed the server's certificate and, "
            "for sslmode=verify-full, that the URL's host is a name in that certificate",
        )
    if isinstance(exc, ssl.SSLError):
        return DatabaseUnreachable(
            url,
            f"the TLS handshake with {where} failed ({exc.reason or exc})",
            "check the server's TLS configuration and the ssl parameters of the database URL",
        )
    if isinstance(exc, OSError):
        return DatabaseUnreachable(
            url,
            f"cannot reach {where} ({exc.strerror or exc})",
            f"check the network or {_URL_REMEDY}",
        )
    code = sqlstate(exc)
    if code == "3D000":
        return DatabaseUnreachable(
            url,
            f"database {parsed.database!r} does not exist",
            'run "sagaworks db upgrade" to create and migrate it',
        )
    if code in {"28000", "28P01"}:
        return DatabaseUnreachable(
            url,
            f"login refused ({_server_message(exc)})",
            "fix the user and password in the database URL or its /run/secrets file",
        )
    if code == "57P03":
        return DatabaseUnreachable(
            url, "PostgreSQL is starting up or shutting down", "wait until it accepts connections"
        )
    if code == "53300":
        return DatabaseUnreachable(
            url,
            "PostgreSQL has no connection slot left",
            "lower SAGAWORKS_DB_POOL_SIZE or the number of workers, or raise max_connections",
        )
    return None


@asynccontextmanager
async def connect(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """Open a connection of `engine`; a failure to connect raises `DatabaseUnreachable`."""
    try:
        conn = await engine.connect()
    except Exception as exc:
        failure = describe_connect_failure(engine.url.render_as_string(hide_password=False), exc)
        if failure is None:
            raise
        raise failure from exc
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def driver_connection(engine: AsyncEngine) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection of `engine` as asyncpg's own: for listeners, advisory locks and
    many-statement transactions that SQLAlchemy's layer only slows down."""
    async with engine.connect() as conn:
        raw = await conn.get_raw_connection()
        yield cast(asyncpg.Connection, raw.driver_connection)


async def probe_database(url: str, timeout_s: float) -> None:
    """Open one connection to `url` and run `SELECT 1`, or raise `DatabaseUnreachable`."""
    engine = create_engine(url, pool_size=1, max_overflow=0, connect_timeout_s=timeout_s)
    try:
        async with connect(engine) as conn:
            await conn.execute(text("SELECT 1"))
    finally:
        await engine.dispose()
