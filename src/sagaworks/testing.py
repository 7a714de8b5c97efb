"""Run a saga with no I/O: the real use cases on the in-memory store, publisher and a fake clock.

A saga author tests the business process, not a mock of the engine: the system
is wired by `bootstrap` from the in-memory adapters `in_memory` builds, events
go through `HandleEvent`, the commands the saga publishes are routed like the
broker would route them (by the topology and the queue -> use case table of
the system, as the worker consumes them) to `HandleStepCommand`, which calls the
author's port adapters, and deadlines and delayed retries fire when the fake
clock is advanced. Nothing connects to RabbitMQ or PostgreSQL
and nothing waits for wall-clock time.

    harness = SagaHarness(order_fulfilment, simulated_ports())
    await harness.publish(OrderPlaced(...))            # delivered, then run until idle
    assert harness.status("o-1") is Status.RUNNING     # waiting for the warehouse
    await harness.advance(timedelta(days=3))           # the dispatch deadline passes
    assert harness.published == [OrderCancelled(order_id="o-1", reason="dispatch_deadline_missed")]
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import count
from types import TracebackType
from typing import Generic, TypeVar, cast
from uuid import UUID

from pydantic import BaseModel

from sagaworks.adapters.memory.caller import DirectCaller
from sagaworks.adapters.memory.clock import FakeClock
from sagaworks.adapters.memory.records import HistoryRecord
from sagaworks.adapters.rabbitmq.inbound import inbound_of
from sagaworks.adapters.rabbitmq.publisher import amqp_properties
from sagaworks.adapters.rabbitmq.topology import commands_exchange_name, exchange_name
from sagaworks.application.config import PortPolicy
from sagaworks.application.ports import InboundMessage, OutboxRow, PortCaller, StoredDeadLetter
from sagaworks.application.results import Handled
from sagaworks.bootstrap import Handler, System, bootstrap, in_memory, own_user
from sagaworks.domain.decide import RunStep, SagaNeedsAttention
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance, Status, saga_id_for
from sagaworks.domain.messages import Message
from sagaworks.settings import Settings

__all__ = ["Delivery", "DirectCaller", "FakeClock", "HarnessError", "SagaHarness"]

S = TypeVar("S", bound=BaseModel)


class HarnessError(RuntimeError):
    """The saga did not settle: it kept sending messages, or a due timer could not fire."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message the harness delivered, and what the use case made of it."""

    queue: str
    message_id: str
    message_type: str
    handled: Handled


def _topic_matches(pattern: str, routing_key: str) -> bool:
    """RabbitMQ topic matching: `*` is one word, `#` zero or more."""
    words, keys = pattern.split("."), routing_key.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(words):
            return j == len(keys)
        if words[i] == "#":
            return any(match(i + 1, k) for k in range(j, len(keys) + 1))
        return j < len(keys) and words[i] in ("*", keys[j]) and match(i + 1, j + 1)

    return match(0, 0)


def _as_delivered(row: OutboxRow, queue: str, user_id: str) -> InboundMessage:
    """What a consumer of `queue` receives for an outbox row: as RabbitMQ would deliver it."""
    props = amqp_properties(row, user_id)
    return inbound_of(
        props.headers or {},
        row.body,
        queue=queue,
        exchange=row.exchange,
        routing_key=row.routing_key,
        message_id=props.message_id,
        message_type=props.message_type,
        app_id=props.app_id,
        timestamp=props.timestamp,
        correlation_id=props.correlation_id,
        user_id=props.user_id,
    )


