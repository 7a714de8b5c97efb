"""The soak: the demo's traffic mix for many minutes with pruning on; the tables must stay flat.

Runs only with `SAGAWORKS_SOAK_MINUTES` set (e.g. 30). The database is a
private PostgreSQL cluster with the stock configuration (autovacuum on: the
shared test cluster runs without it, and table sizes mean nothing there). A
`sagaworks worker` subprocess (simulated participants, scheduled pruning with
retention scaled down to minutes so the steady state arrives early) serves
orders this process publishes at `SAGAWORKS_SOAK_RATE` orders/s (default 20, well within
what one worker sustains with pruning and autovacuum on the slowest two-core machine
measured; docs/retention.md says how to soak at half of `sagaworks bench` instead).
As in the demo, the warehouse answers bookings: it sends what the order's plan says
once the saga has started booking its shipment (read from the history), so its
events arrive before their saga is ready only where the mix means them to.
Every minute, without holding up the orders, it samples table sizes and row counts,
the steps and sagas ended in that minute, and the step latency percentiles from
the history; the samples go to `SAGAWORKS_SOAK_REPORT` (JSON, default under the
test's tmp dir) and are printed as a table, with the slowest dashboard query over
the history at that minute. At the end, the second half's table sizes must not
have grown past the first half's by more than the slack below, and every
saga older than a minute must have ended.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import aio_pika
import asyncpg
import pytest
from broker_tools import USER, delete_prefixed
from private_services import POSTGRES_BIN_DIRS, _binary, _run, free_port
from worker_processes import Spawn, WorkerProcess, worker_env

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.order_mix import OrderPlan, plan_orders
from sagas.order_fulfilment.simulation.shop import Warehouse, publish
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.rabbitmq.topology import exchange_name, saga_queue_name
from sagaworks.domain.instance import saga_id_for

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.soak]

TABLES = (
    "inbox",
    "outbox",
    "saga_instances",
    "saga_history",
    "timers",
    "parked_messages",
    "dead_letters",
)
RETENTION = {
    "SAGAWORKS_RETAIN_INBOX_S": "120",
    "SAGAWORKS_RETAIN_PUBLISHED_OUTBOX_S": "30",
    "SAGAWORKS_RETAIN_FINISHED_SAGAS_S": "120",
    "SAGAWORKS_RETAIN_DEAD_LETTERS_S": "120",
    "SAGAWORKS_PRUNE_INTERVAL_S": "30",
}
"""Retention in minutes instead of days: the steady state arrives within the first ten minutes."""
BOOKINGS_POLL_S = 0.1
"""How often the warehouse looks in the history for sagas that started booking a shipment."""
BOOKINGS_LOOKBACK = 5000
"""History ids are drawn before their transactions commit: each look starts this many back."""
WARM_UP_MINUTES = 5
"""Samples before the steady state: retention (2 min) plus a prune interval, with margin."""
GROWTH_SLACK = 1.25
"""The second half's largest size may exceed the first half's largest by this factor at most."""

DASHBOARD_VIEWS = ("throughput_per_minute", "step_latency", "port_activity")
"""The read models over the saga history: the ones whose cost could grow with traffic."""

_BOOKINGS = """
SELECT id, saga_id FROM saga_history
WHERE id > $1 AND kind = 'step_started' AND step = 'book_shipment'
"""

_STEP_LATENCY = """
WITH done AS (
    SELECT saga_id, step, at FROM saga_history
    WHERE kind IN ('step_completed', 'compensation_completed', 'step_failed')
      AND at >= $1 AND at < $2
)
SELECT percentile_cont(ARRAY[0.5, 0.99]) WITHIN GROUP (ORDER BY extract(epoch FROM d.at - s.at))
FROM done d CROSS JOIN LATERAL (
    SELECT max(h.at) AS at FROM saga_history h
    WHERE h.saga_id = d.saga_id AND h.step = d.step AND h.kind = 'step_started' AND h.at <= d.at
) s WHERE s.at IS NOT NULL
"""


@dataclass
class Sample:
    minute: int
    orders_sent: int
    steps_per_s: float
    ended_per_s: float
    step_p50_ms: float | None
    step_p99_ms: float | None
    dashboard_ms: float
    """The slowest of the history views' queries (`DASHBOARD_VIEWS`), as a dashboard runs it."""
    rows: dict[str, int] = field(default_factory=dict)
    kib: dict[str, int] = field(default_factory=dict)


