"""Helpers for the saga engine's integration tests (not a test module).

`EngineHarness` runs one or more real workers in the test's event loop against
the shared RabbitMQ and PostgreSQL, under a name prefix and in a database of
the test's own:

- simulated participants (`sagas.order_fulfilment.simulation.participants`) share one
  `Ledger`, so duplicate effects are visible across workers; each port
  method can be held back by a per-method gate (`harness.gates["capture"]`);
- a simulated `Warehouse` publishes what `harness.plans[order_id]` says once
  an order's shipment is booked;
- `publish()` sends events like the order service does
  (`participants.publish`), `publish_raw()` sends anything at all;
- every delivery a worker handled is logged (`harness.handled`), every
  outcome event on the `orders` exchange is collected (`harness.outcomes`);
- `wait_for_status()` and `eventually()` poll PostgreSQL with a deadline.

`close()` stops the workers, closes their systems and deletes every queue and
exchange the test used (all named under its prefix).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar
from uuid import UUID

import aio_pika
import asyncpg
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from broker_tools import USER

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import OrderCancelled, OrderFulfilled
from sagas.order_fulfilment.simulation.participants import Ledger, Simulation, simulated_ports
from sagas.order_fulfilment.simulation.shop import Warehouse, publish
from sagaworks import Message
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.publisher import RabbitPublisher
from sagaworks.adapters.rabbitmq.topology import (
    exchange_name,
    saga_queue_name,
)
from sagaworks.application.config import PortPolicy
from sagaworks.application.ports import InboundMessage, OutboxRow, Publisher
from sagaworks.application.results import Handled
from sagaworks.bootstrap import System, bootstrap, own_user
from sagaworks.domain.decide import COMMANDS_DOMAIN
from sagaworks.domain.instance import saga_id_for
from sagaworks.entrypoints.worker import Worker
from sagaworks.settings import Settings

__all__ = [
    "EngineHarness",
    "FlakyPublisher",
    "HandledRecord",
    "HistoryEntry",
    "Outcome",
    "RepeatingPublisher",
    "SagaRow",
    "WarehouseSend",
    "running_harness",
]

T = TypeVar("T")

SAGA = order_fulfilment.name

WarehouseSend = tuple[float, Message, str]
"""(delay in seconds, message, message id) the warehouse publishes after a booking."""


@dataclass(frozen=True)
class SagaRow:
    saga_id: UUID
    status: str
    version: int
    current_step: str | None
    state: dict[str, Any]
    progress: dict[str, Any]

    @property
    def reason(self) -> str | None:
        reason: str | None = self.progress.get("reason")
        return reason


@dataclass(frozen=True)
class HistoryEntry:
    seq: int
    at: datetime
    kind: str
    step: str | None
    message_id: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    """An outcome event sagaworks published on the `orders` exchange."""

    message_type: str
    message_id: str
    correlation_id: str | None
    headers: dict[str, Any]
    body: dict[str, Any]


@dataclass(frozen=True)
class HandledRecord:
    """One delivery a worker's use case finished (or failed on)."""

    worker: int
    use_case: str
    message_id: str
    message_type: str
    delivery_count: int
    handled: Handled | None
    error: str | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)
    """The delivery's headers as the use case read them."""

    @property
    def outcome(self) -> str:
        return self.handled.outcome if self.handled is not None else "error"


class _Recorder:
    """Wraps a use case and logs what it did with every delivery."""

    def __init__(self, use_case: Any, name: str, worker: int, log: list[HandledRecord]) -> None:
        self._use_case = use_case
        self._name = name
        self._worker = worker
        self._log = log

    def __getattr__(self, name: str) -> Any:
        """What the worker reads off a use case besides calling it (`max_bytes`)."""
        return getattr(self._use_case, name)

    async def __call__(self, *args: Any) -> Handled:
        inbound: InboundMessage = args[-1]
        try:
            handled: Handled = await self._use_case(*args)
        except BaseException as error:
            self._record(inbound, None, f"{type(error).__name__}: {error}")
            raise
        self._record(inbound, handled)
        return handled

    def _record(
        self, inbound: InboundMessage, handled: Handled | None, error: str | None = None
    ) -> None:
        self._log.append(
            HandledRecord(
                self._worker,
                self._name,
                inbound.message_id,
                inbound.message_type,
                inbound.delivery_count,
                handled,
                error,
                inbound.headers,
            )
        )


