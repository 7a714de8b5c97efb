"""The fault suite's rig: private services, worker and participant processes, and the books.

Not a test module. `FaultServices` is one private PostgreSQL cluster and one
private RabbitMQ node (tests/private_services.py), shared by a module's
scenarios; each `Scenario` gets a database and a name prefix of its own, the
HTTP participants in a process of their own (participants_main.py), and
workers in processes of their own (worker_main.py), which it can kill with
SIGKILL, or have killed at an exact point. It places the demo's order mix
(`plan_orders`: cancellations, declines, duplicates, early and late events),
sends poison straight to the dead-letter queue, and at the end checks the
books (`Books`): one outcome id per order, every saga ended as planned, no
effect applied twice, no effect left behind by a compensated order, nothing
unpublished or unacknowledged, the dead-letter store holding exactly the
poison.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from private_services import (
    CertificateAuthority,
    PrivatePostgres,
    PrivateRabbitMQ,
    private_postgres,
    private_rabbitmq,
)

from sagas.order_fulfilment.messages import OrderCancelled, OrderFulfilled
from sagas.order_fulfilment.simulation.order_mix import OrderPlan, plan_orders
from sagas.order_fulfilment.simulation.shop import publish, simulated_publishers
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.rabbitmq.topology import dead_letter_queue_name, exchange_name
from sagaworks.settings import Settings

__all__ = ["Books", "FaultServices", "Scenario", "WorkerProcess", "fault_services"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
USER = "guest"
SAGA = "order_fulfilment"
TERMINAL = ("completed", "compensated", "needs_attention")
UNDOES = {"release": "reserve", "void": "authorise", "cancel": "book"}
"""Compensating operation -> the action it undoes, at the fake participants."""


@dataclass
class FaultServices:
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ
    ca: CertificateAuthority

    def database_url(self, database: str, *, port: int | None = None) -> str:
        return (
            f"postgresql://postgres@127.0.0.1:{port or self.postgres.port}/{database}"
            f"?sslmode=verify-full&sslrootcert={self.ca.cert}"
        )

    def amqp_url(self, *, port: int | None = None) -> str:
        return (
            f"amqps://{USER}:{USER}@127.0.0.1:{port or self.rabbitmq.tls_port}/"
            f"?cafile={self.ca.cert}"
        )


@contextlib.contextmanager
def fault_services(folder: Path) -> Iterator[FaultServices]:
    ca = CertificateAuthority.create(folder, "fault-ca")
    server = ca.issue("server", hosts=("127.0.0.1", "localhost"))
    with private_postgres(server, ca) as postgres, private_rabbitmq(folder, server, ca) as rabbit:
        yield FaultServices(postgres, rabbit, ca)


class WorkerProcess:
    """One `sagaworks worker` process (worker_main.py), its log in a file."""

    def __init__(self, env: dict[str, str], log: Path, kill_at: str | None, kill_on: int) -> None:
        self.log = log
        self.kill_at = kill_at
        full = {**env}
        if kill_at is not None:
            full.update(FAULT_KILL_AT=kill_at, FAULT_KILL_ON=str(kill_on))
        self._out = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "worker_main.py")],
            cwd=REPO,
            env=full,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    @property
    def killed_at_point(self) -> bool:
        return self.process.returncode == -signal.SIGKILL

    def kill(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)
        self._out.close()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait for the graceful stop; its exit status."""
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._out.close()
        return int(self.process.returncode)

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines the worker wrote so far."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    found.append(json.loads(line))
        return found


