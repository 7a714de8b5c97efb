"""Use case: run one step's action or compensation on its port.

The port is called with no lock held; its result is then applied in a
transaction of its own. A repeated command (redelivery, crash) calls the port
again with the same idempotency key, so the participant sees one effect.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from sagaworks.application.apply_inputs import ApplyInputs, Arrival
from sagaworks.application.batching import Batcher
from sagaworks.application.config import EngineOptions
from sagaworks.application.ports import Clock, InboundMessage, PortCaller, Store
from sagaworks.application.registry import SagaRegistry, UnknownSaga
from sagaworks.application.results import Handled
from sagaworks.application.stored import dead_letter
from sagaworks.domain.decide import Failure, RunStep, StepFinished, idempotency_key
from sagaworks.domain.definition import SagaDefinition, StepInput
from sagaworks.domain.errors import BusinessFailure, PortUnavailable
from sagaworks.domain.instance import SagaInstance

__all__ = ["HandleStepCommand"]


class HandleStepCommand:
    def __init__(
        self,
        store: Store,
        apply: ApplyInputs,
        clock: Clock,
        registry: SagaRegistry,
        ports: Mapping[str, object],
        caller: PortCaller,
        options: EngineOptions,
    ) -> None:
        self._store = store
        self._apply = apply
        self._clock = clock
        self._registry = registry
        self._ports = ports
        self._caller = caller
        # One read in flight: each is one short statement; reads arriving meanwhile share the next.
        self._reads: Batcher[tuple[SagaDefinition[Any], UUID], SagaInstance | None] = Batcher(
            store.load_sagas, size=options.batch_size, concurrency=1
        )

    async def __call__(self, inbound: InboundMessage) -> Handled:
        try:
            command = RunStep.model_validate_json(inbound.body)
            definition = self._registry.get(command.saga_type)
        except (ValidationError, UnknownSaga) as error:
            return await self._reject(inbound, error)
        instance = await self._reads.submit((definition, command.saga_id))
        if instance is None or not _is_current(instance, command):
            return Handled("stale", saga_id=str(command.saga_id))
        finished = await self._call_port(definition, instance, command, inbound.message_id)
        handled = await self._apply(
            Arrival(
                definition,
                command.saga_id,
                instance.correlation_key,
                finished,
                inbound.message_id,
                known=instance,
            )
        )
        if handled.outcome in {"applied", "duplicate"}:
            return handled
        return replace(handled, outcome="ignored")

    async def _call_port(
        self,
        definition: SagaDefinition[Any],
        instance: SagaInstance,
        command: RunStep,
        message_id: str,
    ) -> StepFinished:
        step = definition.step(command.step)
        function = step.action if command.kind == "action" else step.compensation
        assert function is not None, "decide only compensates steps that have a compensation"
        port = self._ports[step.port]
        call = StepInput(
            saga_id=instance.id,
            correlation_key=instance.correlation_key,
            step=step.name,
            kind=command.kind,
            attempt=command.attempt,
            idempotency_key=idempotency_key(instance.id, step.name, command.kind),
            action_key=idempotency_key(instance.id, step.name, "action"),
            state=instance.state,
        )
        try:
            result = await self._caller.call(step.port, lambda: function(port, call))
        except BusinessFailure as refusal:
            return _finished(command, message_id, failure=Failure(refusal.reason, business=True))
        except (PortUnavailable, TimeoutError) as error:
            retry_at = self._caller.next_retry_at(step.port, command.attempt, self._clock.now())
            failure = Failure(f"{type(error).__name__}: {error}", business=False, retry_at=retry_at)
            return _finished(command, message_id, failure=failure)
        return _finished(command, message_id, result=result)

    async def _reject(self, inbound: InboundMessage, error: Exception) -> Handled:
        reason = "unknown_saga" if isinstance(error, UnknownSaga) else "schema_invalid"
        letter = dead_letter(inbound, reason, type(error).__name__, str(error), handler="run_step")
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, self._clock.now())
        return Handled("dead_lettered", reason)


def _is_current(instance: SagaInstance, command: RunStep) -> bool:
    flight = instance.in_flight
    return (
        flight is not None
        and flight.retry_at is None
        and (flight.step, flight.kind, flight.attempt)
        == (command.step, command.kind, command.attempt)
    )


def _finished(
    command: RunStep, message_id: str, *, result: Any = None, failure: Failure | None = None
) -> StepFinished:
    return StepFinished(
        command.step, command.kind, command.attempt, result, failure, message_id=message_id
    )
