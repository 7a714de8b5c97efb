"""Use case: apply inputs to their sagas, many sagas per transaction.

Every message that changes a saga comes through here: events from other
services, and the results of port calls. Inputs that arrive together share
one transaction (lock every saga in one order, record every inbox row, read
every saga, write every transition as one statement, commit) and one
pipelined publish of the outbox rows it wrote; only then is each input's
result handed back, and only then is its delivery acknowledged.

The batch gives up its place (a connection, its sagas) at commit, not after
the publish: waiting for the broker's confirms takes longer than the
transaction, and the next batch need not wait for them.

Step commands this worker can run at once (`eager.py`) are written with a
lease instead of being published, and start running as soon as the batch
committed; the inputs that caused them do not wait for them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sagaworks.application.batching import Batcher
from sagaworks.application.config import EngineOptions
from sagaworks.application.eager import EagerStep, EagerSteps
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.parsing import Rejected, envelope_of, parse_event
from sagaworks.application.ports import (
    Clock,
    DeadLetter,
    FinishedSaga,
    InboundMessage,
    LockedSaga,
    OutboxRow,
    ParkedMessage,
    SagaClaim,
    SagaTransaction,
    Store,
    Telemetry,
)
from sagaworks.application.results import Handled
from sagaworks.application.stored import dead_letter
from sagaworks.application.tracing import continued_trace, finished_saga
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import Decision, EventReceived, Input, decide
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance, Status

__all__ = ["ApplyInputs", "Arrival", "apply_to_locked_saga"]

_NO_LIMIT = 1 << 62
"""Parked events were size- and boundary-checked when they arrived."""

Published = asyncio.Future[bool]
"""The batch's publish after commit; `OutboxRelay.publish_now` never raises."""


@dataclass(frozen=True, slots=True)
class Arrival:
    """One input for one saga, and the message that carried it."""

    definition: SagaDefinition[Any]
    saga_id: UUID
    correlation_key: str
    given: Input
    message_id: str
    """Recorded in the saga's inbox: the same message id again is a duplicate."""
    parkable: InboundMessage | None = None
    """An event kept for later when its saga cannot take it yet; None for a port's result."""
    known: SagaInstance | None = None
    """The saga as read before the port call; spares decoding it again if nothing changed."""
    body_hash: bytes | None = None
    """Recorded with `message_id`: the same id again with another hash is an `id_conflict`."""
    delivery: InboundMessage | None = None
    """The delivery that carried the input: its body goes to the inbox with `body_hash`."""
    trace_context: str | None = None
    """The `traceparent` of the work that brought the input (see `tracing.py`)."""

    def claim(self) -> SagaClaim:
        """The saga to lock, and the message (id, body hash, body) to record in its inbox."""
        body = None if self.delivery is None else self.delivery.body
        return SagaClaim(
            self.definition, self.saga_id, self.message_id, self.known, self.body_hash, body
        )


