"""Use cases on dead letters: ingest them from the broker, then edit, replay, archive, purge.

Ingestion turns a message from the dead-letter queue into a row of the store,
using the broker's `x-death` record for where and why it failed. Replay sends
a letter back to the one queue that failed (through the default exchange, not
its original exchange, which would fan it out to every bound queue again),
with its original message id, so the saga's inbox makes a repeated replay a
no-op. Every operator action leaves an audit row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ValidationError

from sagaworks.application.dead_letter_ports import (
    AuditRecord,
    DeadLetterFilter,
    DeadLetterRepository,
    StoredDeadLetter,
)
from sagaworks.application.ports import Clock, DeadLetter, InboundMessage, Publisher, Store
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.results import Handled
from sagaworks.application.wire import CE_PREFIX, read_attribute
from sagaworks.domain.decide import RunStep

__all__ = [
    "REPLAY_HEADER",
    "DeadLetterError",
    "EditDeadLetter",
    "EmptySelection",
    "IngestDeadLetter",
    "InvalidBody",
    "LastErrors",
    "NoSchema",
    "QueueOwner",
    "ReplayDeadLetters",
    "ReplayReport",
    "UnknownDeadLetter",
    "archive_dead_letters",
    "envelope_headers",
    "purge_dead_letters",
    "replay_properties",
    "resolve_selection",
    "schema_for",
    "set_path",
]

REPLAY_HEADER = "x-sagaworks-replay"
"""Which replay of a dead letter a message is (1, 2, …): a failure after a replay is new."""

_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-")


class DeadLetterError(Exception):
    """An operator's request that cannot be carried out; the message says what to do."""


class UnknownDeadLetter(DeadLetterError):
    def __init__(self, missing: Sequence[int]) -> None:
        listed = ", ".join(str(i) for i in missing)
        super().__init__(
            f"no dead letter with id {listed}; `sagaworks dlq list --status all` shows the ids"
        )


class EmptySelection(DeadLetterError):
    def __init__(self) -> None:
        super().__init__(
            "no dead letter matches the selection; widen the filters "
            "(--status all includes replayed and archived letters)"
        )


class NoSchema(DeadLetterError):
    pass


class InvalidBody(DeadLetterError):
    """The edited body does not satisfy the message's schema; nothing was saved."""


# --- ingestion --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QueueOwner:
    """Who consumes a queue: a saga (its events) or the step runner (port commands)."""

    saga_type: str | None = None
    runs_steps: bool = False


