"""Every delivery is settled, whatever it carries: on the real broker and database.

A worker consumes a saga queue, the port queues and the dead-letter queue.
Each test publishes what a buggy or hostile service could (a NUL in the
message id, bytes that are not UTF-8, broker headers of the wrong type, huge
bodies, a dead letter the store refuses) and checks that it ends processed,
as a dead letter, or in the unstorable queue, with nothing left unacknowledged
and nothing delivered again and again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import aio_pika
import asyncpg
import pamqp.encode
import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import USER, publish_without_id, rabbitmqctl
from pamqp import commands
from typer.testing import CliRunner

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.simulation.participants import Ledger, Simulation, simulated_ports
from sagaworks.adapters.postgres.dead_letters import PostgresDeadLetters
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.inbound import to_inbound
from sagaworks.adapters.rabbitmq.topology import (
    apply_topology,
    commands_exchange_name,
    exchange_name,
    port_queue_name,
    saga_queue_name,
)
from sagaworks.application.oversized import KEPT_BYTES
from sagaworks.application.ports import AuditRecord
from sagaworks.bootstrap import System, bootstrap
from sagaworks.domain.instance import saga_id_for
from sagaworks.entrypoints.cli.app import app
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGA = order_fulfilment.name


@dataclass
class Rig:
    settings: Settings
    system: System
    client: AbstractRobustConnection
    db: asyncpg.Connection
    database_url: str

    @property
    def prefix(self) -> str:
        return self.settings.exchange_prefix

    @property
    def saga_queue(self) -> str:
        return saga_queue_name(self.prefix, SAGA)

    @property
    def dead_letters(self) -> str:
        return self.system.topology.dead_letter_queue

    @property
    def unstorable(self) -> str:
        return self.system.topology.unstorable_queue

    async def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
        """Publish as the tests' broker user (`user_id`), as an allowed publisher does."""
        props.setdefault("user_id", USER)
        async with self.client.channel(publisher_confirms=True) as channel:
            target = (
                channel.default_exchange if exchange == "" else await channel.get_exchange(exchange)
            )
            await target.publish(
                aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **props),
                routing_key=routing_key,
            )

    async def letters(self) -> list[asyncpg.Record]:
        return list(await self.db.fetch("SELECT * FROM dead_letters ORDER BY id"))

    async def settled(self) -> None:
        """Every queue of the rig but the unstorable one empty, nothing unacknowledged."""

        async def quiet() -> bool:
            rows = await rabbitmqctl("list_queues", "name", "messages", "messages_unacknowledged")
            mine = [r for r in rows if r["name"].startswith(self.prefix)]
            return all(
                r["messages"] == 0 and r["messages_unacknowledged"] == 0
                for r in mine
                if r["name"] != self.unstorable
            )

        await eventually(quiet, timeout_s=30)

    def cli(self, *args: str) -> Any:
        env = {
            "SAGAWORKS_DATABASE_URL": self.database_url,
            "SAGAWORKS_AMQP_URL": self.settings.amqp_url.get_secret_value(),
            "SAGAWORKS_EXCHANGE_PREFIX": self.prefix,
            "SAGAWORKS_LOG_FORMAT": "json",
            "SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]',
        }
        return CliRunner().invoke(app, list(args), env=env, catch_exceptions=False)


async def eventually(check: Callable[[], Awaitable[Any]], timeout_s: float = 20.0) -> Any:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {timeout_s} s: {check}")
        await asyncio.sleep(0.1)


