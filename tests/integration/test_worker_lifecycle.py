"""The `sagaworks worker` process: clear start-up failures, and a graceful stop.

Each test runs the installed console script as a subprocess against the shared
RabbitMQ and PostgreSQL, under an exchange/queue prefix and in databases of its
own. Start-up failures must be one line on stderr and the exit code
`cli/errors.py` assigns; a SIGTERM or SIGINT while port calls are in flight
must settle them, flush the outbox and exit 0 within the grace period, leaving
exactly the unfinished work in the queues for the next worker.
"""

from __future__ import annotations

import json
import secrets
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import AMQP_URL, rabbitmqctl
from order_service import publish_orders
from pydantic import ValidationError
from worker_processes import Spawn, eventually, worker_env

from sagaworks.adapters.postgres.errors import DatabaseUnreachable, SchemaBehind
from sagaworks.adapters.rabbitmq.errors import (
    BrokerAuthenticationFailed,
    BrokerUnreachable,
    TopologyConflict,
)
from sagaworks.adapters.rabbitmq.topology import (
    dead_letter_exchange_name,
    dead_letter_queue_name,
    port_queue_name,
    saga_queue_name,
)
from sagaworks.entrypoints.cli.errors import EXIT_CODES
from sagaworks.entrypoints.cli.loading import NoSagaToRun
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


BASE = Settings.load(secrets_dir=None)

SAGA = "order_fulfilment"
PORT_OF_STEP = {
    "reserve_stock": "inventory",
    "authorise_payment": "payments",
    "book_shipment": "shipping",
}
PORTS = tuple(PORT_OF_STEP.values())
WAITING_STEP = "await_dispatch"

GRACE_PERIOD_S = 10.0
PORT_LATENCY_S = 1.0
PREFETCH = 4
ORDERS = 24


def exit_code_of(error: type[BaseException]) -> int:
    """The exit code `run_async` gives `error` (first matching entry, as it looks them up)."""
    return next(code for kind, code in EXIT_CODES.items() if issubclass(error, kind))


# --- broker and database -----------------------------------------------------------------------


def dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def with_port(url: str, port: int, password: str | None = None) -> str:
    parts = urlsplit(url)
    user = parts.username or "guest"
    credentials = user if password is None else f"{user}:{password}"
    netloc = f"{credentials}@{parts.hostname or 'localhost'}:{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


async def queue_state(connection: AbstractRobustConnection, name: str) -> tuple[int, int]:
    """(ready messages, consumers) of queue `name`, which must exist."""
    async with connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        result = queue.declaration_result
        assert result.message_count is not None
        assert result.consumer_count is not None
        return result.message_count, result.consumer_count


async def consuming(connection: AbstractRobustConnection, queues: list[str]) -> bool:
    for name in queues:
        try:
            _, consumers = await queue_state(connection, name)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            return False
        if consumers == 0:
            return False
    return True


