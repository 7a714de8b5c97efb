"""Eager steps on the real broker and database: what runs in the worker, what goes by queue.

A step command a transition commits runs in the committing worker when that
worker serves the port, the port's breaker is closed and a place is free;
its outbox row carries a lease and is never published unless the lease runs
out. Everything else goes through the port's queue, and a command that does
both (the lease ran out while the eager call was still running, or the
worker died) has one effect and one applied result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from engine_harness import EngineHarness, HandledRecord
from scenarios.order_fulfilment import ALL_ACTIONS, HAPPY_HISTORY, assert_gapless, kinds
from test_order_fulfilment import (
    assert_fulfilled_event,
    assert_settled,
    cancellation,
    dispatch_after_booking,
    place,
    placed,
)

from sagaworks.application.circuit import CircuitOpen
from sagaworks.application.config import PortPolicy
from sagaworks.domain.errors import PortUnavailable
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

HarnessFactory = Callable[..., Awaitable[EngineHarness]]

PORT_STEPS = {
    "inventory": "reserve_stock",
    "payments": "authorise_payment",
    "shipping": "book_shipment",
}


@pytest.fixture
async def harness_factory(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[HarnessFactory]:
    """Opened harnesses on prefixes of their own, eager steps on (the default); closed after."""
    opened: list[EngineHarness] = []

    async def make(**overrides: Any) -> EngineHarness:
        values: dict[str, Any] = {
            "database_url": migrated_database_url,
            "exchange_prefix": f"{run_id}.{secrets.token_hex(3)}.",
            "grace_period_s": 5.0,
            "timer_poll_interval_s": 0.1,
            "outbox_sweep_interval_s": 0.2,
            "db_pool_size": 5,
            **overrides,
        }
        harness = EngineHarness(settings_factory(**values), migrated_database_url)
        opened.append(harness)
        await harness.open()
        return harness

    yield make
    for harness in reversed(opened):
        await harness.close()


async def command_rows(harness: EngineHarness, order_id: str) -> dict[str, asyncpg.Record]:
    """The saga's step-command outbox rows by step name (the first of each step)."""
    rows = await harness.db.fetch(
        "SELECT message_id, routing_key, lease_until, published_at, convert_from(body, 'UTF8') "
        "AS body FROM outbox WHERE saga_id = $1 AND routing_key LIKE 'port.%' ORDER BY id",
        harness.saga_id(order_id),
    )
    by_step: dict[str, asyncpg.Record] = {}
    for row in rows:
        step = next(s for s in (*PORT_STEPS.values(), "capture_payment") if f'"{s}"' in row["body"])
        by_step.setdefault(step, row)
    return by_step


def queued(harness: EngineHarness) -> list[HandledRecord]:
    """Step commands that reached a worker through a port's queue."""
    return [h for h in harness.handled if h.use_case == "handle_step_command"]


async def open_breaker(harness: EngineHarness, port: str, policy: PortPolicy) -> None:
    """Open the worker's breaker of `port` the way failures do: through its calls."""
    breakers = harness.systems[0].breakers
    assert breakers is not None

    async def unavailable() -> None:
        raise PortUnavailable(f"{port} is down (test)")

    for _ in range(policy.breaker_failures):
        with contextlib.suppress(PortUnavailable, CircuitOpen):
            await breakers[port].call(unavailable)
    assert breakers[port].state == "open"


async def test_every_step_of_a_saga_runs_eagerly_and_no_command_crosses_the_broker(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory()
    await harness.start_worker()
    oid = "o-eager"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    saga = await harness.wait_for_status(oid, "completed")

    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    assert harness.effects(oid) == ALL_ACTIONS
    assert harness.ledger.calls["reserve"] == 1
    assert queued(harness) == []
    rows = await command_rows(harness, oid)
    assert sorted(rows) == sorted([*PORT_STEPS.values(), "capture_payment"])
    for step, row in rows.items():
        assert row["lease_until"] is not None, f"{step}: written without a lease"
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)  # each leased row marked once its result committed


async def test_a_slow_port_leases_its_eager_steps_past_its_longest_delivery(
    harness_factory: HarnessFactory,
) -> None:
    """Three attempts of up to 20 s and a second between: leased for 62 s plus a commit."""
    harness = await harness_factory()
    assert harness.settings.eager_lease_s is None, "the lease comes from each port's policy"
    slow = PortPolicy(call_timeout_s=20.0, immediate_attempts=3, immediate_wait_max_s=1.0)
    await harness.start_worker(policies={"shipping": slow})
    oid = "o-slow-lease"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    await harness.wait_for_status(oid, "completed")

    leased_s = {
        step: float(
            await harness.db.fetchval(
                "SELECT extract(epoch FROM lease_until - created_at) FROM outbox "
                "WHERE message_id = $1",
                row["message_id"],
            )
        )
        for step, row in (await command_rows(harness, oid)).items()
    }
    commit_s = harness.settings.db_statement_timeout_s
    assert leased_s["book_shipment"] == pytest.approx(62.0 + commit_s)
    others = {step: s for step, s in leased_s.items() if step != "book_shipment"}
    assert others, "the other ports ran eagerly too"
    assert all(30.0 <= s < 62.0 for s in others.values()), others


