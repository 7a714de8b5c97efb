"""While a port's breaker is open, the worker stops taking that port's work.

Each port has its own queue (`sagaworks.port.<port>`), so pausing one port
leaves the others running. When a breaker opens, the gate:

- cancels the consumer of the port's queue (`basic.cancel`): messages not yet
  delivered wait in RabbitMQ, untouched;
- keeps the deliveries already in hand **unacknowledged** and their handlers
  waiting: a `nack` with requeue would count as a delivery attempt against the
  quorum queue's delivery limit (RabbitMQ 3.10 counts every return), and a
  refused call schedules no delayed retry, so no budget of any kind is spent;
- when the reset timeout has elapsed, consumes again and lets the waiting
  handlers retry: the breaker lets exactly one trial call through, and its
  verdict either closes the breaker or opens it for another round.

FastStream's own `stop()`/`start()` are not used: `stop()` waits for the
in-hand handlers (which are waiting for the breaker) and then silently drops
prefetched deliveries, leaving them unacknowledged for the life of the
channel. The gate cancels and restores only the AMQP consumer.

Every breaker change is logged, and recorded in PostgreSQL and announced as
an event (`RecordBreakerChange`) by a background task, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping

from faststream.rabbit import RabbitBroker
from faststream.rabbit.subscriber import RabbitSubscriber

from sagaworks.adapters.observability.logging import get_logger
from sagaworks.adapters.resilience.breaker import PortBreakers
from sagaworks.application.circuit import CircuitOpen, RecordBreakerChange
from sagaworks.application.ports import BreakerChange, InboundMessage
from sagaworks.application.results import Handled
from sagaworks.entrypoints.consumers import cancel_consumer, resume_consumer

__all__ = ["PortGate", "WorkerStopping"]

_log = get_logger("sagaworks.breakers")

UseCase = Callable[[InboundMessage], Awaitable[Handled]]


class WorkerStopping(Exception):
    """A delivery held for an open breaker is given back because the worker is stopping."""


class PortGate:
    """Pauses and resumes the consumers of port queues as their breakers open and close."""

    def __init__(self, breakers: PortBreakers | None, record: RecordBreakerChange | None) -> None:
        self._breakers = breakers
        self._record = record
        self._subscribers: dict[str, RabbitSubscriber] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changes: asyncio.Queue[BreakerChange] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._recorder: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        if breakers is not None:
            breakers.listen(self._on_change)

    def bind(self, broker: RabbitBroker, queues: Mapping[str, str]) -> None:
        """Find the subscriber of each port's queue (`queues`: port -> queue name)."""
        by_queue = {
            sub.queue.name: sub for sub in broker.subscribers if isinstance(sub, RabbitSubscriber)
        }
        self._subscribers = {port: by_queue[queue] for port, queue in queues.items()}
        self._locks = {port: asyncio.Lock() for port in queues}

    def guard(self, port: str, use_case: UseCase) -> UseCase:
        """`use_case`, but a delivery refused by the open breaker waits and is tried again."""

        async def guarded(inbound: InboundMessage) -> Handled:
            while True:
                try:
                    return await use_case(inbound)
                except CircuitOpen:
                    await self._wait_for_trial(port)

        return guarded

    async def start(self) -> None:
        self._stopping.clear()
        self._recorder = asyncio.create_task(self._record_changes(), name="breaker-recorder")

    async def close(self, flush_s: float = 2.0) -> None:
        """Give back held deliveries, stop pausing and resuming, record what is left."""
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._recorder is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changes.join(), flush_s)
        self._recorder.cancel()
        await asyncio.gather(self._recorder, return_exceptions=True)
        self._recorder = None

    async def _wait_for_trial(self, port: str) -> None:
        assert self._breakers is not None, "only a breaker raises CircuitOpen"
        trial = asyncio.ensure_future(self._breakers[port].until_trial())
        stopping = asyncio.ensure_future(self._stopping.wait())
        await asyncio.wait((trial, stopping), return_when=asyncio.FIRST_COMPLETED)
        trial.cancel()
        stopping.cancel()
        if self._stopping.is_set():
            raise WorkerStopping(f'worker stopping while the breaker of "{port}" is open')

    def _on_change(self, change: BreakerChange) -> None:
        _log.warning(
            f"circuit breaker {change.state}",
            port=change.port,
            previous=change.previous,
            failures=change.failures,
        )
        self._changes.put_nowait(change)
        if change.state == "open" and change.port in self._subscribers:
            task = asyncio.get_running_loop().create_task(self._pause_until_trial(change.port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pause_until_trial(self, port: str) -> None:
        assert self._breakers is not None
        breaker = self._breakers[port]
        subscriber = self._subscribers[port]
        async with self._locks[port]:
            if await cancel_consumer(subscriber):
                _log.info("consumer paused", port=port, queue=subscriber.queue.name)
        await breaker.until_trial()
        async with self._locks[port]:
            if breaker.retry_in() > 0:
                return  # re-opened meanwhile: its own task resumes
            if await resume_consumer(subscriber):
                _log.info(
                    "consumer resumed for a trial call", port=port, queue=subscriber.queue.name
                )

    async def _record_changes(self) -> None:
        while True:
            change = await self._changes.get()
            if self._record is None:
                self._changes.task_done()
                continue
            while True:
                try:
                    await self._record(change)
                    break
                except Exception as error:  # noqa: BLE001 - the database may be briefly away
                    _log.warning(
                        "breaker change not recorded yet; will retry",
                        port=change.port,
                        state=change.state,
                        error=f"{type(error).__name__}: {error}",
                    )
                    await asyncio.sleep(1.0)
            self._changes.task_done()
