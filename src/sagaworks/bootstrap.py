"""The one place that builds adapters, clocks and codecs, and wires them to the use cases.

Every entry point gets its collaborators here. `bootstrap()` builds the whole
engine for the worker (and for the no-I/O harness, which hands it the
in-memory adapters `in_memory()` builds); `bootstrap_tools()` builds only what
an operator command asks for (the dead-letter store, a replay publisher, a
broker connection). Both share the wiring below, and nothing is built at
import time.

A `System` owns what it was given to run: `aclose()` closes the port adapters
(those with an `aclose()` or that are async context managers, entered when
the system was built), the broker connection, the store and the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractRobustConnection
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.memory.breakers import InMemoryBreakerLog
from sagaworks.adapters.memory.caller import DirectCaller
from sagaworks.adapters.memory.clock import FakeClock
from sagaworks.adapters.memory.publisher import InMemoryPublisher
from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.memory.wakeups import IntervalWakeUps
from sagaworks.adapters.observability.environment import telemetry_from_environment
from sagaworks.adapters.observability.logging import get_logger
from sagaworks.adapters.observability.telemetry import EngineTelemetry
from sagaworks.adapters.postgres.breakers import PostgresBreakerLog
from sagaworks.adapters.postgres.dead_letters import PostgresDeadLetters
from sagaworks.adapters.postgres.engine import (
    TRANSIENT_DATABASE_ERRORS,
    create_engine_from_settings,
    probe_database,
    session_deadlines,
)
from sagaworks.adapters.postgres.heartbeats import PostgresHeartbeats
from sagaworks.adapters.postgres.migrations_runner import check_schema_current
from sagaworks.adapters.postgres.notify import PostgresOutboxWakeUps
from sagaworks.adapters.postgres.operator_store import PostgresOperatorStore
from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.adapters.postgres.read_models import PostgresReadModels
from sagaworks.adapters.postgres.read_rollup import PostgresHistoryRollup
from sagaworks.adapters.postgres.retention import PostgresRetention
from sagaworks.adapters.postgres.saga_queries import PostgresSagaQueries
from sagaworks.adapters.postgres.store import PostgresStore
from sagaworks.adapters.rabbitmq.connection import broker_user, connect
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
from sagaworks.adapters.resilience.breaker import PortBreakers, worker_name
from sagaworks.adapters.resilience.caller import ResilientCaller
from sagaworks.adapters.resilience.declared import declared_policies
from sagaworks.application.apply_inputs import ApplyInputs
from sagaworks.application.boundary import (
    Boundary,
    UnconfiguredPublishers,
    allow_list,
    unconfigured,
)
from sagaworks.application.circuit import RecordBreakerChange
from sagaworks.application.config import EngineOptions, PortPolicy
from sagaworks.application.dead_letters import (
    IngestDeadLetter,
    LastErrors,
    QueueOwner,
    ReplayDeadLetters,
)
from sagaworks.application.eager import EagerSteps, leases
from sagaworks.application.handle_event import HandleEvent
from sagaworks.application.handle_step_command import HandleStepCommand
from sagaworks.application.operator_actions import ActOnSaga
from sagaworks.application.operator_plans import ApplyPlan, MakeReplayPlan, MakeSagaPlan
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.oversized import RejectOversized
from sagaworks.application.ports import (
    BreakerLog,
    Clock,
    DeadLetterRepository,
    HeartbeatLog,
    InboundMessage,
    OutboxWakeUps,
    PortCaller,
    Prunable,
    Publisher,
    SagaQueries,
    Store,
)
from sagaworks.application.published_marks import PublishedMarks
from sagaworks.application.read_rollup import RollUpHistory
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.results import Handled
from sagaworks.application.retention import PruneDatabase, RetentionPolicy
from sagaworks.application.timers import ExpireParkedEvents, FireDueTimers
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import COMMANDS_DOMAIN
from sagaworks.domain.definition import SagaDefinition
from sagaworks.settings import Settings

__all__ = [
    "Handler",
    "InMemoryAdapters",
    "OperatorTools",
    "Route",
    "SagaActions",
    "System",
    "SystemClock",
    "bootstrap",
    "bootstrap_saga_actions",
    "bootstrap_tools",
    "boundary_for",
    "in_memory",
    "own_user",
    "preflight",
    "retention_policy",
    "topology_for",
]

_log = get_logger("sagaworks.bootstrap")

Handler = Callable[[InboundMessage], Awaitable[Handled]]
"""A use case as a consumer calls it: one inbound message in, what became of it out."""


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
        dead_letter_delivery_limit=settings.dead_letter_delivery_limit,
    )


async def preflight(settings: Settings) -> None:
    """Fail fast, with one clear line, when the database cannot serve a worker."""
    url = settings.database_url.get_secret_value()
    await probe_database(url, settings.db_connect_timeout_s)
    await check_schema_current(url)


@dataclass(frozen=True, slots=True)
class Route:
    """One queue the engine consumes, and the use case that handles what arrives on it."""

    queue: str
    handle: Handler
    port: str | None = None
    """The port whose steps the queue carries (its breaker may pause it); None otherwise."""


@dataclass
class System:
    """Everything an entry point needs, and what to close when it is done."""

    settings: Settings
    registry: SagaRegistry
    clock: Clock
    store: Store
    publisher: Publisher
    relay: OutboxRelay
    handle_event: HandleEvent
    handle_step_command: HandleStepCommand
    fire_timers: FireDueTimers
    expire_parked_events: ExpireParkedEvents
    ingest_dead_letter: IngestDeadLetter
    reject_oversized: RejectOversized
    """Every consumer's first step: a body over the limit is stored cut short, never parsed."""
    last_errors: LastErrors
    """What handlers last failed with, for dead letters that arrive without a cause."""
    outbox_wake_ups: OutboxWakeUps
    topology: TopologySpec
    transient_errors: tuple[type[BaseException], ...]
    """Errors that mean the infrastructure is briefly away: wait them out, the message is fine."""
    port_lifecycle: AsyncExitStack = field(default_factory=AsyncExitStack)
    """The port adapters' lifecycle: entered by `bootstrap`, closed by `aclose()`."""
    engine: AsyncEngine | None = None
    connection: AbstractRobustConnection | None = None
    breakers: PortBreakers | None = None
    """This process's circuit breakers; None when a test hands in its own `PortCaller`."""
    record_breaker_change: RecordBreakerChange | None = None
    """Records breaker changes and announces them; None with a store handed in that is neither."""
    prune: PruneDatabase | None = None
    """Retention on the PostgreSQL store (the worker's schedule); None with a store handed in."""
    roll_up: RollUpHistory | None = None
    """Folds history into the dashboards' per-minute rows (the worker's schedule); None
    without PostgreSQL."""
    heartbeats: HeartbeatLog | None = None
    """Where the worker beats (`worker_heartbeats`); None without PostgreSQL."""
    telemetry: EngineTelemetry | None = None
    """Traces and metrics (`NoTelemetry` when `OTEL_*` configures no export); shut down last."""
    eager: EagerSteps | None = None
    """Runs committed step commands in this process for the ports a worker `serve`s; None: off."""

    def routes(self) -> list[Route]:
        """The queue -> use case table: every saga's queue, every port's, the dead letters'."""
        prefix = self.settings.exchange_prefix
        table = []
        for definition in self.registry:

            async def on_event(inbound: InboundMessage, d: Any = definition) -> Handled:
                return await self.handle_event(d, inbound)

            table.append(Route(saga_queue_name(prefix, definition.name), on_event))
        for port in self.registry.ports():
            table.append(Route(port_queue_name(prefix, port), self.handle_step_command, port))
        table.append(Route(dead_letter_queue_name(prefix), self.ingest_dead_letter))
        return table

    async def aclose(self) -> None:
        """Close the port adapters, then the broker and database side; all of them, once each."""
        await _close_all(
            [
                self.port_lifecycle.aclose,
                *_broker_closers(self.publisher, self.connection),
                *_database_closers(self.store, self.engine),
                *_telemetry_closers(self.telemetry),
            ]
        )


