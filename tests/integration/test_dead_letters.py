"""Dead letters end to end, on the real broker and database.

A worker runs in the test's event loop (delivery limit 1, events parked for
one second) with the simulated participants, whose inventory can be broken
and mended; `sagaworks dlq` runs as operators run it, in a thread through
typer's runner, or as a real process when it must be killed half-way.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from broker_tools import USER
from typer.testing import CliRunner

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.ports import ReserveStock, StockReservation
from sagas.order_fulfilment.simulation.participants import (
    Ledger,
    SimulatedInventory,
    Simulation,
    simulated_ports,
)
from sagaworks.adapters.postgres.dead_letters import PostgresDeadLetters
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.inbound import to_inbound
from sagaworks.adapters.rabbitmq.topology import (
    commands_exchange_name,
    dead_letter_queue_name,
    exchange_name,
    port_queue_name,
    queue_arguments,
    saga_queue_name,
)
from sagaworks.application.dead_letters import REPLAY_HEADER
from sagaworks.application.ports import DeadLetterFilter
from sagaworks.application.stored import fingerprint
from sagaworks.bootstrap import System, bootstrap
from sagaworks.domain.instance import saga_id_for
from sagaworks.entrypoints.cli.app import app
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGA = order_fulfilment.name
SAGAWORKS = Path(sys.executable).parent / "sagaworks"


class BreakableInventory(SimulatedInventory):
    """Reserving crashes (an unexpected error, not a transient one) until mended."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__("inventory", Simulation(), ledger)
        self.broken = False

    async def reserve(self, command: ReserveStock) -> StockReservation:
        if self.broken:
            raise RuntimeError(f"inventory exploded reserving {command.order_id}")
        return await super().reserve(command)