class ApplyInputs:
    def __init__(
        self,
        store: Store,
        relay: OutboxRelay,
        clock: Clock,
        options: EngineOptions,
        wire: Wire,
        telemetry: Telemetry,
        eager: EagerSteps | None = None,
    ) -> None:
        self._store = store
        self._telemetry = telemetry
        self._relay = relay
        self._clock = clock
        self._options = options
        self._wire = wire
        self._eager = eager
        """Runs the step commands it can here, after commit, instead of publishing them."""
        self._batches: Batcher[Arrival, tuple[Handled, Published]] = Batcher(
            self._apply,
            size=options.batch_size,
            concurrency=options.batch_concurrency,
            key=lambda arrival: arrival.saga_id,
        )

    async def __call__(self, arrival: Arrival) -> Handled:
        settled, published = await self._batches.submit(arrival)
        await asyncio.shield(published)
        return settled

    async def _apply(self, arrivals: Sequence[Arrival]) -> list[tuple[Handled, Published]]:
        eager: list[EagerStep] = []
        try:
            decisions, conflicts, rows, finished = await self._commit(arrivals, eager)
        except BaseException:
            if self._eager is not None:
                self._eager.release(eager)
            raise
        if finished:
            self._telemetry.sagas_finished(finished)
        if self._eager is not None and eager:
            rows = self._eager.start(eager, rows)
        published = asyncio.ensure_future(self._relay.publish_now(rows))
        return [
            (_handled(a, d, conflicting=i in conflicts), published)
            for i, (a, d) in enumerate(zip(arrivals, decisions, strict=True))
        ]

    async def _commit(
        self, arrivals: Sequence[Arrival], eager: list[EagerStep]
    ) -> tuple[list[Decision | None], set[int], list[OutboxRow], list[FinishedSaga]]:
        """One transaction for the batch; the step commands to run here are added to `eager`."""
        async with self._store.transaction() as tx:
            locked = await tx.lock_sagas([a.claim() for a in arrivals])
            now = self._clock.now()
            decisions: list[Decision | None] = [None] * len(arrivals)
            conflicts: set[int] = set()
            applied = []
            finished: list[FinishedSaga] = []
            for i, (arrival, saga) in enumerate(zip(arrivals, locked, strict=True)):
                if saga.duplicate and _conflicts(arrival, saga):
                    conflicts.add(i)
                    await tx.dead_letter(_id_conflict(arrival, saga), now)
                if saga.duplicate or saga.has_parked:
                    continue
                decision = decide(arrival.definition, saga.instance, arrival.given, now)
                decisions[i] = decision
                if decision.outcome == "applied":
                    trace = continued_trace(arrival.trace_context, saga.trace_context)
                    change = self._wire.change(arrival.definition, decision, trace)
                    if self._eager is not None:
                        change, steps = self._eager.claim(arrival.definition, decision, change)
                        eager.extend(steps)
                    applied.append(change)
                    if (end := finished_saga(saga, decision)) is not None:
                        finished.append(end)
            if applied:
                await tx.save_all(applied)
            for seen in decisions:
                if seen is not None:
                    await _note_ignored(tx, seen)
            for i, (arrival, saga) in enumerate(zip(arrivals, locked, strict=True)):
                if saga.has_parked and not saga.duplicate:  # rare: replays what it unblocks
                    replayed = await apply_to_locked_saga(
                        tx,
                        self._wire,
                        arrival.definition,
                        saga,
                        arrival.given,
                        now,
                        arrival.trace_context,
                    )
                    decisions[i] = replayed
                    if (end := finished_saga(saga, replayed)) is not None:
                        finished.append(end)
                parked = decisions[i]
                if parked is not None and parked.outcome == "park" and arrival.parkable:
                    await tx.park(
                        arrival.definition.name,
                        arrival.saga_id,
                        arrival.correlation_key,
                        arrival.parkable,
                        parked.reason,
                        now + self._options.park_for,
                    )
            rows = tx.written_outbox()
        return decisions, conflicts, rows, finished


def _conflicts(arrival: Arrival, saga: LockedSaga) -> bool:
    """A repeated id whose body differs from the one processed first (unknown hash: no)."""
    first = saga.first_body_hash
    return first is not None and arrival.body_hash is not None and first != arrival.body_hash


def _id_conflict(arrival: Arrival, saga: LockedSaga) -> DeadLetter:
    """Both bodies in the letter: the conflicting one as its body, the first as `first_body`.

    The hashes are in its message too: a first body the inbox did not keep is
    still identified.
    """
    assert arrival.delivery is not None, "an arrival with a body hash carries its delivery"
    assert saga.first_body_hash is not None
    assert arrival.body_hash is not None
    return dead_letter(
        arrival.delivery,
        "id_conflict",
        "MessageIdConflict",
        f'message id "{arrival.message_id}" was processed before with another body '
        f"(blake2b-128 of the first body: {saga.first_body_hash.hex()}; of this body: "
        f"{arrival.body_hash.hex()}); this body was not applied (`sagaworks dlq show` "
        "displays both). A publisher must give every distinct message its own id",
        handler=arrival.definition.name,
        saga_type=arrival.definition.name,
        first_body=saga.first_body,
    )