@dataclass(frozen=True)
class InMemoryAdapters:
    """The adapters of a run with no I/O, kept at hand so a test can look inside them."""

    clock: FakeClock
    store: InMemoryStore
    publisher: InMemoryPublisher
    caller: DirectCaller


def in_memory(
    settings: Settings,
    ports: Mapping[str, object],
    *,
    clock: FakeClock | None = None,
    policies: Mapping[str, PortPolicy] | None = None,
) -> InMemoryAdapters:
    """Store, publisher, fake clock and a direct port caller to hand to `bootstrap`.

    The caller uses the policy each port adapter declares unless `policies`
    names another, as `bootstrap` does for the resilient one.
    """
    clock = clock or FakeClock()
    return InMemoryAdapters(
        clock=clock,
        store=InMemoryStore(clock=clock),
        publisher=InMemoryPublisher(),
        caller=DirectCaller({**declared_policies(ports), **(policies or {})}),
    )


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
    outbox_wake_ups: OutboxWakeUps | None = None,
    telemetry: EngineTelemetry | None = None,
) -> System:
    """Wire the system; adapters not given are the real PostgreSQL and RabbitMQ ones.

    Each port's policy is the one its adapter declares (a `policy` attribute),
    unless `policies` names another. Telemetry not given is configured by the
    standard `OTEL_*` variables (off without them). The port adapters are entered (an async
    context manager) or registered for `aclose()` last, so the system closes
    them when it is closed; if one cannot be entered, the system is closed.
    """
    registry = SagaRegistry(sagas)
    missing = sorted(set(registry.ports()) - set(ports))
    if missing:
        raise ValueError(f"no adapter given for port(s): {', '.join(missing)}")
    clock = clock or SystemClock()
    wire = _wire(settings)
    engine = None
    connection = None
    breaker_log: BreakerLog | None = None
    if store is None:
        engine = create_engine_from_settings(settings, deadlines=True)
        pool = ConnectionPool(
            settings.database_url.get_secret_value(),
            size=settings.db_pool_size,
            connect_timeout_s=settings.db_connect_timeout_s,
            deadlines=session_deadlines(settings),
        )
        store = PostgresStore(engine, pool)
        breaker_log = PostgresBreakerLog(engine)
    elif isinstance(store, InMemoryStore):
        breaker_log = InMemoryBreakerLog(store)
    if outbox_wake_ups is None:
        outbox_wake_ups = IntervalWakeUps() if engine is None else PostgresOutboxWakeUps(engine)
    boundary = boundary_for(settings, registry)
    if publisher is None:
        connection = await _connect(settings)
        commands = exchange_name(settings.exchange_prefix, COMMANDS_DOMAIN)
        publisher = RabbitPublisher(
            connection,
            {commands},
            own_user(settings),
            confirm_timeout_s=settings.amqp_publish_timeout_s,
        )
    options = EngineOptions(
        park_for=timedelta(seconds=settings.park_for_s),
        max_message_bytes=settings.max_message_bytes,
        batch_size=settings.batch_size,
        batch_concurrency=settings.batch_concurrency,
        timer_max_attempts=settings.timer_max_attempts,
        timer_retry_base=timedelta(seconds=settings.timer_retry_base_s),
        timer_retry_max=timedelta(seconds=settings.timer_retry_max_s),
    )
    telemetry = telemetry or telemetry_from_environment(worker_name())
    relay = OutboxRelay(store, publisher, marks=PublishedMarks(store), telemetry=telemetry)
    port_policies = {**declared_policies(ports), **(policies or {})}
    if caller is None:
        caller = ResilientCaller(port_policies)
    breakers = caller.breakers if isinstance(caller, ResilientCaller) else None
    if breakers is not None:
        telemetry.watch_breakers(registry.ports())
        breakers.listen(telemetry.breaker_changed)
    eager = _eager_steps(settings, relay, breakers, port_policies)
    apply = ApplyInputs(store, relay, clock, options, wire, telemetry, eager)
    record_breaker_change = None
    if breaker_log is not None:
        record_breaker_change = RecordBreakerChange(breaker_log, relay, wire)
    last_errors = LastErrors()
    owners = _queue_owners(settings, registry)
    handle_step_command = HandleStepCommand(
        store, apply, clock, registry, ports, caller, options, boundary, telemetry
    )
    if eager is not None:
        eager.bind(handle_step_command.run_eagerly)
    system = System(
        settings=settings,
        registry=registry,
        clock=clock,
        store=store,
        publisher=publisher,
        relay=relay,
        handle_event=HandleEvent(store, apply, clock, options, boundary),
        handle_step_command=handle_step_command,
        fire_timers=FireDueTimers(store, relay, clock, registry, wire, options, telemetry),
        expire_parked_events=ExpireParkedEvents(store, clock),
        ingest_dead_letter=IngestDeadLetter(store, clock, owners, last_errors),
        reject_oversized=RejectOversized(
            store,
            clock,
            settings.max_message_bytes,
            owners,
            dead_letter_queue_name(settings.exchange_prefix),
        ),
        last_errors=last_errors,
        outbox_wake_ups=outbox_wake_ups,
        topology=topology_for(settings, registry),
        transient_errors=(OSError, *TRANSIENT_DATABASE_ERRORS),
        engine=engine,
        connection=connection,
        breakers=breakers,
        record_breaker_change=record_breaker_change,
        prune=None if engine is None else _prune(settings, engine, clock),
        roll_up=None if engine is None else _roll_up(settings, engine),
        heartbeats=PostgresHeartbeats(engine) if engine is not None else None,
        telemetry=telemetry,
        eager=eager,
    )
    try:
        await _open_ports(system.port_lifecycle, ports)
    except BaseException:
        await system.aclose()
        raise
    return system


