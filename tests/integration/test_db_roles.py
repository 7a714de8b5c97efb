"""The PostgreSQL roles `sagaworks db roles` creates: each does its job, and nothing more.

Roles are cluster-wide, so every role here is named under a prefix of this
test session's own and dropped at teardown (with what it owns and was granted).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from uuid import uuid4

import asyncpg
import pytest
from engine_harness import EngineHarness

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX
from sagaworks.adapters.postgres.dead_letters import PostgresDeadLetters
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.migrations_runner import (
    check_schema_current,
    downgrade,
    upgrade,
)
from sagaworks.adapters.postgres.roles import (
    RoleNames,
    apply_roles,
    scram_sha_256_verifier,
    table_grants,
)
from sagaworks.application.ports import AuditRecord
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGAWORKS = str(Path(sys.executable).parent / "sagaworks")
BASE = Settings.load(secrets_dir=None)


def _plain(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def as_role(url: str, role: str, password: str) -> str:
    """`url` with `role` and `password` as the credentials."""
    parts = urlsplit(_plain(url))
    host = parts.hostname or "localhost"
    netloc = f"{role}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@dataclass(frozen=True)
class Deployment:
    """A private database with the four roles applied; URLs connect as each of them."""

    admin: str
    names: RoleNames
    passwords: dict[str, str]

    def url(self, role: str) -> str:
        return as_role(self.admin, role, self.passwords[role])

    async def connect(self, role: str) -> asyncpg.Connection:
        return await asyncpg.connect(self.url(role))


async def _drop_roles(database_url: str, names: RoleNames) -> None:
    conn = await asyncpg.connect(_plain(database_url))
    try:
        # One role at a time, grantees first: the migrator's default privileges name them.
        for role in (*names.grantees(), names.migrator):
            if await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role):
                await conn.execute(f'DROP OWNED BY "{role}" CASCADE')
                await conn.execute(f'DROP ROLE "{role}"')
    finally:
        await conn.close()


@pytest.fixture
async def deployment(
    database_factory: Callable[[], Awaitable[str]], run_id: str
) -> AsyncIterator[Deployment]:
    admin = await database_factory()
    names = RoleNames.with_prefix(f"{run_id}_{secrets.token_hex(2)}_")
    passwords = {role: secrets.token_urlsafe(12) for role in (names.migrator, *names.grantees())}
    try:
        await apply_roles(admin, names, passwords)
        yield Deployment(admin, names, passwords)
    finally:
        await _drop_roles(admin, names)


async def sagaworks(*args: str, **env: str) -> tuple[int, str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAWORKS_")}
    process = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        *args,
        env={**clean, "SAGAWORKS_LOG_FORMAT": "json", **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def upgrade_as_migrator(d: Deployment) -> None:
    code, out, err = await sagaworks(
        "db",
        "upgrade",
        SAGAWORKS_MIGRATION_DATABASE_URL=d.url(d.names.migrator),
        SAGAWORKS_DB_ROLE_PREFIX=d.names.migrator.removesuffix("migrator"),
    )
    assert code == 0, err
    assert "database at revision" in out
    for password in d.passwords.values():
        assert password not in out + err


async def refused(conn: asyncpg.Connection, sql: str, *args: Any) -> str:
    """Run `sql` expecting PostgreSQL to refuse it for lack of privilege; the refusal."""
    with pytest.raises(asyncpg.InsufficientPrivilegeError) as refusal:
        async with conn.transaction():
            await conn.execute(sql, *args)
    return str(refusal.value)


async def test_the_migrator_owns_the_schema_it_migrates(deployment: Deployment) -> None:
    d = deployment
    await upgrade_as_migrator(d)

    conn = await d.connect(d.names.migrator)
    try:
        owners = await conn.fetch(
            "SELECT c.relname, r.rolname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
            "WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace"
        )
        assert {row["relname"] for row in owners} == set(table_grants(d.names))
        assert {row["rolname"] for row in owners} == {d.names.migrator}
        await conn.execute("ALTER TABLE saga_instances ADD COLUMN probe int")
        await conn.execute("ALTER TABLE saga_instances DROP COLUMN probe")
    finally:
        await conn.close()


async def test_a_migrator_that_may_not_create_the_read_schema_is_told_to_run_db_roles(
    deployment: Deployment,
) -> None:
    d = deployment
    admin = await asyncpg.connect(_plain(d.admin))
    try:
        database = await admin.fetchval("SELECT current_database()")
        await admin.execute(f'REVOKE CREATE ON DATABASE "{database}" FROM "{d.names.migrator}"')
    finally:
        await admin.close()

    code, _, err = await sagaworks(
        "db",
        "upgrade",
        SAGAWORKS_MIGRATION_DATABASE_URL=d.url(d.names.migrator),
        SAGAWORKS_DB_ROLE_PREFIX=d.names.migrator.removesuffix("migrator"),
    )

    assert code != 0
    assert "may not create the schema sagaworks_read" in err
    assert "run `sagaworks db roles` as an administrator" in err


async def test_roles_command_is_idempotent_and_keeps_passwords_out_of_output(
    deployment: Deployment,
) -> None:
    d = deployment
    await upgrade_as_migrator(d)
    prefix = d.names.migrator.removesuffix("migrator")
    secret_env = {
        "SAGAWORKS_ADMIN_DATABASE_URL": d.admin,
        "SAGAWORKS_DB_ROLE_PREFIX": prefix,
        "SAGAWORKS_DB_WORKER_PASSWORD": d.passwords[d.names.worker],
    }
    for _ in range(2):
        code, out, err = await sagaworks("db", "roles", **secret_env)
        assert code == 0, err
        assert "created: none" in out
        assert f"passwords set: {d.names.worker}" in out
        assert d.passwords[d.names.worker] not in out + err
    code, out, _ = await sagaworks("config", "show", **secret_env)
    assert d.passwords[d.names.worker] not in out
    assert "SAGAWORKS_DB_WORKER_PASSWORD" in out


async def test_a_migrator_that_is_no_superuser_cannot_create_roles(
    deployment: Deployment,
) -> None:
    d = deployment
    code, _, err = await sagaworks(
        "db",
        "roles",
        SAGAWORKS_MIGRATION_DATABASE_URL=d.url(d.names.migrator),
        SAGAWORKS_DB_ROLE_PREFIX=d.names.migrator.removesuffix("migrator"),
    )
    assert code == 3
    assert "SAGAWORKS_ADMIN_DATABASE_URL" in err
    assert len(err.strip().splitlines()) == 1, err


async def test_the_worker_runs_a_saga_but_cannot_rewrite_history_or_the_schema(
    deployment: Deployment, run_id: str, settings_factory: Callable[..., Settings]
) -> None:
    d = deployment
    await upgrade_as_migrator(d)
    worker_url = d.url(d.names.worker)
    await check_schema_current(worker_url)

    settings = settings_factory(
        database_url=worker_url,
        exchange_prefix=f"{run_id}.{secrets.token_hex(3)}.",
        grace_period_s=5.0,
        db_pool_size=3,
    )
    harness = EngineHarness(settings, d.admin)
    await harness.open()
    try:
        await harness.start_worker()
        oid = "o-roles"
        order = OrderPlaced(
            order_id=oid,
            customer_id=f"{DECLINED_CUSTOMER_PREFIX}{oid}",
            lines=(OrderLine(sku="sku-1", quantity=1),),
            amount_cents=100,
            currency="EUR",
            dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
        )
        await harness.publish(order, f"{oid}/placed")
        saga = await harness.wait_for_status(oid, "compensated", timeout_s=20)
        assert saga.status == "compensated"
        assert len(await harness.history(oid)) > 2
    finally:
        await harness.close()

    worker = await d.connect(d.names.worker)
    try:
        assert await worker.fetchval("SELECT count(*) FROM saga_history") > 2
        await refused(worker, "UPDATE saga_history SET kind = 'rewritten'")
        await refused(worker, "DELETE FROM saga_history")
        await refused(worker, "TRUNCATE saga_history")
        await refused(worker, "TRUNCATE saga_instances")
        await refused(worker, "ALTER TABLE saga_instances ADD COLUMN probe int")
        await refused(worker, "DROP TABLE timers")
        await refused(worker, "UPDATE dead_letter_audit SET operator = 'someone else'")
        await refused(worker, "DELETE FROM dead_letter_audit")
        await refused(worker, "CREATE TABLE worker_owned (id int)")
        await refused(worker, "UPDATE sagaworks_alembic_version SET version_num = '0001'")
    finally:
        await worker.close()


async def _a_dead_letter(worker: asyncpg.Connection, message_id: str) -> int:
    row_id: int = await worker.fetchval(
        "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
        "fingerprint, first_failed_at, last_failed_at) VALUES ($1, 'q', 'orders', "
        "'order.placed', '\\x7b7d', 'invalid_body', 'f', now(), now()) RETURNING id",
        message_id,
    )
    return row_id


async def test_the_operator_handles_dead_letters_and_sagas_but_cannot_rewrite_the_audit(
    deployment: Deployment,
) -> None:
    d = deployment
    await upgrade_as_migrator(d)
    worker = await d.connect(d.names.worker)
    try:
        first, second, third = [await _a_dead_letter(worker, f"m{i}") for i in range(3)]
    finally:
        await worker.close()

    engine = create_engine(d.url(d.names.operator), pool_size=1, max_overflow=0)
    letters = PostgresDeadLetters(engine)
    audit = AuditRecord(operator="ops", action="test", batch_id=uuid4(), outcome="ok")
    try:
        assert await letters.archive([first], audit) == 1
        await letters.save_body(second, b'{"fixed": true}', audit)
        letter = await letters.get(second)
        assert letter is not None
        row = await letters.stage_replay(letter, f"replay-{uuid4()}", {})
        await letters.confirm_replay(second, row.id, audit)
        row = await letters.stage_replay(letter, f"replay-{uuid4()}", {})
        await letters.abandon_replay(second, row.id, audit)
        assert await letters.purge([third], audit) == 1
        assert len(await letters.history(first)) == 1
    finally:
        await engine.dispose()

    operator = await d.connect(d.names.operator)
    try:
        assert await operator.fetchval("SELECT count(*) FROM saga_instances") == 0
        await refused(operator, "UPDATE dead_letter_audit SET operator = 'someone else'")
        await refused(operator, "DELETE FROM dead_letter_audit")
        await refused(operator, "TRUNCATE dead_letter_audit")
        # It acts on sagas as messages do (saga rows, history, outbox), but never rewrites
        # a saga's history or the operator audit, and never removes a saga.
        await refused(operator, "UPDATE saga_history SET kind = 'x'")
        await refused(operator, "DELETE FROM saga_history")
        await refused(operator, "DELETE FROM saga_instances")
        await refused(operator, "INSERT INTO saga_instances (id) VALUES ($1)", uuid4())
        await refused(operator, "UPDATE operator_audit SET operator = 'someone else'")
        await refused(operator, "DELETE FROM operator_audit")
        await refused(operator, "ALTER TABLE dead_letters ADD COLUMN probe int")
    finally:
        await operator.close()


async def test_the_readonly_role_reads_everything_and_writes_nothing(
    deployment: Deployment,
) -> None:
    d = deployment
    await upgrade_as_migrator(d)
    readonly = await d.connect(d.names.readonly)
    try:
        for table in table_grants(d.names):
            await readonly.fetchval(f'SELECT count(*) FROM "{table}"')
        for view in ("stuck_sagas", "dead_letter_sagas"):
            assert await readonly.fetchval(f"SELECT count(*) FROM sagaworks_read.{view}") == 0
        await refused(
            readonly,
            "INSERT INTO dead_letters (message_id, queue, exchange, routing_key, body, reason, "
            "fingerprint) VALUES ('m', 'q', 'e', 'k', '\\x00', 'r', 'f')",
        )
        await refused(readonly, "UPDATE saga_instances SET status = 'completed'")
        await refused(readonly, "DELETE FROM outbox")
        await refused(readonly, "TRUNCATE timers")
    finally:
        await readonly.close()


async def test_a_table_a_later_migration_creates_is_readable_and_append_only_until_reconciled(
    deployment: Deployment,
) -> None:
    d = deployment
    await upgrade_as_migrator(d)
    migrator = await d.connect(d.names.migrator)
    try:
        await migrator.execute("CREATE TABLE later_table (id int)")
    finally:
        await migrator.close()
    worker = await d.connect(d.names.worker)
    readonly = await d.connect(d.names.readonly)
    try:
        await worker.execute("INSERT INTO later_table VALUES (1)")
        await refused(worker, "UPDATE later_table SET id = 2")
        assert await readonly.fetchval("SELECT count(*) FROM later_table") == 1
    finally:
        await worker.close()
        await readonly.close()


async def test_the_password_verifier_is_the_one_postgresql_computes(
    deployment: Deployment,
) -> None:
    d = deployment
    role = d.names.readonly
    password = "pässwörd ﬁ\u00a0x"  # NFKC folds the ligature, a no-break space becomes a space
    conn = await asyncpg.connect(_plain(d.admin))
    try:
        await conn.execute("SET password_encryption = 'scram-sha-256'")
        await conn.execute(f"ALTER ROLE \"{role}\" PASSWORD '{password}'")
        stored: str = await conn.fetchval(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1", role
        )
    finally:
        await conn.close()
    iterations, salt = stored.split("$")[1].split(":")
    ours = scram_sha_256_verifier(password, salt=base64.b64decode(salt), iterations=int(iterations))
    assert ours == stored


async def test_a_schema_a_superuser_migrated_is_handed_to_the_migrator(
    deployment: Deployment,
) -> None:
    d = deployment
    await upgrade(d.admin, "head")
    await apply_roles(d.admin, d.names, {})

    migrator_url = d.url(d.names.migrator)
    await downgrade(migrator_url, "base")
    await upgrade_as_migrator(d)
    readonly = await d.connect(d.names.readonly)
    try:
        assert await readonly.fetchval("SELECT count(*) FROM saga_instances") == 0
        assert await readonly.fetchval("SELECT count(*) FROM sagaworks_read.stuck_sagas") == 0
    finally:
        await readonly.close()
