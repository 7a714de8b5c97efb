"""The worker: a FastStream application whose subscribers settle every delivery explicitly.

Path of one message: consume → decide → commit → publish → ack. A use case
returns only after its transaction committed and its outbox rows were handed
to the broker, so acknowledging afterwards can lose nothing. A delivery is
never left unsettled: database outages are waited out with backoff, other
errors requeue it and the queue's delivery limit dead-letters it. A body over
the size limit is stored cut short before anything parses it. A dead letter
the store refuses for good is rejected, and the dead-letter queue's own
dead-letter exchange moves it, bytes intact, to the unstorable queue; so does
its delivery limit for one that keeps coming back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiormq.exceptions import AMQPError
from faststream import AckPolicy, FastStream
from faststream.rabbit import Channel, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage
from faststream.rabbit.message import RabbitMessage as RabbitMessageType
from faststream.rabbit.subscriber import RabbitSubscriber
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from sagaworks.adapters.observability.logging import (
    bind_message_context,
    clear_message_context,
    get_logger,
)
from sagaworks.adapters.observability.telemetry import EngineTelemetry, NoTelemetry
from sagaworks.adapters.postgres.deadlines import CLIENT_GRACE_S
from sagaworks.adapters.rabbitmq.inbound import to_inbound
from sagaworks.adapters.rabbitmq.liveness import ConnectionWatch, with_heartbeat
from sagaworks.adapters.rabbitmq.topology import apply_topology, check_topology
from sagaworks.application.ports import InboundMessage
from sagaworks.application.results import Handled
from sagaworks.application.timers import FailedTimer, TimersRun
from sagaworks.bootstrap import System
from sagaworks.entrypoints.consumers import cancel_consumer
from sagaworks.entrypoints.health import ServiceState
from sagaworks.entrypoints.heartbeat import HeartbeatLoop
from sagaworks.entrypoints.outages import OutageLog
from sagaworks.entrypoints.port_gate import PortGate

__all__ = ["Worker"]

_log = get_logger("sagaworks.worker")

_OUTAGE_PATIENCE_S = 60.0

_CANCEL_CONSUMER_S = 5.0
"""How long stopping waits for the broker to confirm a `basic.cancel`; closing the channel
cancels the consumer anyway."""

T = TypeVar("T")


async def _decode(msg: RabbitMessageType) -> RabbitMessageType:
    """Hand the delivery itself to the subscriber: validation is ours, with a dead-letter reason.

    With `apply_types=False` FastStream calls the subscriber with what this returns and
    skips FastDepends, whose per-message context injection runs in a thread pool.
    """
    return msg


class Worker:
    """Consumes every saga and port queue of a `System` until told to stop."""

    def __init__(self, system: System) -> None:
        self.system = system
        settings = system.settings
        self.telemetry: EngineTelemetry = system.telemetry or NoTelemetry()
        watch = self.broker_watch = ConnectionWatch("consumers", settings.amqp_heartbeat_s)
        self.broker = RabbitBroker(
            with_heartbeat(settings.amqp_url.get_secret_value(), settings.amqp_heartbeat_s),
            graceful_timeout=settings.grace_period_s * 0.7,
            logger=None,
            apply_types=False,
            middlewares=self.telemetry.broker_middlewares(),
            on_close=[watch.on_close],
            on_reconnected=[watch.on_reconnect],
        )
        self.gate = PortGate(system.breakers, system.record_breaker_change)
        self.app = FastStream(
            self.broker,
            logger=None,
            after_startup=[self._start_background, self.gate.start],
            on_shutdown=[self.gate.close, self._stop_consuming],
            after_shutdown=[self._stop_background],
        )
        self._background: list[asyncio.Task[None]] = []
        self.in_flight = 0
        """Deliveries being handled now; the heartbeat adds the eager steps running."""
        self.heartbeat = (
            HeartbeatLoop(system, system.heartbeats, self._work_in_flight, self._broker_state)
            if system.heartbeats is not None
            else None
        )
        self._outages = OutageLog(
            (*system.transient_errors, AMQPError), settings.db_statement_timeout_s + CLIENT_GRACE_S
        )
        self._subscribe()

    def _work_in_flight(self) -> int:
        eager = self.system.eager
        return self.in_flight + (eager.running if eager is not None else 0)

    def _broker_state(self) -> ServiceState:
        down_for_s = self.broker_watch.down_for_s
        if down_for_s is None:
            return ServiceState(up=True)
        return ServiceState(up=False, down_since=time.time() - down_for_s, cause="reconnecting")

    def _subscribe(self) -> None:
        """One consumer per route, each on a channel of its own.

        A channel is one process in RabbitMQ and one frame stream in the client:
        separate channels let the broker deliver to, and take acks from, the saga's
        queue and each port's queue side by side. Prefetch is per consumer either way.
        """
        port_queues: dict[str, str] = {}
        for route in self.system.routes():
            handle = route.handle
            if route.port is not None:
                handle = self.gate.guard(route.port, handle)
                port_queues[route.port] = route.queue
            channel = Channel(prefetch_count=self.system.settings.prefetch)
            self._consume(route.queue, channel, handle)
        self.gate.bind(self.broker, port_queues)

    def _consume(
        self,
        queue: str,
        channel: Channel,
        use_case: Callable[[InboundMessage], Awaitable[Handled]],
    ) -> None:
        transient = self.system.transient_errors
        reject_oversized = self.system.reject_oversized
        dead_letters = queue == self.system.topology.dead_letter_queue
        telemetry = self.telemetry

        @self.broker.subscriber(
            RabbitQueue(queue, declare=False),
            channel=channel,
            ack_policy=AckPolicy.MANUAL,
            decoder=_decode,
            no_reply=True,
        )
        async def counted(message: RabbitMessage) -> None:
            self.in_flight += 1
            try:
                await settle(message)
            finally:
                self.in_flight -= 1

        async def settle(message: RabbitMessage) -> None:
            raw = message.raw_message
            try:
                inbound = to_inbound(raw, queue, unwrap_up_to=reject_oversized.max_bytes)
            except Exception:  # noqa: BLE001 - unreadable: the broker moves it on, bytes intact
                _log.exception(
                    "delivery could not be read; rejected to the queue's dead-letter exchange",
                    queue=queue,
                )
                await message.reject(requeue=False)
                return
            inbound = telemetry.traced(inbound)
            handle = use_case if len(raw.body) <= reject_oversized.max_bytes else reject_oversized
            bind_message_context(
                message_id=inbound.message_id, correlation_id=inbound.correlation_id
            )
            try:
                handled = await _patiently(handle, inbound, transient)
            except Exception as error:  # noqa: BLE001 - any other failure: never leave unsettled
                self.system.last_errors.remember(queue, inbound.message_id, error)
                telemetry.delivery_failed(error)
                if dead_letters and not isinstance(error, transient):
                    _log.exception(
                        "dead letter could not be stored; moved with its original bytes to "
                        "the unstorable queue (sagaworks dlq unstorable)",
                        queue=queue,
                    )
                    await message.reject(requeue=False)
                    return
                _log.exception(
                    "handler failed; message requeued (the delivery limit dead-letters it)",
                    queue=queue,
                    delivery_count=inbound.delivery_count,
                )
                await message.nack(requeue=True)
                return
            finally:
                clear_message_context()
            await message.ack()
            telemetry.delivery_settled(queue, handled.outcome, handled.reason, handled.saga_id)
            if handled.outcome in {"dead_lettered", "parked", "ignored"}:
                _log.info(
                    handled.outcome,
                    queue=queue,
                    reason=handled.reason,
                    saga_id=handled.saga_id,
                    message_id=inbound.message_id,
                )

    async def _stop_consuming(self) -> None:
        """Cancel every consumer (`basic.cancel`) before in-flight deliveries are awaited.

        FastStream's `stop()` first waits for the handlers in progress and only then
        cancels its consumers; whatever the broker delivers meanwhile is dropped unsettled
        and comes back when the channel closes, counted against the quorum queue's
        delivery limit. Cancelled first, the broker sends nothing more; deliveries already
        sent before the cancel took effect are still handled. No new step runs eagerly
        either: from now on step commands go to their ports' queues.
        """
        if self.system.eager is not None:
            self.system.eager.serve(())
        for subscriber in self.broker.subscribers:
            if not isinstance(subscriber, RabbitSubscriber):
                continue
            try:
                async with asyncio.timeout(_CANCEL_CONSUMER_S):
                    await cancel_consumer(subscriber)
            except Exception as error:  # noqa: BLE001 - closing the channel cancels it too
                _log.warning(
                    "could not cancel a consumer", queue=subscriber.queue.name, error=repr(error)
                )

    async def _start_background(self) -> None:
        if self.system.eager is not None:
            self.system.eager.serve(self.system.registry.ports())
        self._background = [
            asyncio.create_task(self._sweep_outbox(), name="outbox-sweeper"),
            asyncio.create_task(self._fire_timers(), name="timers"),
            asyncio.create_task(self._expire_parked(), name="parked-expiry"),
        ]
        if self.system.prune is not None and self.system.settings.prune_interval_s > 0:
            self._background.append(asyncio.create_task(self._prune(), name="retention"))
        if self.system.roll_up is not None and self.system.settings.read_rollup_interval_s > 0:
            self._background.append(asyncio.create_task(self._roll_up(), name="read-rollup"))
        if self.heartbeat is not None:
            self._background.append(asyncio.create_task(self.heartbeat.run(), name="heartbeat"))
        _log.info(
            "worker consuming",
            sagas=[d.name for d in self.system.registry],
            ports=list(self.system.registry.ports()),
            prefetch=self.system.settings.prefetch,
            eager_steps=self.system.eager is not None,
        )

    async def _stop_background(self) -> None:
        """After consumers stopped and in-flight work settled: finish or queue eager steps,
        stop loops, flush the outbox."""
        grace = self.system.settings.grace_period_s
        if self.system.eager is not None:
            await self.system.eager.drain(grace * 0.1)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.heartbeat is not None:
            await self.heartbeat.forget()
        flush_budget = grace * 0.15
        try:
            async with asyncio.timeout(flush_budget):
                while await self.system.relay.sweep(older_than_s=0.0):
                    pass
        except Exception as error:  # noqa: BLE001 - left for the next worker's sweeper
            _log.warning("outbox not fully flushed at shutdown", error=repr(error))
            return
        _log.info("worker stopped: consumers cancelled, in-flight work settled, outbox flushed")

    async def _sweep_outbox(self) -> None:
        interval = self.system.settings.outbox_sweep_interval_s
        async with self.system.outbox_wake_ups.listen() as woken:
            while True:
                await woken.wait(interval)
                await self._guard("outbox sweep", self.system.relay.sweep(), 0)
                await asyncio.sleep(min(interval, 0.5))

    async def _fire_timers(self) -> None:
        interval = self.system.settings.timer_poll_interval_s
        while True:
            run = await self._guard("timers", self.system.fire_timers(), TimersRun())
            for failed in run.failed:
                _log_timer_failure(failed)
            if not run.handled:
                await asyncio.sleep(interval)

    async def _expire_parked(self) -> None:
        while True:
            await self._guard("parked expiry", self.system.expire_parked_events(), 0)
            await asyncio.sleep(self.system.settings.parked_expiry_interval_s)

    async def _prune(self) -> None:
        """Retention on a schedule: one worker of the cluster at a time (an advisory lock)."""
        prune = self.system.prune
        assert prune is not None
        while True:
            await asyncio.sleep(self.system.settings.prune_interval_s)
            pruned = await self._guard("pruning", prune.if_nobody_else(), None)
            if pruned and any(p.rows for p in pruned):
                _log.info("pruned", **{p.what.value: p.rows for p in pruned})

    async def _roll_up(self) -> None:
        """The dashboards' per-minute rows: one worker of the cluster at a time (a row lock)."""
        roll_up = self.system.roll_up
        assert roll_up is not None
        while True:
            rolled = await self._guard("read rollup", roll_up(), None)
            for skipped in (r.skipped for r in rolled or () if r.skipped):
                _log.warning(
                    "history left out of the dashboards' rollup: no worker rolled it up for "
                    "longer than any view looks back",
                    skipped_s=round(skipped.total_seconds()),
                )
            await asyncio.sleep(self.system.settings.read_rollup_interval_s)

    async def _guard(self, what: str, work: Awaitable[T], nothing: T) -> T:
        try:
            done = await work
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            # A library cancelled something this loop awaited (not the loop): an outage.
            self._outages.failed(what, ConnectionError(f"interrupted: {cancelled!r}"))
            await asyncio.sleep(1.0)
            return nothing
        except Exception as error:  # noqa: BLE001 - a background loop must outlive an outage
            self._outages.failed(what, error)
            await asyncio.sleep(1.0)
            return nothing
        self._outages.succeeded()
        return done

    async def declare_topology(self) -> None:
        """Declare the topology, or with `declare_topology` off only check that it exists."""
        assert self.system.connection is not None, "the worker needs the real broker"
        if self.system.settings.declare_topology:
            await apply_topology(self.system.connection, self.system.topology)
        else:
            await check_topology(self.system.connection, self.system.topology)

    async def run(self) -> None:
        """Declare topology, then consume until SIGTERM/SIGINT; returns after a clean stop."""
        await self.declare_topology()
        await self.app.run(log_level=logging.DEBUG)

    async def start(self) -> None:
        """Start consuming inside a program that owns the event loop (demo, benchmark, tests)."""
        await self.declare_topology()
        await self.broker.start()
        await self._start_background()
        await self.gate.start()

    async def stop(self) -> None:
        """Stop consuming, settle in-flight deliveries, flush the outbox."""
        await self.gate.close()
        await self._stop_consuming()
        await self.broker.stop()
        await self._stop_background()