@dataclass
class OperatorTools:
    """What an operator command asked `bootstrap_tools` for, and what to close afterwards."""

    settings: Settings
    dead_letters: DeadLetterRepository | None = None
    replay_publisher: Publisher | None = None
    """Publishes mandatory to the default exchange: a replay to a queue that is gone fails."""
    connection: AbstractRobustConnection | None = None
    engine: AsyncEngine | None = None
    saga_queries: SagaQueries | None = None
    prune: PruneDatabase | None = None
    read_models: PostgresReadModels | None = None

    async def aclose(self) -> None:
        await _close_all(
            [
                *_broker_closers(self.replay_publisher, self.connection),
                *_database_closers(None, self.engine),
            ]
        )


async def bootstrap_tools(
    settings: Settings,
    *,
    dead_letters: bool = False,
    broker: bool = False,
    replay_publisher: bool = False,
    saga_queries: bool = False,
    prune: bool = False,
    read_models: bool = False,
) -> OperatorTools:
    """Only what an operator command needs: no worker, no use cases of the engine.

    `dead_letters`: the PostgreSQL dead-letter store; `broker`: a connection to
    RabbitMQ; `replay_publisher`: a publisher for replays (connects as well);
    `saga_queries`: operators' reads of sagas (`sagaworks saga ...`); `prune`:
    retention on the database; `read_models`: the dashboards' views (`sagaworks top`).
    """
    tools = OperatorTools(settings)
    if dead_letters or saga_queries or prune or read_models:
        engine = tools.engine = create_engine_from_settings(settings)
        if dead_letters:
            tools.dead_letters = PostgresDeadLetters(engine, client_hostname=socket.gethostname())
        if saga_queries:
            tools.saga_queries = PostgresSagaQueries(engine)
        if prune:
            tools.prune = _prune(settings, engine, SystemClock())
        if read_models:
            tools.read_models = PostgresReadModels(engine)
    try:
        if broker or replay_publisher:
            tools.connection = await _connect(settings)
        if replay_publisher:
            assert tools.connection is not None
            tools.replay_publisher = RabbitPublisher(
                tools.connection,
                {""},
                own_user(settings),
                confirm_timeout_s=settings.amqp_publish_timeout_s,
            )
    except BaseException:
        await tools.aclose()
        raise
    return tools


