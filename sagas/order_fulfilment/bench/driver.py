"""`sagaworks bench`: the engine against a hand-written pipeline, on the same machine, in one run.

Both runs drive happy-path order-fulfilment sagas of `STEPS_PER_SAGA` steps
through real RabbitMQ and PostgreSQL, from this process (the driver), and
are served by separate processes:

- **engine**: `--workers` processes of `bench.worker` (the real `Worker` with
  simulated participants whose latency is `--latency-ms`);
- **reference**: as many processes of `bench.reference`, the minimal
  consume → transaction → confirmed publish → ack pipeline.

A *step* is one consumed message that causes one committed transition; a
saga is order.placed → reserve → authorise → book → shipment.dispatched →
capture = 6 steps (the reference runs 6-step sagas too). Step latency is the
time between consecutive transitions of a saga (the first from the publish of
its first message); saga latency runs from that publish to the outcome event
reaching the driver. After each run the bench checks that every saga ended,
that no transition or external effect happened twice, and removes its data.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import psutil
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.bench.reference import (
    DONE_ROUTING_KEY,
    STEP_ROUTING_KEY,
    drop_reference,
    plain_dsn,
    prepare_reference,
    reference_names,
    step_message,
)
from sagas.order_fulfilment.messages import OrderFulfilled, OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.shop import publish
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.rabbitmq.topology import exchange_name
from sagaworks.application.registry import SagaRegistry
from sagaworks.bootstrap import own_user, preflight, topology_for
from sagaworks.domain.instance import saga_id_for
from sagaworks.settings import Settings

__all__ = [
    "STEPS_PER_SAGA",
    "BenchConfig",
    "BenchReport",
    "RunResult",
    "format_report",
    "run_bench",
]

STEPS_PER_SAGA = 6
"""order.placed, reserve_stock, authorise_payment, book_shipment, shipment.dispatched, capture."""

_PORT_EFFECTS = ("reserve", "authorise", "book", "capture")
_ACTION_STEPS = 4


@dataclass(frozen=True)
class BenchConfig:
    workers: int = 1
    latency_s: float = 0.0
    sagas: int = 2000
    duration_s: float = 20.0
    rate: float | None = None
    """Sagas started per second (open loop); None: keep `in_flight` sagas running (closed loop)."""
    in_flight: int = 100
    reference: bool = True
    timeout_s: float = 120.0
    """Give up waiting for the remaining sagas after this long without one ending."""


@dataclass
class RunResult:
    """What one run (engine or reference) measured, and whether it verified."""

    name: str
    sagas: int = 0
    elapsed_s: float = 0.0
    step_ms: list[float] = field(default_factory=list)
    saga_ms: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)
    cpu_per_worker: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    problems: list[str] = field(default_factory=list)
    checks: dict[str, int] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return not self.problems

    @property
    def sagas_per_s(self) -> float:
        return self.sagas / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def steps_per_s(self) -> float:
        return self.sagas_per_s * STEPS_PER_SAGA

    def summary(self) -> dict[str, Any]:
        return {
            "sagas": self.sagas,
            "elapsed_s": round(self.elapsed_s, 3),
            "sagas_per_s": round(self.sagas_per_s, 1),
            "steps_per_s": round(self.steps_per_s, 1),
            "step_p50_ms": _pct(self.step_ms, 50),
            "step_p99_ms": _pct(self.step_ms, 99),
            "saga_p50_ms": _pct(self.saga_ms, 50),
            "saga_p99_ms": _pct(self.saga_ms, 99),
            "cpu": {k: round(v, 3) for k, v in self.cpu.items()},
            "cpu_per_worker": [round(v, 3) for v in self.cpu_per_worker],
            "rss_mb": round(self.rss_mb, 1),
            "verified": self.verified,
            "problems": self.problems,
            "checks": self.checks,
        }


@dataclass
class BenchReport:
    config: BenchConfig
    engine: RunResult
    reference: RunResult | None

    @property
    def verified(self) -> bool:
        return self.engine.verified and (self.reference is None or self.reference.verified)

    def as_dict(self) -> dict[str, Any]:
        engine = self.engine.summary()
        ceiling = self.reference.steps_per_s if self.reference is not None else None
        return {
            "sagas_per_s": engine["sagas_per_s"],
            "steps_per_s": engine["steps_per_s"],
            "step_p50_ms": engine["step_p50_ms"],
            "step_p99_ms": engine["step_p99_ms"],
            "saga_p50_ms": engine["saga_p50_ms"],
            "saga_p99_ms": engine["saga_p99_ms"],
            "ceiling_steps_per_s": round(ceiling, 1) if ceiling is not None else None,
            "ratio": round(self.engine.steps_per_s / ceiling, 3) if ceiling else None,
            "cpu": engine["cpu"],
            "worker_rss_mb": engine["rss_mb"],
            "verified": self.verified,
            "steps_per_saga": STEPS_PER_SAGA,
            "config": {
                "workers": self.config.workers,
                "latency_ms": round(self.config.latency_s * 1000, 3),
                "sagas": self.config.sagas,
                "duration_s": self.config.duration_s,
                "rate": self.config.rate,
                "in_flight": self.config.in_flight,
            },
            "engine": engine,
            "reference": self.reference.summary() if self.reference is not None else None,
        }


def _pct(values: list[float], p: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[p - 1], 2)


# --------------------------------------------------------------------------- load


class _Load:
    """Starts sagas closed-loop (`in_flight` at a time) or open-loop (`rate`), records timings."""

    def __init__(self, config: BenchConfig) -> None:
        self._config = config
        self._slots = asyncio.Semaphore(config.in_flight)
        self.published: dict[str, float] = {}
        self.finished: dict[str, float] = {}
        self.payloads: dict[str, Any] = {}
        self._changed = asyncio.Event()

    def finish(self, key: str, payload: Any = None) -> None:
        if key in self.finished or key not in self.published:
            return
        self.finished[key] = time.time()
        self.payloads[key] = payload
        self._slots.release()
        self._changed.set()

    async def run(self, keys: list[str], start: Callable[[str], Coroutine[Any, Any, None]]) -> None:
        config = self._config
        tasks: set[asyncio.Task[None]] = set()
        began = time.monotonic()
        for i, key in enumerate(keys):
            if time.monotonic() - began > config.duration_s:
                break
            if config.rate is None:
                await self._slots.acquire()
            else:
                await asyncio.sleep(max(0.0, began + i / config.rate - time.monotonic()))
                await self._slots.acquire()
            self.published[key] = time.time()
            task = asyncio.create_task(start(key))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
        deadline = time.monotonic() + config.timeout_s  # without progress for that long: give up
        while len(self.finished) < len(self.published) and time.monotonic() < deadline:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), 1.0)
            except TimeoutError:
                continue
            deadline = time.monotonic() + config.timeout_s

    @property
    def window_s(self) -> float:
        if not self.finished:
            return 0.0
        return max(self.finished.values()) - min(self.published.values())


# --------------------------------------------------------------------------- processes


class _Meter:
    """CPU time of workers, RabbitMQ, PostgreSQL (this database) and the driver; worker RSS."""

    def __init__(self, worker_pids: list[int], database: str) -> None:
        self._workers = [psutil.Process(p) for p in worker_pids]
        self._database = database
        self._start: dict[int, float] = {}
        self._began = 0.0
        self.rss_mb = 0.0
        self.per_worker: list[float] = []
        """Cores each worker process used, in start order: does the work divide between them."""

    def _groups(self) -> dict[str, list[psutil.Process]]:
        groups: dict[str, list[psutil.Process]] = {
            "workers": list(self._workers),
            "rabbitmq": [],
            "postgres": [],
            "driver": [psutil.Process()],
        }
        for proc in psutil.process_iter(["name", "cmdline"]):
            name = proc.info["name"] or ""
            if name == "beam.smp":
                groups["rabbitmq"].append(proc)
            elif name == "postgres" or name.startswith("postgres:"):
                words = " ".join(proc.info["cmdline"] or []).split()
                backend = any("(" in w or w == "[local]" for w in words)
                if not backend or self._database in words:
                    groups["postgres"].append(proc)
        return groups

    @staticmethod
    def _cpu(proc: psutil.Process) -> float | None:
        try:
            times = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return float(times.user + times.system)

    def start(self) -> None:
        self._began = time.monotonic()
        for procs in self._groups().values():
            for proc in procs:
                used = self._cpu(proc)
                if used is not None:
                    self._start[proc.pid] = used

    def sample_rss(self) -> None:
        for proc in self._workers:
            try:
                self.rss_mb = max(self.rss_mb, proc.memory_info().rss / 2**20)
            except psutil.NoSuchProcess:
                continue

    def stop(self) -> dict[str, float]:
        """Cores used by each group since `start()` (1.0 = one core busy the whole time)."""
        wall = max(time.monotonic() - self._began, 1e-9)
        shares: dict[str, float] = {}
        for group, procs in self._groups().items():
            used = 0.0
            for proc in procs:
                now = self._cpu(proc)
                if now is not None:
                    used += now - self._start.get(proc.pid, 0.0)
            shares[group] = used / wall
        shares["machine_cores"] = float(psutil.cpu_count() or 1)
        self.per_worker = [
            ((self._cpu(proc) or 0.0) - self._start.get(proc.pid, 0.0)) / wall
            for proc in self._workers
        ]
        return shares


async def _start_processes(
    argv: list[list[str]], env: dict[str, str], timeout_s: float = 30.0
) -> list[asyncio.subprocess.Process]:
    procs = [
        await asyncio.create_subprocess_exec(
            *a, env=env, stdout=asyncio.subprocess.PIPE, stderr=None
        )
        for a in argv
    ]
    try:
        async with asyncio.timeout(timeout_s):
            for proc in procs:
                assert proc.stdout is not None
                while (line := await proc.stdout.readline()) != b"ready\n":
                    if not line:
                        _not_ready()
    except BaseException:
        await _stop_processes(procs)
        raise
    return procs


def _not_ready() -> None:
    raise RuntimeError("a bench process exited before it was ready (see its errors above)")


async def _stop_processes(procs: list[asyncio.subprocess.Process], grace_s: float = 30.0) -> None:
    for proc in procs:
        if proc.returncode is None:
            proc.terminate()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), grace_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _meter_while(meter: _Meter, load: Awaitable[None]) -> dict[str, float]:
    async def sample() -> None:
        while True:
            meter.sample_rss()
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    meter.start()
    try:
        await load
    finally:
        sampler.cancel()
    meter.sample_rss()
    return meter.stop()


def _database_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[-1].split("?", 1)[0]


# --------------------------------------------------------------------------- engine


async def _run_engine(settings: Settings, config: BenchConfig, run_id: str) -> RunResult:
    result = RunResult("engine")
    prefix = f"{settings.exchange_prefix}bench-{run_id}."
    dsn = plain_dsn(settings.database_url.get_secret_value())
    env = {
        **os.environ,
        "SAGAWORKS_EXCHANGE_PREFIX": prefix,
        "SAGAWORKS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "SAGAWORKS_DATABASE_URL": settings.database_url.get_secret_value(),
        "SAGAWORKS_PREFETCH": str(settings.prefetch),
        "SAGAWORKS_DB_POOL_SIZE": str(settings.db_pool_size),
        "SAGAWORKS_LOG_LEVEL": "WARNING",
    }
    ledgers = [
        Path(tempfile.gettempdir()) / f"sagaworks-bench-{run_id}-{i}.json"
        for i in range(config.workers)
    ]
    argv = [
        [
            sys.executable,
            "-m",
            "sagas.order_fulfilment.bench.worker",
            "--latency-s",
            str(config.latency_s),
            "--ledger",
            str(path),
        ]
        for path in ledgers
    ]
    keys = [f"{run_id}-{i:06d}" for i in range(config.sagas)]
    load = _Load(config)
    workers = await _start_processes(argv, env)
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel(publisher_confirms=True)
        orders = await channel.get_exchange(exchange_name(prefix, OrderPlaced.domain))
        outcomes = await channel.declare_queue(exclusive=True, auto_delete=True)
        await outcomes.bind(orders, OrderFulfilled.routing_key)
        await outcomes.bind(orders, "order.cancelled")

        async def on_outcome(message: AbstractIncomingMessage) -> None:
            load.finish(json.loads(message.body)["order_id"], message.type)

        await outcomes.consume(on_outcome, no_ack=True)
        dispatch_by = datetime.now(UTC) + timedelta(hours=1)
        user = own_user(settings)

        async def start(key: str) -> None:
            placed = OrderPlaced(
                order_id=key,
                customer_id=f"c-{key}",
                lines=(OrderLine(sku="sku-1", quantity=1),),
                amount_cents=1999,
                currency="EUR",
                dispatch_by=dispatch_by,
            )
            await publish(
                orders,
                placed,
                f"{key}/placed",
                source="bench/order-service",
                user_id=user,
                correlation_id=key,
            )

        meter = _Meter([w.pid for w in workers], _database_name(dsn))
        result.cpu = await _meter_while(meter, load.run(keys, start))
        result.cpu_per_worker = meter.per_worker
        result.rss_mb = meter.rss_mb
    finally:
        await _stop_processes(workers)
        await connection.close()
    result.sagas = len(load.finished)
    result.elapsed_s = load.window_s
    result.saga_ms = [(load.finished[k] - load.published[k]) * 1000 for k in load.finished]
    started = list(load.published)
    await _verify_engine(dsn, result, load, started, ledgers)
    await _cleanup_engine(settings, prefix, dsn, started)
    return result


async def _verify_engine(
    dsn: str, result: RunResult, load: _Load, started: list[str], ledgers: list[Path]
) -> None:
    ids = {saga_id_for(order_fulfilment.name, k): k for k in started}
    conn = await asyncpg.connect(dsn)
    try:
        statuses: dict[str, int] = {
            r["status"]: r["n"]
            for r in await conn.fetch(
                "SELECT status, count(*) AS n FROM saga_instances WHERE id = ANY($1::uuid[]) "
                "GROUP BY status",
                list(ids),
            )
        }
        doubled = await conn.fetchval(
            "SELECT count(*) FROM (SELECT 1 FROM saga_history WHERE saga_id = ANY($1::uuid[]) "
            "AND kind = 'step_completed' GROUP BY saga_id, step HAVING count(*) > 1) AS d",
            list(ids),
        )
        completed_steps = await conn.fetchval(
            "SELECT count(*) FROM saga_history WHERE saga_id = ANY($1::uuid[]) "
            "AND kind = 'step_completed'",
            list(ids),
        )
        transitions = await conn.fetch(
            "SELECT saga_id, min(at) AS at FROM saga_history WHERE saga_id = ANY($1::uuid[]) "
            "GROUP BY saga_id, message_id",
            list(ids),
        )
    finally:
        await conn.close()
    by_saga: dict[str, list[float]] = {}
    for row in transitions:
        by_saga.setdefault(ids[row["saga_id"]], []).append(row["at"].timestamp())
    for key, stamps in by_saga.items():
        result.step_ms.extend(_intervals(load.published[key], stamps))
    effects: Counter[tuple[str, str]] = Counter()
    for path in ledgers:
        if not path.exists():
            result.problems.append(
                f"worker ledger {path.name} missing (worker did not stop cleanly)"
            )
            continue
        for entry in json.loads(path.read_text())["effects"]:
            op, order, n = entry.split("\x1f")
            effects[(op, order)] += int(n)
        path.unlink()
    n = len(started)
    terminal = sum(statuses.get(s, 0) for s in ("completed", "compensated", "needs_attention"))
    duplicates = sum(c - 1 for c in effects.values() if c > 1)
    result.checks = {
        "sagas_started": n,
        "sagas_completed": statuses.get("completed", 0),
        "outcome_events": len(load.finished),
        "step_completed_rows": completed_steps,
        "transitions": len(transitions),
        "duplicate_transitions": doubled,
        "effects": sum(effects.values()),
        "duplicate_effects": duplicates,
    }
    if terminal != n:
        result.problems.append(f"{n - terminal} of {n} sagas did not reach a terminal status")
    if statuses.get("completed", 0) != n:
        result.problems.append(f"only {statuses.get('completed', 0)} of {n} happy sagas completed")
    if len(load.finished) != n:
        result.problems.append(f"{n - len(load.finished)} outcome events missing")
    if doubled or completed_steps != _ACTION_STEPS * n:
        result.problems.append(
            f"{completed_steps} step_completed rows for {_ACTION_STEPS * n} steps"
        )
    if len(transitions) != STEPS_PER_SAGA * n:
        result.problems.append(f"{len(transitions)} transitions for {STEPS_PER_SAGA * n} steps")
    if duplicates:
        result.problems.append(f"{duplicates} external effects applied twice")
    missing = {op: sum(1 for k in started if (op, k) not in effects) for op in _PORT_EFFECTS}
    if any(missing.values()):
        result.problems.append(f"effects missing: {missing}")


def _intervals(published: float, stamps: list[float]) -> list[float]:
    ordered = [published, *sorted(stamps)]
    return [(b - a) * 1000 for a, b in itertools.pairwise(ordered)]


_ENGINE_TABLES = ("inbox", "outbox", "saga_instances", "saga_history", "timers", "parked_messages")


async def _cleanup_engine(settings: Settings, prefix: str, dsn: str, started: list[str]) -> None:
    ids = [saga_id_for(order_fulfilment.name, k) for k in started]
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.execute("DELETE FROM inbox WHERE saga_id = ANY($1::uuid[])", ids)
            await conn.execute("DELETE FROM outbox WHERE saga_id = ANY($1::uuid[])", ids)
            await conn.execute("DELETE FROM saga_instances WHERE id = ANY($1::uuid[])", ids)
        # The next run must not wade through this one's dead rows, autovacuum or not.
        await conn.execute(f"VACUUM (ANALYZE) {', '.join(_ENGINE_TABLES)}")
    finally:
        await conn.close()
    spec = topology_for(
        settings.model_copy(update={"exchange_prefix": prefix}),
        SagaRegistry([order_fulfilment]),
    )
    connection = await aio_pika.connect(settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        for queue in (
            *(q.name for q in spec.queues),
            spec.dead_letter_queue,
            spec.unstorable_queue,
        ):
            await channel.queue_delete(queue)
        for exchange in (*spec.exchanges, spec.dead_letter_exchange):
            await channel.exchange_delete(exchange)
    finally:
        await connection.close()


# --------------------------------------------------------------------------- reference


async def _run_reference(settings: Settings, config: BenchConfig, run_id: str) -> RunResult:
    result = RunResult("reference")
    prefix = f"{settings.exchange_prefix}bench-{run_id}."
    dsn = plain_dsn(settings.database_url.get_secret_value())
    amqp_url = settings.amqp_url.get_secret_value()
    exchange_name_, queue_name = reference_names(prefix)
    await prepare_reference(dsn)
    connection = await aio_pika.connect(amqp_url)
    workers: list[asyncio.subprocess.Process] = []
    load = _Load(config)
    try:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.declare_exchange(
            exchange_name_, aio_pika.ExchangeType.TOPIC, durable=True
        )
        steps = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await steps.bind(exchange, STEP_ROUTING_KEY)
        done = await channel.declare_queue(exclusive=True, auto_delete=True)
        await done.bind(exchange, DONE_ROUTING_KEY)

        async def on_done(message: AbstractIncomingMessage) -> None:
            body = json.loads(message.body)
            load.finish(body["saga"], body["ts"])

        await done.consume(on_done, no_ack=True)
        argv = [
            [
                sys.executable,
                "-m",
                "sagas.order_fulfilment.bench.reference",
                "--amqp-url",
                amqp_url,
                "--dsn",
                dsn,
                "--prefix",
                prefix,
                # the same capacity as a worker: one consumer per saga and port queue
                "--prefetch",
                str(settings.prefetch * _queues_per_worker()),
                "--pool-size",
                str(settings.db_pool_size),
            ]
            for _ in range(config.workers)
        ]
        workers = await _start_processes(argv, dict(os.environ))
        keys = [str(uuid.uuid4()) for _ in range(config.sagas)]

        async def start(key: str) -> None:
            await exchange.publish(
                step_message(key, 1, STEPS_PER_SAGA, []), routing_key=STEP_ROUTING_KEY
            )

        meter = _Meter([w.pid for w in workers], _database_name(dsn))
        result.cpu = await _meter_while(meter, load.run(keys, start))
        result.cpu_per_worker = meter.per_worker
        result.rss_mb = meter.rss_mb
    finally:
        await _stop_processes(workers)
        await _delete_reference_topology(connection, exchange_name_, queue_name)
        await connection.close()
    result.sagas = len(load.finished)
    result.elapsed_s = load.window_s
    for key, at in load.finished.items():
        result.saga_ms.append((at - load.published[key]) * 1000)
        result.step_ms.extend(_intervals(load.published[key], load.payloads[key]))
    await _verify_reference(dsn, result, load)
    await drop_reference(dsn)
    return result


def _queues_per_worker() -> int:
    registry = SagaRegistry([order_fulfilment])
    return len(list(registry)) + len(list(registry.ports()))


async def _delete_reference_topology(
    connection: aio_pika.abc.AbstractConnection, exchange: str, queue: str
) -> None:
    channel: AbstractChannel = await connection.channel()
    await channel.queue_delete(queue)
    await channel.exchange_delete(exchange)


async def _verify_reference(dsn: str, result: RunResult, load: _Load) -> None:
    started = list(load.published)
    conn = await asyncpg.connect(dsn)
    try:
        done = await conn.fetchval(
            "SELECT count(*) FROM bench_ref_sagas WHERE id = ANY($1::uuid[]) AND version = $2",
            started,
            STEPS_PER_SAGA,
        )
        inbox = await conn.fetchval("SELECT count(*) FROM bench_ref_inbox")
    finally:
        await conn.close()
    n = len(started)
    result.checks = {"sagas_started": n, "sagas_completed": done, "inbox_rows": inbox}
    if done != n:
        result.problems.append(f"only {done} of {n} reference sagas ran all their steps")
    if inbox != STEPS_PER_SAGA * n:
        result.problems.append(f"{inbox} inbox rows for {STEPS_PER_SAGA * n} steps")
    if len(load.finished) != n:
        result.problems.append(f"{n - len(load.finished)} done messages missing")


# --------------------------------------------------------------------------- entry


Progress = Callable[[str], None]


async def run_bench(
    settings: Settings, config: BenchConfig, *, progress: Progress | None = None
) -> BenchReport:
    """Migrate, run the engine, then (unless disabled) the reference; verify both."""
    await upgrade(settings.effective_migration_url(), "head")
    await preflight(settings)
    run_id = secrets.token_hex(3)
    say = progress or (lambda _text: None)
    say(f"engine: {config.workers} worker(s), port latency {config.latency_s * 1000:g} ms")
    engine = await _run_engine(settings, config, run_id)
    reference = None
    if config.reference:
        say(f"reference: {config.workers} process(es)")
        reference = await _run_reference(settings, config, run_id)
    return BenchReport(config, engine, reference)


def format_report(report: BenchReport) -> str:
    """A plain-text table of both runs, then the ratio and the verification."""
    data = report.as_dict()
    runs = [("engine", data["engine"])]
    if data["reference"] is not None:
        runs.append(("reference", data["reference"]))
    rows = [
        ("sagas", "sagas"),
        ("sagas/s", "sagas_per_s"),
        ("steps/s", "steps_per_s"),
        ("step p50 ms", "step_p50_ms"),
        ("step p99 ms", "step_p99_ms"),
        ("saga p50 ms", "saga_p50_ms"),
        ("saga p99 ms", "saga_p99_ms"),
        ("RSS MB (max)", "rss_mb"),
    ]
    width = 22
    lines = [f"{'':<{width}}" + "".join(f"{name:>12}" for name, _ in runs)]
    for label, key in rows:
        lines.append(f"{label:<{width}}" + "".join(f"{r[key]!s:>12}" for _, r in runs))
    for group in ("workers", "rabbitmq", "postgres", "driver"):
        label = f"CPU {group} (cores)"
        lines.append(
            f"{label:<{width}}" + "".join(f"{r['cpu'].get(group, 0):>12}" for _, r in runs)
        )
    lines.append("")
    if data["ratio"] is not None:
        lines.append(f"ratio engine/reference steps/s: {data['ratio']}")
    lines.append(f"verified: {data['verified']}")
    for name, r in runs:
        for problem in r["problems"]:
            lines.append(f"  {name}: {problem}")
    return "\n".join(lines)