def placed(order_id: str) -> bytes:
    return json.dumps(
        {
            "order_id": order_id,
            "customer_id": "c-1",
            "lines": [{"sku": "sku-1", "quantity": 1}],
            "amount_cents": 1250,
            "currency": "EUR",
            "dispatch_by": (datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        }
    ).encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.fixture
def undecodable_publishing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test publish text fields that are not UTF-8: "\\udcff" goes out as byte 0xff."""

    def lenient(encoder: Any, value: str) -> bytes:
        raw = value.encode("utf-8", "surrogateescape")
        return bytes(encoder.pack(len(raw))) + raw

    monkeypatch.setattr(pamqp.encode, "_string", lenient)


async def _rig(
    settings_factory: Callable[..., Settings], database_url: str, run_id: str, *, worker: bool
) -> AsyncIterator[Rig]:
    settings = settings_factory(
        database_url=database_url,
        exchange_prefix=f"{run_id}.{secrets.token_hex(3)}.",
        delivery_limit=2,
        db_pool_size=4,
    )
    system = await bootstrap(settings, [order_fulfilment], simulated_ports(Simulation(), Ledger()))
    running = Worker(system) if worker else None
    if running is not None:
        await running.start()
    else:
        assert system.connection is not None
        await apply_topology(system.connection, system.topology)
    client = await connect(settings.amqp_url.get_secret_value(), timeout_s=5)
    db = await asyncpg.connect(database_url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        yield Rig(settings, system, client, db, database_url)
    finally:
        if running is not None:
            await running.stop()
        await system.aclose()
        await db.close()
        async with client.channel() as channel:
            topology = system.topology
            for name in (
                *(q.name for q in topology.queues),
                topology.dead_letter_queue,
                topology.unstorable_queue,
            ):
                await channel.queue_delete(name)
            for name in (*topology.exchanges, topology.dead_letter_exchange):
                await channel.exchange_delete(name)
        await client.close()


@pytest.fixture
async def rig(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> AsyncIterator[Rig]:
    async for made in _rig(settings_factory, migrated_database_url, run_id, worker=True):
        yield made


@pytest.fixture
async def idle_rig(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> AsyncIterator[Rig]:
    """The topology and the use cases, but no worker: the test consumes by hand."""
    async for made in _rig(settings_factory, migrated_database_url, run_id, worker=False):
        yield made


async def test_nul_and_bytes_that_are_not_utf8_are_stored_escaped_with_their_bytes(
    rig: Rig, undecodable_publishing: None
) -> None:
    orders = exchange_name(rig.prefix, "orders")
    # A NUL in the id of an event that fails validation: kept as a dead letter.
    await rig.publish(
        orders,
        "order.placed",
        b'{"order_id": "o-nul"}',
        message_id="nul-\x00-1",
        type="order.placed",
    )
    # A NUL in the id of a valid order: processed, its inbox row keeps the escaped id.
    await rig.publish(
        orders, "order.placed", placed("o-ok"), message_id="ok-\x00-2", type="order.placed"
    )
    # Bytes that are not UTF-8 in the type, the id and a header; a NUL in another header.
    await rig.publish(
        orders,
        "order.placed",
        b"{}",
        message_id="bad-\udcff",
        type="order.\udcfe",
        headers={"x-note": "\udcff\udcfe", "x-nul": "a\x00b"},
    )
    # The same straight into the dead-letter queue, as if it had failed elsewhere.
    await rig.publish("", rig.dead_letters, b"\x00raw", message_id="dead-\x00-3", type="t\x00")

    rows = await eventually(lambda: _when_count(rig.letters(), 3))
    by_id = {r["message_id"]: r for r in rows}
    assert set(by_id) == {"nul-\\u0000-1", "bad-\\xff", "dead-\\u0000-3"}
    assert json.loads(by_id["nul-\\u0000-1"]["raw_fields"]) == {"message_id": b64(b"nul-\x00-1")}
    bad = by_id["bad-\\xff"]
    assert bad["message_type"] == "order.\\xfe"
    assert json.loads(bad["headers"])["x-note"] == "\\xff\\xfe"
    assert json.loads(bad["headers"])["x-nul"] == "a\\u0000b"
    assert json.loads(bad["raw_fields"]) == {
        "message_id": b64(b"bad-\xff"),
        "type": b64(b"order.\xfe"),
        "headers/x-note": b64(b"\xff\xfe"),
        "headers/x-nul": b64(b"a\x00b"),
    }
    dead = by_id["dead-\\u0000-3"]
    assert (bytes(dead["body"]), dead["message_type"]) == (b"\x00raw", "t\\u0000")
    assert all(r["times_failed"] == 1 for r in rows)

    await eventually(
        lambda: rig.db.fetchrow(
            "SELECT status FROM saga_instances WHERE id = $1", saga_id_for(SAGA, "o-ok")
        )
    )
    assert (
        await rig.db.fetchval("SELECT count(*) FROM inbox WHERE message_id = $1", "ok-\\u0000-2")
        == 1
    )
    await rig.settled()
    await asyncio.sleep(1.0)
    assert len(await rig.letters()) == 3, "nothing is delivered again"


async def _when_count(rows: Awaitable[list[asyncpg.Record]], n: int) -> list[asyncpg.Record]:
    got = await rows
    return got if len(got) >= n else []


async def test_a_dead_letter_the_store_refuses_moves_to_the_unstorable_queue_intact(
    rig: Rig,
) -> None:
    await rig.db.execute(
        "ALTER TABLE dead_letters ADD CONSTRAINT refuse_one CHECK (message_id <> 'refused-1')"
    )
    body = b"\x00\xff not json, not utf-8"
    await rig.publish(
        "",
        rig.dead_letters,
        body,
        message_id="refused-1",
        type="order.placed",
        headers={"x-trace": "t-1"},
    )

    async with rig.client.channel() as channel:
        unstorable = await channel.get_queue(rig.unstorable)
        await eventually(lambda: _depth(rig, rig.unstorable), timeout_s=30)
        shown = await asyncio.to_thread(rig.cli, "dlq", "unstorable")
        assert shown.exit_code == 0, shown.output
        assert f'1 deliveries the dead-letter store could not take wait in "{rig.unstorable}"' in (
            shown.output
        )
        assert "rabbitmqadmin get queue=" in shown.output
        as_json = await asyncio.to_thread(rig.cli, "dlq", "unstorable", "--json")
        assert json.loads(as_json.output) == {"queue": rig.unstorable, "messages": 1}
        moved = await unstorable.get()
        await moved.ack()
    assert (moved.body, moved.message_id, moved.type) == (body, "refused-1", "order.placed")
    assert moved.headers["x-trace"] == "t-1"
    assert moved.headers["x-first-death-reason"] == "rejected"
    await rig.settled()
    assert await rig.letters() == []


async def _depth(rig: Rig, queue: str) -> int:
    rows = await rabbitmqctl("list_queues", "name", "messages")
    return next((r["messages"] for r in rows if r["name"] == queue), 0)


async def test_broker_headers_of_the_wrong_type_read_as_absent_and_the_delivery_is_settled(
    rig: Rig,
) -> None:
    odd: dict[str, Any] = {
        "x-delivery-count": "abc",
        "x-death": "nope",
        "x-first-death-queue": 5,
        "x-first-death-reason": ["delivery_limit"],
        "x-first-death-exchange": {"a": 1},
    }
    await rig.publish(
        exchange_name(rig.prefix, "orders"),
        "order.placed",
        placed("o-odd"),
        message_id="odd-1",
        type="order.placed",
        headers=odd,
    )
    await rig.publish(
        "",
        rig.dead_letters,
        b"{}",
        message_id="odd-dead-1",
        headers={"x-delivery-count": 1.5, "x-death": [{"queue": 7, "count": "two", "time": 3}]},
    )

    await eventually(
        lambda: rig.db.fetchrow(
            "SELECT 1 FROM saga_instances WHERE id = $1", saga_id_for(SAGA, "o-odd")
        )
    )
    (letter,) = await eventually(lambda: rig.letters())
    assert (letter["message_id"], letter["queue"]) == ("odd-dead-1", "unknown")
    await rig.settled()


async def test_an_oversized_message_is_kept_cut_short_on_every_queue(rig: Rig) -> None:
    body = b'{"padding": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    digest = hashlib.sha256(body).hexdigest()
    await rig.publish(
        exchange_name(rig.prefix, "orders"),
        "order.placed",
        body,
        message_id="big-saga",
        type="order.placed",
    )
    await rig.publish(
        commands_exchange_name(rig.prefix),
        "port.inventory.reserve_stock",
        body,
        message_id="big-port",
        type="sagaworks.step.run",
    )
    await rig.publish(
        "",
        rig.dead_letters,
        body,
        message_id="big-dead",
        headers={
            "x-death": [
                {
                    "queue": rig.saga_queue,
                    "reason": "delivery_limit",
                    "exchange": exchange_name(rig.prefix, "orders"),
                    "routing-keys": ["order.placed"],
                    "count": 1,
                }
            ]
        },
    )

    rows = await eventually(lambda: _when_count(rig.letters(), 3), timeout_s=30)
    by_id = {r["message_id"]: r for r in rows}
    assert set(by_id) == {"big-saga", "big-port", "big-dead"}
    for row in rows:
        assert row["reason"] == "oversized"
        assert bytes(row["body"]) == body[:KEPT_BYTES]
        assert (row["body_length"], row["body_sha256"]) == (len(body), digest)
        assert str(len(body)) in row["exception_message"]
    assert by_id["big-port"]["queue"] == port_queue_name(rig.prefix, "inventory")
    assert by_id["big-dead"]["queue"] == rig.saga_queue
    total = await rig.db.fetchval("SELECT sum(octet_length(body)) FROM dead_letters")
    assert total <= 3 * KEPT_BYTES
    shown = await asyncio.to_thread(rig.cli, "dlq", "show", str(by_id["big-saga"]["id"]), "--json")
    assert json.loads(shown.output)["whole_body"] == {"length": len(body), "sha256": digest}
    await rig.settled()


async def test_a_redelivered_dead_letter_is_not_a_new_failure_and_stays_archived(
    idle_rig: Rig,
) -> None:
    rig = idle_rig
    await rig.publish(
        "",
        rig.dead_letters,
        b"{}",
        message_id="again-1",
        type="order.placed",
        headers={
            "x-death": [
                {
                    "queue": rig.saga_queue,
                    "reason": "rejected",
                    "exchange": exchange_name(rig.prefix, "orders"),
                    "routing-keys": ["order.placed"],
                    "count": 1,
                }
            ]
        },
    )
    ingest = rig.system.ingest_dead_letter
    engine = create_engine(rig.database_url, pool_size=1, max_overflow=0)
    repo = PostgresDeadLetters(engine)
    try:
        async with rig.client.channel() as channel:
            queue = await channel.get_queue(rig.dead_letters)
            first = await eventually(lambda: queue.get(fail=False))
            # Stored, then the worker died before its ack: the broker delivers it again.
            await ingest(to_inbound(first, rig.dead_letters))
            (letter,) = await rig.letters()
            await repo.archive([letter["id"]], AuditRecord("ops", "archive", uuid4(), "ok"))
            await first.nack(requeue=True)
            second = await eventually(lambda: queue.get(fail=False))
            assert (second.headers or {}).get("x-delivery-count") == 1, "a real redelivery"
            await ingest(to_inbound(second, rig.dead_letters))
            await second.ack()
    finally:
        await engine.dispose()
    (after,) = await rig.letters()
    assert (after["times_failed"], after["status"]) == (1, "archived")
    assert after["last_failed_at"] == letter["last_failed_at"]


async def test_header_names_with_nul_or_bytes_that_are_not_utf8_are_stored_escaped(
    rig: Rig, undecodable_publishing: None
) -> None:
    await rig.publish(
        exchange_name(rig.prefix, "orders"),
        "order.placed",
        b"{}",
        message_id="names-1",
        type="order.placed",
        headers={"x-\x00name": "v", "x-table": {"k\x00": "v\udcff"}},
    )

    (letter,) = await eventually(lambda: rig.letters())
    assert (letter["reason"], letter["times_failed"]) == ("schema_invalid", 1)
    headers = json.loads(letter["headers"])
    assert headers["x-\\u0000name"] == "v"
    assert headers["x-table"] == {"k\\u0000": "v\\xff"}
    assert json.loads(letter["raw_fields"]) == {
        "headers/x-\\u0000name#name": b64(b"x-\x00name"),
        "headers/x-table/k\\u0000#name": b64(b"k\x00"),
        "headers/x-table/k\\u0000": b64(b"v\xff"),
    }
    await rig.settled()
    assert await _depth(rig, rig.unstorable) == 0


async def test_oversized_messages_without_id_are_told_apart_by_their_headers(rig: Rig) -> None:
    body = b"x" * (rig.settings.max_message_bytes + 1)
    for trace in ("t-1", "t-2"):
        await publish_without_id(
            exchange_name(rig.prefix, "orders"),
            "order.placed",
            body,
            commands.Basic.Properties(
                message_type="order.placed", user_id=USER, headers={"x-trace": trace}
            ),
        )

    rows = await eventually(lambda: _when_count(rig.letters(), 2))
    assert [(r["reason"], r["times_failed"]) for r in rows] == [("oversized", 1)] * 2
    assert len({r["message_id"] for r in rows}) == 2, "two messages, two letters"
    assert all(r["message_id"].startswith("no-id:") for r in rows)
    await rig.settled()
