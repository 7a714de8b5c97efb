"""Alembic environment: runs the sagaworks migrations over one asyncpg connection.

`migrations_runner` calls Alembic's synchronous commands in a worker thread and
hands the database URL over in `config.attributes["sagaworks_url"]`; this
module gives that thread its own event loop. It never touches logging, so the
application's logging configuration stays as it is. An advisory lock makes
concurrent upgrades (two deploys, several workers' init jobs) run one after
another instead of colliding.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from sagaworks.adapters.postgres.engine import connect, create_engine
from sagaworks.adapters.postgres.tables import ALEMBIC_VERSION_TABLE, metadata

MIGRATION_LOCK_KEY = 0x5A6A_0001
"""`pg_advisory_xact_lock` key held while migrations run."""


def _run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=ALEMBIC_VERSION_TABLE,
        transactional_ddl=True,
    )
    with context.begin_transaction():
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        context.run_migrations()


async def _run_online(url: str) -> None:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        async with connect(engine) as connection:
            await connection.run_sync(_run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise RuntimeError(
        "sagaworks migrations run against a live database only: drop --sql and use "
        '"sagaworks db upgrade"'
    )
asyncio.run(_run_online(context.config.attributes["sagaworks_url"]))
