"""Every stuck reason, produced by a real scenario and detected by `sagaworks_read.stuck_sagas`.

Each test runs a real worker with the HTTP port adapters against the fake
participants (the rig of `test_recoverability`), breaks something the way it
breaks in production (a participant down, hanging or refusing a request, a
worker gone, a state that no longer loads, an event for an order never
placed), and waits until the view lists the saga with that reason. The
view is read through the operators' port (`PostgresSagaQueries`), and the
`saga list --stuck REASON` filter must find the same saga.

Bounds the scenarios cannot wait for (the default idle floor is five
minutes) are lowered the way a site tunes them: `ALTER DATABASE ... SET
sagaworks.stuck_...` on the test's own database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from test_recoverability import FAST, Rig, RigFactory, rig_factory

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagaworks import PortPolicy
from sagaworks.adapters.postgres.engine import create_engine
from sagaworks.adapters.postgres.saga_queries import PostgresSagaQueries
from sagaworks.application.operations import SagaFilter, SagaSort
from sagaworks.application.ports import StuckSaga
from sagaworks.domain.instance import saga_id_for

pytestmark = [pytest.mark.integration]

__all__ = ["rig_factory"]  # the fixture, shared with test_recoverability

PATIENT = PortPolicy(
    call_timeout_s=10.0,
    immediate_attempts=1,
    delayed_retries=40,
    delayed_base_s=0.3,
    delayed_max_s=0.6,
    breaker_failures=100,
    breaker_reset_s=2.0,
)
"""Retries for a long time and never opens its breaker: the retry itself is what is seen."""


@pytest.fixture
async def queries(migrated_database_url: str) -> AsyncIterator[PostgresSagaQueries]:
    engine = create_engine(migrated_database_url, pool_size=2, max_overflow=0)
    yield PostgresSagaQueries(engine)
    await engine.dispose()


async def tune(rig: Rig, **bounds: str) -> None:
    """Set the view's bounds for new sessions of the test's database, as a site would."""
    database = await rig.db.fetchval("SELECT current_database()")
    for name, value in bounds.items():
        await rig.db.execute(f"ALTER DATABASE \"{database}\" SET sagaworks.{name} = '{value}'")


async def detected(
    queries: PostgresSagaQueries, order_id: str, reason: str, timeout_s: float = 30.0
) -> StuckSaga:
    """The stuck row of `order_id` once the view gives it `reason`; the filter finds it too."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    while True:
        rows = await queries.stuck(SagaFilter(), limit=1000)
        mine = [r for r in rows if r.correlation_key == order_id]
        seen.extend(r.reason for r in mine if r.reason not in seen)
        if mine and mine[0].reason == reason:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{order_id} never listed as {reason}; seen: {seen or 'nothing'}")
        await asyncio.sleep(0.1)
    (row,) = mine
    assert row.saga_id == saga_id_for(order_fulfilment.name, order_id)
    assert row.saga_type == order_fulfilment.name
    if row.status is not None:
        page = await queries.find(
            SagaFilter(stuck_reasons=(reason,), correlation_key=order_id),
            SagaSort(),
            limit=10,
            offset=0,
        )
        assert [s.correlation_key for s in page.items] == [order_id]
    return row


async def place(rig: Rig, order_id: str, *, dispatch_in_s: float = 300.0) -> None:
    order = OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=2),),
        amount_cents=4_250,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(seconds=dispatch_in_s),
    )
    await rig.send(order, f"{order_id}/placed", order_id)


async def booked(rig: Rig, order_id: str) -> None:
    async def waiting() -> bool:
        return any(kind == "waiting" for kind, _, _ in await rig.history(order_id))

    await rig.wait_for(waiting, f"{order_id} booked and awaiting dispatch")