@contextmanager
def stock_postgres() -> Iterator[str]:
    """A private cluster with PostgreSQL's stock settings on a free port: yields its base URL."""
    initdb = _binary("initdb", POSTGRES_BIN_DIRS, "the soak needs PostgreSQL 15")
    pg_ctl = _binary("pg_ctl", POSTGRES_BIN_DIRS, "the soak needs PostgreSQL 15")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    runtime = Path(tempfile.mkdtemp(prefix="sagaworks-soak-pg-"))
    if as_user:
        shutil.chown(runtime, "postgres", "postgres")
    data = runtime / "data"
    _run([*as_user, str(initdb), "-D", str(data), "-U", "postgres", "--auth=trust"],
         what="initdb", timeout_s=120)  # fmt: skip
    port = free_port()
    options = f"-p {port} -k {runtime} -c listen_addresses=127.0.0.1"
    _run([*as_user, str(pg_ctl), "-D", str(data), "-l", str(runtime / "postgres.log"), "-w",
          "-o", options, "start"], what="pg_ctl start", timeout_s=120)  # fmt: skip
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        _run([*as_user, str(pg_ctl), "-D", str(data), "-m", "fast", "-w", "stop"],
             what="pg_ctl stop", timeout_s=120)  # fmt: skip
        shutil.rmtree(runtime, ignore_errors=True)


def _soak_minutes() -> float:
    minutes = os.environ.get("SAGAWORKS_SOAK_MINUTES")
    if not minutes:
        pytest.skip("the soak: set SAGAWORKS_SOAK_MINUTES (e.g. 30) to run it")
    return float(minutes)


async def sample(
    db: asyncpg.Connection, minute: int, start: datetime, end: datetime, sent: int
) -> Sample:
    seconds = (end - start).total_seconds()
    steps = await db.fetchval(
        "SELECT count(*) FROM inbox WHERE processed_at >= $1 AND processed_at < $2", start, end
    )
    ended = await db.fetchval(
        "SELECT count(*) FROM saga_history WHERE kind IN ('completed', 'compensated') "
        "AND at >= $1 AND at < $2",
        start,
        end,
    )
    latency = await db.fetchval(_STEP_LATENCY, start, end)
    p50, p99 = (None, None) if latency is None else (latency[0] * 1000, latency[1] * 1000)
    dashboard_ms = 0.0
    for view in DASHBOARD_VIEWS:
        began = time.perf_counter()
        await db.fetch(f"SELECT * FROM sagaworks_read.{view}")
        dashboard_ms = max(dashboard_ms, (time.perf_counter() - began) * 1000)
    rows, kib = {}, {}
    for table in TABLES:
        rows[table] = await db.fetchval(f"SELECT count(*) FROM {table}")
        kib[table] = await db.fetchval("SELECT pg_total_relation_size($1::regclass)", table) // 1024
    return Sample(
        minute,
        sent,
        round(steps / seconds, 1),
        round(ended / seconds, 1),
        None if p50 is None else round(p50, 1),
        None if p99 is None else round(p99, 1),
        round(dashboard_ms, 1),
        rows,
        kib,
    )


async def _send_plan(
    exchange_for: Callable[[str], Awaitable[aio_pika.abc.AbstractExchange]], plan: OrderPlan
) -> None:
    """The order service's messages, one after the other, as the demo sends them."""
    for send in plan.order_service:
        await asyncio.sleep(send.delay_s)
        exchange = await exchange_for(send.message.domain)
        await publish(
            exchange,
            send.message,
            send.message_id,
            source="soak",
            user_id=USER,
            correlation_id=plan.order_id,
        )


