"""The boundary holds under generated deliveries: on a real worker, broker and database.

Hypothesis generates deliveries (`fuzz_deliveries.py`): properties missing,
empty or garbage, any header of any AMQP type, random bytes, NULs, bytes that
are not UTF-8, bodies past the size limit or nested past the parser's depth,
valid bodies with the wrong type or on the wrong exchange, no `user_id` or a
user that may not publish. They are published, one after the other, to a
running worker, with a valid order every `VALID_EVERY` of them, and the test
proves, for every generated delivery, that:

- it was handled exactly once, never redelivered: processed, or dead-lettered
  with the reason docs/messages.md names (computed from what was generated,
  in the contract's check order), each dead letter failed once;
- at the end no queue holds a message or an unacknowledged delivery, the
  unstorable queue included;

and that every valid order completed and its outcome event was published, the
worker kept its broker connections throughout (a loss is named with its
cause), and the process' memory stayed bounded.

The small run (`SMALL` deliveries) runs with the suite; the large one is
marked `fuzz` and runs only when `SAGAWORKS_FUZZ_DELIVERIES` says how many:

    SAGAWORKS_FUZZ_DELIVERIES=3000 uv run pytest -m fuzz -s tests/integration/test_fuzz_boundary.py

A failure names the seed; `--hypothesis-seed=<seed>` generates the same deliveries.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psutil
import pytest
from broker_tools import USER, broker_user, rabbitmqctl, raw_publisher
from engine_harness import EngineHarness, HandledRecord, running_harness
from fuzz_deliveries import Delivery, describe, drawn, expected_reason
from pamqp import commands, encode

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagaworks.adapters.rabbitmq.topology import Binding, exchange_name
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration

SMALL = 300
"""Deliveries in the run that goes with the suite (well under a minute)."""
VALID_EVERY = 25
"""One valid order is published after every this many generated deliveries."""
RSS_GROWTH_BOUND = 512 * 1024 * 1024
"""How much the worker's process may grow over the run: generous, a leak goes far past it."""
PROCESSED = {"applied", "parked", "ignored", "duplicate", "stale"}
"""A use case's outcomes for a delivery it took (anything but a dead letter or a crash)."""
OUTCOME_WAIT_S = 30.0
"""How long a completed order's outcome event may take to arrive: past a lost connection's
reconnection (5 s apart) and the sweeper's next pass (1 s), so the loss is what fails."""


@pytest.fixture
def undecodable_publishing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the test publish text fields that are not UTF-8: "\\udcff" goes out as byte 0xff."""

    def lenient(encoder: Any, value: str) -> bytes:
        raw = value.encode("utf-8", "surrogateescape")
        return bytes(encoder.pack(len(raw))) + raw

    monkeypatch.setattr(encode, "_string", lenient)


@pytest.fixture
async def harness(
    migrated_database_url: str,
    settings_factory: Callable[..., Settings],
    run_id: str,
    undecodable_publishing: None,
) -> AsyncIterator[EngineHarness]:
    async with running_harness(settings_factory, migrated_database_url, run_id) as h:
        yield h


@pytest.fixture
def fuzz_seed(request: pytest.FixtureRequest) -> int:
    """`--hypothesis-seed` when given, else a fresh one (named by any failure)."""
    given = request.config.getoption("hypothesis_seed", default=None)
    return int(given) if given is not None else random.randrange(2**32)


async def test_generated_deliveries_hold_the_line(
    harness: EngineHarness, fuzz_seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    await _hold_the_line(harness, SMALL, fuzz_seed, caplog)


@pytest.mark.fuzz
@pytest.mark.slow
async def test_thousands_of_generated_deliveries_hold_the_line(
    harness: EngineHarness, fuzz_seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    count = os.environ.get("SAGAWORKS_FUZZ_DELIVERIES")
    if not count:
        pytest.skip("the large fuzz run: set SAGAWORKS_FUZZ_DELIVERIES (e.g. 3000) to run it")
    await _hold_the_line(harness, int(count), fuzz_seed, caplog)


# -- the run --------------------------------------------------------------------------------------


@dataclass
class Memory:
    """The process' resident set size, sampled while the run goes on."""

    samples: list[int] = field(default_factory=list)

    @property
    def start(self) -> int:
        return self.samples[0]

    @property
    def peak(self) -> int:
        return max(self.samples)

    @property
    def end(self) -> int:
        return self.samples[-1]