class _Gated:
    """A port whose methods wait for `gates[method]` (when there is one) before running.

    `arrivals[method]` counts the calls that reached the port, held back or not.
    """

    def __init__(
        self, inner: object, gates: Mapping[str, asyncio.Event], arrivals: Counter[str]
    ) -> None:
        self._inner = inner
        self._gates = gates
        self._arrivals = arrivals

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if not callable(method):
            return method

        async def gated(*args: Any, **kwargs: Any) -> Any:
            self._arrivals[name] += 1
            gate = self._gates.get(name)
            if gate is not None:
                await gate.wait()
            return await method(*args, **kwargs)

        return gated


class FlakyPublisher:
    """A real publisher that 'crashes' on the first attempt to publish chosen rows.

    The first `publish()` call that contains a row matching `fail_first` sends
    the call's other rows and raises for the chosen ones, as if the worker died
    between commit and publish; any later attempt for those rows (the sweeper)
    goes through. The other rows stay unmarked too, so the sweeper republishes
    them, as after a real crash, and their consumers' inboxes drop the copies.
    """

    def __init__(self, inner: Publisher, fail_first: Callable[[OutboxRow], bool]) -> None:
        self.inner = inner
        self._fail_first = fail_first
        self.failed: list[OutboxRow] = []
        self.published: list[OutboxRow] = []
        self._seen: set[int] = set()

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        doomed = [r for r in rows if r.id not in self._seen and self._fail_first(r)]
        self._seen.update(r.id for r in doomed)
        spared = [r for r in rows if r not in doomed]
        if spared:
            await self.inner.publish(spared)
            self.published.extend(spared)
        if doomed:
            self.failed.extend(doomed)
            raise ConnectionError(f"simulated crash before publishing outbox rows {doomed}")


class RepeatingPublisher:
    """A real publisher whose chosen rows reach the broker twice, as after a lost confirm."""

    def __init__(self, inner: Publisher, repeat: Callable[[OutboxRow], bool]) -> None:
        self.inner = inner
        self._repeat = repeat
        self.repeated: list[OutboxRow] = []

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        await self.inner.publish(rows)
        again = [r for r in rows if self._repeat(r)]
        if again:
            await self.inner.publish(again)
            self.repeated.extend(again)


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


