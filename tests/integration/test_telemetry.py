"""OpenTelemetry pushed by OTLP: one trace per saga across two worker processes, and metrics.

Two `sagaworks worker` processes export to a small OTLP/HTTP receiver the test
runs on loopback. The first worker takes each order through its first three
steps to the wait for dispatch and is stopped; the second gets the dispatch
events (sent with no trace context, as a warehouse that does not trace would)
and finishes the sagas. Every span of a saga, in both processes, must be in
the trace of the order that started it; the only span outside it is the
dispatch event's own delivery.
"""

from __future__ import annotations

import secrets
import signal
from datetime import UTC, datetime, timedelta

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import USER
from otlp_receiver import Received, ReceivedSpan, otlp_receiver
from test_worker_lifecycle import SAGA, consuming, sagas_by_order
from worker_processes import Spawn, eventually, worker_env

from sagas.order_fulfilment.messages import (
    Message,
    OrderFulfilled,
    OrderLine,
    OrderPlaced,
    ShipmentDispatched,
)
from sagaworks.adapters.rabbitmq.topology import exchange_name, port_queue_name, saga_queue_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ORDERS = 3
PORTS = ("inventory", "payments", "shipping")


def traceparent() -> tuple[str, str]:
    """A fresh W3C `traceparent` as an order service that traces would send, and its trace id."""
    trace_id = secrets.token_hex(16)
    return f"00-{trace_id}-{secrets.token_hex(8)}-01", trace_id


async def publish(
    broker: AbstractRobustConnection,
    prefix: str,
    message: Message,
    message_id: str,
    headers: dict[str, str],
) -> None:
    async with broker.channel(publisher_confirms=True) as channel:
        exchange = await channel.get_exchange(exchange_name(prefix, message.domain))
        await exchange.publish(
            aio_pika.Message(
                message.model_dump_json().encode(),
                message_id=message_id,
                type=message.message_type,
                app_id="tests/telemetry",
                user_id=USER,
                timestamp=datetime.now(UTC),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"cloudEvents_specversion": "1.0", **headers},
            ),
            routing_key=message.routing_key,
        )


def order(order_id: str) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=f"customer-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=1),),
        amount_cents=1999,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(days=7),
    )


def spans_of(received: Received, saga_id: str) -> list[ReceivedSpan]:
    with received.lock:
        return [s for s in received.spans if s.attributes.get("sagaworks.saga.id") == saga_id]