async def test_with_eager_steps_off_every_command_goes_through_its_queue(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(eager_steps=False)
    await harness.start_worker()
    oid = "o-queued"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    saga = await harness.wait_for_status(oid, "completed")

    assert harness.effects(oid) == ALL_ACTIONS
    rows = await command_rows(harness, oid)
    assert all(row["lease_until"] is None for row in rows.values())
    assert sorted(h.message_id for h in queued(harness)) == sorted(
        row["message_id"] for row in rows.values()
    )
    await assert_settled(harness, saga)


async def test_a_port_whose_breaker_is_open_gets_its_command_through_the_queue(
    harness_factory: HarnessFactory,
) -> None:
    policy = PortPolicy(breaker_failures=2, breaker_reset_s=1.0)
    harness = await harness_factory()
    await harness.start_worker(policies={"inventory": policy})
    await open_breaker(harness, "inventory", policy)
    oid = "o-breaker-open"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    saga = await harness.wait_for_status(oid, "completed")

    rows = await command_rows(harness, oid)
    reserve = rows["reserve_stock"]
    assert reserve["lease_until"] is None
    (delivered,) = queued(harness)
    assert (delivered.message_id, delivered.outcome) == (reserve["message_id"], "applied")
    for step in ("authorise_payment", "book_shipment", "capture_payment"):
        assert rows[step]["lease_until"] is not None, f"{step}: its breaker was closed"
    assert harness.effects(oid) == ALL_ACTIONS
    assert_gapless(await harness.history(oid))
    await assert_settled(harness, saga)


async def test_a_port_this_worker_does_not_serve_gets_its_command_through_the_queue(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory()
    await harness.start_worker()
    eager = harness.systems[0].eager
    assert eager is not None
    eager.serve({"inventory", "payments"})  # not shipping
    oid = "o-not-served"
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))
    saga = await harness.wait_for_status(oid, "completed")

    rows = await command_rows(harness, oid)
    assert rows["book_shipment"]["lease_until"] is None
    (delivered,) = queued(harness)
    assert delivered.message_id == rows["book_shipment"]["message_id"]
    assert all(rows[s]["lease_until"] is not None for s in ("reserve_stock", "capture_payment"))
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_settled(harness, saga)


async def test_eager_steps_are_bounded_per_port_and_the_rest_go_through_the_queue(
    harness_factory: HarnessFactory,
) -> None:
    harness = await harness_factory(eager_steps_per_port=1)
    await harness.start_worker()
    reserve = harness.gates["reserve"] = asyncio.Event()
    orders = ["o-bound-1", "o-bound-2", "o-bound-3"]
    for oid in orders:
        dispatch_after_booking(harness, oid)
        await place(harness, placed(oid))

    async def all_at_the_port() -> bool:
        return harness.arrivals["reserve"] == len(orders)

    await harness.eventually(all_at_the_port, what="every reserve call started")
    leases = await harness.db.fetch(
        "SELECT lease_until FROM outbox WHERE routing_key LIKE 'port.inventory.%'"
    )
    assert len(leases) == len(orders)
    assert sum(row["lease_until"] is not None for row in leases) == 1, "one place: one lease"
    reserve.set()
    for oid in orders:
        await harness.wait_for_status(oid, "completed")

    leased = [(await command_rows(harness, oid))["reserve_stock"] for oid in orders]
    assert sorted(row["lease_until"] is not None for row in leased) == [False, False, True]
    through_queue = {h.message_id for h in queued(harness) if h.message_id.endswith("/1/0")}
    assert through_queue == {row["message_id"] for row in leased if row["lease_until"] is None}
    for oid in orders:
        assert harness.effects(oid) == ALL_ACTIONS
        await assert_settled(harness, await harness.wait_for_status(oid, "completed"))