class EngineHarness:
    """Workers, simulated participants and probes for one test. Use `open()` and `close()`."""

    def __init__(self, settings: Settings, database_url: str) -> None:
        prefix = settings.exchange_prefix
        assert prefix, "the harness needs a private exchange prefix"
        self.settings = settings
        self.user = own_user(settings)
        """The broker user the harness publishes as: the one of the worker's URL."""
        self.database_url = database_url
        self.prefix = prefix
        self.ledger = Ledger()
        self.plans: dict[str, list[WarehouseSend]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.arrivals: Counter[str] = Counter()
        self.handled: list[HandledRecord] = []
        self.outcomes: list[Outcome] = []
        self.systems: list[System] = []
        self.workers: list[Worker] = []
        self.saga_queue = saga_queue_name(prefix, SAGA)
        self.outcome_queue_name = f"{prefix}test.outcomes"
        self._extra_closers: list[Callable[[], Awaitable[Any]]] = []
        self._client: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._outcome_queue: AbstractQueue | None = None
        self._outcome_consumer = ""
        self._db: asyncpg.Connection | None = None
        self.warehouse: Warehouse | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    async def open(self) -> None:
        self._db = await asyncpg.connect(_plain_dsn(self.database_url))
        for codec in ("json", "jsonb"):
            await self._db.set_type_codec(
                codec, encoder=json.dumps, decoder=json.loads, schema="pg_catalog"
            )
        self._client = await aio_pika.connect_robust(self.settings.amqp_url.get_secret_value())
        self._channel = await self._client.channel(publisher_confirms=True, on_return_raises=True)
        self.warehouse = Warehouse(
            self._channel,
            lambda domain: exchange_name(self.prefix, domain),
            lambda order_id, _shipment_id: list(self.plans.get(order_id, ())),
            self.user,
        )

    async def start_worker(
        self, *, publisher_wrapper: Any = None, policies: Mapping[str, PortPolicy] | None = None
    ) -> Worker:
        """Bootstrap one more system (own engine and connection) and start a worker on it.

        `publisher_wrapper(real_publisher)` may return a publisher wrapping the real one;
        `policies` replace the ports' default call policies, by port.
        """
        assert self.warehouse is not None, "open() the harness first"
        ports = simulated_ports(Simulation(), self.ledger, self.warehouse.on_booked)
        gated = {name: _Gated(port, self.gates, self.arrivals) for name, port in ports.items()}
        connection = None
        publisher = None
        if publisher_wrapper is not None:
            connection = await connect(
                self.settings.amqp_url.get_secret_value(),
                timeout_s=self.settings.amqp_connect_timeout_s,
            )
            real = RabbitPublisher(
                connection, {exchange_name(self.prefix, COMMANDS_DOMAIN)}, own_user(self.settings)
            )
            publisher = publisher_wrapper(real)
            self._extra_closers.append(real.close)
        system = await bootstrap(
            self.settings, [order_fulfilment], gated, publisher=publisher, policies=policies
        )
        if connection is not None:
            # bootstrap() opens no broker connection when given a publisher, but the
            # worker needs one to declare the topology: hand it ours (closed by aclose()).
            system.connection = connection
        index = len(self.systems)
        self.systems.append(system)
        system.handle_event = _Recorder(system.handle_event, "handle_event", index, self.handled)  # type: ignore[assignment]
        recorder = _Recorder(system.handle_step_command, "handle_step_command", index, self.handled)
        system.handle_step_command = recorder  # type: ignore[assignment]
        oversized = _Recorder(system.reject_oversized, "reject_oversized", index, self.handled)
        system.reject_oversized = oversized  # type: ignore[assignment]
        worker = Worker(system)
        await worker.start()
        self.workers.append(worker)
        if self._outcome_queue is None:
            await self._listen_for_outcomes()
        return worker

    async def close(self) -> None:
        errors: list[BaseException] = []

        async def attempt(work: Awaitable[Any]) -> None:
            try:
                await work
            except Exception as error:
                errors.append(error)

        for worker in reversed(self.workers):
            await attempt(worker.stop())
        if self.warehouse is not None:
            await attempt(self.warehouse.stop())
        for closer in self._extra_closers:
            await attempt(closer())
        for system in reversed(self.systems):
            await attempt(system.aclose())
        if self._outcome_queue is not None:
            await attempt(self._outcome_queue.cancel(self._outcome_consumer))
        if self._client is not None:
            await attempt(self._delete_broker_entities())
            await attempt(self._client.close())
        if self._db is not None:
            await attempt(self._db.close())
        if errors:
            raise errors[0]

    async def _delete_broker_entities(self) -> None:
        assert self._client is not None
        queues = {self.outcome_queue_name}
        exchanges: set[str] = set()
        for system in self.systems:
            topology = system.topology
            queues.update(q.name for q in topology.queues)
            queues.update((topology.dead_letter_queue, topology.unstorable_queue))
            exchanges.update(topology.exchanges)
            exchanges.add(topology.dead_letter_exchange)
        async with self._client.channel() as channel:
            for name in sorted(queues):
                assert name.startswith(self.prefix), name
                await channel.queue_delete(name)
            for name in sorted(exchanges):
                assert name.startswith(self.prefix), name
                await channel.exchange_delete(name)

    async def _listen_for_outcomes(self) -> None:
        assert self._channel is not None
        queue = await self._channel.declare_queue(self.outcome_queue_name, durable=False)
        orders = exchange_name(self.prefix, OrderFulfilled.domain)
        for event in (OrderFulfilled, OrderCancelled):
            await queue.bind(orders, event.routing_key)
        self._outcome_consumer = await queue.consume(self._on_outcome, no_ack=True)
        self._outcome_queue = queue

    async def _on_outcome(self, incoming: AbstractIncomingMessage) -> None:
        self.outcomes.append(
            Outcome(
                message_type=incoming.type or "",
                message_id=incoming.message_id or "",
                correlation_id=incoming.correlation_id,
                headers=dict(incoming.headers or {}),
                body=json.loads(incoming.body),
            )
        )

    # -- publishing -----------------------------------------------------------------------------

    async def publish(
        self, message: Message, message_id: str, *, correlation_id: str | None = None
    ) -> None:
        """Publish as the order service or the warehouse does: persistent, confirmed."""
        assert self._channel is not None
        exchange = await self._channel.get_exchange(
            exchange_name(self.prefix, message.domain), ensure=False
        )
        await publish(
            exchange,
            message,
            message_id,
            source=f"tests/{message.domain}",
            user_id=self.user,
            correlation_id=correlation_id,
        )

    async def publish_raw(
        self,
        domain: str,
        routing_key: str,
        body: bytes,
        *,
        message_id: str | None,
        message_type: str,
        user_id: str | None = USER,
        channel: AbstractChannel | None = None,
    ) -> None:
        """Publish any body with any type, id and user (on `channel`: another connection's).

        Unroutable messages fail (on_return_raises).
        """
        channel = channel or self._channel
        assert channel is not None
        exchange = await channel.get_exchange(exchange_name(self.prefix, domain), ensure=False)
        await exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                type=message_type,
                app_id=f"tests/{domain}",
                user_id=user_id,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"cloudEvents_specversion": "1.0"},
            ),
            routing_key=routing_key,
        )

    async def publish_to_queue(self, queue: str, message: Message, message_id: str) -> None:
        """Send to one queue through the default exchange, as the dead-letter replay does."""
        assert self._channel is not None
        await self._channel.default_exchange.publish(
            aio_pika.Message(
                message.model_dump_json().encode(),
                message_id=message_id,
                type=message.message_type,
                app_id="tests/replay",
                user_id=self.user,
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                headers={"cloudEvents_specversion": "1.0"},
            ),
            routing_key=queue,
        )

    # -- probes ---------------------------------------------------------------------------------

    @property
    def db(self) -> asyncpg.Connection:
        assert self._db is not None, "open() the harness first"
        return self._db

    @staticmethod
    def saga_id(order_id: str) -> UUID:
        return saga_id_for(SAGA, order_id)

    async def saga(self, order_id: str) -> SagaRow | None:
        row = await self.db.fetchrow(
            "SELECT id, status, version, current_step, state, progress FROM saga_instances "
            "WHERE saga_type = $1 AND correlation_key = $2",
            SAGA,
            order_id,
        )
        if row is None:
            return None
        return SagaRow(
            row["id"],
            row["status"],
            row["version"],
            row["current_step"],
            row["state"],
            row["progress"],
        )

    async def history(self, order_id: str) -> list[HistoryEntry]:
        rows = await self.db.fetch(
            "SELECT seq, at, kind, step, message_id, detail FROM saga_history "
            "WHERE saga_id = $1 ORDER BY seq",
            self.saga_id(order_id),
        )
        return [
            HistoryEntry(r["seq"], r["at"], r["kind"], r["step"], r["message_id"], r["detail"])
            for r in rows
        ]

    async def parked(self, order_id: str) -> list[asyncpg.Record]:
        return list(
            await self.db.fetch(
                "SELECT * FROM parked_messages WHERE saga_id = $1 ORDER BY id",
                self.saga_id(order_id),
            )
        )

    async def dead_letter(self, message_id: str) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self.db.fetchrow(
            "SELECT * FROM dead_letters WHERE message_id = $1", message_id
        )
        return row

    async def queue_depth(self, name: str) -> int:
        """Messages ready in a queue (deliveries not yet acknowledged are not counted)."""
        assert self._client is not None
        async with self._client.channel() as channel:
            queue = await channel.declare_queue(name, passive=True)
            count = queue.declaration_result.message_count
        return int(count or 0)

    def effects(self, order_id: str) -> dict[str, int]:
        """Effects the participants applied for one order, by operation."""
        return {op: n for (op, order), n in self.ledger.effects.items() if order == order_id}

    def handled_for(self, message_id: str) -> list[HandledRecord]:
        return [h for h in self.handled if h.message_id == message_id]

    def outcomes_for(self, order_id: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.body.get("order_id") == order_id]

    # -- waiting --------------------------------------------------------------------------------

    async def eventually(
        self,
        check: Callable[[], Awaitable[T | None]],
        *,
        what: str,
        timeout_s: float = 15.0,
        interval_s: float = 0.05,
    ) -> T:
        """Poll `check` until it returns something other than None/False, or fail."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = await check()
            if result is not None and result is not False:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{self}")
            await asyncio.sleep(interval_s)

    async def wait_for_status(
        self, order_id: str, *statuses: str, timeout_s: float = 15.0
    ) -> SagaRow:
        """Wait until the saga of `order_id` has one of `statuses` (any terminal one if none)."""
        wanted = set(statuses or ("completed", "compensated", "needs_attention"))

        async def reached() -> SagaRow | None:
            saga = await self.saga(order_id)
            return saga if saga is not None and saga.status in wanted else None

        return await self.eventually(
            reached, what=f"saga {order_id} to be {'/'.join(sorted(wanted))}", timeout_s=timeout_s
        )

    async def wait_for_history(
        self, order_id: str, kind: str, step: str | None = None, *, timeout_s: float = 15.0
    ) -> HistoryEntry:
        async def recorded() -> HistoryEntry | None:
            for entry in await self.history(order_id):
                if entry.kind == kind and (step is None or entry.step == step):
                    return entry
            return None

        return await self.eventually(
            recorded, what=f"history {kind} {step or ''} of {order_id}", timeout_s=timeout_s
        )

    async def wait_for_outcome(self, order_id: str, *, timeout_s: float = 10.0) -> Outcome:
        async def received() -> Outcome | None:
            found = self.outcomes_for(order_id)
            return found[0] if found else None

        return await self.eventually(
            received, what=f"an outcome event for {order_id}", timeout_s=timeout_s
        )

    async def wait_for_handled(
        self, message_id: str, times: int = 1, *, timeout_s: float = 15.0
    ) -> list[HandledRecord]:
        async def done() -> list[HandledRecord] | None:
            records = self.handled_for(message_id)
            return records if len(records) >= times else None

        return await self.eventually(
            done, what=f"{times} handling(s) of message {message_id}", timeout_s=timeout_s
        )

    def __str__(self) -> str:
        tail = "\n".join(
            f"  w{h.worker} {h.use_case} {h.message_id} {h.message_type} -> {h.outcome}"
            f" {h.handled.reason if h.handled else h.error}"
            for h in self.handled[-15:]
        )
        return f"last handled deliveries:\n{tail}\nledger effects: {dict(self.ledger.effects)}"


@asynccontextmanager
async def running_harness(
    settings_factory: Callable[..., Settings], database_url: str, run_id: str
) -> AsyncIterator[EngineHarness]:
    """A harness on its own exchange prefix with one worker started, closed on exit."""
    settings = settings_factory(
        database_url=database_url,
        exchange_prefix=f"{run_id}.{secrets.token_hex(3)}.",
        grace_period_s=5.0,
        db_pool_size=5,
    )
    harness = EngineHarness(settings, database_url)
    await harness.open()
    try:
        await harness.start_worker()
        yield harness
    finally:
        await harness.close()
