"""The `sagaworks` command line, run as the installed console script against the real services.

Every command runs in a subprocess with `SAGAWORKS_DATABASE_URL` pointing at a
database of this test session and `SAGAWORKS_EXCHANGE_PREFIX` at a prefix of
this test, so nothing it creates is shared; all of it is removed afterwards.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from broker_tools import AMQP_URL, PUBLISHERS_JSON, USER, delete_prefixed, rabbitmqctl

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.shop import publish
from sagaworks.adapters.postgres.migrations_runner import current, head
from sagaworks.adapters.rabbitmq.topology import (
    dead_letter_queue_name,
    exchange_name,
    port_queue_name,
    saga_queue_name,
    unstorable_queue_name,
)
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGAWORKS = str(Path(sys.executable).parent / "sagaworks")
BASE = Settings.load(secrets_dir=None)
PORTS = ("inventory", "payments", "shipping")


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


async def sagaworks(*args: str, env: dict[str, str], timeout_s: float = 60.0) -> Run:
    """Run the console script to completion; it is killed if it outlives `timeout_s`."""
    process = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def cli_env(database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The test process's environment, pointed at a private database and name prefix."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAWORKS_")}
    env["SAGAWORKS_AMQP_URL"] = AMQP_URL
    env["SAGAWORKS_DATABASE_URL"] = database_url
    env["SAGAWORKS_EXCHANGE_PREFIX"] = prefix
    env["SAGAWORKS_PUBLISHERS"] = PUBLISHERS_JSON
    env["SAGAWORKS_LOG_FORMAT"] = "json"
    env.update(extra)
    return env


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or 'postgres'}:{password}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def prefix(run_id: str, broker: aio_pika.abc.AbstractRobustConnection) -> AsyncIterator[str]:
    """A name prefix for one test; its queues and exchanges are deleted afterwards."""
    test_prefix = f"{run_id}.cli{secrets.token_hex(3)}."
    yield test_prefix
    await delete_prefixed(broker, test_prefix)


@pytest.fixture
async def missing_database_url(
    database_factory: Callable[[], Awaitable[str]],
) -> AsyncIterator[str]:
    """URL of a database nobody created (dropped afterwards if the test made it)."""
    sibling = await database_factory()
    name = f"{urlsplit(sibling).path.lstrip('/')}_cli_missing"
    yield with_database(sibling, name)
    admin = await asyncpg.connect(dsn(with_database(sibling, "postgres")))
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def queue_depth(connection: aio_pika.abc.AbstractRobustConnection, name: str) -> int:
    async with connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        count = queue.declaration_result.message_count
        assert count is not None
        return count


# --- config show -------------------------------------------------------------------------------


async def test_config_show_prints_every_setting_with_passwords_masked(
    database_factory: Callable[[], Awaitable[str]], prefix: str
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    database_url = with_password(await database_factory(), password)
    amqp_password = f"amqp-{secrets.token_hex(8)}"
    env = cli_env(
        database_url,
        prefix,
        SAGAWORKS_PREFETCH="7",
        SAGAWORKS_AMQP_URL=f"amqp://svc:{amqp_password}@broker.example:5672/shop",
        SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports", "shop.returns"]',
    )

    run = await sagaworks("config", "show", env=env)

    assert run.code == 0, run.stderr
    shown = {}
    for line in run.stdout.splitlines():
        variable, _, value = line.partition(" ")
        shown[variable] = value.strip()
    assert set(shown) == {f"SAGAWORKS_{name.upper()}" for name in Settings.model_fields}
    assert shown["SAGAWORKS_DATABASE_URL"] == with_password(database_url, "***")
    assert shown["SAGAWORKS_AMQP_URL"] == "amqp://svc:***@broker.example:5672/shop"
    assert shown["SAGAWORKS_PREFETCH"] == "7"
    assert shown["SAGAWORKS_EXCHANGE_PREFIX"] == prefix
    assert shown["SAGAWORKS_SAGAS"] == "sagas.order_fulfilment.http_ports,shop.returns"
    for secret in (password, amqp_password):
        assert secret not in run.stdout + run.stderr


async def test_config_show_masks_passwords_given_as_query_parameters(
    database_factory: Callable[[], Awaitable[str]], prefix: str
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    key_password = f"key-{secrets.token_hex(8)}"
    migration_password = f"mig-{secrets.token_hex(8)}"
    database_url = await database_factory()
    env = cli_env(
        f"{database_url}?password={password}&sslmode=require&sslpassword={key_password}",
        prefix,
        SAGAWORKS_MIGRATION_DATABASE_URL=f"{database_url}?PASSWORD={migration_password}",
    )

    run = await sagaworks("config", "show", "--json", env=env)

    assert run.code == 0, run.stderr
    shown = json.loads(run.stdout)
    assert shown["database_url"] == f"{database_url}?password=***&sslmode=require&sslpassword=***"
    assert shown["migration_database_url"] == f"{database_url}?PASSWORD=***"
    for secret in (password, key_password, migration_password):
        assert secret not in run.stdout + run.stderr


async def test_config_show_json_is_one_object(
    database_factory: Callable[[], Awaitable[str]], prefix: str
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    database_url = with_password(await database_factory(), password)
    env = cli_env(database_url, prefix, SAGAWORKS_DELIVERY_LIMIT="9")

    run = await sagaworks("config", "show", "--json", env=env)

    assert run.code == 0, run.stderr
    public = json.loads(run.stdout)
    assert set(public) == set(Settings.model_fields)
    assert public["database_url"] == with_password(database_url, "***")
    assert public["delivery_limit"] == 9
    assert public["exchange_prefix"] == prefix
    assert public["sagas"] == []
    assert password not in run.stdout + run.stderr


async def test_config_show_with_an_invalid_setting_is_one_line_and_exit_2(prefix: str) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    env = cli_env(f"mysql://root:{password}@localhost/shop", prefix)

    run = await sagaworks("config", "show", env=env)

    assert run.code == 2
    assert run.stdout == ""
    (line,) = run.stderr.splitlines()
    assert line.startswith("sagaworks: error: invalid settings: SAGAWORKS_DATABASE_URL: ")
    assert password not in run.stderr


# --- db upgrade | current | downgrade ----------------------------------------------------------


@pytest.mark.slow
async def test_db_upgrade_creates_and_migrates_then_downgrade_empties(
    missing_database_url: str, prefix: str
) -> None:
    env = cli_env(missing_database_url, prefix)
    newest = head()

    upgraded = await sagaworks("db", "upgrade", env=env)

    assert upgraded.code == 0, upgraded.stderr
    assert upgraded.stdout.splitlines() == [
        "created the database",
        f"database at revision {newest}",
    ]
    assert await current(missing_database_url) == newest

    state = await sagaworks("db", "current", env=env)
    assert state.code == 0, state.stderr
    assert state.stdout.strip() == f"{newest} (up to date)"

    again = await sagaworks("db", "upgrade", env=env)
    assert again.code == 0, again.stderr
    assert again.stdout.splitlines() == [f"database at revision {newest}"], "nothing to create"

    downgraded = await sagaworks("db", "downgrade", "base", env=env)
    assert downgraded.code == 0, downgraded.stderr
    assert downgraded.stdout.strip() == "database at revision base"
    assert await current(missing_database_url) is None

    state = await sagaworks("db", "current", env=env)
    assert state.code == 0, state.stderr
    assert state.stdout.strip() == f"not migrated (behind; newest is {newest})"


@pytest.mark.parametrize(
    "command",
    [("db", "current"), ("dlq", "list"), ("dlq", "show", "1"), ("db", "prune", "--dry-run")],
    ids=" ".join,
)
async def test_a_command_on_a_missing_database_is_one_line_and_exit_3(
    missing_database_url: str, prefix: str, command: tuple[str, ...]
) -> None:
    run = await sagaworks(*command, env=cli_env(missing_database_url, prefix))

    assert run.code == 3
    assert "Traceback" not in run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith("sagaworks: error: cannot use PostgreSQL at ")
    assert "does not exist" in line


# --- topology apply ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_topology_apply_twice_declares_once_and_keeps_messages(
    database_factory: Callable[[], Awaitable[str]],
    prefix: str,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    env = cli_env(await database_factory(), prefix, SAGAWORKS_SAGAS='["sagas.order_fulfilment"]')
    saga_queue = saga_queue_name(prefix, "order_fulfilment")
    expected_queues = {
        saga_queue,
        dead_letter_queue_name(prefix),
        unstorable_queue_name(prefix),
        *(port_queue_name(prefix, port) for port in PORTS),
    }

    first = await sagaworks("topology", "apply", env=env)

    assert first.code == 0, first.stderr
    assert "exchanges" in first.stdout
    assert "queues" in first.stdout
    declared = {
        row["name"]: row
        for row in await rabbitmqctl("list_queues", "name", "type", "durable", "arguments")
        if row["name"].startswith(prefix)
    }
    assert expected_queues <= set(declared)
    assert all(row["type"] == "quorum" and row["durable"] for row in declared.values())
    orders = exchange_name(prefix, "orders")
    assert orders in {row["name"] for row in await rabbitmqctl("list_exchanges", "name")}

    async with broker.channel(publisher_confirms=True, on_return_raises=True) as channel:
        exchange = await channel.get_exchange(orders)
        await publish(
            exchange,
            OrderPlaced(
                order_id="cli-kept-1",
                customer_id="c-1",
                lines=(OrderLine(sku="sku-1", quantity=1),),
                amount_cents=100,
                currency="EUR",
                dispatch_by=datetime.now(UTC) + timedelta(days=1),
            ),
            "cli-kept-1",
            source="tests/cli",
            user_id=USER,
        )
    assert await queue_depth(broker, saga_queue) == 1

    second = await sagaworks("topology", "apply", env=env)

    assert second.code == 0, second.stderr
    assert second.stdout == first.stdout
    after = {
        row["name"]: row
        for row in await rabbitmqctl("list_queues", "name", "type", "durable", "arguments")
        if row["name"].startswith(prefix)
    }
    assert after == declared, "a second apply must not change or add anything"
    assert await queue_depth(broker, saga_queue) == 1, "a second apply must keep queued messages"


async def test_topology_apply_with_the_broker_down_is_one_line_and_exit_5(
    database_factory: Callable[[], Awaitable[str]], prefix: str
) -> None:
    env = cli_env(
        await database_factory(), prefix, SAGAWORKS_AMQP_URL="amqp://guest:guest@127.0.0.1:1/"
    )

    run = await sagaworks("topology", "apply", env=env)

    assert run.code == 5
    assert "Traceback" not in run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith("sagaworks: error: cannot reach RabbitMQ at 127.0.0.1:1: ")
