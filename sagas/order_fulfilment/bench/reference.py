"""The yardstick of `sagaworks bench`: a minimal hand-written saga step pipeline.

One step = consume from a quorum queue → one transaction (inbox insert
`ON CONFLICT DO NOTHING`, `SELECT … FOR UPDATE` of the saga row, versioned
`UPDATE`, outbox insert) → confirmed, persistent publish of the next message
→ ack. The first step of a saga inserts its row instead of locking it; the
last step publishes a "done" message that the bench driver consumes, as the
engine publishes `order.fulfilled`. aio-pika and asyncpg are used directly and
nothing else is done: no validation, no history, no timers, no framework.
It is what the engine is measured against, so it must stay this small.

Run as `python -m sagas.order_fulfilment.bench.reference` by the bench (one
process per engine worker, so both get the same share of the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from sagaworks.entrypoints.gc_tuning import tune_for_throughput

__all__ = [
    "DONE_ROUTING_KEY",
    "STEP_ROUTING_KEY",
    "drop_reference",
    "main",
    "plain_dsn",
    "prepare_reference",
    "reference_names",
    "run_reference",
    "step_message",
]

STEP_ROUTING_KEY = "step"
DONE_ROUTING_KEY = "done"

_DDL = """
CREATE TABLE IF NOT EXISTS bench_ref_sagas (
  id uuid PRIMARY KEY, version integer NOT NULL, state jsonb NOT NULL,
  updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_ref_inbox (
  message_id text PRIMARY KEY, processed_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS bench_ref_outbox (
  id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, message_id text NOT NULL UNIQUE,
  saga_id uuid NOT NULL, body bytea NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
"""

_DROP = "DROP TABLE IF EXISTS bench_ref_sagas, bench_ref_inbox, bench_ref_outbox"

_CLAIM = "INSERT INTO bench_ref_inbox (message_id) VALUES ($1) ON CONFLICT DO NOTHING RETURNING 1"
_INSERT = "INSERT INTO bench_ref_sagas (id, version, state) VALUES ($1, 1, $2)"
_LOCK = "SELECT version FROM bench_ref_sagas WHERE id = $1 FOR UPDATE"
_UPDATE = (
    "UPDATE bench_ref_sagas SET version = version + 1, state = $2, updated_at = now() "
    "WHERE id = $1 AND version = $3"
)
_OUTBOX = "INSERT INTO bench_ref_outbox (message_id, saga_id, body) VALUES ($1, $2, $3)"


def plain_dsn(url: str) -> str:
    """asyncpg wants `postgresql://`; settings may say `postgresql+asyncpg://`."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def reference_names(prefix: str) -> tuple[str, str]:
    """(topic exchange, step queue) of the reference pipeline under a name prefix."""
    return f"{prefix}bench.reference", f"{prefix}bench.reference.steps"


def step_message(saga: str, step: int, steps: int, stamps: list[float]) -> aio_pika.Message:
    """Message `step` (1-based) of a saga; `stamps` are the commit times of the steps so far."""
    body = {"saga": saga, "step": step, "steps": steps, "ts": stamps}
    return aio_pika.Message(
        json.dumps(body).encode(),
        message_id=f"{saga}/{step}",
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def prepare_reference(dsn: str) -> None:
    await _execute(dsn, _DDL)


async def drop_reference(dsn: str) -> None:
    await _execute(dsn, _DROP)


async def _execute(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(plain_dsn(dsn))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _step(
    pool: asyncpg.Pool, exchange: AbstractExchange, message: AbstractIncomingMessage
) -> None:
    body: dict[str, Any] = json.loads(message.body)
    saga, step, steps = body["saga"], int(body["step"]), int(body["steps"])
    state = json.dumps({"step": step})
    async with pool.acquire() as conn, conn.transaction():
        if await conn.fetchval(_CLAIM, message.message_id) is None:
            await message.ack()
            return
        if step == 1:
            await conn.execute(_INSERT, saga, state)
        else:
            version = await conn.fetchval(_LOCK, saga)
            await conn.execute(_UPDATE, saga, state, version)
        nxt = step_message(saga, step + 1, steps, [*body["ts"], time.time()])
        await conn.execute(_OUTBOX, nxt.message_id, saga, nxt.body)
    key = DONE_ROUTING_KEY if step >= steps else STEP_ROUTING_KEY
    await exchange.publish(nxt, routing_key=key)
    await message.ack()


async def run_reference(
    amqp_url: str, dsn: str, prefix: str, *, prefetch: int, pool_size: int, stop: asyncio.Event
) -> None:
    """Consume the reference step queue until `stop` is set; print `ready` once consuming."""
    exchange_name, queue_name = reference_names(prefix)
    pool = await asyncpg.create_pool(plain_dsn(dsn), min_size=pool_size, max_size=pool_size)
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=prefetch)
        exchange = await channel.get_exchange(exchange_name)
        queue = await channel.get_queue(queue_name)

        async def on_message(message: AbstractIncomingMessage) -> None:
            try:
                await _step(pool, exchange, message)
            except Exception:  # noqa: BLE001 - the yardstick requeues like the engine does
                await message.nack(requeue=True)

        tag = await queue.consume(on_message)
        tune_for_throughput()  # as the worker's process does: compare pipelines, not GC settings
        print("ready", flush=True)  # noqa: T201 - the bench waits for this line
        await stop.wait()
        await queue.cancel(tag)
    finally:
        await connection.close()
        await pool.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point of one reference consumer process; SIGTERM stops it."""
    parser = argparse.ArgumentParser(prog="bench_reference")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--prefetch", type=int, default=128)
    parser.add_argument("--pool-size", type=int, default=10)
    args = parser.parse_args(argv)

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_reference(
            args.amqp_url,
            args.dsn,
            args.prefix,
            prefetch=args.prefetch,
            pool_size=args.pool_size,
            stop=stop,
        )

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on some platforms
        asyncio.run(go())
    else:
        uvloop.run(go())


if __name__ == "__main__":
    main()