def _handled(arrival: Arrival, decision: Decision | None, *, conflicting: bool) -> Handled:
    saga_id = str(arrival.saga_id)
    if conflicting:
        return Handled("dead_lettered", "id_conflict", saga_id)
    if decision is None:
        return Handled("duplicate", saga_id=saga_id)
    if decision.outcome == "park":
        return Handled("parked", decision.reason, saga_id)
    return Handled(decision.outcome, decision.reason, saga_id)


async def apply_to_locked_saga(
    tx: SagaTransaction,
    wire: Wire,
    definition: SagaDefinition[Any],
    locked: LockedSaga,
    given: Input,
    now: datetime,
    trace_context: str | None,
) -> Decision:
    """One input to one saga locked by `tx`: decide and persist, then retry what it unblocks.

    The route for inputs that cannot share a batch statement: due timers, and
    sagas with parked events, which a transition may make ready.
    """
    decision = decide(definition, locked.instance, given, now)
    await _note_ignored(tx, decision)
    if decision.outcome == "applied":
        trace = continued_trace(trace_context, locked.trace_context)
        await tx.save(wire.change(definition, decision, trace))
        assert decision.instance is not None
        if locked.has_parked:
            await _replay_parked(tx, wire, definition, decision.instance, now, trace)
    return decision


async def _note_ignored(tx: SagaTransaction, decision: Decision) -> None:
    """An ignored input's history entries (why an event was ignored), in its transaction."""
    if decision.outcome == "ignored" and decision.history and decision.instance is not None:
        await tx.append_history(decision.instance.id, decision.at, decision.history)


def _never_taken(
    definition: SagaDefinition[Any], instance: SagaInstance, item: ParkedMessage
) -> DeadLetter:
    """The letter of an event kept for a saga that ended without it: with the saga's outcome."""
    outcome = instance.status.value + (f" ({instance.reason})" if instance.reason else "")
    return dead_letter(
        item.inbound,
        "saga_ended",
        "SagaEnded",
        f"saga {definition.name} {instance.id} ({instance.correlation_key}) ended {outcome} "
        f"without taking this event, kept for it since it arrived ({item.reason})",
        handler=definition.name,
        saga_type=definition.name,
    )


async def _replay_parked(
    tx: SagaTransaction,
    wire: Wire,
    definition: SagaDefinition[Any],
    instance: SagaInstance,
    now: datetime,
    trace_context: str | None,
) -> None:
    """Apply what the saga can take now; once it has ended, dead-letter what it never took.

    An event leaves the park when the saga takes it, or when the saga ends
    (completed or compensated; one that needs attention lives on: a person
    may resume it). Until then it waits, however long the saga takes, also
    when the saga would ignore it now (it is compensating, say): its letter
    then says how the saga ended.
    """
    if instance.status is Status.NEEDS_ATTENTION:
        return
    parked = await tx.parked_for(instance.id)
    progressed = True
    while parked and progressed:
        progressed = False
        for item in list(parked):
            message = parse_event(definition, item.inbound, _NO_LIMIT, None)
            if isinstance(message, Rejected):
                await tx.dead_letter(
                    dead_letter(
                        item.inbound,
                        message.reason,
                        message.exception_type,
                        message.exception_message,
                        handler=definition.name,
                        saga_type=definition.name,
                    ),
                    now,
                )
                await tx.unpark([item.id])
                parked.remove(item)
                continue
            given = EventReceived(envelope_of(item.inbound, now), message)
            decision = decide(definition, instance, given, now)
            if decision.outcome == "park" or (
                decision.outcome == "ignored" and not instance.status.ended
            ):
                continue
            await _note_ignored(tx, decision)
            if decision.outcome == "ignored":
                await tx.dead_letter(_never_taken(definition, instance, item), now)
            if decision.outcome == "applied":
                await tx.save(wire.change(definition, decision, trace_context))
                assert decision.instance is not None
                instance = decision.instance
            await tx.unpark([item.id])
            parked.remove(item)
            progressed = True