@dataclass
class SagaActions:
    """What `sagaworks saga retry|...|plan|apply` need: the use cases on the real store."""

    store: PostgresOperatorStore
    queries: SagaQueries
    act: ActOnSaga
    make_plan: MakeSagaPlan
    make_replay_plan: MakeReplayPlan
    apply_plan: ApplyPlan
    engine: AsyncEngine
    connection: AbstractRobustConnection
    publishers: tuple[RabbitPublisher, RabbitPublisher]

    async def aclose(self) -> None:
        await _close_all(
            [
                *(p.close for p in self.publishers),
                self.connection.close,
                *_database_closers(self.store, self.engine),
            ]
        )


async def bootstrap_saga_actions(
    settings: Settings, sagas: Iterable[SagaDefinition[Any]]
) -> SagaActions:
    """Operators' actions on sagas: they lock, decide, write and publish as a worker does.

    The step commands an action sends are published as the user of
    `SAGAWORKS_AMQP_URL`, which workers accept them from.
    """
    registry = SagaRegistry(sagas)
    engine = create_engine_from_settings(settings)
    pool = ConnectionPool(
        settings.database_url.get_secret_value(),
        size=2,
        connect_timeout_s=settings.db_connect_timeout_s,
    )
    store = PostgresOperatorStore(engine, pool, hostname=socket.gethostname())
    try:
        connection = await _connect(settings)
    except BaseException:
        await _close_all(_database_closers(store, engine))
        raise
    commands = exchange_name(settings.exchange_prefix, COMMANDS_DOMAIN)
    publisher = RabbitPublisher(connection, {commands}, own_user(settings))
    replay_publisher = RabbitPublisher(connection, {""}, own_user(settings))
    clock = SystemClock()
    act = ActOnSaga(store, OutboxRelay(store, publisher), clock, registry, _wire(settings))
    letters = PostgresDeadLetters(engine, client_hostname=socket.gethostname())
    targets = frozenset(q.name for q in topology_for(settings, registry).queues)
    replay = ReplayDeadLetters(letters, replay_publisher, targets)
    return SagaActions(
        store=store,
        queries=PostgresSagaQueries(engine),
        act=act,
        make_plan=MakeSagaPlan(store, clock),
        make_replay_plan=MakeReplayPlan(store, letters, replay, clock),
        apply_plan=ApplyPlan(store, act, letters, replay),
        engine=engine,
        connection=connection,
        publishers=(publisher, replay_publisher),
    )


