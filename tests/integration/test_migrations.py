"""The migrations against the real PostgreSQL: up, down, up again, and what the schema enforces."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.engine import Connection

from sagaworks.adapters.postgres.engine import create_engine, probe_database
from sagaworks.adapters.postgres.errors import DatabaseUnreachable, SchemaAhead, SchemaBehind
from sagaworks.adapters.postgres.migrations_runner import (
    check_schema_current,
    current,
    downgrade,
    ensure_database_exists,
    head,
    upgrade,
)
from sagaworks.adapters.postgres.tables import ALEMBIC_VERSION_TABLE, OUTBOX_CHANNEL, metadata

pytestmark = pytest.mark.integration

SAGAWORKS_TABLES = set(metadata.tables)
SAGAWORKS_FUNCTIONS = {
    "sagaworks_outbox_notify",
    "sagaworks_saga_history_append_only",
    "sagaworks_dead_letter_audit_stamp",
    "sagaworks_dead_letter_audit_append_only",
}


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def fetch_names(url: str, query: str) -> set[str]:
    conn = await asyncpg.connect(dsn(url))
    try:
        return {row[0] for row in await conn.fetch(query)}
    finally:
        await conn.close()


async def tables_in(url: str) -> set[str]:
    return await fetch_names(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")


async def functions_in(url: str) -> set[str]:
    return await fetch_names(
        url,
        "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'public'",
    )


async def insert_saga(conn: asyncpg.Connection) -> uuid.UUID:
    saga_id = uuid.uuid4()
    await conn.execute(
        "INSERT INTO saga_instances (id, saga_type, correlation_key, status, state, "
        "state_schema_version) VALUES ($1, 'order_fulfilment', $2, 'running', '{}', 1)",
        saga_id,
        str(saga_id),
    )
    return saga_id


async def test_upgrade_downgrade_and_upgrade_again(
    database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await database_factory()
    assert await current(url) is None

    await upgrade(url)

    assert await current(url) == head()
    assert SAGAWORKS_TABLES | {ALEMBIC_VERSION_TABLE} <= await tables_in(url)
    assert await functions_in(url) >= SAGAWORKS_FUNCTIONS

    await downgrade(url, "base")

    assert await current(url) is None
    assert not SAGAWORKS_TABLES & await tables_in(url)
    assert not {name for name in await functions_in(url) if name.startswith("sagaworks_")}

    await upgrade(url)
    assert await current(url) == head()
    assert await tables_in(url) >= SAGAWORKS_TABLES


async def test_migrated_schema_matches_tables_module(migrated_database_url: str) -> None:
    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(
            connection,
            opts={"version_table": ALEMBIC_VERSION_TABLE, "compare_type": True},
        )
        return list(compare_metadata(context, metadata))

    engine = create_engine(migrated_database_url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            differences = await conn.run_sync(diff)
    finally:
        await engine.dispose()
    assert differences == []


async def test_concurrent_upgrades_in_one_process_take_turns(
    database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await database_factory()

    await asyncio.wait_for(asyncio.gather(upgrade(url), upgrade(url), upgrade(url)), timeout=60)

    assert await current(url) == head()


async def test_concurrent_upgrades_in_separate_processes_take_turns(
    database_factory: Callable[[], Awaitable[str]],
) -> None:
    url = await database_factory()
    script = (
        "import asyncio, sys\n"
        "from sagaworks.adapters.postgres.migrations_runner import upgrade\n"
        "asyncio.run(upgrade(sys.argv[1]))\n"
    )
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, url, stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]

    results = await asyncio.wait_for(
        asyncio.gather(*(process.communicate() for process in processes)), timeout=60
    )

    errors = [
        stderr.decode()
        for process, (_, stderr) in zip(processes, results, strict=True)
        if process.returncode != 0
    ]
    assert errors == []
    assert await current(url) == head()


async def test_upgrade_creates_a_missing_database(unused_database_url: str) -> None:
    with pytest.raises(DatabaseUnreachable):
        await probe_database(unused_database_url, timeout_s=5)

    await upgrade(unused_database_url)

    assert await current(unused_database_url) == head()
    assert await ensure_database_exists(unused_database_url) is False


async def test_ensure_database_exists_quotes_the_name(migrated_database_url: str) -> None:
    odd_name = f'{urlsplit(migrated_database_url).path.lstrip("/")}-odd "name"'
    url = with_database(migrated_database_url, odd_name.replace(" ", "%20").replace('"', "%22"))
    admin = await asyncpg.connect(dsn(with_database(migrated_database_url, "postgres")))
    try:
        assert await ensure_database_exists(url) is True
        assert await admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", odd_name) == 1
        assert await ensure_database_exists(url) is False
    finally:
        quoted = '"' + odd_name.replace('"', '""') + '"'
        await admin.execute(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)")
        await admin.close()


async def test_check_schema_current(database_factory: Callable[[], Awaitable[str]]) -> None:
    url = await database_factory()
    with pytest.raises(SchemaBehind) as unmigrated:
        await check_schema_current(url)
    assert str(unmigrated.value) == (
        f"database schema is not migrated but this sagaworks needs {head()}: "
        'run "sagaworks db upgrade"'
    )
    assert unmigrated.value.current is None

    await upgrade(url)
    await check_schema_current(url)
    engine = create_engine(url, pool_size=1, max_overflow=0)
    try:
        await check_schema_current(engine)
    finally:
        await engine.dispose()

    conn = await asyncpg.connect(dsn(url))
    try:
        await conn.execute(f"UPDATE {ALEMBIC_VERSION_TABLE} SET version_num = '9999'")
    finally:
        await conn.close()
    with pytest.raises(SchemaAhead, match=r"database schema is at 9999, a revision this sagaworks"):
        await check_schema_current(url)
    with pytest.raises(SchemaAhead, match=r"database schema is at 9999"):
        await upgrade(url, "head")
    with pytest.raises(SchemaAhead, match=r"database schema is at 9999"):
        await downgrade(url, "base")


def test_schema_behind_names_both_revisions_and_the_command() -> None:
    assert str(SchemaBehind("0001", "0002")) == (
        'database schema is at 0001 but this sagaworks needs 0002: run "sagaworks db upgrade"'
    )


async def test_history_is_append_only(db: asyncpg.Connection) -> None:
    saga_id = await insert_saga(db)
    await db.execute(
        "INSERT INTO saga_history (saga_id, seq, kind) VALUES ($1, 1, 'started')", saga_id
    )

    with pytest.raises(asyncpg.RaiseError, match="saga_history is append-only: UPDATE"):
        await db.execute("UPDATE saga_history SET kind = 'rewritten' WHERE saga_id = $1", saga_id)
    with pytest.raises(asyncpg.RaiseError, match="saga_history is append-only: DELETE"):
        await db.execute("DELETE FROM saga_history WHERE saga_id = $1", saga_id)
    assert await db.fetchval("SELECT kind FROM saga_history WHERE saga_id = $1", saga_id) == (
        "started"
    )

    await db.execute("DELETE FROM saga_instances WHERE id = $1", saga_id)
    assert await db.fetchval("SELECT count(*) FROM saga_history WHERE saga_id = $1", saga_id) == 0


async def insert_outbox_row(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO outbox (message_id, exchange, routing_key, body) "
        "VALUES ($1, 'orders', 'order.fulfilled', $2)",
        str(uuid.uuid4()),
        b"{}",
    )


async def test_outbox_insert_notifies_the_relay(
    db: asyncpg.Connection, migrated_database_url: str
) -> None:
    notifications: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
    listener = await asyncpg.connect(dsn(migrated_database_url))

    def on_notify(_conn: object, _pid: int, channel: str, payload: object) -> None:
        notifications.put_nowait((channel, payload))

    try:
        await listener.add_listener(OUTBOX_CHANNEL, on_notify)
        async with db.transaction():
            await insert_outbox_row(db)
            await asyncio.sleep(0.1)
            assert notifications.empty(), "NOTIFY must wait for the commit"

        assert await asyncio.wait_for(notifications.get(), timeout=5) == (OUTBOX_CHANNEL, "")

        await db.execute(
            "INSERT INTO outbox (message_id, exchange, routing_key, body) "
            "SELECT message_id, exchange, routing_key, body FROM outbox "
            "ON CONFLICT (message_id) DO NOTHING"
        )
        await asyncio.sleep(0.2)
        assert notifications.empty(), "an insert that adds no row must not wake the relay"

        async with db.transaction():
            await db.execute("SELECT set_config('sagaworks.publishes_own_outbox', 'on', true)")
            await insert_outbox_row(db)
        await asyncio.sleep(0.2)
        assert notifications.empty(), "a transaction that publishes its own rows wakes nobody"

        await insert_outbox_row(db)
        assert await asyncio.wait_for(notifications.get(), timeout=5) == (OUTBOX_CHANNEL, ""), (
            "the setting is local to its transaction"
        )
    finally:
        await listener.close()


async def test_constraints_reject_unknown_statuses(db: asyncpg.Connection) -> None:
    with pytest.raises(asyncpg.CheckViolationError, match="ck_saga_instances_status"):
        await db.execute(
            "INSERT INTO saga_instances (id, saga_type, correlation_key, status, state, "
            "state_schema_version) VALUES ($1, 't', 'k', 'paused', '{}', 1)",
            uuid.uuid4(),
        )
    with pytest.raises(asyncpg.CheckViolationError, match="ck_dead_letters_status"):
        await db.execute(
            "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
            "fingerprint, first_failed_at, last_failed_at, status) "
            "VALUES ('m', 'q', 'x', 'r', '', 'bad', 'f', now(), now(), 'lost')"
        )


async def test_purging_a_dead_letter_keeps_its_audit_rows(db: asyncpg.Connection) -> None:
    letter_id = await db.fetchval(
        "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
        "fingerprint, first_failed_at, last_failed_at) "
        "VALUES ('m1', 'q', 'x', 'r', '', 'schema_invalid', 'f', now(), now()) RETURNING id"
    )
    await db.execute(
        "INSERT INTO dead_letter_audit (operator, action, dead_letter_id, outcome) "
        "VALUES ('alice', 'purge', $1, 'ok')",
        letter_id,
    )

    await db.execute("DELETE FROM dead_letters WHERE id = $1", letter_id)

    row = await db.fetchrow("SELECT operator, dead_letter_id FROM dead_letter_audit")
    assert row is not None
    assert (row["operator"], row["dead_letter_id"]) == ("alice", None)


async def test_the_audit_is_append_only_and_stamps_the_role_and_client(
    db: asyncpg.Connection,
) -> None:
    letter_id = await db.fetchval(
        "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
        "fingerprint, first_failed_at, last_failed_at) "
        "VALUES ('m1', 'q', 'x', 'r', '', 'schema_invalid', 'f', now(), now()) RETURNING id"
    )
    # Whatever the insert says, the row names the role and address that really wrote it.
    audit_id = await db.fetchval(
        "INSERT INTO dead_letter_audit (operator, action, dead_letter_id, outcome, db_role, "
        "client_addr, client_hostname) "
        "VALUES ('alice', 'edit', $1, 'saved', 'someone_else', '10.9.9.9', 'laptop') "
        "RETURNING id",
        letter_id,
    )
    row = await db.fetchrow(
        "SELECT operator, db_role, host(client_addr) AS addr, client_hostname, "
        "current_user AS me, host(inet_client_addr()) AS my_addr "
        "FROM dead_letter_audit WHERE id = $1",
        audit_id,
    )
    assert row is not None
    assert (row["operator"], row["client_hostname"]) == ("alice", "laptop")
    assert (row["db_role"], row["addr"]) == (row["me"], row["my_addr"])
    assert row["db_role"] != "someone_else"

    for statement, verb in (
        ("UPDATE dead_letter_audit SET operator = 'mallory'", "UPDATE"),
        ("UPDATE dead_letter_audit SET dead_letter_id = NULL", "UPDATE"),
        ("DELETE FROM dead_letter_audit", "DELETE"),
        ("TRUNCATE dead_letter_audit", "TRUNCATE"),
    ):
        with pytest.raises(asyncpg.RaiseError, match=f"dead_letter_audit is append-only: {verb}"):
            await db.execute(statement)
    assert await db.fetchval("SELECT operator FROM dead_letter_audit") == "alice"

    # Purging the letter still works: the foreign key may clear the link, nothing else.
    await db.execute("DELETE FROM dead_letters WHERE id = $1", letter_id)
    after = await db.fetchrow("SELECT operator, dead_letter_id, db_role FROM dead_letter_audit")
    assert after is not None
    assert (after["operator"], after["dead_letter_id"], after["db_role"]) == (
        "alice",
        None,
        row["me"],
    )


async def test_a_parked_timer_is_left_out_of_the_due_index(db: asyncpg.Connection) -> None:
    saga_id = await insert_saga(db)
    await db.execute(
        "INSERT INTO timers (saga_id, name, fire_at, attempts, last_error, parked_at) "
        "VALUES ($1, 'deadline:x', now(), 3, 'ValueError: no', now())",
        saga_id,
    )
    with pytest.raises(asyncpg.CheckViolationError):
        await db.execute("UPDATE timers SET attempts = -1")
    indexes = await db.fetch(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'timers' ORDER BY 1"
    )
    definitions = {r["indexname"]: r["indexdef"] for r in indexes}
    assert "WHERE (parked_at IS NULL)" in definitions["ix_timers_due"]
    assert "ix_timers_fire_at" not in definitions


async def test_probe_database_on_a_closed_port_says_refused() -> None:
    url = "postgresql://worker:s3cret@127.0.0.1:1/sagaworks"
    with pytest.raises(DatabaseUnreachable) as refused:
        await probe_database(url, timeout_s=5)
    message = str(refused.value)
    assert message == (
        "cannot use PostgreSQL at postgresql://worker:***@127.0.0.1:1/sagaworks: "
        "connection to 127.0.0.1:1 refused; start PostgreSQL or fix the database URL "
        "(SAGAWORKS_DATABASE_URL or SAGAWORKS_MIGRATION_DATABASE_URL)"
    )
    assert "s3cret" not in message


async def test_probe_database_on_a_missing_database_says_run_upgrade(
    migrated_database_url: str,
) -> None:
    url = with_database(migrated_database_url, f"sagaworks_absent_{uuid.uuid4().hex}")
    with pytest.raises(DatabaseUnreachable, match=r'does not exist; run "sagaworks db upgrade"'):
        await probe_database(url, timeout_s=5)
    with pytest.raises(DatabaseUnreachable, match="does not exist"):
        await current(url)


async def test_probe_database_with_an_unknown_role_says_login_refused(
    migrated_database_url: str,
) -> None:
    parts = urlsplit(migrated_database_url)
    netloc = f"no_such_role_{uuid.uuid4().hex[:8]}:pw@{parts.hostname}:{parts.port or 5432}"
    url = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    with pytest.raises(DatabaseUnreachable, match="login refused") as refused:
        await probe_database(url, timeout_s=5)
    assert "fix the user and password" in str(refused.value)
    assert ":pw@" not in str(refused.value)


async def test_probe_database_on_a_silent_server_times_out(silent_port: int) -> None:
    port = silent_port
    with pytest.raises(DatabaseUnreachable, match=f"127.0.0.1:{port} did not answer in time"):
        await probe_database(f"postgresql://postgres@127.0.0.1:{port}/x", timeout_s=0.5)