@dataclass
class Books:
    """What a scenario's run left behind; `violations()` lists every broken guarantee."""

    scenario: str
    orders: int
    kills: int = 0
    lost: int = 0
    """Orders that never got an outcome event."""
    double_outcomes: int = 0
    """Orders with two different outcome ids (two outcomes)."""
    republished: int = 0
    """Outcome events seen again with the same id (allowed: at least once)."""
    wrong_outcomes: list[str] = field(default_factory=list)
    duplicated_effects: int = 0
    leaked_effects: list[str] = field(default_factory=list)
    stuck: list[str] = field(default_factory=list)
    unpublished: int = 0
    left_in_queues: dict[str, int] = field(default_factory=dict)
    dead_letters_unexpected: list[str] = field(default_factory=list)
    dead_letters_missing: list[str] = field(default_factory=list)
    recovery_s: float = 0.0
    """Longest time from the end of a fault until sagas moved again."""
    detection_s: float | None = None
    """For a partition: from the cut until the worker logged it."""

    def violations(self) -> list[str]:
        found = []
        for name in ("lost", "double_outcomes", "duplicated_effects", "unpublished"):
            if getattr(self, name):
                found.append(f"{name}: {getattr(self, name)}")
        for name in (
            "wrong_outcomes",
            "leaked_effects",
            "stuck",
            "left_in_queues",
            "dead_letters_unexpected",
            "dead_letters_missing",
        ):
            value = getattr(self, name)
            if value:
                found.append(f"{name}: {value if len(value) < 12 else list(value)[:12]}")
        return found

    def row(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "orders": self.orders,
            "kills": self.kills,
            "lost": self.lost,
            "duplicated_effects": self.duplicated_effects,
            "leaked_effects": len(self.leaked_effects),
            "stuck": len(self.stuck),
            "republished_outcomes": self.republished,
            "recovery_s": round(self.recovery_s, 1),
            "detection_s": None if self.detection_s is None else round(self.detection_s, 1),
        }


