"""Port policies, circuit breakers and the resilient caller, on a fake clock: no real sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from random import Random
from typing import Any
from uuid import uuid4

import pytest

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.state import OrderState
from sagaworks import BusinessFailure, PortPolicy, PortUnavailable
from sagaworks.adapters.observability.telemetry import NoTelemetry
from sagaworks.adapters.resilience.breaker import PortBreaker
from sagaworks.adapters.resilience.caller import ResilientCaller
from sagaworks.adapters.resilience.declared import declared_policies
from sagaworks.application.apply_inputs import ApplyInputs
from sagaworks.application.boundary import Boundary
from sagaworks.application.circuit import CircuitOpen, breaker_event
from sagaworks.application.config import EngineOptions
from sagaworks.application.handle_step_command import HandleStepCommand
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import BreakerChange, InboundMessage
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import RunStep
from sagaworks.domain.instance import InFlight, SagaInstance, Status

pytestmark = pytest.mark.unit

POLICY = PortPolicy(
    call_timeout_s=1.0,
    immediate_attempts=3,
    immediate_wait_s=0.1,
    immediate_wait_max_s=0.4,
    breaker_failures=3,
    breaker_reset_s=10.0,
)


class FakeClock:
    """Monotonic seconds that only move when someone sleeps (or the test says so)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)  # let other tasks run, as a real sleep would


class Port:
    """Counts calls; answers with whatever `answers` says next (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else "ok"
        if isinstance(answer, BaseException):
            raise answer
        return answer


def make_breaker(clock: FakeClock, policy: PortPolicy = POLICY) -> tuple[PortBreaker, list[str]]:
    changes: list[BreakerChange] = []
    breaker = PortBreaker(
        "payments", policy, worker="w1", on_change=changes.append, clock=clock, sleep=clock.sleep
    )
    return breaker, changes  # type: ignore[return-value]


def states(changes: list[Any]) -> list[tuple[str, str]]:
    return [(c.previous, c.state) for c in changes]


def down() -> PortUnavailable:
    return PortUnavailable("503")


async def fail(breaker: PortBreaker, times: int, error: Exception | None = None) -> None:
    """Make `times` calls that fail with `error` (the port answering 503 by default)."""
    for _ in range(times):
        with pytest.raises(type(error or down())):
            await breaker.call(Port(error or down()))


async def open_breaker(breaker: PortBreaker) -> None:
    await fail(breaker, POLICY.breaker_failures - 1)
    with pytest.raises(CircuitOpen):
        await breaker.call(Port(down()))


async def due_for_trial(clock: FakeClock) -> tuple[PortBreaker, list[str]]:
    """A breaker opened and then left for its reset timeout: the next call is the trial."""
    breaker, changes = make_breaker(clock)
    await open_breaker(breaker)
    clock.now += POLICY.breaker_reset_s
    return breaker, changes


class HeldPort:
    """Counts calls; each waits for `release`, then answers `answer` (raised if an exception)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.release = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        await self.release.wait()
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer


# --- breaker -----------------------------------------------------------------------------------


async def test_breaker_opens_after_the_configured_failures_and_refuses_without_calling() -> None:
    clock = FakeClock()
    breaker, changes = make_breaker(clock)

    await open_breaker(breaker)
    port = Port()
    with pytest.raises(CircuitOpen) as refused:
        await breaker.call(port)

    assert breaker.state == "open"
    assert port.calls == 0
    assert refused.value.retry_in_s == pytest.approx(10.0)
    assert states(changes) == [("closed", "open")]
    assert changes[0].failures == 3


async def test_timeouts_count_as_failures_and_a_success_resets_the_count() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock)

    await fail(breaker, 2, TimeoutError())
    await breaker.call(Port("ok"))
    await fail(breaker, 2, TimeoutError())

    assert breaker.state == "closed"
    assert breaker.failures == 2


async def test_a_business_refusal_is_an_answer_not_a_failure() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock)
    await fail(breaker, 2)

    with pytest.raises(BusinessFailure):
        await breaker.call(Port(BusinessFailure("payment_declined")))

    assert breaker.state == "closed"
    assert breaker.failures == 0


async def test_a_bug_in_the_adapter_and_a_cancellation_say_nothing_about_the_port() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock)
    await fail(breaker, 2)

    with pytest.raises(KeyError):
        await breaker.call(Port(KeyError("oops")))
    started = asyncio.Event()

    async def hangs() -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(breaker.call(hangs))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert (breaker.state, breaker.failures) == ("closed", 2)