def own_user(settings: Settings) -> str:
    """The broker user sagaworks publishes as: the user of `SAGAWORKS_AMQP_URL`."""
    return broker_user(settings.amqp_url.get_secret_value())


def boundary_for(settings: Settings, registry: SagaRegistry) -> Boundary:
    """Who may publish each consumed event; warns, or refuses in production, where nobody said.

    Raises `UnconfiguredPublishers` with `SAGAWORKS_PROFILE=production` while a
    consumed event type has no allowed publishers.
    """
    allowed = allow_list(registry, settings.publishers)
    missing = unconfigured(registry, allowed)
    if missing:
        if settings.profile == "production":
            raise UnconfiguredPublishers(missing)
        _log.warning(
            "no allowed publishers for some consumed event types: any broker user that sets "
            "user_id may publish them; declare publishers=(...) on their message classes or "
            "set SAGAWORKS_PUBLISHERS (a production profile refuses to start like this)",
            event_types=missing,
        )
    prefix = settings.exchange_prefix
    return Boundary(
        lambda domain: exchange_name(prefix, domain), allowed, frozenset({own_user(settings)})
    )


def retention_policy(settings: Settings) -> RetentionPolicy:
    """How long each kind of row is kept, from `SAGAWORKS_RETAIN_*` (0: for ever)."""
    seconds = {
        Prunable.INBOX: settings.retain_inbox_s,
        Prunable.OUTBOX: settings.retain_published_outbox_s,
        Prunable.SAGAS: settings.retain_finished_sagas_s,
        Prunable.DEAD_LETTERS: settings.retain_dead_letters_s,
        Prunable.BREAKERS: settings.retain_breakers_s,
    }
    return RetentionPolicy(
        keep={what: timedelta(seconds=s) if s > 0 else None for what, s in seconds.items()},
        batch_size=settings.prune_batch_size,
        pause=timedelta(seconds=settings.prune_pause_s),
    )