async def test_a_compensation_that_gave_up_needs_attention(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    brief = PortPolicy(
        call_timeout_s=0.5,
        immediate_attempts=1,
        delayed_retries=1,
        delayed_base_s=0.1,
        delayed_max_s=0.2,
        breaker_failures=20,
    )
    rig = await rig_factory(policies={"payments": brief})
    order = "keep-attention"
    await place(rig, order)
    await booked(rig, order)
    rig.services.payments.fail("void", order_id=order)
    await rig.cancel(order)

    row = await detected(queries, order, "needs_attention")

    assert row.status == "needs_attention"
    assert "503" in row.detail
    assert row.command == f'sagaworks saga resume {row.saga_id} --reason "..."'


async def test_a_compensation_failing_again_and_again_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(policies={"payments": PATIENT})
    order = "keep-void-failing"
    await place(rig, order)
    await booked(rig, order)
    rig.services.payments.fail("void", order_id=order)
    await rig.cancel(order)

    row = await detected(queries, order, "compensation_failing")

    assert row.status == "compensating"
    assert row.detail.startswith("compensation of authorise_payment failed ")
    assert "503" in row.detail
    assert row.command.startswith(f"sagaworks saga retry {row.saga_id} ")


async def test_a_saga_waiting_on_a_port_whose_breaker_is_open_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory()
    rig.services.payments.unavailable_for(None)
    order = "breaker-open"
    await place(rig, order)

    row = await detected(queries, order, "port_breaker_open")

    assert row.status == "running"
    assert row.current_step == "authorise_payment"
    assert "port payments, whose breaker is open in 1 worker(s)" in row.detail
    assert FAST.breaker_failures == 3


async def test_a_saga_with_a_dead_lettered_command_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(delivery_limit=1)
    order = "rejected"
    rig.services.payments.fail("authorise", order_id=order, status=400)
    await place(rig, order)

    row = await detected(queries, order, "dead_lettered")

    letter = await rig.db.fetchrow("SELECT id, message_id, reason FROM dead_letters")
    assert letter is not None
    assert letter["message_id"].startswith(f"{row.saga_id}/")
    assert row.status == "running"
    assert f"dead letter {letter['id']} ({letter['reason']})" in row.detail
    assert row.command == f"sagaworks dlq replay {letter['id']}"


async def test_a_wait_whose_deadline_passed_without_its_timer_firing_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(timer_max_attempts=1, timer_poll_interval_s=0.1)
    order = "keep-deadline-lost"
    await place(rig, order, dispatch_in_s=3.0)
    await booked(rig, order)
    # The saga's state no longer loads (say, after a bad deploy): its deadline cannot apply.
    await rig.db.execute(
        "UPDATE saga_instances SET state = '{\"poisoned\": true}' WHERE correlation_key = $1",
        order,
    )

    row = await detected(queries, order, "waiting_past_deadline")

    assert row.status == "running"
    assert row.current_step == "await_dispatch"
    assert "its timer is parked after 1 failed attempt(s): ValidationError" in row.detail
    assert row.command == f'sagaworks saga cancel {row.saga_id} --reason "..."'


async def test_a_due_timer_nobody_fires_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory()
    await tune(rig, stuck_timer_grace="1 second")
    order = "keep-no-worker"
    await place(rig, order, dispatch_in_s=2.0)
    await booked(rig, order)
    await rig.worker.stop()  # the only worker is gone: nobody claims the deadline

    row = await detected(queries, order, "timer_overdue")

    assert row.status == "running"
    assert row.detail.startswith("timer deadline:await_dispatch was due at ")
    assert row.detail.endswith("and no worker has fired it")


async def test_a_step_on_its_second_delayed_retry_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(policies={"payments": PATIENT})
    order = "retrying"
    rig.services.payments.fail("authorise", order_id=order)
    await place(rig, order)

    row = await detected(queries, order, "step_retrying")

    assert row.status == "running"
    assert row.current_step == "authorise_payment"
    assert row.detail.startswith("action of authorise_payment failed ")
    assert "503" in row.detail
    attempts = int(row.detail.split(" failed ")[1].split(" ")[0])
    assert attempts >= 2


async def test_an_event_parked_for_an_order_never_placed_is_listed_before_it_expires(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(park_for_s=120.0)
    order = "never-placed"
    await rig.cancel(order)

    row = await detected(queries, order, "parked_expiring")

    assert row.status is None, "no saga has started for it"
    assert "parked because no_saga" in row.detail
    assert row.command == f"sagaworks saga show {row.saga_id}"


async def test_a_step_in_flight_much_longer_than_usual_is_listed(
    rig_factory: RigFactory, queries: PostgresSagaQueries
) -> None:
    rig = await rig_factory(policies={"payments": PATIENT})
    await tune(rig, stuck_idle_floor="1 second")
    usual = ["usual-1", "usual-2", "usual-3"]
    for order in usual:
        await place(rig, order)
    for order in usual:
        assert await rig.wait_for_status(order) == "completed"
    rig.services.payments.slow_for(None, delay_s=6.0)  # applied, answered very late
    order = "hanging"
    await place(rig, order)

    row = await detected(queries, order, "idle_too_long")

    assert row.status == "running"
    assert row.current_step == "authorise_payment"
    assert "action of authorise_payment in flight since" in row.detail
    assert "p95 of" in row.detail, "the usual duration was learned from history"
    rig.services.payments.heal()