async def test_after_the_reset_timeout_exactly_one_trial_runs_and_its_success_closes() -> None:
    breaker, changes = await due_for_trial(FakeClock())
    port = HeldPort("ok")

    callers = [asyncio.create_task(breaker.call(port)) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)

    assert (breaker.state, port.calls) == ("half_open", 1)
    port.release.set()
    assert await asyncio.gather(*callers) == ["ok"] * 5
    assert port.calls == 5
    assert states(changes) == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


async def test_a_failed_trial_reopens_and_the_waiting_callers_are_refused_without_calling() -> None:
    breaker, changes = await due_for_trial(FakeClock())
    port = HeldPort(down())

    callers = [asyncio.create_task(breaker.call(port)) for _ in range(4)]
    for _ in range(5):
        await asyncio.sleep(0)
    port.release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)

    assert port.calls == 1
    assert all(isinstance(r, CircuitOpen) for r in results)
    assert breaker.state == "open"
    assert states(changes)[-2:] == [("open", "half_open"), ("half_open", "open")]


async def test_a_cancelled_trial_lets_the_next_caller_be_the_trial() -> None:
    breaker, _ = await due_for_trial(FakeClock())
    started = asyncio.Event()

    async def hangs() -> str:
        started.set()
        await asyncio.Event().wait()
        return "never"

    trial = asyncio.create_task(breaker.call(hangs))
    await started.wait()
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial

    assert breaker.state == "half_open"
    assert await breaker.call(Port("ok")) == "ok"
    assert breaker.state == "closed"


async def test_until_trial_sleeps_on_the_clock_until_the_reset_timeout() -> None:
    clock = FakeClock()
    breaker, _ = make_breaker(clock)
    await open_breaker(breaker)
    clock.now += 4.0

    await breaker.until_trial()

    assert clock.slept == [pytest.approx(6.0)]
    assert breaker.retry_in() == 0.0
    assert breaker.state == "open"  # the next call, not the wait, moves it to half-open


def test_breaker_events_are_routed_by_state_and_port() -> None:
    at = datetime(2030, 1, 1, tzinfo=UTC)
    change = BreakerChange("payments", "host:1", "closed", "open", 5, at)

    event = breaker_event(change)

    assert event.routing_key == "breaker.open.payments"
    assert event.envelope.type == "sagaworks.breaker.opened"
    assert event.body.model_dump() == {
        "port": "payments",
        "worker": "host:1",
        "previous": "closed",
        "failures": 5,
        "changed_at": at,
    }


# --- caller ------------------------------------------------------------------------------------


def make_caller(clock: FakeClock, policy: PortPolicy = POLICY) -> ResilientCaller:
    return ResilientCaller({"payments": policy}, clock=clock, sleep=clock.sleep)


def call(caller: ResilientCaller, port: Port) -> Callable[[], Awaitable[Any]]:
    return lambda: caller.call("payments", port)


async def test_transient_errors_are_retried_at_once_with_capped_jittered_waits() -> None:
    clock = FakeClock()
    caller = make_caller(
        clock,
        PortPolicy(
            immediate_attempts=5,
            breaker_failures=10,
            immediate_wait_s=0.1,
            immediate_wait_max_s=0.4,
        ),
    )
    port = Port(down(), TimeoutError(), down(), down(), "ok")

    assert await call(caller, port)() == "ok"

    assert port.calls == 5
    assert len(clock.slept) == 4
    assert all(0 < s <= 0.4 + 1e-9 for s in clock.slept)


async def test_the_last_transient_error_is_raised_after_the_immediate_attempts() -> None:
    clock = FakeClock()
    caller = make_caller(clock, PortPolicy(immediate_attempts=2, breaker_failures=10))
    port = Port(down(), down(), "never")

    with pytest.raises(PortUnavailable):
        await call(caller, port)()

    assert port.calls == 2


@pytest.mark.parametrize("error", [BusinessFailure("payment_declined"), ValueError("bug")])
async def test_business_refusals_and_other_errors_are_not_retried(error: Exception) -> None:
    clock = FakeClock()
    caller = make_caller(clock)
    port = Port(error, "never")

    with pytest.raises(type(error)):
        await call(caller, port)()

    assert port.calls == 1
    assert clock.slept == []


async def test_retries_stop_as_soon_as_the_breaker_opens() -> None:
    clock = FakeClock()
    caller = make_caller(clock, PortPolicy(immediate_attempts=10, breaker_failures=3))
    port = Port(*(down() for _ in range(10)))

    with pytest.raises(CircuitOpen):
        await call(caller, port)()
    with pytest.raises(CircuitOpen):
        await call(caller, port)()

    assert port.calls == 3
    assert caller.breakers["payments"].state == "open"