def _prune(settings: Settings, engine: AsyncEngine, clock: Clock) -> PruneDatabase:
    return PruneDatabase(PostgresRetention(engine), clock, retention_policy(settings))


def _roll_up(settings: Settings, engine: AsyncEngine) -> RollUpHistory:
    return RollUpHistory(
        PostgresHistoryRollup(engine), keep=timedelta(seconds=settings.read_rollup_keep_s)
    )


def _eager_steps(
    settings: Settings,
    relay: OutboxRelay,
    breakers: PortBreakers | None,
    policies: Mapping[str, PortPolicy],
) -> EagerSteps | None:
    """Eager steps as the settings say; a port runs eagerly only while its breaker is closed.

    Unless `SAGAWORKS_EAGER_LEASE_S` says otherwise, a step's lease outlasts its port's
    longest delivery plus a commit (a statement's deadline).
    """
    if not settings.eager_steps:
        return None
    prefix = settings.exchange_prefix
    return EagerSteps(
        relay,
        per_port=settings.eager_steps_per_port,
        lease_for=leases(
            policies, fixed_s=settings.eager_lease_s, commit_s=settings.db_statement_timeout_s
        ),
        breaker_closed=lambda port: breakers is None or breakers[port].state == "closed",
        queue_for=lambda port: port_queue_name(prefix, port),
    )


def _wire(settings: Settings) -> Wire:
    prefix = settings.exchange_prefix
    return Wire(lambda domain: exchange_name(prefix, domain))


async def _connect(settings: Settings) -> AbstractRobustConnection:
    return await connect(
        settings.amqp_url.get_secret_value(),
        timeout_s=settings.amqp_connect_timeout_s,
        heartbeat_s=settings.amqp_heartbeat_s,
    )


def _queue_owners(settings: Settings, registry: SagaRegistry) -> dict[str, QueueOwner]:
    """Who owns each queue, so a dead letter names the saga or step that failed.

    The failure fingerprint groups dead letters by it.
    """
    prefix = settings.exchange_prefix
    owners = {saga_queue_name(prefix, d.name): QueueOwner(saga_type=d.name) for d in registry}
    owners.update(
        {port_queue_name(prefix, p): QueueOwner(runs_steps=True) for p in registry.ports()}
    )
    return owners


async def _open_ports(stack: AsyncExitStack, ports: Mapping[str, object]) -> None:
    """Enter each distinct port adapter that is an async context manager, or note its `aclose`."""
    seen: set[int] = set()
    for adapter in ports.values():
        if id(adapter) in seen:
            continue
        seen.add(id(adapter))
        if isinstance(adapter, contextlib.AbstractAsyncContextManager):
            await stack.enter_async_context(adapter)
        elif callable(close := getattr(adapter, "aclose", None)):
            stack.push_async_callback(close)


def _broker_closers(
    publisher: Publisher | None, connection: AbstractRobustConnection | None
) -> list[Callable[[], Awaitable[Any]]]:
    closers: list[Callable[[], Awaitable[Any]]] = []
    if isinstance(publisher, RabbitPublisher):
        closers.append(publisher.close)
    if connection is not None:
        closers.append(connection.close)
    return closers


def _database_closers(
    store: Store | None, engine: AsyncEngine | None
) -> list[Callable[[], Awaitable[Any]]]:
    closers: list[Callable[[], Awaitable[Any]]] = []
    if isinstance(store, PostgresStore):
        closers.append(store.aclose)
    if engine is not None:
        closers.append(engine.dispose)
    return closers


def _telemetry_closers(
    telemetry: EngineTelemetry | None,
) -> list[Callable[[], Awaitable[Any]]]:
    """Push the last spans and metrics off the event loop (the SDK's exporters block)."""
    if telemetry is None:
        return []
    return [lambda: asyncio.to_thread(telemetry.shutdown)]


async def _close_all(closers: list[Callable[[], Awaitable[Any]]]) -> None:
    """Call every closer, in order, even when one fails; then raise what failed."""
    errors: list[Exception] = []
    for close in closers:
        try:
            await close()
        except Exception as error:  # noqa: BLE001 - the others are closed all the same
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise ExceptionGroup("closing the system failed", errors)