class Scenario:
    """One scenario's database, prefix, participants, workers and books."""

    def __init__(
        self,
        services: FaultServices,
        name: str,
        folder: Path,
        *,
        orders: int,
        seed: int = 7,
        poison: int = 6,
        amqp_port: int | None = None,
        pg_port: int | None = None,
        settings: dict[str, str] | None = None,
        deadline_slack_s: float = 0.0,
    ) -> None:
        """`deadline_slack_s` moves every dispatch deadline later: a cut longer than the
        mix's two minutes would otherwise rightly cancel orders whose parcel is on its way."""
        self.services = services
        self.name = name
        self.folder = folder
        self.run_id = f"{name[:12]}{secrets.token_hex(2)}"
        self.prefix = f"{self.run_id}."
        self.database = f"fault_{self.run_id}".lower()
        self.plans: list[OrderPlan] = plan_orders(
            orders,
            self.run_id,
            datetime.now(UTC) + timedelta(seconds=deadline_slack_s),
            seed=seed,
            missed_deadline_s=3.0,
        )
        self.poison_ids = [f"{self.run_id}-poison-{i}" for i in range(poison)]
        self.amqp_port = amqp_port
        self.pg_port = pg_port
        self.extra_settings = settings or {}
        self.seed = seed
        self.rng = random.Random(seed)
        self.workers: list[WorkerProcess] = []
        self.outcome_ids: dict[str, set[str]] = defaultdict(set)
        self.outcome_events: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.fault_ends: list[datetime] = []
        self.kills = 0
        self._participants: subprocess.Popen[bytes] | None = None
        self._control = ""
        self._participant_ports: dict[str, int] = {}
        self._client: AbstractRobustConnection | None = None
        self._db: asyncpg.Connection | None = None
        self._senders: list[asyncio.Task[None]] = []

    # -- setup ----------------------------------------------------------------------------------

    @property
    def db(self) -> asyncpg.Connection:
        assert self._db is not None
        return self._db

    async def open(self) -> None:
        url = self.services.database_url(self.database)
        await upgrade(url)
        self._db = await asyncpg.connect(url)
        self._client = await aio_pika.connect_robust(
            self.services.amqp_url(), reconnect_interval=0.5
        )
        self._start_participants()

    def _start_participants(self) -> None:
        ready = self.folder / f"{self.run_id}.participants.json"
        spec = {
            "orders": len(self.plans),
            "run_id": self.run_id,
            "seed": self.seed,
            "amqp_url": self.services.amqp_url(),
            "prefix": self.prefix,
            "user": USER,
            "ready": str(ready),
        }
        log = (self.folder / f"{self.run_id}.participants.log").open("ab")
        self._participants = subprocess.Popen(
            [sys.executable, str(HERE / "participants_main.py"), json.dumps(spec)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert self._participants.poll() is None, "the participants process exited"
            assert time.monotonic() < deadline, "the participants process did not start in 60 s"
            time.sleep(0.1)
        self._participant_ports = json.loads(ready.read_text())
        self._control = f"http://127.0.0.1:{self._participant_ports['control']}"

    def worker_env(self) -> dict[str, str]:
        settings = simulated_publishers(Settings.load(secrets_dir=None), USER)
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": str(REPO),
            "SAGAWORKS_AMQP_URL": self.services.amqp_url(port=self.amqp_port),
            "SAGAWORKS_DATABASE_URL": self.services.database_url(self.database, port=self.pg_port),
            "SAGAWORKS_SAGAS": json.dumps(["sagas.order_fulfilment.http_ports"]),
            "SAGAWORKS_EXCHANGE_PREFIX": self.prefix,
            "SAGAWORKS_PUBLISHERS": json.dumps(settings.publishers),
            "SAGAWORKS_LOG_FORMAT": "json",
            "SAGAWORKS_GRACE_PERIOD_S": "10",
            # A worker killed between an eager step's commit and its mark leaves the row leased;
            # a short lease lets the next worker's sweeper send it before the books are closed.
            "SAGAWORKS_EAGER_LEASE_S": "3",
            "SAGAWORKS_DB_POOL_SIZE": "5",
            "ORDER_FULFILMENT_HTTP_INVENTORY_URL": self._participant_url("inventory"),
            "ORDER_FULFILMENT_HTTP_PAYMENTS_URL": self._participant_url("payments"),
            "ORDER_FULFILMENT_HTTP_SHIPPING_URL": self._participant_url("shipping"),
            **self.extra_settings,
        }

    def _participant_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self._participant_ports[name]}"

    def start_worker(self, kill_at: str | None = None, kill_on: int = 1) -> WorkerProcess:
        log = self.folder / f"{self.run_id}.worker{len(self.workers)}.log"
        worker = WorkerProcess(self.worker_env(), log, kill_at, kill_on)
        self.workers.append(worker)
        return worker

    async def wait_until_consuming(self, worker: WorkerProcess, timeout_s: float = 90.0) -> None:
        """Until `worker` logged that it consumes (it declared the topology first)."""
        deadline = time.monotonic() + timeout_s
        while not any(line.get("event") == "worker consuming" for line in worker.lines()):
            if not worker.alive:
                raise AssertionError(f"worker exited ({worker.process.returncode}): {worker.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not consuming after {timeout_s} s: {worker.log}")
            await asyncio.sleep(0.2)

    async def listen_for_outcomes(self) -> None:
        assert self._client is not None
        channel = await self._client.channel()
        queue = await channel.declare_queue(f"{self.prefix}test.outcomes", durable=True)
        orders = exchange_name(self.prefix, OrderFulfilled.domain)
        for event in (OrderFulfilled, OrderCancelled):
            await queue.bind(orders, event.routing_key)
        await queue.consume(self._on_outcome)

    async def _on_outcome(self, incoming: AbstractIncomingMessage) -> None:
        body = json.loads(incoming.body)
        order_id = body.get("order_id", "")
        self.outcome_ids[order_id].add(incoming.message_id or "")
        self.outcome_events[order_id].append((incoming.type or "", body.get("reason", "")))
        await incoming.ack()

    # -- load -----------------------------------------------------------------------------------

    def place_orders(self, over_s: float = 3.0) -> None:
        """Send every plan's messages, spread over `over_s` seconds, and the poison."""
        step = over_s / max(len(self.plans), 1)
        for index, plan in enumerate(self.plans):
            for send in plan.order_service:
                at = index * step + send.delay_s
                self._later(at, send.message, send.message_id, plan.order_id)
        task = asyncio.get_running_loop().create_task(self._send_poison())
        self._senders.append(task)

    def _later(self, at: float, message: Any, message_id: str, order_id: str) -> None:
        async def send() -> None:
            await asyncio.sleep(at)
            await self._publish(message, message_id, order_id)

        self._senders.append(asyncio.get_running_loop().create_task(send()))

    async def _publish(self, message: Any, message_id: str, order_id: str) -> None:
        """Publish, retrying while the broker is away: the order service does not give up."""
        assert self._client is not None
        deadline = time.monotonic() + 240
        while True:
            try:
                async with self._client.channel(publisher_confirms=True) as channel:
                    exchange = await channel.get_exchange(
                        exchange_name(self.prefix, message.domain), ensure=False
                    )
                    await publish(
                        exchange,
                        message,
                        message_id,
                        source="tests/fault",
                        user_id=USER,
                        correlation_id=order_id,
                    )
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    async def _send_poison(self) -> None:
        assert self._client is not None
        async with self._client.channel(publisher_confirms=True) as channel:
            for message_id in self.poison_ids:
                await channel.default_exchange.publish(
                    aio_pika.Message(
                        b'{"poison": true}',
                        message_id=message_id,
                        type="order.placed",
                        user_id=USER,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=dead_letter_queue_name(self.prefix),
                )

    async def senders_done(self) -> None:
        await asyncio.gather(*self._senders)

    # -- faults ---------------------------------------------------------------------------------

    async def fault_ended(self) -> None:
        """Note the database's clock: recovery is measured from here to the next progress."""
        with contextlib.suppress(Exception):
            self.fault_ends.append(await self.db.fetchval("SELECT clock_timestamp()"))

    async def participant_fault(self, participant: str, for_s: float, status: int = 503) -> None:
        async with httpx.AsyncClient() as client:
            answer = await client.post(
                f"{self._control}/fault",
                json={"participant": participant, "for_s": for_s, "status": status},
            )
            answer.raise_for_status()

    async def reconnect_db(self) -> None:
        """After a database restart: the test's own connection is gone too."""
        if self._db is not None:
            self._db.terminate()
        deadline = time.monotonic() + 60
        while True:
            try:
                self._db = await asyncpg.connect(self.services.database_url(self.database))
                return
            except (OSError, asyncpg.PostgresError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    # -- books ----------------------------------------------------------------------------------

    async def not_ended(self) -> list[str]:
        rows = await self.db.fetch(
            "SELECT correlation_key FROM saga_instances WHERE saga_type = $1 "
            "AND status <> ALL($2::text[])",
            SAGA,
            list(TERMINAL),
        )
        ended = await self.db.fetchval(
            "SELECT count(*) FROM saga_instances WHERE saga_type = $1", SAGA
        )
        missing = len(self.plans) - int(ended) - len(rows)
        return [r["correlation_key"] for r in rows] + ["(not started)"] * max(missing, 0)

    async def diagnose(self) -> str:
        """What a stuck run looks like: sagas by status and step, the outbox, the queues."""
        steps = await self.db.fetch(
            "SELECT status, current_step, count(*) AS n FROM saga_instances "
            "GROUP BY 1, 2 ORDER BY 3 DESC"
        )
        unpublished = await self.db.fetchval(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        )
        timers = await self.db.fetchval("SELECT count(*) FROM timers")
        queues = self.services.rabbitmq.rabbitmqctl(
            "list_queues", "name", "messages_ready", "messages_unacknowledged", "consumers",
            "--quiet", "--no-table-headers",
        )  # fmt: skip
        mine = "\n".join(q for q in queues.splitlines() if q.startswith(self.prefix))
        sessions = await self.db.fetch(
            "SELECT state, wait_event, left(query, 80) AS query, now() - xact_start AS age "
            "FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        for worker in self.workers:
            if worker.alive:
                worker.process.send_signal(signal.SIGUSR1)  # worker_main.py dumps its tasks
        await asyncio.sleep(1.0)
        mine += f"\nsessions: {[tuple(r) for r in sessions]}"
        return (
            f"sagas: {[tuple(r) for r in steps]}\nunpublished outbox rows: {unpublished}, "
            f"timers: {timers}\nqueues (ready, unacked, consumers):\n{mine}\n"
            f"logs: {[str(w.log) for w in self.workers]}"
        )

    async def wait_until_all_ended(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                if not await self.not_ended() and self._outcomes_in():
                    return True
            await asyncio.sleep(0.5)
        return False

    def _outcomes_in(self) -> bool:
        return all(self.outcome_ids.get(p.order_id) for p in self.plans)

    async def recovery_s(self) -> float:
        longest = 0.0
        for ended in self.fault_ends:
            resumed = await self.db.fetchval(
                "SELECT min(at) FROM saga_history WHERE at > $1", ended
            )
            if resumed is not None:
                longest = max(longest, (resumed - ended).total_seconds())
        return longest

    async def ledger(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            answer = await client.get(f"{self._control}/ledger")
            answer.raise_for_status()
            data: dict[str, Any] = answer.json()
            return data

    async def close_books(self) -> Books:
        """Let the queues drain, stop the workers gracefully, then count (see `Books`)."""
        books = Books(self.name, len(self.plans), kills=self.kills)
        deadline = time.monotonic() + 60
        books.left_in_queues = self._queue_depths()
        while books.left_in_queues and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            books.left_in_queues = self._queue_depths()
        unpublished = "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        while time.monotonic() < deadline:
            if not await self.db.fetchval(unpublished):
                break
            await asyncio.sleep(1.0)
        for worker in self.workers:
            if worker.alive:
                worker.stop()
        books.stuck = await self.not_ended()
        await asyncio.sleep(1.0)  # outcome events still on their way to the test's queue
        for plan in self.plans:
            ids = self.outcome_ids.get(plan.order_id, set())
            seen = self.outcome_events.get(plan.order_id, [])
            if not ids:
                books.lost += 1
                continue
            books.double_outcomes += len(ids) > 1
            books.republished += len(seen) - len(ids)
            expected_type, expected_reason = plan.expected
            kind, reason = seen[0]
            if kind != expected_type or (expected_reason and reason != expected_reason):
                books.wrong_outcomes.append(f"{plan.order_id} {plan.kind}: {kind} {reason}")
        ledger = await self.ledger()
        books.duplicated_effects = int(ledger["duplicates"])
        effects: dict[str, dict[str, int]] = defaultdict(dict)
        for effect in ledger["effects"]:
            effects[effect["order_id"]][effect["operation"]] = effect["count"]
        for plan in self.plans:
            outcome = self.outcome_events.get(plan.order_id, [("", "")])[0][0]
            if outcome != OrderCancelled.message_type:
                continue
            applied = effects.get(plan.order_id, {})
            for undo, action in UNDOES.items():
                if applied.get(action, 0) > applied.get(undo, 0):
                    books.leaked_effects.append(f"{plan.order_id}: {action} not undone")
            if applied.get("capture"):
                books.leaked_effects.append(f"{plan.order_id}: captured but cancelled")
        books.unpublished = int(
            await self.db.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        )
        stored = {
            r["message_id"] for r in await self.db.fetch("SELECT message_id FROM dead_letters")
        }
        books.dead_letters_unexpected = sorted(stored - set(self.poison_ids))
        books.dead_letters_missing = sorted(set(self.poison_ids) - stored)
        books.recovery_s = await self.recovery_s()
        return books

    def _queue_depths(self) -> dict[str, int]:
        listing = self.services.rabbitmq.rabbitmqctl(
            "list_queues", "name", "messages", "--quiet", "--no-table-headers"
        )
        depths = {}
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0].startswith(self.prefix) and parts[1] != "0":
                if parts[0].endswith("test.outcomes") or parts[0].endswith(".unstorable"):
                    continue
                depths[parts[0]] = int(parts[1])
        return depths

    async def close(self) -> None:
        for task in self._senders:
            task.cancel()
        await asyncio.gather(*self._senders, return_exceptions=True)
        for worker in self.workers:
            worker.kill()
        if self._participants is not None and self._participants.poll() is None:
            self._participants.send_signal(signal.SIGTERM)
            try:
                self._participants.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._participants.kill()
                self._participants.wait(timeout=10)
        if self._client is not None:
            await self._client.close()
        if self._db is not None:
            await self._db.close()


def record(books: Books, results: Path) -> None:
    """Append the scenario's row to the run's results (JSON lines) for docs/recoverability.md."""
    with results.open("a") as out:
        out.write(json.dumps(books.row()) + "\n")