def _log_timer_failure(failed: FailedTimer) -> None:
    failure = failed.failure
    timer = failure.timer
    facts = {
        "saga_type": timer.saga_type,
        "saga_id": str(timer.saga_id),
        "timer": timer.name,
        "attempts": failure.attempts,
        "error": failure.error,
    }
    if failure.retry_at is None:
        _log.error(
            "timer parked after failing every attempt; see docs/recoverability.md to find and "
            "re-arm it",
            **facts,
        )
    else:
        _log.warning(
            "timer failed to apply; rolled back, retried later",
            retry_at=failure.retry_at.isoformat(),
            **facts,
        )


async def _patiently(
    use_case: Callable[[InboundMessage], Awaitable[Handled]],
    inbound: InboundMessage,
    transient: tuple[type[BaseException], ...],
) -> Handled:
    """Run the use case, waiting out an infrastructure outage rather than burning deliveries."""
    try:  # the common case pays for no retry machinery
        return await use_case(inbound)
    except transient:
        await asyncio.sleep(0.1)
    retrying = AsyncRetrying(
        retry=retry_if_exception_type(transient),
        stop=stop_after_delay(_OUTAGE_PATIENCE_S),
        wait=wait_exponential_jitter(multiplier=0.1, max=5.0),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await use_case(inbound)
    raise AssertionError("tenacity re-raises the last error")  # pragma: no cover
