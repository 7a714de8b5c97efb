"""The RabbitMQ topology sagaworks relies on, declared idempotently from code.

Recoverability (docs/recoverability.md) depends on broker-side settings that are easy to
get subtly wrong on RabbitMQ 3.10: a quorum queue has no delivery limit
unless one is set, and `at-least-once` dead-lettering silently degrades to
`at-most-once` without `x-overflow: reject-publish`. So the topology is not
left to whoever declares a queue first: this module names every exchange and
queue, fixes their arguments in one place (`queue_arguments`, which the
worker's subscribers reuse so that their own declarations match), and
declares them at start-up.

Declaring is idempotent: declaring what already exists with the same
arguments changes nothing and keeps the queued messages. RabbitMQ never
alters an existing entity, though; if the arguments differ it answers
PRECONDITION_FAILED, which `apply_topology` turns into a `TopologyConflict`
that says which argument differs and how to migrate (docs/topology.md).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
from aio_pika.abc import AbstractConnection, ExchangeType
from aiormq.exceptions import ChannelNotFoundEntity, ChannelPreconditionFailed

from sagaworks.adapters.rabbitmq.errors import EntityKind, TopologyConflict, TopologyMissing

__all__ = [
    "Binding",
    "Permissions",
    "QueueSpec",
    "TopologyReport",
    "TopologySpec",
    "apply_topology",
    "check_topology",
    "commands_exchange_name",
    "dead_letter_exchange_name",
    "dead_letter_queue_arguments",
    "dead_letter_queue_name",
    "events_exchange_name",
    "exchange_name",
    "operator_permissions",
    "port_queue_name",
    "queue_arguments",
    "queue_depth",
    "saga_queue_name",
    "unstorable_queue_arguments",
    "unstorable_queue_name",
    "worker_permissions",
]

_T = TypeVar("_T")

# "inequivalent arg 'x-delivery-limit' for queue 'q' in vhost '/': received the value '5' of
# type 'signedint' but current is none" -- values come as `none`, `'v'` or `the value 'v' of
# type 't'` (RabbitMQ 3.10, rabbit_misc:assert_args_equivalence and rabbit_exchange).
_INEQUIVALENT_ARG = re.compile(
    r"inequivalent arg '(?P<argument>[^']*)' for (?:queue|exchange) '.*?' "
    r"in vhost '(?P<vhost>.*?)': received (?P<received>.+) but current is (?P<current>.+)$"
)
_VHOST = re.compile(r"in vhost '(?P<vhost>.*?)'")
_VALUE = re.compile(r"^(?:none|the value '(?P<typed>.*)' of type '[^']*'|'(?P<plain>.*)')$")


def exchange_name(prefix: str, domain: str) -> str:
    """Topic exchange a domain service publishes to, e.g. `orders`, `warehouse`."""
    return f"{prefix}{domain}"


def events_exchange_name(prefix: str) -> str:
    """Topic exchange sagaworks publishes its sagas' outcome events to."""
    return f"{prefix}sagaworks.events"


def commands_exchange_name(prefix: str) -> str:
    """Topic exchange sagaworks publishes commands to participants on."""
    return f"{prefix}sagaworks.commands"


def saga_queue_name(prefix: str, saga_name: str) -> str:
    """Quorum queue one saga consumes from, shared by all workers running that saga."""
    if not saga_name:
        raise ValueError("a saga needs a non-empty name to get a queue")
    name = f"{prefix}sagaworks.{saga_name}"
    if name == dead_letter_queue_name(prefix):
        raise ValueError(
            f'saga name "{saga_name}" would reuse the dead-letter queue "{name}"; rename the saga'
        )
    return name


def port_queue_name(prefix: str, port: str) -> str:
    """Quorum queue of step commands for one port, so work for a port can pause on its own."""
    return f"{prefix}sagaworks.port.{port}"


def dead_letter_exchange_name(prefix: str) -> str:
    """Fanout exchange every saga queue dead-letters to."""
    return f"{prefix}sagaworks.dlx"


def dead_letter_queue_name(prefix: str) -> str:
    """Quorum queue collecting dead letters until they are ingested into PostgreSQL."""
    return f"{prefix}sagaworks.dead-letters"


def unstorable_queue_name(prefix: str) -> str:
    """Quorum queue nothing consumes: dead letters the store refused, kept as they came."""
    return f"{dead_letter_queue_name(prefix)}.unstorable"


@dataclass(frozen=True)
class Binding:
    """Route messages published to `exchange` with a matching topic `routing_key`."""

    exchange: str
    routing_key: str


@dataclass(frozen=True)
class QueueSpec:
    """A saga queue (final name, prefix included) and the bindings that feed it."""

    name: str
    bindings: tuple[Binding, ...]