async def drain_and_return(
    connection: AbstractRobustConnection, name: str
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message ready in queue `name`, fetched unacknowledged and then returned to it."""
    messages = []
    async with connection.channel() as channel:
        queue = await channel.declare_queue(name, passive=True)
        while (message := await queue.get(no_ack=False, fail=False, timeout=5)) is not None:
            messages.append(message)
        for message in messages:
            await message.nack(requeue=True)
    return messages


async def place_orders(connection: AbstractRobustConnection, prefix: str, count: int) -> set[str]:
    """Publish `count` orders as the order service would; returns their order ids."""
    run = secrets.token_hex(3)
    order_ids = {f"wl-{run}-{n}" for n in range(count)}
    await publish_orders(connection, prefix, sorted(order_ids), quantity=2)
    return order_ids


async def sagas_by_order(db: asyncpg.Connection) -> dict[str, asyncpg.Record]:
    rows = await db.fetch(
        "SELECT id, correlation_key, status, current_step FROM saga_instances WHERE saga_type = $1",
        SAGA,
    )
    return {row["correlation_key"]: row for row in rows}


async def completed_steps(db: asyncpg.Connection) -> Counter[tuple[uuid.UUID, str]]:
    rows = await db.fetch("SELECT saga_id, step FROM saga_history WHERE kind = 'step_completed'")
    return Counter((row["saga_id"], row["step"]) for row in rows)


# --- start-up failures -------------------------------------------------------------------------


async def start_and_fail(spawn: Spawn, env: dict[str, str]) -> tuple[int, str, str]:
    worker = await spawn(env, "failing")
    code = await worker.wait_for_exit(60)
    return code, worker.stdout(), worker.stderr()


def assert_one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    (line,) = lines
    assert line.startswith("sagaworks: error: ")
    return line


def test_start_up_failures_have_distinct_exit_codes() -> None:
    codes = {
        exit_code_of(kind)
        for kind in (ValidationError, DatabaseUnreachable, SchemaBehind, BrokerUnreachable)
    }
    codes.add(exit_code_of(TopologyConflict))
    codes.add(exit_code_of(NoSagaToRun))
    assert len(codes) == 6
    assert 0 not in codes
    assert 1 not in codes
    assert exit_code_of(BrokerAuthenticationFailed) == exit_code_of(BrokerUnreachable)


async def test_invalid_settings(spawn: Spawn, prefix: str) -> None:
    env = worker_env("postgresql://postgres@127.0.0.1:1/unused", prefix, SAGAWORKS_PREFETCH="0")

    code, stdout, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(ValidationError)
    line = assert_one_error_line(stderr)
    assert line.startswith("sagaworks: error: invalid settings: SAGAWORKS_PREFETCH: ")
    assert stdout == ""


async def test_no_saga_configured(spawn: Spawn, prefix: str) -> None:
    env = worker_env("postgresql://postgres@127.0.0.1:1/unused", prefix)
    del env["SAGAWORKS_SAGAS"]

    code, stdout, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(NoSagaToRun)
    line = assert_one_error_line(stderr)
    assert line == (
        "sagaworks: error: no saga to run: set SAGAWORKS_SAGAS, "
        """e.g. SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports"]'"""
    )
    assert stdout == ""


async def test_database_unreachable(spawn: Spawn, prefix: str) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    url = with_port(BASE.database_url.get_secret_value(), 1, password)
    env = worker_env(url, prefix)

    code, stdout, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(DatabaseUnreachable)
    line = assert_one_error_line(stderr)
    assert "cannot use PostgreSQL at " in line
    assert ":1" in line
    assert "refused" in line
    assert password not in stdout + stderr


async def test_database_schema_behind(
    spawn: Spawn, prefix: str, database_factory: Callable[[], Awaitable[str]]
) -> None:
    env = worker_env(await database_factory(), prefix)

    code, _stdout, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(SchemaBehind)
    line = assert_one_error_line(stderr)
    assert "database schema is not migrated" in line
    assert line.endswith('run "sagaworks db upgrade"')


async def test_broker_unreachable(spawn: Spawn, prefix: str, migrated_database_url: str) -> None:
    env = worker_env(
        migrated_database_url, prefix, SAGAWORKS_AMQP_URL=with_port(AMQP_URL, 1, "guest")
    )

    code, _, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(BrokerUnreachable)
    line = assert_one_error_line(stderr)
    assert "cannot reach RabbitMQ at " in line
    assert ":1" in line


async def test_bad_broker_credentials(
    spawn: Spawn, prefix: str, migrated_database_url: str
) -> None:
    password = f"not-the-password-{secrets.token_hex(8)}"
    parts = urlsplit(AMQP_URL)
    amqp_url = with_port(AMQP_URL, parts.port or 5672, password)
    env = worker_env(migrated_database_url, prefix, SAGAWORKS_AMQP_URL=amqp_url)

    code, stdout, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(BrokerAuthenticationFailed)
    line = assert_one_error_line(stderr)
    assert f'refused user "{parts.username or "guest"}"' in line
    assert "Check the user name and password" in line
    assert password not in stdout + stderr


