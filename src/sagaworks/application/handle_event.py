"""Use case: an event from another service reaches a saga."""

from __future__ import annotations

from typing import Any

from sagaworks.application.apply_inputs import ApplyInputs, Arrival
from sagaworks.application.boundary import Boundary
from sagaworks.application.config import EngineOptions
from sagaworks.application.parsing import Rejected, envelope_of, parse_event
from sagaworks.application.ports import Clock, InboundMessage, Store
from sagaworks.application.results import Handled
from sagaworks.application.stored import body_hash, dead_letter
from sagaworks.domain.decide import EventReceived
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import saga_id_for

__all__ = ["HandleEvent"]


class HandleEvent:
    """Parse and route an event to its saga; `ApplyInputs` decides, persists and publishes."""

    def __init__(
        self,
        store: Store,
        apply: ApplyInputs,
        clock: Clock,
        options: EngineOptions,
        boundary: Boundary,
    ) -> None:
        self._store = store
        self._apply = apply
        self._clock = clock
        self._options = options
        self._boundary = boundary

    async def __call__(self, definition: SagaDefinition[Any], inbound: InboundMessage) -> Handled:
        message = parse_event(definition, inbound, self._options.max_message_bytes, self._boundary)
        if isinstance(message, Rejected):
            return await self._reject(definition, inbound, message)
        key = definition.correlation_key(message)
        saga_id = saga_id_for(definition.name, key)
        given = EventReceived(envelope_of(inbound, self._clock.now()), message)
        return await self._apply(
            Arrival(
                definition,
                saga_id,
                key,
                given,
                inbound.message_id,
                parkable=inbound,
                body_hash=body_hash(inbound.body),
                delivery=inbound,
                trace_context=inbound.trace_context,
            )
        )

    async def _reject(
        self, definition: SagaDefinition[Any], inbound: InboundMessage, why: Rejected
    ) -> Handled:
        letter = dead_letter(
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
