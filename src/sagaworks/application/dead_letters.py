"""Use cases on dead letters: ingest them from the broker, then edit, replay, archive, purge.

Ingestion turns a message from the dead-letter queue into a row of the store,
using its newest `PriorFailure` for where and why it failed. Replay sends
a letter back to the one queue that failed (through the default exchange, not
its original exchange, which would fan it out to every bound queue again),
with its original message id, so the saga's inbox makes a repeated replay a
no-op; only to a queue the topology declares, since the failed queue is what
the letter's x-death header says. Every operator action leaves an audit row.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from typing import Any
from uuid import UUID, uuid4

from pydantic import BaseModel, ValidationError

from sagaworks.application.ports import (
    AuditRecord,
    Clock,
    DeadLetterFilter,
    DeadLetterRepository,
    InboundMessage,
    PriorFailure,
    Publisher,
    Store,
    StoredDeadLetter,
)
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.results import Handled
from sagaworks.application.stored import dead_letter
from sagaworks.application.wire import resend_envelope
from sagaworks.domain.decide import RunStep

__all__ = [
    "REPLAY_HEADER",
    "ArchiveDeadLetters",
    "DeadLetterError",
    "EditDeadLetter",
    "EmptySelection",
    "IngestDeadLetter",
    "InvalidBody",
    "LastErrors",
    "NoSchema",
    "PurgeDeadLetters",
    "QueueOwner",
    "ReplayDeadLetters",
    "ReplayReport",
    "UndeclaredQueue",
    "UnknownDeadLetter",
    "replay_envelope",
    "resolve_selection",
    "schema_for",
    "set_path",
    "undeclared_queues",
    "where_it_failed",
]

REPLAY_HEADER = "x-sagaworks-replay"
"""Which replay of a dead letter a message is (1, 2, …): a failure after a replay is new."""


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


class UndeclaredQueue(DeadLetterError):
    """A letter says it failed in a queue sagaworks does not declare; nothing was sent."""

    def __init__(self, strays: Mapping[str, Sequence[int]]) -> None:
        queues = "; ".join(
            f'"{queue}" (dead letter {", ".join(map(str, ids))})'
            for queue, ids in sorted(strays.items())
        )
        first = min(i for ids in strays.values() for i in ids)
        super().__init__(
            f"refusing to replay to {queues}: not a queue the topology declares (the queues "
            "of the sagas in SAGAWORKS_SAGAS and of their ports, under SAGAWORKS_EXCHANGE_PREFIX)"
            "; the failed queue comes from the letter's x-death header, which whoever published "
            "to the dead-letter queue could write. Nothing was sent. Check the settings match "
            f"the worker's and look at the letter (`sagaworks dlq show {first}`); if that queue "
            "is really meant, name it with --allow-queue; otherwise set the letter aside "
            f"(`sagaworks dlq archive {first}`) or narrow the selection with --queue"
        )


def undeclared_queues(
    letters: Iterable[StoredDeadLetter], targets: Collection[str]
) -> dict[str, list[int]]:
    """The letters (by queue) a replay would send to a queue not in `targets`."""
    strays: dict[str, list[int]] = {}
    for letter in letters:
        if letter.queue not in targets:
            strays.setdefault(letter.queue, []).append(letter.id)
    return strays


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


_UNRECORDED = PriorFailure("", "", "", (), 0, None)


def _last_failure(inbound: InboundMessage) -> PriorFailure:
    """Where and why the message died: its newest recorded failure."""
    return inbound.failures[0] if inbound.failures else _UNRECORDED


_BROKER_CAUSES = {
    "rejected": ("Rejected", "a consumer rejected the message without requeueing it"),
    "expired": ("MessageExpired", "the message's time-to-live ran out in the queue"),
    "maxlen": ("QueueFull", "the queue was at its length limit"),
}


class IngestDeadLetter:
    """One message from the dead-letter queue into the store; the caller acks after commit.

    Idempotent: the store counts a failure again only when its headers differ
    (a redelivered dead letter carries the same death record; a replayed
    message that fails again carries a new one and another replay number).
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
        death = _last_failure(inbound)
        reason = death.reason or "unknown"
        original = where_it_failed(
            replace(inbound, message_id=inbound.message_id or _content_id(inbound))
        )
        queue, message_id = original.queue, original.message_id
        handler, saga_type = self._handler(queue, inbound.body)
        exception_type, exception_message = self._cause(reason, queue, message_id, inbound)
        letter = dead_letter(
            original,
            reason,
            exception_type,
            exception_message,
            handler=handler,
            saga_type=saga_type,
        )
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, death.time or self._clock.now())
        return Handled("applied", reason)

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

    def _cause(
        self, reason: str, queue: str, message_id: str, inbound: InboundMessage
    ) -> tuple[str, str]:
        if reason == "delivery_limit":
            seen = self._last_errors.get(queue, message_id)
            if seen is not None:
                return seen
            deliveries = inbound.delivery_count
            times = f" {deliveries} times" if deliveries else ""
            return (
                "DeliveryLimitExceeded",
                f"returned to the queue{times} without being acknowledged "
                "(x-delivery-limit); the handler's error was not seen by the ingesting worker",
            )
        return _BROKER_CAUSES.get(reason, ("DeadLettered", f"broker reason {reason}"))


