"""Run the schema migrations from code: what `sagaworks db upgrade|current|downgrade` call.

There is no alembic.ini: the Alembic configuration is built here, pointing at
the `migrations` folder shipped inside the package. Alembic's commands are
synchronous, so they run in a worker thread whose `env.py` drives asyncpg on
its own event loop. Workers never migrate; they call `check_schema_current`
at start-up and refuse to run on a schema they were not built for.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.engine import (
    connect,
    create_engine,
    describe_connect_failure,
    sqlstate,
    to_asyncpg_url,
)
from sagaworks.adapters.postgres.errors import DatabaseUnreachable, SchemaAhead, SchemaBehind
from sagaworks.adapters.postgres.tables import ALEMBIC_VERSION_TABLE

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "check_schema_current",
    "current",
    "downgrade",
    "ensure_database_exists",
    "head",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"

_MAINTENANCE_DATABASE = "postgres"
_INVALID_CATALOG_NAME = "3D000"
_DUPLICATE_DATABASE = "42P04"
_INSUFFICIENT_PRIVILEGE = "42501"

# Alembic keeps the running environment in module globals (`alembic.context`,
# `alembic.op`): two commands in threads of one process would swap each other's
# connection. Commands of one process take turns here; env.py's advisory lock
# makes separate processes take turns.
_ALEMBIC_LOCK = threading.Lock()


def alembic_config(url: str | None = None) -> Config:
    """An Alembic `Config` for the packaged migrations; `url` is the database to migrate."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if url is not None:
        config.attributes["sagaworks_url"] = url
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this sagaworks ships."""
    revision = _scripts().get_current_head()
    if revision is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}: the package is incomplete")
    return revision


async def ensure_database_exists(url: str) -> bool:
    """Create the database named by `url` if it is missing; True when it was created.

    The database is created from the `postgres` maintenance database of the same
    server, so the role needs CREATEDB only the first time.
    """
    name = make_url(to_asyncpg_url(url)).database
    if not name:
        raise ValueError("the database URL names no database: add /NAME after host and port")
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect():
            return False
    except Exception as exc:
        if sqlstate(exc) != _INVALID_CATALOG_NAME:
            failure = describe_connect_failure(url, exc)
            if failure is None:
                raise
            raise failure from exc
    finally:
        await engine.dispose()
    return await _create_database(url, name)


async def _create_database(url: str, name: str) -> bool:
    maintenance = make_url(to_asyncpg_url(url)).set(database=_MAINTENANCE_DATABASE)
    engine = create_engine(
        maintenance.render_as_string(hide_password=False), pool_size=1, max_overflow=0
    )
    try:
        async with connect(engine) as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            exists = await conn.scalar(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": name}
            )
            if exists:
                return False
            quote = conn.dialect.identifier_preparer.quote_identifier
            quoted = quote(name)
            try:
                await conn.execute(text(f"CREATE DATABASE {quoted}"))
            except DBAPIError as exc:
                code = sqlstate(exc)
                if code == _DUPLICATE_DATABASE:
                    return False
                if code == _INSUFFICIENT_PRIVILEGE:
                    raise DatabaseUnreachable(
                        url,
                        f"database {name!r} does not exist and this role may not create it",
                        f"have an administrator run CREATE DATABASE {quoted} OWNER "
                        f"{quote(maintenance.username or 'postgres')}, "
                        'then run "sagaworks db upgrade" again',
                    ) from exc
                raise
            return True
    finally:
        await engine.dispose()


def _run_command(alembic_command: Callable[[Config, str], None], url: str, revision: str) -> None:
    with _ALEMBIC_LOCK:
        alembic_command(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    """Create the database if needed, then migrate it up to `revision`."""
    await ensure_database_exists(url)
    await _refuse_unknown_revision(url)
    await asyncio.to_thread(_run_command, command.upgrade, url, revision)


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database down to `revision` (`base` drops every sagaworks object)."""
    await _refuse_unknown_revision(url)
    await asyncio.to_thread(_run_command, command.downgrade, url, revision)


async def _refuse_unknown_revision(url: str) -> None:
    """A database a newer sagaworks migrated cannot be moved from here: say so in one line."""
    revision = await current(url)
    if revision is not None and revision not in _known_revisions():
        raise SchemaAhead(revision, head())


def _known_revisions() -> set[str]:
    return {script.revision for script in _scripts().walk_revisions()}


def _read_revision(connection: Connection) -> str | None:
    context = MigrationContext.configure(connection, opts={"version_table": ALEMBIC_VERSION_TABLE})
    return context.get_current_revision()


async def current(url: str) -> str | None:
    """The revision the database is at; None when it was never migrated (or downgraded to base)."""
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        return await _engine_revision(engine)
    finally:
        await engine.dispose()


async def _engine_revision(engine: AsyncEngine) -> str | None:
    async with connect(engine) as conn:
        return await conn.run_sync(_read_revision)


async def check_schema_current(engine_or_url: AsyncEngine | str) -> None:
    """Raise `SchemaBehind`/`SchemaAhead` unless the database is exactly at `head()`."""
    if isinstance(engine_or_url, AsyncEngine):
        revision = await _engine_revision(engine_or_url)
    else:
        revision = await current(engine_or_url)
    newest = head()
    if revision == newest:
        return
    if revision is None:
        raise SchemaBehind(None, newest)
    if revision in _known_revisions():
        raise SchemaBehind(revision, newest)
    raise SchemaAhead(revision, newest)
