"""The one composition root: wires real or in-memory adapters by the same call.

Nothing is built at import time. `bootstrap()` connects to PostgreSQL and
RabbitMQ unless a test hands it other adapters, and returns a `System` whose
use cases the entry points call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.memory.breakers import InMemoryBreakerLog
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.postgres.breakers import PostgresBreakerLog
from sagaworks.adapters.postgres.engine import create_engine_from_settings
from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.adapters.postgres.store import PostgresStore
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.publisher import RabbitPublisher
from sagaworks.adapters.rabbitmq.topology import (
    Binding,
    QueueSpec,
    TopologySpec,
    commands_exchange_name,
    dead_letter_exchange_name,
    dead_letter_queue_name,
    events_exchange_name,
    exchange_name,
    port_queue_name,
    saga_queue_name,
)
from sagaworks.adapters.resilience.breaker import PortBreakers
from sagaworks.adapters.resilience.caller import ResilientCaller
from sagaworks.adapters.resilience.policy import PortPolicy, declared_policies
from sagaworks.application.apply_inputs import ApplyInputs
from sagaworks.application.circuit import RecordBreakerChange
from sagaworks.application.handle_event import HandleEvent
from sagaworks.application.options import EngineOptions
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import Clock, PortCaller, Publisher, Store
from sagaworks.application.published_marks import PublishedMarks
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.run_step import RunStepCommand
from sagaworks.application.timers import ExpireParked, FireDueTimers
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import COMMANDS_DOMAIN
from sagaworks.domain.definition import SagaDefinition
from sagaworks.settings import Settings

__all__ = ["System", "SystemClock", "bootstrap", "topology_for"]


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def topology_for(settings: Settings, registry: SagaRegistry) -> TopologySpec:
    """Exchanges, the queue of every saga and of every port, and the dead-letter pair."""
    prefix = settings.exchange_prefix
    commands = commands_exchange_name(prefix)
    exchanges: dict[str, None] = {events_exchange_name(prefix): None, commands: None}
    queues: list[QueueSpec] = []
    for definition in registry:
        bindings = []
        for event in definition.consumed_events():
            exchange = exchange_name(prefix, event.domain)
            exchanges[exchange] = None
            bindings.append(Binding(exchange, event.routing_key))
        for event in definition.published_events():
            exchanges[exchange_name(prefix, event.domain)] = None
        queues.append(QueueSpec(saga_queue_name(prefix, definition.name), tuple(bindings)))
    for port in registry.ports():
        queues.append(
            QueueSpec(port_queue_name(prefix, port), (Binding(commands, f"port.{port}.#"),))
        )
    return TopologySpec(
        exchanges=tuple(exchanges),
        queues=tuple(queues),
        dead_letter_exchange=dead_letter_exchange_name(prefix),
        dead_letter_queue=dead_letter_queue_name(prefix),
        delivery_limit=settings.delivery_limit,
    )


@dataclass
class System:
    """Everything an entry point needs, and what to close when it is done."""

    settings: Settings
    registry: SagaRegistry
    store: Store
    publisher: Publisher
    relay: OutboxRelay
    handle_event: HandleEvent
    run_step: RunStepCommand
    fire_timers: FireDueTimers
    expire_parked: ExpireParked
    topology: TopologySpec
    engine: AsyncEngine | None = None
    connection: AbstractRobustConnection | None = None
    breakers: PortBreakers | None = None
    """This process's circuit breakers; None when a test hands in its own `PortCaller`."""
    record_breaker_change: RecordBreakerChange | None = None
    """Records breaker changes and announces them; None with a store handed in that is neither."""

    async def aclose(self) -> None:
        if isinstance(self.publisher, RabbitPublisher):
            await self.publisher.close()
        if self.connection is not None:
            await self.connection.close()
        if isinstance(self.store, PostgresStore):
            await self.store.aclose()
        if self.engine is not None:
            await self.engine.dispose()


async def bootstrap(
    settings: Settings,
    sagas: Iterable[SagaDefinition[Any]],
    ports: Mapping[str, object],
    *,
    policies: Mapping[str, PortPolicy] | None = None,
    clock: Clock | None = None,
    store: Store | None = None,
    publisher: Publisher | None = None,
    caller: PortCaller | None = None,
) -> System:
    """Wire the system; adapters not given are the real PostgreSQL and RabbitMQ ones.

    Each port's policy is the one its adapter declares (a `policy` attribute),
    unless `policies` names another.
    """
    registry = SagaRegistry(sagas)
    missing = sorted(set(registry.ports()) - set(ports))
    if missing:
        raise ValueError(f"no adapter given for port(s): {', '.join(missing)}")
    clock = clock or SystemClock()
    prefix = settings.exchange_prefix
    wire = Wire(lambda domain: exchange_name(prefix, domain))
    engine = None
    connection = None
    if store is None:
        engine = create_engine_from_settings(settings)
        pool = ConnectionPool(
            settings.database_url.get_secret_value(),
            size=settings.db_pool_size,
            connect_timeout_s=settings.db_connect_timeout_s,
        )
        store = PostgresStore(engine, pool)
    if publisher is None:
        connection = await connect(
            settings.amqp_url.get_secret_value(), timeout_s=settings.amqp_connect_timeout_s
        )
        publisher = RabbitPublisher(connection, {exchange_name(prefix, COMMANDS_DOMAIN)})
    options = EngineOptions(
        park_for=timedelta(seconds=settings.park_for_s),
        max_message_bytes=settings.max_message_bytes,
        batch_size=settings.batch_size,
        batch_concurrency=settings.batch_concurrency,
    )
    relay = OutboxRelay(store, publisher, marks=PublishedMarks(store))
    apply = ApplyInputs(store, relay, clock, options, wire)
    if caller is None:
        caller = ResilientCaller({**declared_policies(ports), **(policies or {})})
    record_breaker_change = None
    if engine is not None:
        record_breaker_change = RecordBreakerChange(PostgresBreakerLog(engine), relay, wire)
    elif isinstance(store, InMemoryStore):
        record_breaker_change = RecordBreakerChange(InMemoryBreakerLog(store), relay, wire)
    return System(
        settings=settings,
        registry=registry,
        store=store,
        publisher=publisher,
        relay=relay,
        handle_event=HandleEvent(store, apply, clock, options),
        run_step=RunStepCommand(store, apply, clock, registry, ports, caller, options),
        fire_timers=FireDueTimers(store, relay, clock, registry, wire),
        expire_parked=ExpireParked(store, clock),
        topology=topology_for(settings, registry),
        engine=engine,
        connection=connection,
        breakers=caller.breakers if isinstance(caller, ResilientCaller) else None,
        record_breaker_change=record_breaker_change,
    )
