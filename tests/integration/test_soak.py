"""The soak: the demo's traffic mix for many minutes with pruning on; the tables must stay flat.

Runs only with `SAGAWORKS_SOAK_MINUTES` set (e.g. 30). The database is a
private PostgreSQL cluster with the stock configuration (autovacuum on: the
shared test cluster runs without it, and table sizes mean nothing there). A
`sagaworks worker` subprocess (simulated participants, scheduled pruning with
retention scaled down to minutes so the steady state arrives early) serves
orders this process publishes at `SAGAWORKS_SOAK_RATE` orders/s (default 20, well within
what one worker sustains with pruning and autovacuum on the slowest two-core machine
measured; docs/retention.md says how to soak at half of `sagaworks bench` instead; the
warehouse's events are sent on a clock, not on the saga's commands, so a rate near
capacity tips into parking them, which costs more). Every minute it samples
table sizes and row counts, the steps and sagas ended in that minute, and
the step latency percentiles from the history; the samples go to
`SAGAWORKS_SOAK_REPORT` (JSON, default under the test's tmp dir) and are
printed as a table, with the slowest dashboard query over the history at
that minute. At the end, the second half's table sizes must not
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

import aio_pika
import asyncpg
import pytest
from broker_tools import USER, delete_prefixed
from private_services import POSTGRES_BIN_DIRS, _binary, _run, free_port
from worker_processes import Spawn, WorkerProcess, worker_env

from sagas.order_fulfilment.simulation.order_mix import OrderPlan, Send, plan_orders
from sagas.order_fulfilment.simulation.shop import publish
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.rabbitmq.topology import exchange_name, saga_queue_name

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
WAREHOUSE_DELAY_S = 0.5
"""The warehouse answers a booking after this (plus the mix's own delay)."""
WARM_UP_MINUTES = 5
"""Samples before the steady state: retention (2 min) plus a prune interval, with margin."""
GROWTH_SLACK = 1.25
"""The second half's largest size may exceed the first half's largest by this factor at most."""

DASHBOARD_VIEWS = ("throughput_per_minute", "step_latency", "port_activity")
"""The read models over the saga history: the ones whose cost could grow with traffic."""

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


def _sends(plan: OrderPlan) -> list[Send]:
    """The order service's messages and, a while later, the warehouse's: one sender, in time."""
    later = [Send(WAREHOUSE_DELAY_S + s.delay_s, s.message, s.message_id) for s in plan.warehouse]
    return [*plan.order_service, *later]


async def _send_plan(
    exchange_for: Callable[[str], Awaitable[aio_pika.abc.AbstractExchange]], plan: OrderPlan
) -> None:
    for send in sorted(_sends(plan), key=lambda s: s.delay_s):
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

    samples: list[Sample] = []
    pending: set[asyncio.Task[None]] = set()
    sent = 0
    started = time.monotonic()
    window_start = datetime.now(UTC)
    next_sample = started + 60
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
                task = asyncio.create_task(_send_plan(exchange_for, plans.pop()))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            if time.monotonic() >= next_sample:
                now = datetime.now(UTC)
                samples.append(await sample(db, len(samples) + 1, window_start, now, sent))
                print(print_table(samples[-1:]), flush=True)
                window_start, next_sample = now, next_sample + 60
                _write(report, samples)
                assert worker.returncode is None, worker.output()
            await asyncio.sleep(tick)
        await asyncio.gather(*pending)
        await asyncio.sleep(30)
        stuck = await db.fetchval(
            "SELECT count(*) FROM saga_instances WHERE status NOT IN "
            "('completed', 'compensated') AND created_at < now() - interval '60 seconds'"
        )
        async with broker.channel() as probe:
            waiting = (await probe.declare_queue(queue, passive=True)).declaration_result
        unread = waiting.message_count
    finally:
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