async def answer_bookings(
    database_url: str, waiting: dict[UUID, str], warehouse: Warehouse, done: asyncio.Event
) -> None:
    """Tells the warehouse of each order whose saga started booking its shipment, once.

    The worker's simulated shipping participant runs in its own process; the
    step's `step_started` row is this process's sign that it books now.
    """
    db = await asyncpg.connect(database_url)
    try:
        seen = 0
        while not done.is_set():
            for row in await db.fetch(_BOOKINGS, seen - BOOKINGS_LOOKBACK):
                seen = max(seen, row["id"])
                if (order_id := waiting.pop(row["saga_id"], None)) is not None:
                    warehouse.on_booked(order_id, f"shp-{order_id}")
            await asyncio.sleep(BOOKINGS_POLL_S)
    finally:
        await db.close()


async def take_samples(
    database_url: str,
    minutes: float,
    started: float,
    sent: Callable[[], int],
    report: Path,
    worker: WorkerProcess,
) -> list[Sample]:
    """A sample at the end of each whole minute, on its own connection: orders go on meanwhile."""
    db = await asyncpg.connect(database_url)
    samples: list[Sample] = []
    try:
        window_start = datetime.now(UTC)
        for minute in range(1, int(minutes) + 1):
            await asyncio.sleep(max(0.0, started + 60 * minute - time.monotonic()))
            now = datetime.now(UTC)
            samples.append(await sample(db, minute, window_start, now, sent()))
            print(print_table(samples[-1:]), flush=True)
            window_start = now
            _write(report, samples)
            assert worker.returncode is None, worker.output()
    finally:
        await db.close()
    return samples


def _write(report: Path, samples: list[Sample]) -> None:
    report.write_text(json.dumps([asdict(s) for s in samples], indent=1))


def print_table(samples: list[Sample]) -> str:
    header = (
        f"{'min':>3} {'sent':>7} {'steps/s':>8} {'ended/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'dash ms':>7} " + " ".join(f"{t[:12]:>12}" for t in TABLES)
    )
    lines = [header]
    for s in samples:
        sizes = " ".join(f"{s.rows[t]:>6}/{s.kib[t]:>5}" for t in TABLES)
        lines.append(
            f"{s.minute:>3} {s.orders_sent:>7} {s.steps_per_s:>8} {s.ended_per_s:>8} "
            f"{s.step_p50_ms!s:>7} {s.step_p99_ms!s:>7} {s.dashboard_ms:>7} {sizes}"
        )
    return "\n".join(lines)


