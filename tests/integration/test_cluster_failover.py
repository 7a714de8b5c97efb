"""Failover on a three-node RabbitMQ cluster: the node leading the saga queue dies under load.

Marked `cluster`; runs only when `SAGAWORKS_CLUSTER_ORDERS` says how many orders:

    SAGAWORKS_CLUSTER_ORDERS=300 uv run pytest -m cluster -s \
        tests/integration/test_cluster_failover.py

Three private nodes on loopback form a cluster; the topology is declared through
the first, so the quorum queues' leaders start there. Two `sagaworks worker`
processes run the reference saga against fake HTTP participants that live in
this test process (their ledger outlives any worker): one worker connects to a
node that survives, the other to the leader. While orders stream in, the leader
is killed with SIGKILL and started again 20 s later. Then every order must have
ended, no participant may have applied an effect twice, nothing may be left
unpublished or queued, and the test prints how long consumption paused.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aio_pika
import asyncpg
import pytest
from broker_tools import USER
from rabbitmq_cluster import ClusterNode, rabbitmq_cluster
from worker_processes import SAGAWORKS, Spawn, WorkerProcess, eventually, worker_env

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagas.order_fulfilment.simulation.fake_services import FakeServices
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX
from sagas.order_fulfilment.simulation.shop import Warehouse, publish
from sagaworks.adapters.rabbitmq.topology import exchange_name, saga_queue_name

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.slow]

ORDERS = int(os.environ.get("SAGAWORKS_CLUSTER_ORDERS", "0"))
SAGA_QUEUE = saga_queue_name("", "order_fulfilment")
TERMINAL = ("completed", "compensated", "needs_attention")
PUBLISH_EVERY_S = 0.02
DOWN_FOR_S = 20.0
DECLINE_EVERY = 10


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _cluster_env(database_url: str, node: ClusterNode, services: FakeServices) -> dict[str, str]:
    ports = services.settings()
    return worker_env(
        database_url,
        "",
        SAGAWORKS_AMQP_URL=node.url(),
        SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports"]',
        ORDER_FULFILMENT_HTTP_INVENTORY_URL=ports.inventory_url,
        ORDER_FULFILMENT_HTTP_PAYMENTS_URL=ports.payments_url,
        ORDER_FULFILMENT_HTTP_SHIPPING_URL=ports.shipping_url,
    )


def _order(number: int) -> OrderPlaced:
    order_id = f"o{number:05d}"
    customer = f"{DECLINED_CUSTOMER_PREFIX}{order_id}" if number % DECLINE_EVERY == 0 else order_id
    return OrderPlaced(
        order_id=order_id,
        customer_id=customer,
        lines=(OrderLine(sku="sku-1", quantity=1),),
        amount_cents=1_999,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(minutes=30),
    )


async def _consumers(node: ClusterNode, queue: str) -> int:
    listed = await asyncio.to_thread(
        node.rabbitmqctl, "list_queues", "name", "consumers", "--formatter", "json", "-q"
    )
    return next((row["consumers"] for row in json.loads(listed) if row["name"] == queue), 0)


async def _queued(node: ClusterNode) -> dict[str, int]:
    listed = await asyncio.to_thread(
        node.rabbitmqctl,
        "list_queues",
        "name",
        "messages",
        "messages_unacknowledged",
        "--formatter",
        "json",
        "-q",
    )
    return {
        row["name"]: row["messages"] + row["messages_unacknowledged"]
        for row in json.loads(listed)
        if row["messages"] or row["messages_unacknowledged"]
    }


async def test_killing_the_saga_queue_leader_loses_nothing(
    tmp_path: Path, migrated_database_url: str, spawn: Spawn
) -> None:
    if not ORDERS:
        pytest.skip("the cluster failover run: set SAGAWORKS_CLUSTER_ORDERS (e.g. 300) to run it")
    with rabbitmq_cluster(tmp_path) as nodes:
        services = FakeServices()
        await services.start()
        db = await asyncpg.connect(_dsn(migrated_database_url))
        try:
            await _run(nodes, services, db, migrated_database_url, spawn)
        finally:
            await db.close()
            await services.stop()


async def _run(
    nodes: list[ClusterNode],
    services: FakeServices,
    db: asyncpg.Connection,
    database_url: str,
    spawn: Spawn,
) -> None:
    declare = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        "topology",
        "apply",
        env=_cluster_env(database_url, nodes[0], services),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(declare.communicate(), timeout=120)
    assert declare.returncode == 0, stderr.decode(errors="replace")
    leader_name = nodes[0].queue_leaders()[SAGA_QUEUE]
    (victim,) = (node for node in nodes if node.name == leader_name)
    survivor = next(node for node in nodes if node is not victim)

    client = await aio_pika.connect_robust(survivor.url())
    channel = await client.channel(publisher_confirms=True)
    warehouse = Warehouse(
        channel,
        lambda domain: exchange_name("", domain),
        lambda order_id, shipment_id: [
            (0.05, ShipmentDispatched(order_id=order_id, shipment_id=shipment_id), f"{order_id}/d")
        ],
        USER,
    )
    services.on_booked = warehouse.on_booked
    workers: list[WorkerProcess] = [
        await spawn(_cluster_env(database_url, survivor, services), "on-survivor"),
        await spawn(_cluster_env(database_url, victim, services), "on-leader"),
    ]

    async def both_consuming() -> bool:
        return await _consumers(survivor, SAGA_QUEUE) == 2

    await eventually(
        both_consuming, "both workers to consume", timeout_s=120, workers=tuple(workers)
    )

    killed_at: datetime | None = None
    restarted_at: datetime | None = None

    async def place_orders() -> None:
        nonlocal killed_at
        exchange = await channel.get_exchange(exchange_name("", OrderPlaced.domain), ensure=False)
        for number in range(ORDERS):
            order = _order(number)
            await publish(exchange, order, f"{order.order_id}/placed", source="tests", user_id=USER)
            if number == ORDERS // 3:
                killed_at = datetime.now(UTC)
                await asyncio.to_thread(victim.kill)
            await asyncio.sleep(PUBLISH_EVERY_S)

    await place_orders()
    assert killed_at is not None
    await asyncio.sleep(max(0.0, DOWN_FOR_S - (datetime.now(UTC) - killed_at).total_seconds()))
    restarted_at = datetime.now(UTC)
    await asyncio.to_thread(victim.start)
    restart_took_s = (datetime.now(UTC) - restarted_at).total_seconds()
    back_at = datetime.now(UTC)
    await eventually(
        both_consuming, "the worker on the killed node to consume again", timeout_s=120
    )
    reconnect_s = (datetime.now(UTC) - back_at).total_seconds()

    async def all_ended() -> bool:
        ended = await db.fetchval(
            "SELECT count(*) FROM saga_instances WHERE status = ANY($1::text[])", list(TERMINAL)
        )
        return bool(ended == ORDERS)

    await eventually(all_ended, "every saga to end", timeout_s=600, workers=(workers[0],))

    async def settled() -> bool:
        unpublished = await db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        return unpublished == 0 and not await _queued(survivor)

    await eventually(settled, "the outbox and queues to drain", timeout_s=120)
    await warehouse.stop()
    await client.close()

    statuses = dict(await db.fetch("SELECT status, count(*) FROM saga_instances GROUP BY status"))
    declined = len(range(0, ORDERS, DECLINE_EVERY))
    assert statuses == {"completed": ORDERS - declined, "compensated": declined}
    assert services.duplicate_effects() == 0
    assert await db.fetchval("SELECT count(*) FROM dead_letters") == 0

    # How long nothing moved: the widest gap between history rows after the kill, and
    # before it for comparison.
    times = [row["at"] for row in await db.fetch("SELECT at FROM saga_history ORDER BY at")]
    before = [b - a for a, b in itertools.pairwise(times) if b <= killed_at]
    after = [
        b - a
        for a, b in itertools.pairwise(times)
        if killed_at <= b <= killed_at + timedelta(seconds=60)
    ]
    pause_s = max(after, default=timedelta()).total_seconds()
    calm_s = max(before, default=timedelta()).total_seconds()
    finished_s = (times[-1] - killed_at).total_seconds()
    print(
        f"\ncluster failover: {ORDERS} orders ({ORDERS - declined} completed, {declined} "
        f"compensated), 0 lost, 0 effects twice; consumption paused {pause_s:.1f} s after "
        f"the leader was killed (widest gap before: {calm_s:.2f} s); the killed node was back "
        f"{restart_took_s:.0f} s after its restart began and its worker consumed again "
        f"{reconnect_s:.1f} s later; last transition {finished_s:.1f} s after the kill"
    )
    for worker in workers:
        assert worker.returncode is None, worker.output()