async def test_topology_conflict_names_the_queue_and_argument(
    spawn: Spawn,
    prefix: str,
    migrated_database_url: str,
    broker: AbstractRobustConnection,
) -> None:
    saga_queue = saga_queue_name(prefix, SAGA)
    async with broker.channel() as channel:
        await channel.declare_queue(
            saga_queue,
            durable=True,
            arguments={
                "x-queue-type": "quorum",
                "x-dead-letter-exchange": dead_letter_exchange_name(prefix),
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
                "x-delivery-limit": 3,
            },
        )
    env = worker_env(migrated_database_url, prefix, SAGAWORKS_DELIVERY_LIMIT="5")

    code, _, stderr = await start_and_fail(spawn, env)

    assert code == exit_code_of(TopologyConflict)
    line = assert_one_error_line(stderr)
    assert f'queue "{saga_queue}" exists with x-delivery-limit=3 but sagaworks declares 5' in line
    assert "SAGAWORKS_DELIVERY_LIMIT=3" in line
    rows = await rabbitmqctl("list_queues", "name", "arguments")
    (existing,) = (row for row in rows if row["name"] == saga_queue)
    arguments = {key: value for key, _type, value in existing["arguments"]}
    assert arguments["x-delivery-limit"] == 3, "the worker must leave the existing queue alone"


# --- graceful stop -----------------------------------------------------------------------------


async def unacknowledged_on_port_queues(prefix: str) -> int:
    ports = {port_queue_name(prefix, port) for port in PORTS}
    rows = await rabbitmqctl("list_queues", "name", "messages_unacknowledged")
    return sum(row["messages_unacknowledged"] for row in rows if row["name"] in ports)