@dataclass(frozen=True)
class TopologySpec:
    """Everything `apply_topology` declares; all names are final (prefix included)."""

    exchanges: tuple[str, ...]
    queues: tuple[QueueSpec, ...]
    dead_letter_exchange: str
    dead_letter_queue: str
    delivery_limit: int
    dead_letter_delivery_limit: int = 20

    @property
    def unstorable_queue(self) -> str:
        """Where the dead-letter queue dead-letters to: its name + `.unstorable`."""
        return f"{self.dead_letter_queue}.unstorable"

    def __post_init__(self) -> None:
        for name in ("delivery_limit", "dead_letter_delivery_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        names = [*self.exchanges, self.dead_letter_exchange]
        queues = [queue.name for queue in self.queues] + [
            self.dead_letter_queue,
            self.unstorable_queue,
        ]
        for kind, declared in (("exchange", names), ("queue", queues)):
            if "" in declared:
                raise ValueError(f"{kind} names must not be empty")
            duplicates = sorted({name for name in declared if declared.count(name) > 1})
            if duplicates:
                raise ValueError(
                    f"{kind} names must be unique, the dead-letter {kind} included; "
                    f"declared more than once: {', '.join(duplicates)}"
                )
        for queue in self.queues:
            for binding in queue.bindings:
                if binding.exchange not in self.exchanges:
                    raise ValueError(
                        f'queue "{queue.name}" is bound to exchange "{binding.exchange}", '
                        "which is not among the declared exchanges; add it to `exchanges`"
                    )


@dataclass(frozen=True)
class TopologyReport:
    """What `apply_topology` declared (created, or found already as specified)."""

    exchanges: tuple[str, ...]
    queues: tuple[str, ...]
    bindings: tuple[tuple[str, Binding], ...]
    """(queue name, binding) pairs, the dead-letter queue's binding included."""

    def summary(self) -> str:
        return (
            f"{len(self.exchanges)} exchanges, {len(self.queues)} queues, "
            f"{len(self.bindings)} bindings"
        )


def queue_arguments(spec: TopologySpec) -> dict[str, Any]:
    """Arguments of every saga queue; anything declaring a saga queue must pass exactly these.

    Quorum queues replicate and count deliveries; `x-delivery-limit` bounds
    poison-message redeliveries (3.10 has no default); `at-least-once`
    dead-lettering keeps a message in the saga queue until the dead-letter
    queue confirms it, and RabbitMQ only honours it with `reject-publish`.
    """
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": spec.dead_letter_exchange,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": spec.delivery_limit,
    }


def dead_letter_queue_arguments(spec: TopologySpec) -> dict[str, Any]:
    """Arguments of the dead-letter queue: replicated, bounded, overflowing to the unstorable queue.

    A dead letter the store refuses for good is rejected by the ingester, and
    one that keeps coming back (a worker that dies on it) meets the delivery
    limit; either way the broker moves it, bytes intact, through the default
    exchange to `spec.unstorable_queue`, confirmed before it leaves.
    """
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": spec.unstorable_queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-delivery-limit": spec.dead_letter_delivery_limit,
    }


def unstorable_queue_arguments() -> dict[str, Any]:
    """Arguments of the unstorable queue: replicated; nothing consumes it, nothing leaves it."""
    return {"x-queue-type": "quorum"}


async def apply_topology(connection: AbstractConnection, spec: TopologySpec) -> TopologyReport:
    """Declare `spec` on a channel of its own; safe to run on every start-up.

    A plain (non-robust) channel is used on purpose: a refused declaration
    closes the channel, and a robust channel would reopen itself and replay
    its declarations. The caller's connection stays usable either way.

    Raises `TopologyConflict` on the first entity that exists with other
    arguments; nothing that already exists is changed.
    """
    arguments = queue_arguments(spec)
    bindings: list[tuple[str, Binding]] = []
    async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
        for name in spec.exchanges:
            await _declare(
                "exchange", name, channel.declare_exchange(name, ExchangeType.TOPIC, durable=True)
            )
        await _declare(
            "exchange",
            spec.dead_letter_exchange,
            channel.declare_exchange(spec.dead_letter_exchange, ExchangeType.FANOUT, durable=True),
        )
        await _declare(
            "queue",
            spec.unstorable_queue,
            channel.declare_queue(
                spec.unstorable_queue, durable=True, arguments=unstorable_queue_arguments()
            ),
        )
        dead_letters = await _declare(
            "queue",
            spec.dead_letter_queue,
            channel.declare_queue(
                spec.dead_letter_queue, durable=True, arguments=dead_letter_queue_arguments(spec)
            ),
        )
        # A fanout exchange ignores routing keys; "" avoids aio-pika's default (the queue name).
        dead_letter_binding = Binding(spec.dead_letter_exchange, "")
        await dead_letters.bind(dead_letter_binding.exchange, dead_letter_binding.routing_key)
        bindings.append((spec.dead_letter_queue, dead_letter_binding))
        for queue_spec in spec.queues:
            queue = await _declare(
                "queue",
                queue_spec.name,
                channel.declare_queue(queue_spec.name, durable=True, arguments=arguments),
            )
            for binding in queue_spec.bindings:
                await queue.bind(binding.exchange, binding.routing_key)
                bindings.append((queue_spec.name, binding))
    return TopologyReport(
        exchanges=(*spec.exchanges, spec.dead_letter_exchange),
        queues=(
            spec.unstorable_queue,
            spec.dead_letter_queue,
            *(queue.name for queue in spec.queues),
        ),
        bindings=tuple(bindings),
    )