async def test_a_command_run_eagerly_and_from_the_queue_at_once_has_one_effect_and_one_result(
    harness_factory: HarnessFactory,
) -> None:
    """The lease runs out while the eager call is still at the port: the sweeper publishes the
    command, a queue consumer calls the port too; the idempotency key makes one effect and the
    inbox applies one result."""
    harness = await harness_factory()
    await harness.start_worker()
    oid = "o-twice"
    reserve = harness.gates["reserve"] = asyncio.Event()
    dispatch_after_booking(harness, oid)
    await place(harness, placed(oid))

    async def eager_call_waiting() -> bool:
        return harness.arrivals["reserve"] == 1

    await harness.eventually(eager_call_waiting, what="the eager reserve call")
    command = (await command_rows(harness, oid))["reserve_stock"]
    assert command["lease_until"] is not None
    await harness.db.execute(  # as if the lease had run out: the sweeper's turn
        "UPDATE outbox SET lease_until = now() - interval '1 second', "
        "created_at = created_at - interval '1 minute' WHERE message_id = $1",
        command["message_id"],
    )

    async def both_calls_waiting() -> bool:
        return harness.arrivals["reserve"] == 2

    await harness.eventually(both_calls_waiting, what="the queued reserve call")
    reserve.set()
    saga = await harness.wait_for_status(oid, "completed")

    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    assert harness.ledger.calls["reserve"] == 2
    assert harness.effects(oid) == ALL_ACTIONS
    (from_queue,) = await harness.wait_for_handled(command["message_id"])
    assert from_queue.outcome in {"applied", "duplicate"}
    completed = [h for h in history if h.kind == "step_completed" and h.step == "reserve_stock"]
    assert [h.message_id for h in completed] == [command["message_id"]]
    await assert_fulfilled_event(harness, saga, oid)
    await assert_settled(harness, saga)


async def test_an_event_arriving_during_an_eager_step_is_applied_in_order(
    harness_factory: HarnessFactory,
) -> None:
    """A cancellation while the eager reserve call runs: one transaction after another."""
    harness = await harness_factory()
    await harness.start_worker()
    oid = "o-eager-cancel"
    cancel_id = f"{oid}/cancel"
    reserve = harness.gates["reserve"] = asyncio.Event()
    await place(harness, placed(oid))
    await harness.wait_for_history(oid, "step_started", "reserve_stock")

    await harness.publish(cancellation(oid), cancel_id, correlation_id=oid)
    await harness.wait_for_history(oid, "compensation_started")
    reserve.set()
    saga = await harness.wait_for_status(oid, "compensated")

    history = await harness.history(oid)
    assert_gapless(history)
    assert kinds(history) == [
        ("started", None),
        ("step_started", "reserve_stock"),
        ("compensation_started", None),
        ("step_completed", "reserve_stock"),
        ("step_started", "reserve_stock"),
        ("compensation_completed", "reserve_stock"),
        ("compensated", None),
    ]
    assert [h.seq for h in history] == sorted(h.seq for h in history)
    assert harness.effects(oid) == {"reserve": 1, "release": 1}
    await assert_settled(harness, saga)


@pytest.mark.slow
async def test_a_worker_killed_during_an_eager_step_leaves_the_command_to_the_queue(
    harness_factory: HarnessFactory, tmp_path: Path
) -> None:
    """The worker dies with the step claimed: after the lease, another worker runs it once."""
    harness = await harness_factory(eager_lease_s=2.0)
    settings = harness.settings
    env = {
        **os.environ,
        "SAGAWORKS_EXCHANGE_PREFIX": settings.exchange_prefix,
        "SAGAWORKS_AMQP_URL": settings.amqp_url.get_secret_value(),
        "SAGAWORKS_DATABASE_URL": settings.database_url.get_secret_value(),
        "SAGAWORKS_EAGER_LEASE_S": "2",
        "SAGAWORKS_LOG_LEVEL": "WARNING",
    }
    doomed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sagas.order_fulfilment.bench.worker",
        "--latency-s",
        "30",  # every port call takes 30 s: the eager call is still waiting when it dies
        "--ledger",
        str(tmp_path / "ledger.json"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert doomed.stdout is not None
        async with asyncio.timeout(30):
            ready = await doomed.stdout.readline()
        assert ready.strip() == b"ready", ready
        oid = "o-killed"
        dispatch_after_booking(harness, oid)
        await place(harness, placed(oid))

        async def claimed() -> asyncpg.Record | None:
            return (await command_rows(harness, oid)).get("reserve_stock")

        command = await harness.eventually(claimed, what="the reserve command, leased")
        assert command["lease_until"] is not None
        assert command["published_at"] is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            doomed.send_signal(signal.SIGKILL)
        await doomed.wait()

    await harness.start_worker()
    saga = await harness.wait_for_status(oid, "completed", timeout_s=30.0)
    (delivered,) = await harness.wait_for_handled(command["message_id"])
    assert delivered.outcome == "applied"
    history = await harness.history(oid)
    assert kinds(history) == HAPPY_HISTORY
    assert_gapless(history)
    assert harness.effects(oid) == ALL_ACTIONS
    await assert_settled(harness, saga)
