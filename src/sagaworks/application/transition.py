"""Applying one input to one locked saga, and then any events parked for it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sagaworks.application.inbound import Rejected, envelope_of, parse_event
from sagaworks.application.ports import LockedSaga, SagaTransaction
from sagaworks.application.stored import dead_letter
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import Decision, EventReceived, Input, decide
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import SagaInstance

__all__ = ["apply_input"]

_NO_LIMIT = 1 << 62


async def apply_input(
    tx: SagaTransaction,
    wire: Wire,
    definition: SagaDefinition[Any],
    locked: LockedSaga,
    given: Input,
    now: datetime,
) -> Decision:
    """Decide and persist; after a transition, retry the events that waited for it."""
    decision = decide(definition, locked.instance, given, now)
    if decision.outcome == "applied":
        await tx.save(wire.change(definition, decision))
        assert decision.instance is not None
        if locked.has_parked:
            await _replay_parked(tx, wire, definition, decision.instance, now)
    return decision


async def _replay_parked(
    tx: SagaTransaction,
    wire: Wire,
    definition: SagaDefinition[Any],
    instance: SagaInstance,
    now: datetime,
) -> None:
    parked = await tx.parked_for(instance.id)
    progressed = True
    while parked and progressed:
        progressed = False
        for item in list(parked):
            message = parse_event(definition, item.inbound, _NO_LIMIT)
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
            if decision.outcome == "park":
                continue
            if decision.outcome == "applied":
                await tx.save(wire.change(definition, decision))
                assert decision.instance is not None
                instance = decision.instance
            await tx.unpark([item.id])
            parked.remove(item)
            progressed = True