async def check_topology(connection: AbstractConnection, spec: TopologySpec) -> None:
    """Check passively that every exchange and queue of `spec` exists; declare nothing.

    What a worker does instead of `apply_topology` when deploy applies the
    topology: a passive declaration needs no configure permission. Bindings
    cannot be checked passively; `sagaworks topology apply` makes them.
    Raises `TopologyMissing` naming the first entity that is absent.
    """
    exchanges = (*spec.exchanges, spec.dead_letter_exchange)
    queues = (spec.dead_letter_queue, spec.unstorable_queue, *(queue.name for queue in spec.queues))
    kinds: list[tuple[EntityKind, str]] = [("exchange", name) for name in exchanges]
    kinds += [("queue", name) for name in queues]
    async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
        for kind, name in kinds:
            try:
                if kind == "exchange":
                    await channel.declare_exchange(name, passive=True)
                else:
                    await channel.declare_queue(name, passive=True)
            except ChannelNotFoundEntity as exc:
                raise TopologyMissing(kind=kind, name=name) from exc


@dataclass(frozen=True)
class Permissions:
    """A RabbitMQ user's configure, write and read regular expressions on one vhost."""

    configure: str
    write: str
    read: str

    def rabbitmqctl(self, user: str, vhost: str = "/") -> str:
        """The `rabbitmqctl set_permissions` line that grants them."""
        quoted = " ".join(
            shlex.quote(x) for x in (vhost, user, self.configure, self.write, self.read)
        )
        return f"rabbitmqctl set_permissions -p {quoted}"


def _exactly(names: list[str]) -> str:
    if not names:
        return "^$"
    return "^(" + "|".join(re.escape(name) for name in sorted(set(names))) + ")$"


_DEFAULT_EXCHANGE = "amq.default"
"""The resource name RabbitMQ checks write permission on for a publish to the "" exchange."""


def worker_permissions(spec: TopologySpec) -> Permissions:
    """What a worker that does not declare topology needs, on exactly its own names.

    Configure nothing; write to its exchanges (events, step commands, outcome
    events) and to the default exchange (dead-letter replays staged in the
    outbox, published by the sweeper when the operator's command could not);
    read its saga, port and dead-letter queues.
    """
    queues = [spec.dead_letter_queue, *(queue.name for queue in spec.queues)]
    return Permissions(
        configure="^$", write=_exactly([*spec.exchanges, _DEFAULT_EXCHANGE]), read=_exactly(queues)
    )


def operator_permissions() -> Permissions:
    """What `sagaworks dlq replay` needs: publishing to the default exchange, nothing else."""
    return Permissions(configure="^$", write=_exactly([_DEFAULT_EXCHANGE]), read="^$")


async def queue_depth(connection: AbstractConnection, name: str) -> int | None:
    """Messages ready in queue `name`, None when there is no such queue (a passive declare)."""
    async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
        try:
            queue = await channel.declare_queue(name, passive=True)
        except ChannelNotFoundEntity:
            return None
        return int(queue.declaration_result.message_count or 0)


async def _declare(kind: EntityKind, name: str, declaration: Awaitable[_T]) -> _T:
    try:
        return await declaration
    except ChannelPreconditionFailed as exc:
        raise _conflict(kind, name, str(exc.args[0]) if exc.args else "") from exc


def _conflict(kind: EntityKind, name: str, reply_text: str) -> TopologyConflict:
    match = _INEQUIVALENT_ARG.search(reply_text)
    if match is None:
        vhost = _VHOST.search(reply_text)
        return TopologyConflict(
            kind=kind,
            name=name,
            vhost=vhost["vhost"] if vhost else "/",
            argument=None,
            existing=None,
            wanted=None,
            reply_text=reply_text,
        )
    return TopologyConflict(
        kind=kind,
        name=name,
        vhost=match["vhost"],
        argument=match["argument"],
        existing=_value(match["current"]),
        wanted=_value(match["received"]),
        reply_text=reply_text,
    )


def _value(rendered: str) -> str | None:
    """`none` -> None; `'v'` and `the value 'v' of type 't'` -> `v`; anything else as is."""
    match = _VALUE.match(rendered)
    if match is None:
        return rendered
    if match["typed"] is not None:
        return str(match["typed"])
    if match["plain"] is not None:
        return str(match["plain"])
    return None