async def test_one_saga_is_one_trace_across_two_workers_and_metrics_reach_the_collector(
    spawn: Spawn,
    prefix: str,
    migrated_database_url: str,
    db: asyncpg.Connection,
    broker: AbstractRobustConnection,
) -> None:
    with otlp_receiver() as (endpoint, received):
        env = worker_env(
            migrated_database_url,
            prefix,
            OTEL_EXPORTER_OTLP_ENDPOINT=endpoint,
            OTEL_BSP_SCHEDULE_DELAY="200",
            OTEL_METRIC_EXPORT_INTERVAL="500",
            OTEL_SERVICE_NAME="sagaworks-test",
        )
        queues = [saga_queue_name(prefix, SAGA), *(port_queue_name(prefix, p) for p in PORTS)]

        first = await spawn(env, "first")
        await eventually(
            lambda: consuming(broker, queues), "the first worker", timeout_s=60, workers=(first,)
        )
        run = secrets.token_hex(3)
        traces = {}
        for n in range(ORDERS):
            order_id = f"tel-{run}-{n}"
            header, trace_id = traceparent()
            traces[order_id] = trace_id
            await publish(
                broker, prefix, order(order_id), f"placed-{order_id}", {"traceparent": header}
            )

        async def all_waiting() -> bool:
            sagas = await sagas_by_order(db)
            return set(sagas) == set(traces) and all(
                s["current_step"] == "await_dispatch" for s in sagas.values()
            )

        await eventually(
            all_waiting, "every saga to wait for dispatch", timeout_s=60, workers=(first,)
        )
        code, _ = await first.stop(signal.SIGTERM, timeout_s=40)
        assert code == 0, first.output()

        second = await spawn(env, "second")
        await eventually(
            lambda: consuming(broker, queues), "the second worker", timeout_s=60, workers=(second,)
        )
        for order_id in traces:
            dispatched = ShipmentDispatched(order_id=order_id, shipment_id=f"shp-{order_id}")
            await publish(broker, prefix, dispatched, f"dispatched-{order_id}", {})

        async def all_completed() -> bool:
            sagas = await sagas_by_order(db)
            return all(s["status"] == "completed" for s in sagas.values())

        await eventually(all_completed, "every saga to complete", timeout_s=60, workers=(second,))
        code, _ = await second.stop(signal.SIGTERM, timeout_s=40)
        assert code == 0, second.output()

        sagas = await sagas_by_order(db)
        for order_id, trace_id in traces.items():
            saga_id = str(sagas[order_id]["id"])
            spans = spans_of(received, saga_id)
            dispatch = [
                s
                for s in spans
                if s.attributes.get("messaging.message.id") == f"dispatched-{order_id}"
            ]
            assert len(dispatch) == 1, [s.name for s in spans]
            traced = [s for s in spans if s not in dispatch]
            names = sorted(s.name for s in traced)
            assert {s.trace_id for s in traced} == {trace_id}, names
            instances = {s.resource["service.instance.id"] for s in traced}
            assert len(instances) == 2, f"spans from {instances}: {names}"
            calls = {s.name for s in traced if s.attributes.get("sagaworks.port")}
            assert calls == {
                "call inventory.reserve_stock",
                "call payments.authorise_payment",
                "call shipping.book_shipment",
                "call payments.capture_payment",
            }
            for call in (s for s in traced if s.attributes.get("sagaworks.port")):
                assert call.attributes["sagaworks.outcome"] == "succeeded"
                assert call.attributes["sagaworks.attempt"] == 1
                assert call.parent_span_id, f"{call.name} has no parent"
            # The outcome event the second worker published continues the saga's trace too.
            published = await db.fetchval(
                "SELECT trace_context FROM outbox WHERE saga_id = $1 AND routing_key = $2",
                sagas[order_id]["id"],
                OrderFulfilled.routing_key,
            )
            assert published is not None
            assert published.split("-")[1] == trace_id
            assert {s.resource["service.name"] for s in traced} == {"sagaworks-test"}

        with received.lock:
            finished = list(received.metrics.get("sagaworks.sagas.finished", []))
            steps = list(received.metrics.get("sagaworks.port.call.duration", []))
        assert {(p["step"], p["outcome"]) for p in steps if p["count"] > 0} >= {
            ("reserve_stock", "succeeded"),
            ("capture_payment", "succeeded"),
        }
        # Cumulative sums (OTLP's default temporality): every export repeats the running total.
        assert max(p["value"] for p in finished if p["status"] == "completed") == ORDERS


async def test_with_telemetry_off_the_trace_context_still_travels_with_the_saga(
    spawn: Spawn,
    prefix: str,
    migrated_database_url: str,
    db: asyncpg.Connection,
    broker: AbstractRobustConnection,
) -> None:
    env = {
        k: v
        for k, v in worker_env(migrated_database_url, prefix).items()
        if not k.startswith("OTEL_")
    }
    queues = [saga_queue_name(prefix, SAGA), *(port_queue_name(prefix, p) for p in PORTS)]
    worker = await spawn(env, "untraced")
    await eventually(
        lambda: consuming(broker, queues), "the worker", timeout_s=60, workers=(worker,)
    )
    header, _ = traceparent()
    order_id = f"off-{secrets.token_hex(3)}"
    await publish(broker, prefix, order(order_id), f"placed-{order_id}", {"traceparent": header})

    async def waiting() -> bool:
        saga = (await sagas_by_order(db)).get(order_id)
        return saga is not None and saga["current_step"] == "await_dispatch"

    await eventually(waiting, "the saga to wait for dispatch", timeout_s=60, workers=(worker,))
    code, _ = await worker.stop(signal.SIGTERM, timeout_s=40)
    assert code == 0, worker.output()

    saga_id = (await sagas_by_order(db))[order_id]["id"]
    assert (
        await db.fetchval("SELECT trace_context FROM saga_instances WHERE id = $1", saga_id)
        == header
    )
    carried = await db.fetch("SELECT trace_context FROM outbox WHERE saga_id = $1", saga_id)
    assert len(carried) == 3  # reserve, authorise, book: each command continued the order's trace
    assert {row["trace_context"] for row in carried} == {header}
    timers = await db.fetch("SELECT trace_context FROM timers WHERE saga_id = $1", saga_id)
    assert [row["trace_context"] for row in timers] == [header]  # the dispatch deadline
