"""Use case: an event from another service reaches a saga."""

from __future__ import annotations

from typing import Any

from sagaworks.application.inbound import Rejected, envelope_of, parse_event
from sagaworks.application.options import EngineOptions
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import Clock, DeadLetter, InboundMessage, Store
from sagaworks.application.results import Handled
from sagaworks.application.transition import apply_input
from sagaworks.domain.decide import EventReceived
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import saga_id_for

__all__ = ["HandleEvent"]


class HandleEvent:
    """One transaction per event: lock, dedupe, decide, persist; publish after commit."""

    def __init__(
        self, store: Store, relay: OutboxRelay, clock: Clock, options: EngineOptions
    ) -> None:
        self._store = store
        self._relay = relay
        self._clock = clock
        self._options = options

    async def __call__(self, definition: SagaDefinition[Any], inbound: InboundMessage) -> Handled:
        message = parse_event(definition, inbound, self._options.max_message_bytes)
        if isinstance(message, Rejected):
            return await self._reject(definition, inbound, message)
        key = definition.correlation_key(message)
        saga_id = saga_id_for(definition.name, key)
        async with self._store.transaction() as tx:
            locked = await tx.lock_saga(definition, saga_id, message_id=inbound.message_id)
            if locked.duplicate:
                return Handled("duplicate", saga_id=str(saga_id))
            now = self._clock.now()
            given = EventReceived(envelope_of(inbound, now), message)
            decision = await apply_input(tx, definition, locked, given, now)
            if decision.outcome == "park":
                expires_at = now + self._options.park_for
                await tx.park(definition.name, saga_id, key, inbound, decision.reason, expires_at)
            rows = tx.written_outbox()
        await self._relay.publish_now(rows)
        outcome = "parked" if decision.outcome == "park" else decision.outcome
        return Handled(outcome, decision.reason, str(saga_id))

    async def _reject(
        self, definition: SagaDefinition[Any], inbound: InboundMessage, why: Rejected
    ) -> Handled:
        letter = DeadLetter(
            inbound,
            why.reason,
            why.exception_type,
            why.exception_message,
            handler=definition.name,
            saga_type=definition.name,
        )
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, self._clock.now())
        return Handled("dead_lettered", why.reason)
