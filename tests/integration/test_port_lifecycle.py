"""A worker's system owns its port adapters: stopping it closes their HTTP clients.

The worker runs as `sagaworks worker` runs it (bootstrap, start, stop, close the
system) with the HTTP participants of order fulfilment, talking to fake
services on loopback, against the shared RabbitMQ and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import AMQP_URL, USER, delete_prefixed

from sagas.order_fulfilment.http_ports import http_ports
from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.fake_services import FakeServices
from sagas.order_fulfilment.simulation.shop import publish
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.bootstrap import bootstrap
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    connection = await aio_pika.connect_robust(AMQP_URL)
    yield connection
    await connection.close()


@pytest.fixture
async def services() -> AsyncIterator[FakeServices]:
    fakes = FakeServices()
    await fakes.start()
    yield fakes
    await fakes.stop()


async def place_order(connection: AbstractRobustConnection, prefix: str, order_id: str) -> None:
    async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
        exchange = await channel.get_exchange(exchange_name(prefix, OrderPlaced.domain))
        await publish(
            exchange,
            OrderPlaced(
                order_id=order_id,
                customer_id=f"customer-{order_id}",
                lines=(OrderLine(sku="sku-1", quantity=1),),
                amount_cents=1999,
                currency="EUR",
                dispatch_by=datetime.now(UTC) + timedelta(days=7),
            ),
            f"placed-{order_id}",
            source="tests/order-service",
            user_id=USER,
            correlation_id=order_id,
        )


async def test_stopping_the_worker_closes_the_http_clients_of_its_ports(
    settings_factory: Callable[..., Settings],
    migrated_database_url: str,
    broker: AbstractRobustConnection,
    services: FakeServices,
    run_id: str,
) -> None:
    prefix = f"{run_id}.pl{secrets.token_hex(3)}."
    settings = settings_factory(database_url=migrated_database_url, exchange_prefix=prefix)
    ports = http_ports(services.settings())
    system = await bootstrap(settings, [order_fulfilment], ports)
    worker = Worker(system)
    try:
        await worker.start()
        await place_order(broker, prefix, f"pl-{secrets.token_hex(3)}")
        for _ in range(600):  # every participant called: each client holds a connection
            if all(p.count() for p in services.participants):
                break
            await asyncio.sleep(0.05)
        assert all(p.count() for p in services.participants)
        assert not any(port.is_closed for port in ports.values())
    finally:
        await worker.stop()
        await system.aclose()
        await delete_prefixed(broker, prefix)
    assert {name: port.is_closed for name, port in ports.items()} == {
        "inventory": True,
        "payments": True,
        "shipping": True,
    }