async def eager_steps_in_flight(db: asyncpg.Connection) -> int:
    """Step commands a worker runs itself (leased) whose results are not committed yet."""
    count: int = await db.fetchval(
        "SELECT count(*) FROM outbox WHERE lease_until IS NOT NULL AND published_at IS NULL"
    )
    return count


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_stop_with_steps_in_flight_loses_nothing_and_exits_0(
    stop_signal: signal.Signals,
    spawn: Spawn,
    prefix: str,
    migrated_database_url: str,
    db: asyncpg.Connection,
    broker: AbstractRobustConnection,
) -> None:
    env = worker_env(
        migrated_database_url,
        prefix,
        SAGAWORKS_GRACE_PERIOD_S=str(GRACE_PERIOD_S),
        SAGAWORKS_PREFETCH=str(PREFETCH),
        ORDER_FULFILMENT_SIM_LATENCY_S=str(PORT_LATENCY_S),
    )
    saga_queue = saga_queue_name(prefix, SAGA)
    port_queues = {port: port_queue_name(prefix, port) for port in PORTS}
    every_queue = [saga_queue, *port_queues.values()]

    first = await spawn(env, "first")
    await eventually(
        lambda: consuming(broker, every_queue),
        "the first worker to consume",
        timeout_s=60,
        workers=(first,),
    )
    order_ids = await place_orders(broker, prefix, ORDERS)

    async def mid_work() -> bool:
        sagas = await sagas_by_order(db)
        if set(sagas) != order_ids or not await completed_steps(db):
            return False
        # Port calls in flight: run eagerly by the worker, or delivered from a port's queue.
        if await eager_steps_in_flight(db) > 0:
            return True
        return await unacknowledged_on_port_queues(prefix) > 0

    await eventually(
        mid_work,
        "every saga to start and port calls to be in flight",
        timeout_s=60,
        workers=(first,),
    )

    code, took_s = await first.stop(stop_signal, timeout_s=GRACE_PERIOD_S + 20)

    assert code == 0, first.output()
    assert took_s < GRACE_PERIOD_S, f"stopping took {took_s:.1f} s\n{first.output()}"
    assert "Traceback" not in first.stderr()

    # Nothing lost: every order has its saga, every committed message was published ...
    sagas = await sagas_by_order(db)
    assert set(sagas) == order_ids
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    assert (await queue_state(broker, dead_letter_queue_name(prefix)))[0] == 0

    # ... and what is queued is exactly the work not done yet: one command per saga whose
    # current step is a port call, in that port's queue, and no order left unread.
    assert await drain_and_return(broker, saga_queue) == []
    queued: list[tuple[str, uuid.UUID, str]] = []
    seen: dict[tuple[str, uuid.UUID, str], list[str]] = {}
    returned = 0
    most_deliveries = 0
    for port, queue in port_queues.items():
        for message in await drain_and_return(broker, queue):
            command = json.loads(message.body)
            assert command["port"] == port
            assert command["kind"] == "action"
            entry = (port, uuid.UUID(command["saga_id"]), command["step"])
            queued.append(entry)
            deliveries = (message.headers or {}).get("x-delivery-count")
            returned += bool(deliveries)
            most_deliveries = max(most_deliveries, int(deliveries or 0))
            seen.setdefault(entry, []).append(
                f"message_id={message.message_id} x-delivery-count={deliveries}"
            )
    # Consumption stops first, so a stop costs a queued command at most one delivery attempt,
    # and only for deliveries already on their way when the consumers were cancelled (at most
    # the prefetch window of each port consumer); most stops return none.
    assert most_deliveries <= 1, seen
    assert returned <= PREFETCH * len(port_queues), (
        f"{returned} of {len(queued)} queued commands were delivered to the stopping worker "
        "and returned unprocessed"
    )
    pending = [
        (PORT_OF_STEP[row["current_step"]], row["id"], row["current_step"])
        for row in sagas.values()
        if row["current_step"] in PORT_OF_STEP
    ]
    if sorted(queued) != sorted(pending):
        steps = {row["id"]: row["current_step"] for row in sagas.values()}
        extra = Counter(queued) - Counter(pending)
        missing = Counter(pending) - Counter(queued)
        history = {
            saga_id: [
                (r["kind"], r["step"], r["message_id"])
                for r in await db.fetch(
                    "SELECT kind, step, message_id FROM saga_history WHERE saga_id = $1 "
                    "ORDER BY seq",
                    saga_id,
                )
            ]
            for (_, saga_id, _) in (*extra, *missing)
        }
        pytest.fail(
            "the queues do not hold exactly the unfinished work:\n"
            + "".join(
                f"  queued, not pending: {e} x{n} (saga at {steps.get(e[1])}): {seen[e]}\n"
                for e, n in extra.items()
            )
            + "".join(f"  pending, not queued: {e}\n" for e in missing)
            + "".join(f"  history of {k}: {v}\n" for k, v in history.items())
            + first.output()
        )
    assert pending, "the worker was stopped mid-work, so some steps must be left"
    assert all(row["current_step"] in {*PORT_OF_STEP, WAITING_STEP} for row in sagas.values())
    done_before_stop = await completed_steps(db)
    assert done_before_stop, "steps in flight at the signal were finished, not abandoned"
    assert max(done_before_stop.values()) == 1

    # A second worker picks the rest up; every step then ran exactly once per saga.
    second = await spawn(env, "second")

    async def all_waiting() -> bool:
        rows = (await sagas_by_order(db)).values()
        return all(row["current_step"] == WAITING_STEP for row in rows)

    await eventually(
        all_waiting,
        "every saga to reach await_dispatch",
        timeout_s=120,
        workers=(second,),
    )
    code, took_s = await second.stop(signal.SIGTERM, timeout_s=GRACE_PERIOD_S + 20)
    assert code == 0, second.output()
    assert took_s < GRACE_PERIOD_S

    sagas = await sagas_by_order(db)
    assert {row["status"] for row in sagas.values()} == {"running"}
    assert await completed_steps(db) == Counter(
        {(row["id"], step): 1 for row in sagas.values() for step in PORT_OF_STEP}
    )
    assert await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0
    for queue in [*every_queue, dead_letter_queue_name(prefix)]:
        assert (await queue_state(broker, queue))[0] == 0, f"{queue} should be empty"