def where_it_failed(inbound: InboundMessage) -> InboundMessage:
    """A dead letter as the queue that failed it received it: that queue, exchange, key."""
    death = _last_failure(inbound)
    return replace(
        inbound,
        queue=death.queue or "unknown",
        exchange=death.exchange,
        routing_key=death.routing_keys[0] if death.routing_keys else inbound.routing_key,
    )


def _content_id(inbound: InboundMessage) -> str:
    """A stable id for a message that has none, so its redeliveries still dedupe."""
    deaths = json.dumps([astuple(f) for f in inbound.failures], default=str)
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


def replay_envelope(letter: StoredDeadLetter, replay: int) -> dict[str, Any]:
    """The outbox envelope of a replay: the letter as it came, with its original id, numbered.

    The publisher drops what the broker wrote on the message when it failed.
    """
    return resend_envelope(
        letter.message_id, letter.message_type, {**letter.headers, REPLAY_HEADER: replay}
    )


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

    def __init__(
        self, repo: DeadLetterRepository, publisher: Publisher, targets: Collection[str]
    ) -> None:
        self._repo = repo
        self._publisher = publisher
        self._targets = frozenset(targets)
        """The only queues a replay may send to: those the topology declares (and any the
        operator named); a letter's failed queue is whatever its x-death header said."""

    async def __call__(
        self,
        ids: Sequence[int],
        *,
        operator: str,
        rate: float | None = None,
        progress: Progress | None = None,
    ) -> ReplayReport:
        batch = uuid4()
        await self.refuse_undeclared(ids, operator, batch)
        interval = 1.0 / rate if rate else 0.0
        started = time.monotonic()
        replayed = 0
        for position, letter_id in enumerate(ids):
            if interval:
                await asyncio.sleep(max(0.0, started + position * interval - time.monotonic()))
            letter = await self._repo.get(letter_id)
            if letter is None:
                continue
            error = await self.replay_one(letter, operator, batch)
            if error is not None:
                return ReplayReport(batch, len(ids), replayed, letter.id, error)
            replayed += 1
            if progress is not None:
                progress(replayed, len(ids))
        return ReplayReport(batch, len(ids), replayed)

    async def replay_one(self, letter: StoredDeadLetter, operator: str, batch: UUID) -> str | None:
        """Stage, publish and confirm one letter's replay; the error if the publish failed."""
        replay = letter.times_replayed + 1
        key = f"{letter.message_id}#replay-{letter.id}-{replay}"
        row = await self._repo.stage_replay(letter, key, replay_envelope(letter, replay))
        detail = {"queue": letter.queue, "outbox_message_id": key, "replay": replay}
        try:
            await self._publisher.publish([row])
        except Exception as error:  # noqa: BLE001 - any failed publish is reported
            text = f"{type(error).__name__}: {error}"
            audit = AuditRecord(operator, "replay", batch, "failed", {**detail, "error": text})
            await self._repo.abandon_replay(letter.id, row.id, audit)
            return text
        audit = AuditRecord(operator, "replay", batch, "replayed", detail)
        await self._repo.confirm_replay(letter.id, row.id, audit)
        return None

    async def refuse_undeclared(self, ids: Sequence[int], operator: str, batch: UUID) -> None:
        """Check every letter before sending any; audit and refuse the whole run otherwise."""
        selection = DeadLetterFilter(ids=tuple(ids), statuses=())
        letters = await self._repo.find(selection, limit=max(len(ids), 1))
        strays = undeclared_queues(letters, self._targets)
        if not strays:
            return
        for queue, stray_ids in strays.items():
            audit = AuditRecord(
                operator, "replay", batch, "refused", {"queue": queue, "why": "undeclared_queue"}
            )
            await self._repo.audit(stray_ids, audit)
        raise UndeclaredQueue(strays)


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


class ArchiveDeadLetters:
    """Set letters aside: kept and audited, out of the default list."""

    def __init__(self, repo: DeadLetterRepository) -> None:
        self._repo = repo

    async def __call__(self, ids: Sequence[int], operator: str) -> int:
        return await self._repo.archive(ids, AuditRecord(operator, "archive", uuid4(), "archived"))


class PurgeDeadLetters:
    """Delete letters for good; their audit rows remain."""

    def __init__(self, repo: DeadLetterRepository) -> None:
        self._repo = repo

    async def __call__(self, ids: Sequence[int], operator: str) -> int:
        return await self._repo.purge(ids, AuditRecord(operator, "purge", uuid4(), "purged"))