@contextlib.asynccontextmanager
async def _sampling(every_s: float = 0.1) -> AsyncIterator[Memory]:
    process = psutil.Process()
    memory = Memory([process.memory_info().rss])

    async def sample() -> None:
        while True:
            await asyncio.sleep(every_s)
            memory.samples.append(process.memory_info().rss)

    task = asyncio.create_task(sample())
    try:
        yield memory
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        memory.samples.append(process.memory_info().rss)


async def _hold_the_line(
    harness: EngineHarness, count: int, seed: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sagaworks.broker")
    max_bytes = harness.settings.max_message_bytes
    deliveries = drawn(count, seed, max_bytes)
    assert len(deliveries) == count, f"hypothesis generated {len(deliveries)} of {count}"
    expected: dict[int, str | None] = {}
    described: dict[int, str] = {}
    ports = _port_bindings(harness)
    valid: list[str] = []
    async with (
        _sampling() as memory,
        broker_user() as (stranger, password),
        raw_publisher() as own,
        raw_publisher(stranger, password) as other,
    ):
        started = time.monotonic()
        for seq, delivery in enumerate(deliveries):
            body = delivery.body.build(seq)
            expected[seq] = expected_reason(delivery, body, seq, max_bytes)
            described[seq] = describe(delivery, body, seq)
            publisher, user = {
                "own": (own, USER),
                "none": (own, None),
                "stranger": (other, stranger),
            }[delivery.user]
            exchange, routing_key = _address(harness, delivery, ports)
            try:
                await publisher.publish(
                    exchange, routing_key, body, _properties(delivery, seq, user)
                )
            except (AssertionError, TimeoutError) as error:
                raise AssertionError(f"seed {seed}: not published: {described[seq]}") from error
            del body
            if seq % VALID_EVERY == 0:
                valid.append(await _publish_valid_order(harness, seq))
        published_s = time.monotonic() - started

        by_seq = await _wait_until_each_handled(harness, set(expected), timeout_s=60 + count / 20)
        settled_s = time.monotonic() - started
        for order_id in valid:
            saga = await harness.wait_for_status(order_id, "completed", timeout_s=60)
            assert saga.status == "completed"
        await _queues_settle(harness)
        await asyncio.sleep(1.0)

    failures = _compare(harness, expected, described, _by_seq(harness.handled))
    failures += await _compare_letters(harness, expected)
    errors = [h for h in harness.handled if h.error is not None]
    losses = _broker_losses(caplog)
    figures = _figures(count, expected, published_s, settled_s, memory, len(valid))
    print(f"\nfuzz figures (seed {seed}): {json.dumps(figures | {'broker_losses': losses})}")
    assert not errors, f"seed {seed}: handlers crashed: {errors[:5]}"
    assert not failures, f"seed {seed}, {len(failures)} deliveries wrong:\n" + "\n".join(
        failures[:20]
    )
    assert by_seq.keys() == expected.keys()
    assert memory.peak - memory.start < RSS_GROWTH_BOUND, figures
    for order_id in valid:
        await harness.wait_for_outcome(order_id, timeout_s=OUTCOME_WAIT_S)
    assert not losses, f"seed {seed}: the worker lost its broker connections: {losses}"


def _broker_losses(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Each loss of a worker's broker connection during the run: which one, and why."""
    return [
        f"{getattr(r, 'connection', '?')}: {r.cause}"
        for r in caplog.records
        if r.name == "sagaworks.broker" and hasattr(r, "cause")
    ]


def _port_bindings(harness: EngineHarness) -> list[Binding]:
    saga_queue = harness.saga_queue
    return [
        binding
        for queue in harness.systems[0].topology.queues
        if queue.name != saga_queue
        for binding in queue.bindings
    ]


def _address(harness: EngineHarness, delivery: Delivery, ports: list[Binding]) -> tuple[str, str]:
    target = delivery.target
    if target.kind == "event":
        return exchange_name(harness.prefix, target.domain), target.routing_key
    if target.kind == "direct":
        return "", harness.saga_queue
    binding = ports[target.port % len(ports)]
    return binding.exchange, binding.routing_key.replace("#", "fz").replace("*", "fz")


def _properties(delivery: Delivery, seq: int, user: str | None) -> commands.Basic.Properties:
    return commands.Basic.Properties(
        message_id=delivery.wire_id(seq),
        message_type=delivery.message_type,
        user_id=user,
        app_id=delivery.app_id,
        correlation_id=delivery.correlation_id,
        timestamp=delivery.timestamp,
        content_type="application/json",
        delivery_mode=2,
        headers=delivery.wire_headers(seq),
    )


async def _publish_valid_order(harness: EngineHarness, seq: int) -> str:
    order_id = f"ok-{seq}"
    harness.plans[order_id] = [
        (
            0.05,
            ShipmentDispatched(order_id=order_id, shipment_id=f"shp-{order_id}"),
            f"{order_id}/d",
        )
    ]
    order = OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=1),),
        amount_cents=1_000,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
    )
    await harness.publish(order, f"{order_id}/placed")
    return order_id


