"""A database filled by a real demo run, with a worker still beating: what dashboards read.

Helpers for the read-model tests (not a test module). `demo_world()` runs
`sagaworks demo`'s engine (`run_demo`) into a database of its own, then keeps
a real worker running on it, places an order nobody dispatches (a saga in
progress) and one order the boundary rejects (a dead letter), and waits until
the worker's heartbeat reports its queues. Every row the read models show
comes from the engine's own paths.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
from broker_tools import USER, delete_prefixed

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.demo.run import DemoReport, run_demo
from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.participants import simulated_ports
from sagas.order_fulfilment.simulation.shop import publish, simulated_publishers
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.bootstrap import bootstrap, own_user
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

__all__ = ["DemoWorld", "demo_world", "eventually"]

DEMO_ORDERS = 60


@dataclass(frozen=True)
class DemoWorld:
    settings: Settings
    dsn: str
    """Plain asyncpg DSN of the database."""
    report: DemoReport
    waiting_order: str
    """An order whose saga waits for a dispatch that never comes."""


async def eventually(check: Callable[[], Awaitable[bool]], what: str, deadline_s: float) -> None:
    """Poll `check` until it holds; fail naming `what` after `deadline_s`."""
    deadline = time.monotonic() + deadline_s
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {deadline_s}s: {what}")
        await asyncio.sleep(0.1)


@asynccontextmanager
async def demo_world(database_url: str, run_id: str) -> AsyncIterator[DemoWorld]:
    prefix = f"{run_id}.{secrets.token_hex(3)}."
    settings = Settings.load(
        secrets_dir=None,
        database_url=database_url,
        exchange_prefix=prefix,
        heartbeat_interval_s=0.5,
        grace_period_s=5.0,
        db_pool_size=5,
    )
    for user in dict.fromkeys((own_user(settings), USER)):
        settings = simulated_publishers(settings, user)
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    report = await run_demo(settings, DEMO_ORDERS, timeout_s=120.0, seed=11)
    system = await bootstrap(settings, [order_fulfilment], simulated_ports())
    worker = Worker(system)
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    try:
        await worker.start()
        waiting = f"waiting-{secrets.token_hex(3)}"
        async with connection.channel(publisher_confirms=True) as channel:
            orders = await channel.get_exchange(exchange_name(prefix, OrderPlaced.domain))
            order = OrderPlaced(
                order_id=waiting,
                customer_id="c-read-models",
                lines=(OrderLine(sku="sku-1", quantity=1),),
                amount_cents=1200,
                currency="EUR",
                dispatch_by=datetime.now(UTC) + timedelta(hours=1),
            )
            await publish(orders, order, f"{waiting}-placed", source="test", user_id=USER)
            await orders.publish(
                aio_pika.Message(
                    b'{"order_id": ""}',
                    message_id=f"invalid-{secrets.token_hex(3)}",
                    type=OrderPlaced.message_type,
                    user_id=USER,
                    content_type="application/json",
                ),
                routing_key=OrderPlaced.routing_key,
            )
        conn = await asyncpg.connect(dsn)
        try:

            async def ready() -> bool:
                waiting_row = await conn.fetchval(
                    "SELECT current_step FROM saga_instances WHERE correlation_key = $1", waiting
                )
                letters = await conn.fetchval("SELECT count(*) FROM dead_letters")
                depths = await conn.fetchval(
                    "SELECT count(*) FROM worker_heartbeats WHERE queue_depths <> '{}'"
                )
                return waiting_row == "await_dispatch" and letters > 0 and depths > 0

            await eventually(ready, "a waiting saga, a dead letter and a heartbeat", 30.0)
        finally:
            await conn.close()
        yield DemoWorld(settings, dsn, report, waiting)
    finally:
        await worker.stop()
        await system.aclose()
        await delete_prefixed(connection, prefix)
        await connection.close()