class LastErrors:
    """The last handler error per (queue, message id), bounded, oldest forgotten first.

    RabbitMQ cannot attach an error to a nack, so a message dead-lettered over
    the delivery limit carries no cause; the worker that saw it fail can still
    say which exception it was when it ingests the dead letter.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._errors: OrderedDict[tuple[str, str], tuple[str, str]] = OrderedDict()

    def remember(self, queue: str, message_id: str, error: BaseException) -> None:
        key = (queue, message_id)
        self._errors[key] = (type(error).__name__, str(error))
        self._errors.move_to_end(key)
        while len(self._errors) > self._size:
            self._errors.popitem(last=False)

    def get(self, queue: str, message_id: str) -> tuple[str, str] | None:
        return self._errors.get((queue, message_id))


@dataclass(frozen=True, slots=True)
class _Death:
    queue: str
    reason: str
    exchange: str
    routing_key: str
    time: datetime | None


def _death(inbound: InboundMessage) -> _Death:
    """Where and why the message died: the newest `x-death` entry (the list is newest-first)."""
    headers = inbound.headers
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        newest = deaths[0]
        keys = newest.get("routing-keys") or [inbound.routing_key]
        when = newest.get("time")
        return _Death(
            queue=str(newest.get("queue") or "unknown"),
            reason=str(newest.get("reason") or "unknown"),
            exchange=str(newest.get("exchange") or ""),
            routing_key=str(keys[0]),
            time=_parse_time(when) if isinstance(when, str) else None,
        )
    return _Death(
        queue=str(headers.get("x-first-death-queue") or "unknown"),
        reason=str(headers.get("x-first-death-reason") or "unknown"),
        exchange=str(headers.get("x-first-death-exchange") or ""),
        routing_key=inbound.routing_key,
        time=None,
    )


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


_BROKER_CAUSES = {
    "rejected": ("Rejected", "a consumer rejected the message without requeueing it"),
    "expired": ("MessageExpired", "the message's time-to-live ran out in the queue"),
    "maxlen": ("QueueFull", "the queue was at its length limit"),
}


def envelope_headers(inbound: InboundMessage) -> dict[str, Any]:
    """The headers plus the CloudEvents attributes that came only as AMQP properties.

    The store keeps headers, not properties; with the attributes as
    `cloudEvents_*` headers (the binding's own form) a replay loses none of them.
    """
    headers = dict(inbound.headers)
    attributes = {
        "id": inbound.message_id,
        "type": inbound.message_type,
        "source": inbound.source,
        "time": inbound.time.isoformat() if inbound.time else None,
        "correlationid": inbound.correlation_id,
        "causationid": inbound.causation_id,
    }
    for name, value in attributes.items():
        if value and read_attribute(name, headers) is None:
            headers[f"{CE_PREFIX}{name}"] = value
    return headers


class IngestDeadLetter:
    """One message from the dead-letter queue into the store; the caller acks after commit.

    Idempotent: the store counts a failure again only when its headers differ
    (a redelivered dead letter carries the same `x-death`; a replayed message
    that fails again carries a new one and another replay number).
    """

    def __init__(
        self,
        store: Store,
        clock: Clock,
        owners: Mapping[str, QueueOwner],
        last_errors: LastErrors,
    ) -> None:
        self._store = store
        self._clock = clock
        self._owners = owners
        self._last_errors = last_errors

    async def __call__(self, inbound: InboundMessage) -> Handled:
        death = _death(inbound)
        message_id = inbound.message_id or _content_id(inbound)
        handler, saga_type = self._handler(death.queue, inbound.body)
        exception_type, exception_message = self._cause(death, message_id, inbound)
        original = replace(
            inbound,
            message_id=message_id,
            queue=death.queue,
            exchange=death.exchange,
            routing_key=death.routing_key,
        )
        letter = DeadLetter(
            original,
            death.reason,
            exception_type,
            exception_message,
            handler=handler,
            saga_type=saga_type,
        )
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, death.time or self._clock.now())
        return Handled("applied", death.reason)

    def _handler(self, queue: str, body: bytes) -> tuple[str | None, str | None]:
        owner = self._owners.get(queue)
        if owner is None:
            return None, None
        if not owner.runs_steps:
            return owner.saga_type, owner.saga_type
        try:
            command = RunStep.model_validate_json(body)
        except ValidationError:
            return "run_step", None
        return f"{command.saga_type}.{command.step}.{command.kind}", command.saga_type

    def _cause(self, death: _Death, message_id: str, inbound: InboundMessage) -> tuple[str, str]:
        if death.reason == "delivery_limit":
            seen = self._last_errors.get(death.queue, message_id)
            if seen is not None:
                return seen
            deliveries = inbound.headers.get("x-delivery-count")
            times = f" {deliveries} times" if isinstance(deliveries, int) else ""
            return (
                "DeliveryLimitExceeded",
                f"returned to the queue{times} without being acknowledged "
                "(x-delivery-limit); the handler's error was not seen by the ingesting worker",
            )
        return _BROKER_CAUSES.get(death.reason, ("DeadLettered", f"broker reason {death.reason}"))


def _content_id(inbound: InboundMessage) -> str:
    """A stable id for a message that has none, so its redeliveries still dedupe."""
    deaths = json.dumps(inbound.headers.get("x-death"), sort_keys=True, default=str)
    digest = hashlib.sha256(inbound.body + deaths.encode()).hexdigest()[:24]
    return f"no-id:{digest}"


# --- selection --------------------------------------------------------------------------------


async def resolve_selection(repo: DeadLetterRepository, selection: DeadLetterFilter) -> list[int]:
    """The ids an action applies to; unknown explicit ids and an empty result are errors."""
    ids = await repo.ids(selection)
    if selection.ids:
        missing = sorted(set(selection.ids) - set(ids))
        if missing:
            known = await repo.ids(DeadLetterFilter(ids=tuple(missing), statuses=()))
            unknown = sorted(set(missing) - set(known))
            if unknown:
                raise UnknownDeadLetter(unknown)
    if not ids:
        raise EmptySelection()
    return ids


# --- replay -----------------------------------------------------------------------------------


def replay_properties(letter: StoredDeadLetter, replay: int) -> dict[str, Any]:
    """The outbox `headers` (AMQP properties) of a replay: broker death records stripped."""
    headers: dict[str, Any] = {
        key: value
        for key, value in letter.headers.items()
        if key not in _BROKER_HEADERS and not key.startswith(_BROKER_PREFIXES)
    }
    headers[REPLAY_HEADER] = replay
    timestamp = read_attribute("time", headers)
    return {
        "message_id": letter.message_id,
        "type": letter.message_type or read_attribute("type", headers),
        "app_id": read_attribute("source", headers),
        "correlation_id": read_attribute("correlationid", headers),
        "content_type": read_attribute("datacontenttype", headers) or "application/json",
        "timestamp": timestamp if timestamp and _parse_time(timestamp) else None,
        "headers": headers,
    }


@dataclass(frozen=True, slots=True)
class ReplayReport:
    batch_id: UUID
    selected: int
    replayed: int
    failed_id: int | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": str(self.batch_id),
            "selected": self.selected,
            "replayed": self.replayed,
            "failed_id": self.failed_id,
            "error": self.error,
        }


Progress = Callable[[int, int], None]
"""Called with (replayed so far, selected)."""


class ReplayDeadLetters:
    """Replay letters one at a time, paced, stopping at the first publish that fails.

    Each letter: write an outbox row (exchange "" and the failed queue as
    routing key, so only that queue receives it), publish it with a confirm,
    and only then mark the letter replayed. A run killed half-way leaves the
    rest `active`; running it again replays them, and a message sent twice is
    one message to the saga's inbox.
    """

    def __init__(self, repo: DeadLetterRepository, publisher: Publisher) -> None:
        self._repo = repo
        self._publisher = publisher

    async def __call__(
        self,
        ids: Sequence[int],
        *,
        operator: str,
        rate: float | None = None,
        progress: Progress | None = None,
    ) -> ReplayReport:
        batch = uuid4()
        interval = 1.0 / rate if rate else 0.0
        started = time.monotonic()
        replayed = 0
        for position, letter_id in enumerate(ids):
            if interval:
                await asyncio.sleep(max(0.0, started + position * interval - time.monotonic()))
            letter = await self._repo.get(letter_id)
            if letter is None:
                continue
            replay = letter.times_replayed + 1
            key = f"{letter.message_id}#replay-{letter.id}-{replay}"
            row = await self._repo.stage_replay(letter, key, replay_properties(letter, replay))
            detail = {"queue": letter.queue, "outbox_message_id": key, "replay": replay}
            try:
                await self._publisher.publish([row])
            except Exception as error:  # noqa: BLE001 - any failed publish stops the batch
                text = f"{type(error).__name__}: {error}"
                audit = AuditRecord(operator, "replay", batch, "failed", {**detail, "error": text})
                await self._repo.abandon_replay(letter.id, row.id, audit)
                return ReplayReport(batch, len(ids), replayed, letter.id, text)
            audit = AuditRecord(operator, "replay", batch, "replayed", detail)
            await self._repo.confirm_replay(letter.id, row.id, audit)
            replayed += 1
            if progress is not None:
                progress(replayed, len(ids))
        return ReplayReport(batch, len(ids), replayed)


# --- edit -------------------------------------------------------------------------------------


def schema_for(registry: SagaRegistry, letter: StoredDeadLetter) -> type[BaseModel]:
    """The pydantic model the letter's consumer validates it against."""
    message_type = letter.message_type or ""
    if message_type == RunStep.message_type:
        return RunStep
    definitions = list(registry)
    preferred = [d for d in definitions if d.name == letter.saga_type]
    for definition in preferred + definitions:
        event = definition.event_type(message_type)
        if event is not None:
            return event
    raise NoSchema(
        f'no registered saga consumes type "{message_type or "(none)"}", so dead letter '
        f"{letter.id} cannot be validated; check SAGAWORKS_SAGAS"
    )


def set_path(document: Any, path: str, value: Any) -> Any:
    """`document` with the value at a dotted path (`lines.0.quantity`) replaced or added."""
    head, _, rest = path.partition(".")
    if not head:
        raise DeadLetterError(f'"{path}" is not a field path; write e.g. lines.0.quantity=2')
    if isinstance(document, list):
        if not head.isdigit() or int(head) >= len(document):
            raise DeadLetterError(f'"{head}" is not an index of a list of {len(document)} items')
        copy: Any = list(document)
        index: Any = int(head)
    elif isinstance(document, dict):
        copy, index = dict(document), head
    else:
        raise DeadLetterError(f'cannot set "{path}": the value there is not an object or a list')
    if not rest:
        copy[index] = value
    elif isinstance(copy, dict) and index not in copy:
        raise DeadLetterError(f'cannot set "{path}": there is no field "{head}" to go into')
    else:
        copy[index] = set_path(copy[index], rest, value)
    return copy


class EditDeadLetter:
    """Replace a letter's body after checking it against the message's schema."""

    def __init__(self, repo: DeadLetterRepository, registry: SagaRegistry) -> None:
        self._repo = repo
        self._registry = registry

    async def load(self, letter_id: int) -> StoredDeadLetter:
        letter = await self._repo.get(letter_id)
        if letter is None:
            raise UnknownDeadLetter([letter_id])
        return letter

    async def __call__(
        self, letter: StoredDeadLetter, body: bytes, *, operator: str, how: Mapping[str, Any]
    ) -> None:
        model = schema_for(self._registry, letter)
        batch = uuid4()
        try:
            model.model_validate_json(body)
        except ValidationError as error:
            problems = _validation_lines(error)
            audit = AuditRecord(operator, "edit", batch, "refused", {**how, "errors": problems})
            await self._repo.audit([letter.id], audit)
            raise InvalidBody(
                f"the edited body of dead letter {letter.id} does not match "
                f"{model.__name__}: {'; '.join(problems)}; nothing was saved"
            ) from None
        await self._repo.save_body(
            letter.id, body, AuditRecord(operator, "edit", batch, "saved", how)
        )


def _validation_lines(error: ValidationError) -> list[str]:
    return [
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in error.errors()[:10]
    ]


# --- archive and purge ------------------------------------------------------------------------


async def archive_dead_letters(
    repo: DeadLetterRepository, ids: Sequence[int], operator: str
) -> int:
    return await repo.archive(ids, AuditRecord(operator, "archive", uuid4(), "archived"))


async def purge_dead_letters(repo: DeadLetterRepository, ids: Sequence[int], operator: str) -> int:
    return await repo.purge(ids, AuditRecord(operator, "purge", uuid4(), "purged"))