@dataclass
class Env:
    settings: Settings
    system: System
    connection: AbstractRobustConnection
    db: asyncpg.Connection
    ledger: Ledger
    inventory: BreakableInventory
    cli_env: dict[str, str]
    extra_queues: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return self.settings.exchange_prefix

    def exchange(self, domain: str) -> str:
        return exchange_name(self.prefix, domain)

    async def publish(
        self, domain: str, message_type: str, body: dict[str, Any] | bytes, message_id: str
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.connection.channel(on_return_raises=True) as channel:
            exchange = await channel.get_exchange(self.exchange(domain))
            await exchange.publish(
                aio_pika.Message(
                    raw,
                    message_id=message_id,
                    type=message_type,
                    app_id="test-shop",
                    user_id=USER,
                    correlation_id=f"corr-{message_id}",
                    content_type="application/json",
                    headers={"cloudEvents_specversion": "1.0"},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=message_type,
            )

    async def letters(self, **where: Any) -> list[asyncpg.Record]:
        clauses = " AND ".join(f"{k} = ${i}" for i, k in enumerate(where, 1)) or "true"
        return list(
            await self.db.fetch(
                f"SELECT * FROM dead_letters WHERE {clauses} ORDER BY id", *where.values()
            )
        )

    async def letter(self, timeout_s: float = 20.0, **where: Any) -> asyncpg.Record:
        rows = await eventually(lambda: self.letters(**where), timeout_s=timeout_s)
        assert len(rows) == 1, rows
        return rows[0]

    async def saga(self, order_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.db.fetchrow(
            "SELECT * FROM saga_instances WHERE id = $1", saga_id_for(SAGA, order_id)
        )
        return row

    async def saga_status(self, order_id: str, *wanted: str, timeout_s: float = 20.0) -> None:
        async def status() -> bool:
            row = await self.saga(order_id)
            return row is not None and (row["status"] in wanted or row["current_step"] in wanted)

        await eventually(status, timeout_s=timeout_s)

    async def history(self, order_id: str) -> list[str]:
        rows = await self.db.fetch(
            "SELECT kind FROM saga_history WHERE saga_id = $1 ORDER BY seq",
            saga_id_for(SAGA, order_id),
        )
        return [r["kind"] for r in rows]

    async def cli(self, *args: str, input: str | None = None) -> Any:
        """Run `sagaworks ...` in a thread (the CLI runs its own event loop)."""
        runner = CliRunner()
        return await asyncio.to_thread(
            runner.invoke, app, list(args), env=self.cli_env, input=input, catch_exceptions=False
        )


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {check}")
        await asyncio.sleep(0.1)


def placed(order_id: str) -> dict[str, Any]:
    return {
        "order_id": order_id,
        "customer_id": "c-1",
        "lines": [{"sku": "sku-1", "quantity": 1}],
        "amount_cents": 1250,
        "currency": "EUR",
        "dispatch_by": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
    }


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def env(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> AsyncIterator[Env]:
    prefix = f"{run_id}.{secrets.token_hex(3)}."
    settings = settings_factory(
        database_url=migrated_database_url,
        exchange_prefix=prefix,
        delivery_limit=1,
        park_for_s=1.0,
        db_pool_size=4,
    )
    ledger = Ledger()
    inventory = BreakableInventory(ledger)
    ports = {**simulated_ports(Simulation(), ledger), "inventory": inventory}
    system = await bootstrap(settings, [order_fulfilment], ports)
    worker = Worker(system)
    await worker.start()
    connection = await connect(settings.amqp_url.get_secret_value(), timeout_s=5)
    db = await asyncpg.connect(_dsn(migrated_database_url))
    cli_env = {
        "SAGAWORKS_DATABASE_URL": migrated_database_url,
        "SAGAWORKS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "SAGAWORKS_EXCHANGE_PREFIX": prefix,
        "SAGAWORKS_LOG_FORMAT": "json",
        "SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]',
    }
    environment = Env(settings, system, connection, db, ledger, inventory, cli_env)
    try:
        yield environment
    finally:
        await worker.stop()
        await system.aclose()
        await db.close()
        async with connection.channel() as channel:
            topology = system.topology
            for name in (
                *environment.extra_queues,
                *(q.name for q in topology.queues),
                topology.dead_letter_queue,
                topology.unstorable_queue,
            ):
                await channel.queue_delete(name)
            for name in (*topology.exchanges, topology.dead_letter_exchange):
                await channel.exchange_delete(name)
        await connection.close()


async def spy_queue(env: Env, domain: str, routing_key: str, *, dead_letters: bool) -> str:
    """Another queue bound like the saga's; with `dead_letters`, it dead-letters like it too."""
    name = f"{env.prefix}spy.{secrets.token_hex(2)}"
    env.extra_queues.append(name)
    arguments = queue_arguments(env.system.topology) if dead_letters else {"x-queue-type": "quorum"}
    async with env.connection.channel() as channel:
        queue = await channel.declare_queue(name, durable=True, arguments=arguments)
        await queue.bind(env.exchange(domain), routing_key)
    return name


async def drain(env: Env, queue_name: str, settle_s: float = 1.0) -> list[AbstractIncomingMessage]:
    """Every message that reaches the queue within `settle_s` of the last one (acked)."""
    got: list[AbstractIncomingMessage] = []
    async with env.connection.channel() as channel:
        queue = await channel.get_queue(queue_name)
        deadline = time.monotonic() + settle_s
        while time.monotonic() < deadline:
            message = await queue.get(fail=False)
            if message is None:
                await asyncio.sleep(0.05)
                continue
            await message.ack()
            got.append(message)
            deadline = time.monotonic() + settle_s
    return got


async def test_delivery_limit_is_stored_and_replay_completes_the_saga_with_its_waiting_event(
    env: Env,
) -> None:
    env.inventory.broken = True
    await env.publish("orders", "order.placed", placed("o-1"), "placed-o-1")
    crashed = await env.letter(reason="delivery_limit")

    # Where it failed: the inventory port's queue, published to the commands exchange.
    saga_id = saga_id_for(SAGA, "o-1")
    assert crashed["queue"] == port_queue_name(env.prefix, "inventory")
    assert crashed["exchange"] == commands_exchange_name(env.prefix)
    assert crashed["routing_key"].startswith("port.inventory.")
    assert crashed["message_id"].startswith(f"{saga_id}/")
    assert crashed["message_type"] == "sagaworks.step.run"
    assert crashed["saga_type"] == SAGA
    # Why: the worker remembered the handler's last error for this message.
    assert crashed["exception_type"] == "RuntimeError"
    assert crashed["exception_message"] == "inventory exploded reserving o-1"
    assert crashed["handler"] == f"{SAGA}.reserve_stock.action"
    assert crashed["fingerprint"] == fingerprint(
        "delivery_limit", "RuntimeError", "inventory exploded reserving o-1", crashed["handler"]
    )
    assert (crashed["times_failed"], crashed["times_replayed"], crashed["status"]) == (
        1,
        0,
        "active",
    )
    assert crashed["first_failed_at"] == crashed["last_failed_at"]
    headers = json.loads(crashed["headers"])
    assert headers["x-death"][0]["reason"] == "delivery_limit"
    assert json.loads(crashed["body"])["step"] == "reserve_stock"

    # The warehouse dispatches before the saga can take it: it waits for as long as the
    # saga lives, past the parking window, and is not dead-lettered.
    await env.publish(
        "warehouse", "shipment.dispatched", {"order_id": "o-1", "shipment_id": "s-1"}, "disp-o-1"
    )
    await eventually(lambda: env.db.fetchval("SELECT count(*) FROM parked_messages"))
    await asyncio.sleep(1.1)
    assert await env.system.expire_parked_events() == 0
    assert await env.db.fetchval("SELECT count(*) FROM parked_messages") == 1
    assert await env.letters(reason="unexpected_event") == []

    # The port answers again: replaying the command makes the saga go on, and it takes
    # the dispatch that waited for it.
    env.inventory.broken = False
    result = await env.cli("dlq", "replay", str(crashed["id"]), "--operator", "alice")
    assert result.exit_code == 0, result.output
    assert "replayed 1 of 1" in result.stdout
    await env.saga_status("o-1", "completed")
    assert await env.db.fetchval("SELECT count(*) FROM parked_messages") == 0
    effects = dict(env.ledger.effects)
    history = await env.history("o-1")

    # Replaying it again changes nothing: a stale command.
    result = await env.cli("dlq", "replay", str(crashed["id"]), "--operator", "bob")
    assert result.exit_code == 0, result.output
    await asyncio.sleep(1.0)
    assert dict(env.ledger.effects) == effects
    assert env.ledger.duplicate_effects() == 0
    assert await env.history("o-1") == history
    (row,) = await env.letters(id=crashed["id"])
    assert (row["status"], row["times_replayed"], row["times_failed"]) == ("replayed", 2, 1)
    audit = await env.db.fetch(
        "SELECT operator, action, outcome, batch_id FROM dead_letter_audit "
        "WHERE dead_letter_id = $1 ORDER BY id",
        crashed["id"],
    )
    assert [(a["operator"], a["action"], a["outcome"]) for a in audit] == [
        ("alice", "replay", "replayed"),
        ("bob", "replay", "replayed"),
    ]
    assert audit[0]["batch_id"] != audit[1]["batch_id"]

    shown = await env.cli("dlq", "show", str(crashed["id"]), "--json")
    assert shown.exit_code == 0, shown.output
    details = json.loads(shown.stdout)
    assert [h["operator"] for h in details["history"]] == ["alice", "bob"]
    assert details["exception_type"] == "RuntimeError"


async def test_rejected_message_replays_only_to_its_queue_and_a_second_failure_counts(
    env: Env,
) -> None:
    # A second consumer of order.placed whose queue dead-letters like the saga's.
    other = await spy_queue(env, "orders", "order.placed", dead_letters=True)
    await env.publish("orders", "order.placed", placed("o-2"), "placed-o-2")
    await env.saga_status("o-2", "await_dispatch")
    history = await env.history("o-2")
    async with env.connection.channel() as channel:
        queue = await channel.get_queue(other)
        message = await eventually(lambda: queue.get(fail=False))
        await message.reject(requeue=False)

    letter = await env.letter(reason="rejected")
    assert (letter["queue"], letter["exchange"], letter["routing_key"]) == (
        other,
        env.exchange("orders"),
        "order.placed",
    )
    assert (letter["message_id"], letter["message_type"]) == ("placed-o-2", "order.placed")
    assert (letter["exception_type"], letter["handler"], letter["saga_type"]) == (
        "Rejected",
        None,
        None,
    )
    assert json.loads(letter["body"])["order_id"] == "o-2"

    # Dry run: says where, sends nothing.
    dry = await env.cli(
        "dlq", "replay", str(letter["id"]), "--dry-run", "--json", "--allow-queue", other
    )
    assert dry.exit_code == 0, dry.output
    (plan,) = json.loads(dry.stdout)["would_send"]
    assert (plan["exchange"], plan["routing_key"], plan["replay"]) == ("", other, 1)
    assert await drain(env, other, settle_s=0.3) == []

    # The spy queue is no queue of sagaworks' topology: replayed only when named.
    refused = await env.cli("dlq", "replay", "--queue", other, "--operator", "carol")
    assert refused.exit_code == 1
    assert f'refusing to replay to "{other}"' in refused.stderr
    assert await drain(env, other, settle_s=0.3) == []
    result = await env.cli(
        "dlq", "replay", "--queue", other, "--operator", "carol", "--allow-queue", other
    )
    assert result.exit_code == 0, result.output
    (again,) = await drain(env, other)
    assert again.message_id == "placed-o-2"
    assert again.type == "order.placed"
    assert again.correlation_id == "corr-placed-o-2"
    assert again.headers is not None
    assert again.headers[REPLAY_HEADER] == 1
    assert not any(k == "x-death" or k.startswith("x-first-death") for k in again.headers)
    # The saga's queue, bound to the same routing key, received nothing.
    await asyncio.sleep(0.5)
    assert await env.history("o-2") == history
    (row,) = await env.letters(id=letter["id"])
    assert (row["status"], row["times_replayed"]) == ("replayed", 1)

    # Replayed once more, it fails again: the same row, counted again, active again.
    result = await env.cli("dlq", "replay", str(letter["id"]), "--allow-queue", other)
    assert result.exit_code == 0, result.output
    async with env.connection.channel() as channel:
        queue = await channel.get_queue(other)
        message = await eventually(lambda: queue.get(fail=False))
        assert message.headers[REPLAY_HEADER] == 2
        await message.reject(requeue=False)
    await eventually(
        lambda: env.db.fetchval(
            "SELECT times_failed = 2 FROM dead_letters WHERE id = $1", letter["id"]
        )
    )
    (row,) = await env.letters(queue=other, message_id="placed-o-2")
    assert (row["id"], row["status"], row["times_failed"], row["times_replayed"]) == (
        letter["id"],
        "active",
        2,
        2,
    )
    assert row["last_failed_at"] >= letter["last_failed_at"]
    assert json.loads(row["headers"])[REPLAY_HEADER] == 2


async def test_ingesting_the_same_dead_letter_twice_counts_it_once(env: Env) -> None:
    other = await spy_queue(env, "orders", "order.placed", dead_letters=True)
    await env.publish("orders", "order.placed", placed("o-3"), "placed-o-3")
    async with env.connection.channel() as channel:
        queue = await channel.get_queue(other)
        message = await eventually(lambda: queue.get(fail=False))
        await message.reject(requeue=False)
    letter = await env.letter(reason="rejected")
    (before,) = await env.letters(id=letter["id"])
    # The same delivery ingested again (a worker died between commit and ack):
    # rebuild it from the stored headers, which hold the same x-death.
    ingest = env.system.ingest_dead_letter
    stored = json.loads(before["headers"])
    raw = _FakeIncoming(before["body"], stored, before["routing_key"], "placed-o-3")
    await ingest(to_inbound(raw, dead_letter_queue_name(env.prefix)))  # type: ignore[arg-type]
    (after,) = await env.letters(id=letter["id"])
    assert (after["times_failed"], after["last_failed_at"]) == (1, before["last_failed_at"])


@dataclass
class _FakeIncoming:
    body: bytes
    headers: dict[str, Any]
    routing_key: str
    message_id: str
    exchange: str = "sagaworks.dlx"
    timestamp: None = None
    type: str = "order.placed"
    app_id: None = None
    correlation_id: None = None
    user_id: None = None
    content_type: str = "application/json"


async def test_poison_is_fixed_with_edit_then_replayed(env: Env, tmp_path: Path) -> None:
    bad = placed("o-4")
    bad["lines"][0]["quantity"] = 0
    await env.publish("orders", "order.placed", bad, "placed-o-4")
    letter = await env.letter(reason="schema_invalid")
    assert (letter["queue"], letter["exchange"], letter["routing_key"]) == (
        saga_queue_name(env.prefix, SAGA),
        env.exchange("orders"),
        "order.placed",
    )
    assert letter["exception_type"] == "ValidationError"
    assert "lines.0.quantity" in letter["exception_message"]
    assert (letter["handler"], letter["saga_type"]) == (SAGA, SAGA)
    assert await env.saga("o-4") is None
    letter_id = str(letter["id"])

    refused = await env.cli("dlq", "edit", letter_id, "--set", "lines.0.quantity=-5")
    assert refused.exit_code == 1
    assert "does not match OrderPlaced" in refused.stderr
    assert "lines.0.quantity: Input should be greater than 0" in refused.stderr
    (row,) = await env.letters(id=letter["id"])
    assert (row["body"], row["original_body"]) == (letter["body"], None)

    # $EDITOR gets the pretty-printed body; here a script changes the quantity.
    script = tmp_path / "editor.py"
    script.write_text(
        "import json, sys\n"
        "p = sys.argv[1]\n"
        "d = json.load(open(p))\n"
        "d['lines'][0]['quantity'] = 3\n"
        "json.dump(d, open(p, 'w'))\n"
    )
    env.cli_env["EDITOR"] = f"{sys.executable} {script}"
    saved = await env.cli("dlq", "edit", letter_id, "--operator", "dave")
    assert saved.exit_code == 0, saved.output
    (row,) = await env.letters(id=letter["id"])
    assert row["original_body"] == letter["body"]
    assert json.loads(row["body"])["lines"][0]["quantity"] == 3
    audit = await env.db.fetch(
        "SELECT operator, action, outcome, detail FROM dead_letter_audit "
        "WHERE dead_letter_id = $1 ORDER BY id",
        letter["id"],
    )
    assert [(a["action"], a["outcome"]) for a in audit] == [("edit", "refused"), ("edit", "saved")]
    assert "greater than 0" in json.loads(audit[0]["detail"])["errors"][0]

    result = await env.cli("dlq", "replay", letter_id)
    assert result.exit_code == 0, result.output
    await env.saga_status("o-4", "await_dispatch")


async def test_no_saga_replays_once_the_saga_exists_and_reaches_only_the_failed_queue(
    env: Env,
) -> None:
    spy = await spy_queue(env, "orders", "order.cancellation_requested", dead_letters=False)
    await env.publish("orders", "order.cancellation_requested", {"order_id": "o-5"}, "cancel-o-5")
    await eventually(lambda: env.db.fetchval("SELECT count(*) FROM parked_messages"))
    await asyncio.sleep(1.1)
    assert await env.system.expire_parked_events() == 1
    letter = await env.letter(reason="no_saga")
    assert (letter["queue"], letter["routing_key"], letter["message_id"]) == (
        saga_queue_name(env.prefix, SAGA),
        "order.cancellation_requested",
        "cancel-o-5",
    )
    assert len(await drain(env, spy, settle_s=0.3)) == 1  # the original publish

    await env.publish("orders", "order.placed", placed("o-5"), "placed-o-5")
    await env.saga_status("o-5", "await_dispatch")
    result = await env.cli("dlq", "replay", "--reason", "no_saga", "--operator", "erin")
    assert result.exit_code == 0, result.output
    await env.saga_status("o-5", "compensated")
    assert await drain(env, spy) == [], "the replay fanned out to another bound queue"
    assert env.ledger.duplicate_effects() == 0


async def test_replay_killed_mid_batch_then_run_again_loses_nothing_and_doubles_nothing(
    env: Env,
) -> None:
    orders = [f"k-{i}" for i in range(12)]
    for order in orders:
        await env.publish(
            "orders", "order.cancellation_requested", {"order_id": order}, f"c-{order}"
        )
    await eventually(
        lambda: env.db.fetchval("SELECT count(*) = 12 FROM parked_messages"), timeout_s=30
    )
    await asyncio.sleep(1.1)
    assert await env.system.expire_parked_events() == 12
    for order in orders:
        await env.publish("orders", "order.placed", placed(order), f"p-{order}")
    for order in orders:
        await env.saga_status(order, "await_dispatch", timeout_s=30)

    process = await asyncio.create_subprocess_exec(
        str(SAGAWORKS),
        *("dlq", "replay", "--reason", "no_saga", "--rate", "4", "--json"),
        env={**os.environ, **env.cli_env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await eventually(
        lambda: env.db.fetchval("SELECT count(*) >= 3 FROM dead_letters WHERE status = 'replayed'"),
        timeout_s=30,
    )
    process.send_signal(signal.SIGKILL)
    await process.wait()
    done = await env.db.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'replayed'")
    assert 3 <= done < 12, "the run was meant to be killed half-way"

    result = await env.cli("dlq", "replay", "--reason", "no_saga")
    assert result.exit_code == 0, result.output
    assert f"replayed {12 - done} of {12 - done}" in result.stdout
    for order in orders:
        await env.saga_status(order, "compensated", timeout_s=30)
    assert (
        await env.db.fetchval("SELECT count(*) FROM dead_letters WHERE status = 'replayed'") == 12
    )
    for operation in ("release", "void", "cancel"):
        assert env.ledger.count(operation) == 12
    assert env.ledger.duplicate_effects() == 0
    await asyncio.sleep(1.0)
    for order in orders:
        kinds = await env.history(order)
        assert kinds.count("compensated") == 1, kinds


async def test_replay_refuses_a_queue_the_topology_does_not_declare(env: Env) -> None:
    """A dead letter whose x-death names a queue of someone else's is not sent there."""
    target = f"{env.prefix}payments.internal"
    env.extra_queues.append(target)
    async with env.connection.channel() as channel:
        await channel.declare_queue(target, durable=True, arguments={"x-queue-type": "quorum"})
        await channel.default_exchange.publish(
            aio_pika.Message(
                json.dumps(placed("o-forged")).encode(),
                message_id="forged-1",
                type="order.placed",
                headers={
                    "x-death": [
                        {
                            "queue": target,
                            "reason": "rejected",
                            "exchange": env.exchange("orders"),
                            "routing-keys": ["order.placed"],
                            "count": 1,
                            "time": datetime.now(UTC),
                        }
                    ]
                },
            ),
            routing_key=dead_letter_queue_name(env.prefix),
        )
    letter = await env.letter(message_id="forged-1")
    assert letter["queue"] == target

    for dry in ((), ("--dry-run",)):
        result = await env.cli("dlq", "replay", str(letter["id"]), "--operator", "gina", *dry)
        assert result.exit_code == 1, result.output
        message = " ".join(result.stderr.split())
        assert f'refusing to replay to "{target}" (dead letter {letter["id"]})' in message
        assert "not a queue the topology declares" in message
        assert f"sagaworks dlq archive {letter['id']}" in message
        assert "--allow-queue" in message
    assert await drain(env, target, settle_s=0.5) == []
    (after,) = await env.letters(id=letter["id"])
    assert (after["status"], after["times_replayed"]) == ("active", 0)
    audit = await env.db.fetch(
        "SELECT operator, action, outcome, detail, db_role, host(client_addr) AS addr, "
        "client_hostname, current_user AS me FROM dead_letter_audit WHERE dead_letter_id = $1",
        letter["id"],
    )
    assert [(a["operator"], a["action"], a["outcome"]) for a in audit] == [
        ("gina", "replay", "refused")
    ]
    assert json.loads(audit[0]["detail"]) == {"queue": target, "why": "undeclared_queue"}
    # Besides the name the operator gave: the database role, the client address, the host.
    assert audit[0]["db_role"] == audit[0]["me"]
    assert audit[0]["addr"] in {"127.0.0.1", "::1"}
    assert audit[0]["client_hostname"] == socket.gethostname()
    shown = await env.cli("dlq", "show", str(letter["id"]), "--json")
    (entry,) = json.loads(shown.stdout)["history"]
    assert (entry["operator"], entry["db_role"], entry["client_hostname"]) == (
        "gina",
        audit[0]["me"],
        socket.gethostname(),
    )


async def test_operator_errors_archive_and_purge(env: Env) -> None:
    missing = await env.cli("dlq", "show", "999999")
    assert missing.exit_code == 1
    assert "no dead letter with id 999999" in missing.stderr
    empty = await env.cli("dlq", "replay", "--reason", "no_such_reason")
    assert empty.exit_code == 1
    assert "no dead letter matches the selection" in empty.stderr
    unnamed = await env.cli("dlq", "archive")
    assert unnamed.exit_code == 2
    assert "name what to archive" in unnamed.stderr

    for n in range(3):
        await env.publish("orders", "order.placed", b"{broken", f"junk-{n}")
    await eventually(lambda: env.db.fetchval("SELECT count(*) = 3 FROM dead_letters"))
    listed = await env.cli("dlq", "list", "--reason", "malformed_json", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout)["total"] == 3
    grouped = await env.cli("dlq", "groups", "--json")
    (group,) = json.loads(grouped.stdout)
    assert (group["count"], group["reason"]) == (3, "malformed_json")

    refused = await env.cli("dlq", "archive", "--group", group["fingerprint"], input="n\n")
    assert refused.exit_code == 1
    assert await env.db.fetchval("SELECT count(*) FROM dead_letters WHERE status='active'") == 3
    archived = await env.cli(
        "dlq", "archive", "--group", group["fingerprint"], "--yes", "--operator", "frank"
    )
    assert archived.exit_code == 0, archived.output
    assert "archived 3" in archived.stdout
    purged = await env.cli("dlq", "purge", "--all", "--operator", "frank", input="y\n")
    assert purged.exit_code == 0, purged.output
    assert await env.db.fetchval("SELECT count(*) FROM dead_letters") == 0
    audit = await env.db.fetch(
        "SELECT action, outcome, dead_letter_id, detail FROM dead_letter_audit ORDER BY id"
    )
    assert [(a["action"], a["dead_letter_id"] is None) for a in audit] == [
        *[("archive", True)] * 3,  # their letters are gone now: SET NULL
        *[("purge", True)] * 3,
    ]
    assert {json.loads(a["detail"])["message_id"] for a in audit[3:]} == {
        "junk-0",
        "junk-1",
        "junk-2",
    }


async def test_list_and_groups_on_ten_thousand_dead_letters(migrated_database_url: str) -> None:
    db = await asyncpg.connect(_dsn(migrated_database_url))
    try:
        await db.execute(
            """
            INSERT INTO dead_letters (message_id, queue, exchange, routing_key, message_type,
                saga_type, headers, body, reason, exception_type, exception_message, handler,
                fingerprint, first_failed_at, last_failed_at, times_failed, status)
            SELECT 'm-' || i, 'sagaworks.order_fulfilment', 'orders',
                   (ARRAY['order.placed', 'order.cancellation_requested',
                          'shipment.dispatched'])[1 + i % 3],
                   'order.placed', 'order_fulfilment', '{"cloudEvents_specversion": "1.0"}',
                   convert_to('{"order_id": "o-' || i || '"}', 'UTF8'),
                   (ARRAY['schema_invalid', 'delivery_limit', 'no_saga', 'rejected'])[1 + i % 4],
                   'Error' || (i % 7), 'failure number ' || (i % 50) || ' at step ' || (i % 13),
                   'order_fulfilment', 'fp-' || (i % 40),
                   now() - make_interval(mins => i), now() - make_interval(mins => i),
                   1 + i % 3, (ARRAY['active', 'active', 'replayed', 'archived'])[1 + i % 4]
            FROM generate_series(1, 10000) AS i
            """
        )
        await db.execute("ANALYZE dead_letters")
    finally:
        await db.close()
    engine = create_engine(migrated_database_url)
    repo = PostgresDeadLetters(engine)
    since = datetime.now(UTC) - timedelta(days=5)
    cases: dict[str, Callable[[], Awaitable[Any]]] = {
        "list (active, newest 50)": lambda: repo.find(DeadLetterFilter(), limit=50),
        "list reason+routing key+since, page 3": lambda: repo.find(
            DeadLetterFilter(reason="delivery_limit", routing_key="order.placed", since=since),
            limit=50,
            offset=100,
        ),
        "list text 'number 7 at' (ILIKE), all statuses": lambda: repo.find(
            DeadLetterFilter(statuses=(), text="number 7 at"), limit=50
        ),
        "list group fp-3 + count": lambda: asyncio.gather(
            repo.find(DeadLetterFilter(fingerprint="fp-3"), limit=50),
            repo.count(DeadLetterFilter(fingerprint="fp-3")),
        ),
        "count (active)": lambda: repo.count(DeadLetterFilter()),
        "groups (active)": lambda: repo.groups(DeadLetterFilter(), limit=50),
        "groups (all statuses, saga type)": lambda: repo.groups(
            DeadLetterFilter(statuses=(), saga_type="order_fulfilment"), limit=50
        ),
    }
    try:
        assert await repo.count(DeadLetterFilter(statuses=())) == 10_000
        timings = {}
        for name, query in cases.items():
            await query()  # warm the connection and the plan cache
            runs = []
            for _ in range(5):
                started = time.perf_counter()
                await query()
                runs.append((time.perf_counter() - started) * 1000)
            timings[name] = sorted(runs)[len(runs) // 2]
        groups = await repo.groups(DeadLetterFilter(), limit=50)
        assert len(groups) == 20  # status and fingerprint both follow i mod 4
        assert sum(g.count for g in groups) == 5_000
        page = await repo.find(
            DeadLetterFilter(reason="delivery_limit", routing_key="order.placed", since=since),
            limit=50,
            offset=100,
        )
        assert all(p.reason == "delivery_limit" for p in page)
    finally:
        await engine.dispose()
    print("\n10 000 dead letters, median of 5 runs:")
    for name, ms in timings.items():
        print(f"  {name:<45} {ms:7.1f} ms")