def _by_seq(handled: list[HandledRecord]) -> dict[int, list[HandledRecord]]:
    found: dict[int, list[HandledRecord]] = defaultdict(list)
    for record in handled:
        seq = record.headers.get("x-fz-seq")
        if isinstance(seq, int):
            found[seq].append(record)
    return found


async def _wait_until_each_handled(
    harness: EngineHarness, seqs: set[int], timeout_s: float
) -> dict[int, list[HandledRecord]]:
    async def all_handled() -> dict[int, list[HandledRecord]] | None:
        found = _by_seq(harness.handled)
        return found if seqs <= found.keys() else None

    return await harness.eventually(
        all_handled, what=f"all {len(seqs)} generated deliveries handled", timeout_s=timeout_s
    )


async def _queues_settle(harness: EngineHarness, timeout_s: float = 60) -> None:
    """No queue of the run holds a message or an unacknowledged delivery."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = await rabbitmqctl("list_queues", "name", "messages", "messages_unacknowledged")
        busy = [
            r
            for r in rows
            if r["name"].startswith(harness.prefix)
            and (r["messages"] or r["messages_unacknowledged"])
        ]
        if not busy:
            return
        assert time.monotonic() < deadline, f"queues still busy after {timeout_s} s: {busy}"
        await asyncio.sleep(0.5)


def _compare(
    harness: EngineHarness,
    expected: dict[int, str | None],
    described: dict[int, str],
    by_seq: dict[int, list[HandledRecord]],
) -> list[str]:
    failures = []
    for seq, reason in expected.items():
        records = by_seq.get(seq, [])
        if len(records) != 1:
            failures.append(f"handled {len(records)} times: {described[seq]}")
            continue
        (record,) = records
        got = (
            record.handled.reason if record.outcome == "dead_lettered" and record.handled else None
        )
        if reason is None and record.outcome not in PROCESSED:
            failures.append(f"expected processed, got {record.outcome} {got}: {described[seq]}")
        elif reason is not None and (record.outcome, got) != ("dead_lettered", reason):
            failures.append(
                f"expected {reason}, got {record.outcome} {got} "
                f"({record.handled.reason if record.handled else record.error}): {described[seq]}"
            )
    return failures


async def _compare_letters(harness: EngineHarness, expected: dict[int, str | None]) -> list[str]:
    """The dead-letter store holds one letter per rejected delivery, failed once, nothing else."""
    rows = await harness.db.fetch(
        "SELECT (headers->>'x-fz-seq')::int AS seq, reason, times_failed FROM dead_letters"
        " WHERE headers ? 'x-fz-seq'"
    )
    letters = {r["seq"]: (r["reason"], r["times_failed"]) for r in rows}
    failures = (
        [f"{len(rows) - len(letters)} letters share a delivery"]
        if len(rows) != len(letters)
        else []
    )
    for seq, reason in expected.items():
        letter = letters.get(seq)
        if reason is None and letter is not None:
            failures.append(f"#{seq} processed, yet a dead letter {letter}")
        elif reason is not None and letter != (reason, 1):
            failures.append(f"#{seq}: letter {letter}, expected ({reason!r}, 1)")
    others = await harness.db.fetchval(
        "SELECT count(*) FROM dead_letters WHERE NOT headers ? 'x-fz-seq'"
    )
    if others:
        failures.append(f"{others} dead letters that are no generated delivery")
    return failures


def _figures(
    count: int,
    expected: dict[int, str | None],
    published_s: float,
    settled_s: float,
    memory: Memory,
    valid: int,
) -> dict[str, Any]:
    reasons = Counter(reason or "processed" for reason in expected.values())
    rejected = count - reasons["processed"]
    mib = 1024 * 1024
    return {
        "deliveries": count,
        "valid_orders": valid,
        "by_reason": dict(reasons.most_common()),
        "published_s": round(published_s, 1),
        "settled_s": round(settled_s, 1),
        "rejected_per_s": round(rejected / settled_s, 1),
        "rss_mib": {
            "start": round(memory.start / mib, 1),
            "peak": round(memory.peak / mib, 1),
            "end": round(memory.end / mib, 1),
        },
    }