async def test_a_slow_port_times_out_as_a_transient_failure() -> None:
    caller = ResilientCaller({"payments": PortPolicy(call_timeout_s=0.001, immediate_attempts=1)})

    async def never() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await caller.call("payments", never)

    assert caller.breakers["payments"].failures == 1


# --- policy ------------------------------------------------------------------------------------


def test_delayed_retries_back_off_exponentially_up_to_the_cap_then_stop() -> None:
    policy = PortPolicy(delayed_retries=6, delayed_base_s=1.0, delayed_max_s=8.0)
    now = datetime(2030, 1, 1, tzinfo=UTC)

    rng = Random()

    delays = [(policy.next_retry_at(n, now, rng) or now) - now for n in range(1, 7)]

    ceilings = [1, 2, 4, 8, 8, 8]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert timedelta(seconds=ceiling / 2) <= delay <= timedelta(seconds=ceiling)
    assert policy.next_retry_at(7, now, rng) is None


def test_a_caller_jitters_delayed_retries_from_its_own_random_source() -> None:
    policy = PortPolicy(delayed_retries=20, delayed_base_s=60.0, delayed_max_s=60.0)
    now = datetime(2030, 1, 1, tzinfo=UTC)

    def schedule(caller: ResilientCaller) -> list[datetime | None]:
        return [caller.next_retry_at("payments", n, now) for n in range(1, 21)]

    seeded = [ResilientCaller({"payments": policy}, rng=Random(7)) for _ in range(2)]
    assert schedule(seeded[0]) == schedule(seeded[1])
    # By default each worker draws its own jitter: two workers do not retry in lockstep.
    assert schedule(ResilientCaller({"payments": policy})) != schedule(
        ResilientCaller({"payments": policy})
    )


@pytest.mark.parametrize(
    "bad", [{"breaker_failures": 0}, {"breaker_reset_s": 0}, {"call_timeout_s": 0}]
)
def test_a_policy_refuses_nonsense(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="a port policy needs"):
        PortPolicy(**bad)


def test_policies_are_read_from_the_port_adapters_that_declare_one() -> None:
    class Declares:
        policy = POLICY

    class Silent:
        pass

    assert declared_policies({"payments": Declares(), "shipping": Silent()}) == {"payments": POLICY}


# --- run_step ----------------------------------------------------------------------------------


async def test_run_step_lets_circuit_open_through_without_recording_a_failure() -> None:
    saga_id = uuid4()
    instance = SagaInstance(
        id=saga_id,
        saga_type=order_fulfilment.name,
        correlation_key="o-1",
        correlation_id="o-1",
        status=Status.RUNNING,
        position=1,
        state=OrderState(
            order_id="o-1",
            customer_id="c-1",
            lines=(),
            amount_cents=1,
            currency="EUR",
            dispatch_by=datetime(2030, 1, 1, tzinfo=UTC),
        ),
        version=2,
        in_flight=InFlight("authorise_payment", "action", 1),
    )

    class Store:
        async def load_sagas(self, wanted: Any) -> list[SagaInstance]:
            return [instance for _ in wanted]

        def transaction(self) -> Any:
            raise AssertionError("a refused call must not be recorded")

    class RefusingCaller:
        async def call(self, port: str, attempt: Any) -> Any:
            raise CircuitOpen(port, 5.0)

        def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
            raise AssertionError("a refused call schedules no delayed retry")

    command = RunStep(
        saga_type=order_fulfilment.name,
        saga_id=saga_id,
        step="authorise_payment",
        kind="action",
        attempt=1,
        port="payments",
    )
    options = EngineOptions(park_for=timedelta(seconds=1), max_message_bytes=1024)
    handle_step_command = HandleStepCommand(
        Store(),  # type: ignore[arg-type]
        ApplyInputs(
            Store(),  # type: ignore[arg-type]
            OutboxRelay(Store(), None),  # type: ignore[arg-type]
            FakeWallClock(),
            options,
            Wire(str),
            NoTelemetry(),
        ),
        FakeWallClock(),
        SagaRegistry([order_fulfilment]),
        {"payments": object()},
        RefusingCaller(),
        options,
        Boundary(str, own_users=frozenset({"sagaworks"})),
        NoTelemetry(),
    )
    inbound = InboundMessage(
        message_id="m-1",
        message_type=RunStep.message_type,
        body=command.model_dump_json().encode(),
        headers={},
        queue="q",
        exchange="x",
        routing_key="port.payments",
        user_id="sagaworks",
    )

    with pytest.raises(CircuitOpen):
        await handle_step_command(inbound)


class FakeWallClock:
    def now(self) -> datetime:
        return datetime(2030, 1, 1, tzinfo=UTC)
