"""Operators acting on sagas, one and many, against a real worker on the real broker and database.

A worker runs in the test's event loop with the simulated participants; its
payments port can be taken down (transient failures, retried an hour later)
or made to refuse captures. `sagaworks saga ...` runs as operators run it: in
a thread through typer's runner, or as a real process when it must be killed
half-way. Some tests call the use cases in-process, to act many times while
the worker is busy with the same sagas.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import aio_pika
import asyncpg
import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import USER
from typer.testing import CliRunner

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import ShipmentDispatched
from sagas.order_fulfilment.ports import (
    Authorisation,
    AuthorisePayment,
    CapturePayment,
    PaymentCapture,
)
from sagas.order_fulfilment.simulation.participants import (
    Ledger,
    SimulatedPayments,
    Simulation,
    simulated_ports,
)
from sagaworks import BusinessFailure, PortPolicy, PortUnavailable
from sagaworks.application.operator_actions import ActionRequest
from sagaworks.bootstrap import SagaActions, System, bootstrap, bootstrap_saga_actions
from sagaworks.domain.instance import saga_id_for
from sagaworks.entrypoints.cli.app import app
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SAGA = order_fulfilment.name
SAGAWORKS = Path(sys.executable).parent / "sagaworks"


class ControlledPayments(SimulatedPayments):
    """Authorising fails transiently while `down` (retried an hour later); capturing is
    refused for good while `refuse_capture`."""

    policy = PortPolicy(
        immediate_attempts=1, delayed_base_s=3600, delayed_max_s=3600, breaker_failures=1000
    )

    def __init__(self, ledger: Ledger) -> None:
        super().__init__("payments", Simulation(), ledger)
        self.down = False
        self.refuse_capture = False

    async def authorise(self, command: AuthorisePayment) -> Authorisation:
        if self.down:
            raise PortUnavailable("payments is down")
        return await super().authorise(command)

    async def capture(self, command: CapturePayment) -> PaymentCapture:
        if self.refuse_capture:
            raise BusinessFailure("card_expired", command.order_id)
        return await super().capture(command)


@dataclass
class Ops:
    settings: Settings
    system: System
    actions: SagaActions
    connection: AbstractRobustConnection
    db: asyncpg.Connection
    ledger: Ledger
    payments: ControlledPayments
    cli_env: dict[str, str]

    async def publish(self, message_type: str, body: dict[str, Any], message_id: str) -> None:
        domain = "warehouse" if message_type == ShipmentDispatched.message_type else "orders"
        exchange_name = f"{self.settings.exchange_prefix}{domain}"
        async with self.connection.channel(on_return_raises=True) as channel:
            exchange = await channel.get_exchange(exchange_name)
            await exchange.publish(
                aio_pika.Message(
                    json.dumps(body).encode(),
                    message_id=message_id,
                    type=message_type,
                    app_id="test-shop",
                    user_id=USER,
                    content_type="application/json",
                    headers={"cloudEvents_specversion": "1.0"},
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                ),
                routing_key=message_type,
            )

    async def place(self, order_id: str, *, dispatch_in: timedelta = timedelta(hours=1)) -> None:
        body = {
            "order_id": order_id,
            "customer_id": "c-1",
            "lines": [{"sku": "sku-1", "quantity": 1}],
            "amount_cents": 1250,
            "currency": "EUR",
            "dispatch_by": (datetime.now(UTC) + dispatch_in).isoformat(),
        }
        await self.publish("order.placed", body, f"placed-{order_id}")

    async def saga(self, order_id: str) -> asyncpg.Record:
        row: asyncpg.Record | None = await self.db.fetchrow(
            "SELECT * FROM saga_instances WHERE id = $1", saga_id_for(SAGA, order_id)
        )
        assert row is not None, order_id
        return row

    async def reaches(self, order_id: str, *wanted: str, timeout_s: float = 20.0) -> None:
        async def there() -> bool:
            row = await self.db.fetchrow(
                "SELECT status, current_step FROM saga_instances WHERE id = $1",
                saga_id_for(SAGA, order_id),
            )
            return row is not None and (row["status"] in wanted or row["current_step"] in wanted)

        await eventually(there, timeout_s=timeout_s, what=f"{order_id} in {wanted}")

    async def history(self, order_id: str) -> list[asyncpg.Record]:
        return list(
            await self.db.fetch(
                "SELECT seq, kind, step, message_id, detail FROM saga_history "
                "WHERE saga_id = $1 ORDER BY seq",
                saga_id_for(SAGA, order_id),
            )
        )

    async def kinds(self, order_id: str) -> list[str]:
        return [h["kind"] for h in await self.history(order_id)]

    async def audit(self, order_id: str) -> list[asyncpg.Record]:
        return list(
            await self.db.fetch(
                "SELECT * FROM operator_audit WHERE saga_id = $1 ORDER BY at, id",
                saga_id_for(SAGA, order_id),
            )
        )

    async def cli(self, *args: str) -> Any:
        """Run `sagaworks ...` in a thread (the CLI runs its own event loop)."""
        return await asyncio.to_thread(
            CliRunner().invoke, app, list(args), env=self.cli_env, catch_exceptions=False
        )

    def request(self, action: str, order_id: str, request_id: str, **more: Any) -> ActionRequest:
        return ActionRequest(
            action,  # type: ignore[arg-type]
            saga_id_for(SAGA, order_id),
            SAGA,
            "test",
            "tester",
            request_id,
            **more,
        )


async def eventually(
    check: Callable[[], Awaitable[Any]], *, timeout_s: float = 20.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(0.1)


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


@pytest.fixture
async def ops(
    settings_factory: Callable[..., Settings], migrated_database_url: str, run_id: str
) -> AsyncIterator[Ops]:
    prefix = f"{run_id}.{secrets.token_hex(3)}."
    settings = settings_factory(
        database_url=migrated_database_url,
        exchange_prefix=prefix,
        park_for_s=1.0,
        db_pool_size=4,
        timer_poll_interval_s=0.2,
    )
    ledger = Ledger()
    payments = ControlledPayments(ledger)
    ports = {**simulated_ports(Simulation(), ledger), "payments": payments}
    system = await bootstrap(settings, [order_fulfilment], ports)
    worker = Worker(system)
    await worker.start()
    actions = await bootstrap_saga_actions(settings, [order_fulfilment])
    connection = await aio_pika.connect_robust(settings.amqp_url.get_secret_value())
    db = await asyncpg.connect(_dsn(migrated_database_url))
    await db.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    cli_env = {
        "SAGAWORKS_DATABASE_URL": migrated_database_url,
        "SAGAWORKS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "SAGAWORKS_EXCHANGE_PREFIX": prefix,
        "SAGAWORKS_LOG_FORMAT": "json",
        "SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]',
    }
    try:
        yield Ops(settings, system, actions, connection, db, ledger, payments, cli_env)
    finally:
        await worker.stop()
        await actions.aclose()
        await system.aclose()
        await db.close()
        async with connection.channel() as channel:
            topology = system.topology
            for name in (
                *(q.name for q in topology.queues),
                topology.dead_letter_queue,
                topology.unstorable_queue,
            ):
                await channel.queue_delete(name)
            for name in (*topology.exchanges, topology.dead_letter_exchange):
                await channel.exchange_delete(name)
        await connection.close()


# --- one saga ---------------------------------------------------------------------------------


async def test_retry_runs_a_delayed_step_now_and_the_timeline_and_audit_say_who_and_why(
    ops: Ops,
) -> None:
    ops.payments.down = True
    await ops.place("r-1")
    await ops.reaches("r-1", "authorise_payment")
    await eventually(
        lambda: ops.db.fetchval("SELECT count(*) = 1 FROM timers WHERE name LIKE 'retry:%'"),
        what="a delayed retry an hour away",
    )
    ops.payments.down = False

    result = await ops.cli("saga", "retry", "r-1", "--reason", "payments is back", "--as", "alice")
    assert result.exit_code == 0, result.output
    assert "recorded operator_retry, step_started" in result.stdout

    await ops.reaches("r-1", "await_dispatch")
    steps = [(h["kind"], h["step"]) for h in await ops.history("r-1")]
    assert steps.index(("retry_scheduled", "authorise_payment")) < steps.index(
        ("operator_retry", None)
    )
    assert steps.index(("operator_retry", None)) < steps.index(
        ("step_completed", "authorise_payment")
    )
    assert await ops.db.fetchval("SELECT count(*) FROM timers WHERE name LIKE 'retry:%'") == 0
    (audit,) = await ops.audit("r-1")
    assert (audit["operator"], audit["action"], audit["result"]) == ("alice", "retry", "applied")
    assert audit["reason"] == "payments is back"
    assert audit["db_role"]
    (row,) = [h for h in await ops.history("r-1") if h["kind"] == "operator_retry"]
    assert row["detail"]["audit_id"] == str(audit["id"])
    assert row["detail"]["operator"] == "alice"
    assert ops.ledger.duplicate_effects() == 0

    shown = await ops.cli("saga", "show", "r-1")
    assert shown.exit_code == 0, shown.output
    assert "operator_retry" in shown.stdout


async def test_the_same_request_twice_acts_once(ops: Ops) -> None:
    await ops.place("i-1")
    await ops.reaches("i-1", "await_dispatch")
    args = ("saga", "pause", "i-1", "--reason", "hold", "--request-id", "req-7")
    first = await ops.cli(*args)
    assert first.exit_code == 0, first.output
    version = (await ops.saga("i-1"))["version"]
    second = await ops.cli(*args)
    assert second.exit_code == 0, second.output
    assert 'request "req-7" was already carried out on this saga' in second.stdout
    assert (await ops.saga("i-1"))["version"] == version
    assert (await ops.kinds("i-1")).count("operator_pause") == 1
    results = [a["result"] for a in await ops.audit("i-1")]
    assert results == ["applied", "duplicate"]


async def test_finished_sagas_refuse_actions_and_cancel_dry_run_shows_the_compensation_plan(
    ops: Ops,
) -> None:
    await ops.place("c-1")
    await ops.reaches("c-1", "await_dispatch")
    dry = await ops.cli("saga", "cancel", "c-1", "--reason", "customer phoned", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "1. book_shipment -> port shipping (done)" in dry.stdout
    assert "2. authorise_payment -> port payments (done)" in dry.stdout
    assert "3. reserve_stock -> port inventory (done)" in dry.stdout
    assert (await ops.saga("c-1"))["status"] == "running", "a dry run changes nothing"

    done = await ops.cli("saga", "cancel", "c-1", "--reason", "customer phoned")
    assert done.exit_code == 0, done.output
    await ops.reaches("c-1", "compensated")
    for operation in ("cancel", "void", "release"):
        assert ops.ledger.count(operation) == 1

    refused = await ops.cli("saga", "retry", "c-1", "--reason", "again")
    assert refused.exit_code == 1
    assert "the saga is compensated: a finished saga takes no more actions" in refused.stdout
    assert [a["result"] for a in await ops.audit("c-1")] == ["applied", "refused"]


async def test_past_the_pivot_cancel_is_refused_and_resume_or_resolve_finish_the_saga(
    ops: Ops,
) -> None:
    ops.payments.refuse_capture = True
    for order in ("p-1", "p-2"):
        await ops.place(order)
        await ops.reaches(order, "await_dispatch")
        await ops.publish(
            "shipment.dispatched", {"order_id": order, "shipment_id": "s"}, f"d-{order}"
        )
        await ops.reaches(order, "needs_attention")

    refused = await ops.cli("saga", "cancel", "p-1", "--reason", "give up")
    assert refused.exit_code == 1
    assert 'past its pivot step "capture_payment"' in refused.stdout

    ops.payments.refuse_capture = False
    resumed = await ops.cli("saga", "resume", "p-1", "--reason", "card updated")
    assert resumed.exit_code == 0, resumed.output
    await ops.reaches("p-1", "completed")
    assert ops.ledger.count("capture") == 1

    resolved = await ops.cli(
        "saga",
        "resolve",
        "p-2",
        "capture_payment",
        "--reason",
        "paid by bank transfer",
        "--note",
        "transfer 991 received",
    )
    assert resolved.exit_code == 0, resolved.output
    await ops.reaches("p-2", "completed")
    assert ops.ledger.count("capture") == 1, "a resolved step is not run"
    (row,) = [h for h in await ops.history("p-2") if h["kind"] == "operator_resolve"]
    assert row["detail"]["note"] == "transfer 991 received"


async def test_a_paused_saga_keeps_its_events_and_timers_and_applies_them_in_order_on_unpause(
    ops: Ops,
) -> None:
    dispatch_by = datetime.now(UTC) + timedelta(seconds=8)
    await ops.place("z-1", dispatch_in=timedelta(seconds=8))
    await ops.reaches("z-1", "await_dispatch")
    paused = await ops.cli("saga", "pause", "z-1", "--reason", "investigating")
    assert paused.exit_code == 0, paused.output
    version = (await ops.saga("z-1"))["version"]

    await ops.publish("shipment.dispatched", {"order_id": "z-1", "shipment_id": "s"}, "d-z-1")
    await ops.publish("order.cancellation_requested", {"order_id": "z-1"}, "x-z-1")
    await eventually(
        lambda: ops.db.fetchval("SELECT count(*) = 2 FROM parked_messages WHERE reason = 'paused'"),
        what="both events kept",
    )
    # The dispatch deadline passes while paused.
    await asyncio.sleep(max(0.0, (dispatch_by - datetime.now(UTC)).total_seconds()) + 1.0)
    # Kept past SAGAWORKS_PARK_FOR_S (1 s here): a paused saga's events do not expire.
    assert await ops.system.expire_parked_events() == 0
    assert (await ops.saga("z-1"))["version"] == version, "a paused saga does not move"
    assert "deadline_missed" not in await ops.kinds("z-1")
    assert await ops.db.fetchval("SELECT count(*) FROM timers") == 1

    unpaused = await ops.cli("saga", "unpause", "z-1", "--reason", "all clear")
    assert unpaused.exit_code == 0, unpaused.output
    await ops.reaches("z-1", "completed")
    kinds = await ops.kinds("z-1")
    # Dispatched first (the wait is met, capture runs), then the cancellation (refused: past
    # the pivot): the order they arrived in.
    assert kinds.index("operator_unpause") < kinds.index("event_received")
    assert kinds.index("event_received") < kinds.index("cancellation_refused")
    assert "deadline_missed" not in kinds
    assert await ops.db.fetchval("SELECT count(*) FROM parked_messages") == 0


async def test_actions_while_the_worker_drives_the_same_sagas_lose_no_update(ops: Ops) -> None:
    orders = [f"b-{i}" for i in range(15)]

    async def pause_then_unpause(order: str) -> None:
        await ops.actions.act(ops.request("pause", order, f"p-{order}"))
        await asyncio.sleep(0.05)
        await ops.actions.act(ops.request("unpause", order, f"u-{order}"))

    for order in orders:
        await ops.place(order)
    for order in orders:
        await ops.reaches(
            order, "reserve_stock", "authorise_payment", "book_shipment", "await_dispatch"
        )
    await asyncio.gather(*(pause_then_unpause(o) for o in orders))
    for order in orders:
        await ops.reaches(order, "await_dispatch", timeout_s=30)
        history = await ops.history(order)
        assert [h["seq"] for h in history] == list(range(1, len(history) + 1))
        kinds = [h["kind"] for h in history]
        assert kinds.count("operator_pause") == 1
        assert kinds.count("operator_unpause") == 1
        assert kinds.index("operator_pause") < kinds.index("operator_unpause")
        assert kinds.count("step_completed") == 3, kinds
        saga = await ops.saga(order)
        assert saga["progress"]["paused"] is False
        applied = {h["message_id"] for h in history if h["kind"] != "step_result_ignored"}
        assert saga["version"] == len(applied), (kinds, saga["version"])
    assert ops.ledger.duplicate_effects() == 0


# --- many sagas -------------------------------------------------------------------------------


async def plan_of(ops: Ops, *args: str) -> str:
    made = await ops.cli("saga", "plan", *args, "--json")
    assert made.exit_code == 0, made.output
    return str(json.loads(made.stdout)["id"])


async def test_apply_killed_mid_way_then_run_again_acts_once_per_saga(ops: Ops) -> None:
    orders = [f"k-{i}" for i in range(12)]
    for order in orders:
        await ops.place(order)
    for order in orders:
        await ops.reaches(order, "await_dispatch", timeout_s=30)
    plan = await plan_of(
        ops, "cancel", "--key-prefix", "k-", "--status", "running", "--reason", "recall"
    )
    counts = await ops.cli("saga", "plans", plan, "--json")
    assert json.loads(counts.stdout)[0]["total"] == 12

    process = await asyncio.create_subprocess_exec(
        str(SAGAWORKS),
        *("saga", "apply", plan, "--rate", "3", "--json"),
        env={**os.environ, **ops.cli_env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    settled = "SELECT count(*) FROM operator_plan_targets WHERE outcome IS NOT NULL"
    await eventually(lambda: ops.db.fetchval(settled + " HAVING count(*) >= 3"), timeout_s=30)
    process.send_signal(signal.SIGKILL)
    await process.wait()
    done = await ops.db.fetchval(settled)
    assert 3 <= done < 12, "the apply was meant to be killed half-way"

    again = await ops.cli("saga", "apply", plan)
    assert again.exit_code == 0, again.output
    assert "finished" in again.stdout
    assert f"12 of 12 settled (12 applied); {12 - done} in this run" in again.stdout
    for order in orders:
        await ops.reaches(order, "compensated", timeout_s=30)
        assert (await ops.kinds(order)).count("operator_cancel") == 1
        assert [a["result"] for a in await ops.audit(order)] == ["applied"]
    assert ops.ledger.count("release") == 12
    assert ops.ledger.duplicate_effects() == 0


async def test_a_failing_canary_halts_and_the_failure_rate_halts_a_later_run(ops: Ops) -> None:
    orders = [f"h-{i}" for i in range(8)]
    for order in orders:
        await ops.place(order)
    for order in orders:
        await ops.reaches(order, "await_dispatch", timeout_s=30)
    # Nothing is in flight at a wait, so every retry is refused.
    plan = await plan_of(ops, "retry", "--key-prefix", "h-", "--reason", "kick them")

    canary = await ops.cli("saga", "apply", plan, "--canary", "2")
    assert canary.exit_code == 1
    assert "halted: the canary failed: 2 of 2 targets refused or failed" in " ".join(
        canary.stdout.split()
    )
    rest = await ops.cli("saga", "apply", plan, "--halt-on", "50")
    assert rest.exit_code == 1
    assert "halted: 5 of 5 targets refused or failed" in " ".join(rest.stdout.split())
    listed = json.loads((await ops.cli("saga", "plans", plan, "--json")).stdout)[0]
    assert (listed["status"], listed["settled"], listed["outcomes"]) == (
        "halted",
        5,
        {"refused": 5},
    )


async def test_a_saga_that_moved_since_the_plan_was_made_is_skipped(ops: Ops) -> None:
    for order in ("m-1", "m-2"):
        await ops.place(order)
        await ops.reaches(order, "await_dispatch")
    plan = await plan_of(ops, "pause", "--key-prefix", "m-", "--reason", "freeze")
    await ops.actions.act(ops.request("pause", "m-2", "moved-it"))
    applied = await ops.cli("saga", "apply", plan)
    assert applied.exit_code == 0, applied.output
    assert "(1 applied, 1 skipped)" in applied.stdout
    skipped = await ops.db.fetchval(
        "SELECT detail FROM operator_plan_targets WHERE outcome = 'skipped'"
    )
    assert "moved since the plan was made" in skipped
    assert (await ops.kinds("m-2")).count("operator_pause") == 1


async def test_dead_letter_replay_as_a_plan(ops: Ops) -> None:
    orders = [f"d-{i}" for i in range(4)]
    for order in orders:
        await ops.publish("order.cancellation_requested", {"order_id": order}, f"x-{order}")
    await eventually(
        lambda: ops.db.fetchval("SELECT count(*) = 4 FROM parked_messages"), what="parked"
    )
    await asyncio.sleep(1.1)
    assert await ops.system.expire_parked_events() == 4
    for order in orders:
        await ops.place(order)
    for order in orders:
        await ops.reaches(order, "await_dispatch", timeout_s=30)

    made = await ops.cli("dlq", "plan", "--reason", "no_saga", "--why", "sagas exist now", "--json")
    assert made.exit_code == 0, made.output
    plan = json.loads(made.stdout)["id"]
    assert json.loads(made.stdout)["total"] == 4
    applied = await ops.cli("dlq", "apply", plan, "--canary", "1")
    assert applied.exit_code == 0, applied.output
    assert "4 of 4 settled (4 applied)" in applied.stdout
    for order in orders:
        await ops.reaches(order, "compensated", timeout_s=30)
    again = await ops.cli("dlq", "apply", plan)
    assert again.exit_code == 0
    assert "0 in this run" in again.stdout
    statuses = await ops.db.fetch("SELECT DISTINCT status FROM dead_letters")
    assert [r["status"] for r in statuses] == ["replayed"]
    audited = await ops.db.fetchval(
        "SELECT count(*) FROM operator_audit WHERE plan_id = $1 AND dead_letter_id IS NOT NULL",
        UUID(plan),
    )
    assert audited == 4
