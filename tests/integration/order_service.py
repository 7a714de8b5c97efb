"""Placing orders on the real broker as the order service would."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from aio_pika.abc import AbstractRobustConnection
from broker_tools import USER

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.shop import publish
from sagaworks.adapters.rabbitmq.topology import exchange_name

__all__ = ["publish_orders"]


async def publish_orders(
    connection: AbstractRobustConnection, prefix: str, order_ids: Iterable[str], *, quantity: int
) -> None:
    """Publish one `OrderPlaced` per order id, in order, with confirms, as the tests' user."""
    async with connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
        exchange = await channel.get_exchange(exchange_name(prefix, OrderPlaced.domain))
        for order_id in order_ids:
            await publish(
                exchange,
                OrderPlaced(
                    order_id=order_id,
                    customer_id=f"customer-{order_id}",
                    lines=(OrderLine(sku="sku-1", quantity=quantity),),
                    amount_cents=1999,
                    currency="EUR",
                    dispatch_by=datetime.now(UTC) + timedelta(days=7),
                ),
                f"placed-{order_id}",
                source="tests/order-service",
                user_id=USER,
                correlation_id=order_id,
            )