class SagaHarness(Generic[S]):
    """Drives one saga definition through the real use cases, entirely in memory.

    `ports` are the port adapters by name, as `build_ports()` returns them.
    With `redeliver=True` every message is delivered twice at once, as an
    at-least-once broker may after a worker crash, to prove the saga and its
    ports do each thing once anyway.
    """

    def __init__(
        self,
        definition: SagaDefinition[S],
        ports: Mapping[str, object],
        *,
        clock: FakeClock | None = None,
        settings: Settings | None = None,
        policies: Mapping[str, PortPolicy] | None = None,
        caller: PortCaller | None = None,
        redeliver: bool = False,
        max_deliveries: int = 10_000,
    ) -> None:
        self.definition = definition
        self.ports = ports
        self.settings = settings or Settings.load(secrets_dir=None)
        adapters = in_memory(self.settings, ports, clock=clock, policies=policies)
        self.clock = adapters.clock
        self.store = adapters.store
        self.publisher = adapters.publisher
        self.deliveries: list[Delivery] = []
        """Every delivery so far, in order, with its outcome."""
        self._policies = policies
        self._caller = caller or adapters.caller
        self._redeliver = redeliver
        self._max_deliveries = max_deliveries
        self._system: System | None = None
        self._handlers: dict[str, Handler] = {}
        self._pending: deque[tuple[str, InboundMessage]] = deque()
        self._routed = 0
        self._ids = count(1)
        types: list[type[Message]] = [
            *definition.consumed_events(),
            *definition.published_events(),
            SagaNeedsAttention,
        ]
        self._types = {t.message_type: t for t in types}

    async def __aenter__(self) -> SagaHarness[S]:
        await self.system()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._system is not None:
            await self._system.aclose()

    async def system(self) -> System:
        """The wired system (built by `bootstrap` on first use)."""
        if self._system is None:
            system = await bootstrap(
                self.settings,
                [self.definition],
                self.ports,
                policies=self._policies,
                clock=self.clock,
                store=self.store,
                publisher=self.publisher,
                caller=self._caller,
            )
            self._handlers = {route.queue: route.handle for route in system.routes()}
            self._system = system
        return self._system

    # -- driving --------------------------------------------------------------------------------

    async def publish(
        self,
        event: Message,
        *,
        message_id: str | None = None,
        correlation_id: str | None = None,
        source: str = "tests",
        user_id: str | None = None,
        settle: bool = True,
    ) -> Handled:
        """Deliver `event` as another service would publish it; then, by default, run until idle.

        Returns what the saga did with the event (`applied`, `parked`,
        `duplicate`...). Reuse a `message_id` to deliver a duplicate. The
        publisher (`user_id`) is by default one the event type allows.
        """
        await self.system()
        exchange = exchange_name(self.settings.exchange_prefix, event.domain)
        queues = [q for q in self._queues_for(exchange, event.routing_key) if q in self._handlers]
        if not queues:
            raise LookupError(
                f'saga "{self.definition.name}" does not consume "{event.message_type}" '
                f"(it consumes: {', '.join(self._consumed())})"
            )
        inbound = inbound_of(
            {"cloudEvents_specversion": "1.0"},
            event.model_dump_json().encode(),
            queue=queues[0],
            exchange=exchange,
            routing_key=event.routing_key,
            message_id=message_id or f"{event.message_type}-{next(self._ids)}",
            message_type=event.message_type,
            app_id=source,
            timestamp=self.clock.now(),
            correlation_id=correlation_id,
            user_id=user_id or self._publisher_of(event),
        )
        handled = [await self._deliver(queue, replace(inbound, queue=queue)) for queue in queues]
        if settle:
            await self.run_until_idle()
        return handled[0]

    async def run_until_idle(self) -> int:
        """Deliver everything published (commands, events) until nothing is left; returns a count.

        Rows a failed publish left in the outbox are swept as the worker's sweeper
        would. Raises `HarnessError` when the saga does not settle.
        """
        system = await self.system()
        delivered = 0
        while True:
            self._route_published()
            if not self._pending:
                try:
                    swept = await system.relay.sweep(older_than_s=0.0)
                except Exception:  # noqa: BLE001 - the worker's sweeper retries later, too
                    swept = 0
                if not swept:
                    return delivered
                continue
            queue, inbound = self._pending.popleft()
            await self._deliver(queue, inbound)
            delivered += 1
            if delivered >= self._max_deliveries:
                raise HarnessError(
                    f"still busy after {delivered} deliveries: the saga does not settle "
                    "(a transition loop?)"
                )

    async def fire_timers(self) -> int:
        """What the worker's clock loops do now: fire due timers, expire parked events, settle.

        Returns how many timers fired. A timer that fails to apply raises its error
        here (the worker would log it and retry it later).
        """
        system = await self.system()
        fired = 0
        while True:
            run = await system.fire_timers()
            if run.failed:
                raise run.failed[0].error
            now_fired = run.fired
            while await system.expire_parked_events():
                pass
            await self.run_until_idle()
            fired += now_fired
            if not now_fired:
                return fired
            if fired >= self._max_deliveries:
                raise HarnessError(f"{fired} timers fired without the saga settling")

    async def advance(self, by: timedelta | float) -> int:
        """Move the clock forward by `by` (seconds or a timedelta), firing timers on the way.

        The clock stops at each due timer or parked-event expiry in order, so
        what a deadline sets in motion happens at the time it would. Returns
        how many timers fired.
        """
        delta = by if isinstance(by, timedelta) else timedelta(seconds=by)
        if delta < timedelta(0):
            raise ValueError("advance by a positive amount; time does not go backwards")
        target = self.clock.now() + delta
        fired = 0
        while (due := self._next_due()) is not None and due <= target:
            self.clock.set(max(due, self.clock.now()))
            fired += await self.fire_timers()
            left = self._next_due()
            if left is not None and left <= self.clock.now():
                raise HarnessError(f"something due at {left.isoformat()} could not be fired")
        self.clock.set(target)
        return fired + await self.fire_timers()

    # -- looking inside -------------------------------------------------------------------------

    def instance(self, correlation_key: str) -> SagaInstance | None:
        return self.store.saga(self.definition, self._saga_id(correlation_key))

    def status(self, correlation_key: str) -> Status | None:
        """The saga's status, None if no saga has that key."""
        instance = self.instance(correlation_key)
        return None if instance is None else instance.status

    def state(self, correlation_key: str) -> S:
        instance = self.instance(correlation_key)
        if instance is None:
            raise LookupError(f'no "{self.definition.name}" saga for "{correlation_key}"')
        return cast(S, instance.state)

    def history(self, correlation_key: str) -> list[HistoryRecord]:
        """The saga's timeline, as `sagaworks show` would list it."""
        return self.store.history(self._saga_id(correlation_key))

    @property
    def published(self) -> list[Message]:
        """Events the saga announced to other services (not its commands), oldest first."""
        return [self._decode(row) for row in self.publisher.published if not self._is_command(row)]

    @property
    def commands(self) -> list[RunStep]:
        """Step commands sent to the ports, oldest first."""
        return [
            RunStep.model_validate_json(row.body)
            for row in self.publisher.published
            if self._is_command(row)
        ]

    @property
    def dead_letters(self) -> list[StoredDeadLetter]:
        return self.store.dead_letters()

    # -- plumbing -------------------------------------------------------------------------------

    def _saga_id(self, correlation_key: str) -> UUID:
        return saga_id_for(self.definition.name, correlation_key)

    def _consumed(self) -> list[str]:
        return [e.message_type for e in self.definition.consumed_events()]

    def _is_command(self, row: OutboxRow) -> bool:
        return row.exchange == commands_exchange_name(self.settings.exchange_prefix)

    def _decode(self, row: OutboxRow) -> Message:
        message_type = dict(row.headers).get("type", "")
        kind = self._types.get(message_type)
        if kind is None:
            raise HarnessError(f'published an event of unknown type "{message_type}"')
        return kind.model_validate_json(row.body)

    def _queues_for(self, exchange: str, routing_key: str) -> list[str]:
        assert self._system is not None
        return [
            queue.name
            for queue in self._system.topology.queues
            if any(
                b.exchange == exchange and _topic_matches(b.routing_key, routing_key)
                for b in queue.bindings
            )
        ]

    def _route_published(self) -> None:
        """Hand newly published rows to every bound queue this harness consumes."""
        rows = self.publisher.published[self._routed :]
        self._routed += len(rows)
        for row in rows:
            for queue in self._queues_for(row.exchange, row.routing_key):
                if queue in self._handlers:
                    delivered = _as_delivered(row, queue, own_user(self.settings))
                    self._pending.append((queue, delivered))

    def _publisher_of(self, event: Message) -> str:
        """A broker user allowed to publish `event` (by settings, else its class), else "tests"."""
        allowed = self.settings.publishers.get(event.message_type, event.publishers)
        return sorted(allowed)[0] if allowed else "tests"

    async def _deliver(self, queue: str, inbound: InboundMessage) -> Handled:
        handler = self._handlers[queue]
        if self._redeliver:
            results = list(
                await asyncio.gather(handler(inbound), handler(replace(inbound, delivery_count=1)))
            )
        else:
            results = [await handler(inbound)]
        for handled in results:
            self.deliveries.append(
                Delivery(queue, inbound.message_id, inbound.message_type, handled)
            )
        return next((h for h in results if h.outcome != "duplicate"), results[0])

    def _next_due(self) -> datetime | None:
        moments = [t.fire_at for t in self.store.timers() if t.parked_at is None]
        moments += [p.expires_at for p in self.store.parked()]
        return min(moments, default=None)