async def test_soak_with_pruning_keeps_the_tables_flat(
    spawn: Spawn,
    run_id: str,
    tmp_path: Path,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    minutes = _soak_minutes()
    try:
        with stock_postgres() as server:
            await _soak(spawn, f"{server}/soak", minutes, run_id, tmp_path, broker)
    finally:
        await delete_prefixed(broker, f"{run_id}.soak.")


async def _soak(
    spawn: Spawn,
    database_url: str,
    minutes: float,
    run_id: str,
    tmp_path: Path,
    broker: aio_pika.abc.AbstractRobustConnection,
) -> None:
    admin = await asyncpg.connect(database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute("CREATE DATABASE soak")
    finally:
        await admin.close()
    await upgrade(database_url, "head")
    rate = float(os.environ.get("SAGAWORKS_SOAK_RATE", "20"))
    report = Path(os.environ.get("SAGAWORKS_SOAK_REPORT", str(tmp_path / "soak.json")))
    prefix = f"{run_id}.soak."
    env = worker_env(database_url, prefix, **RETENTION)
    worker: WorkerProcess = await spawn(env)
    db = await asyncpg.connect(database_url)
    channel = await broker.channel(publisher_confirms=True)
    exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}

    async def exchange_for(domain: str) -> aio_pika.abc.AbstractExchange:
        if domain not in exchanges:
            exchanges[domain] = await channel.get_exchange(exchange_name(prefix, domain))
        return exchanges[domain]

    queue = saga_queue_name(prefix, "order_fulfilment")
    deadline = time.monotonic() + 60
    while True:
        try:
            async with broker.channel() as probe:
                await probe.declare_queue(queue, passive=True)
            break
        except aio_pika.exceptions.ChannelClosed:
            assert worker.returncode is None, worker.output()
            assert time.monotonic() < deadline, "the worker did not declare its topology"
            await asyncio.sleep(0.5)

    pending: set[asyncio.Task[None]] = set()
    waiting: dict[UUID, str] = {}  # saga id → order id, where the warehouse awaits the booking
    answered: dict[str, OrderPlan] = {}
    warehouse = Warehouse(
        channel,
        lambda domain: exchange_name(prefix, domain),
        lambda order_id, _shipment: [
            (s.delay_s, s.message, s.message_id) for s in answered.pop(order_id).warehouse
        ],
        USER,
    )
    no_more_bookings = asyncio.Event()
    bookings = asyncio.create_task(
        answer_bookings(database_url, waiting, warehouse, no_more_bookings)
    )
    sent = 0
    started = time.monotonic()
    sampler = asyncio.create_task(
        take_samples(database_url, minutes, started, lambda: sent, report, worker)
    )
    tick = 0.1
    batch = 0
    plans: list[OrderPlan] = []
    try:
        while time.monotonic() - started < minutes * 60:
            due = int((time.monotonic() - started) * rate) - sent
            for _ in range(max(due, 0)):
                if not plans:
                    plans = plan_orders(1000, f"{run_id}-{batch}", datetime.now(UTC), seed=batch)
                    batch += 1
                plan = plans.pop()
                if plan.warehouse:
                    waiting[saga_id_for(order_fulfilment.name, plan.order_id)] = plan.order_id
                    answered[plan.order_id] = plan
                task = asyncio.create_task(_send_plan(exchange_for, plan))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            for helper in (sampler, bookings):
                if helper.done():
                    helper.result()  # raises what stopped it
            await asyncio.sleep(tick)
        samples = await sampler
        await asyncio.gather(*pending)
        await asyncio.sleep(30)
        no_more_bookings.set()
        await bookings
        stuck = await db.fetchval(
            "SELECT count(*) FROM saga_instances WHERE status NOT IN "
            "('completed', 'compensated') AND created_at < now() - interval '60 seconds'"
        )
        async with broker.channel() as probe:
            waiting_in_queue = (await probe.declare_queue(queue, passive=True)).declaration_result
        unread = waiting_in_queue.message_count
    finally:
        for helper in (sampler, bookings):
            helper.cancel()
        await asyncio.gather(sampler, bookings, return_exceptions=True)
        await warehouse.stop()
        await db.close()
        await channel.close()
        await worker.stop(signal.SIGTERM, 30)

    summary = print_table(samples)
    print(f"\nsoak: {minutes} min at {rate} orders/s, {sent} orders\n{summary}")
    _write(report, samples)
    assert unread == 0, f"{unread} messages still wait in {queue}: the worker fell behind"
    assert stuck == 0, "every saga older than a minute ended"
    assert statistics.median(s.steps_per_s for s in samples) > 0
    if len(samples) < 2 * WARM_UP_MINUTES:
        return  # too short a run to tell flat from growing: the figures are the result
    half = len(samples) // 2
    first, second = samples[WARM_UP_MINUTES:half], samples[half:]
    for table in ("inbox", "outbox", "saga_instances", "saga_history"):
        grew = max(s.rows[table] for s in second) / max(1, max(s.rows[table] for s in first))
        assert grew <= GROWTH_SLACK, f"{table} kept growing: x{grew:.2f}"
