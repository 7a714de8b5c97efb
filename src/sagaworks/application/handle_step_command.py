"""Use case: run one step's action or compensation on its port.

The port is called with no lock held; its result is then applied in a
transaction of its own. A repeated command (redelivery, crash) calls the port
again with the same idempotency key, so the participant sees one effect.
A command arrives from the port's queue, or straight from the transaction
that committed it (`run_eagerly`, see `eager.py`): both record the result
under the command's message id, so the saga's inbox applies it once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from sagaworks.application.apply_inputs import ApplyInputs, Arrival
from sagaworks.application.batching import Batcher
from sagaworks.application.boundary import Boundary
from sagaworks.application.config import EngineOptions
from sagaworks.application.eager import EagerStep
from sagaworks.application.parsing import Rejected, missing_id
from sagaworks.application.ports import (
    Clock,
    InboundMessage,
    OutboxRow,
    PortCaller,
    StepCall,
    Store,
    Telemetry,
)
from sagaworks.application.registry import SagaRegistry, UnknownSaga
from sagaworks.application.results import Handled
from sagaworks.application.stored import body_hash, dead_letter
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
        boundary: Boundary,
        telemetry: Telemetry,
    ) -> None:
        self._store = store
        self._telemetry = telemetry
        self._own_users = boundary.own_users
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
        refused = self._refused(inbound)
        if refused is not None:
            return await self._dead_letter(inbound, refused)
        try:
            command = RunStep.model_validate_json(inbound.body)
            definition = self._registry.get(command.saga_type)
        except (ValidationError, UnknownSaga) as error:
            reason = "unknown_saga" if isinstance(error, UnknownSaga) else "schema_invalid"
            return await self._dead_letter(
                inbound, Rejected(reason, type(error).__name__, str(error))
            )
        instance = await self._reads.submit((definition, command.saga_id))
        if instance is None or not _is_current(instance, command):
            return Handled("stale", saga_id=str(command.saga_id))
        if instance.paused:  # runs no step; unpausing sends the command again
            return Handled("stale", "paused", str(command.saga_id))
        finished = await self._call_port(
            definition, instance, command, inbound.message_id, inbound.trace_context
        )
        handled = await self._apply(
            Arrival(
                definition,
                command.saga_id,
                instance.correlation_key,
                finished,
                inbound.message_id,
                known=instance,
                body_hash=body_hash(inbound.body),
                delivery=inbound,
                trace_context=inbound.trace_context,
            )
        )
        if handled.outcome in {"applied", "duplicate", "dead_lettered"}:
            return handled
        return replace(handled, outcome="ignored")

    async def run_eagerly(
        self, step: EagerStep, row: OutboxRow
    ) -> Callable[[], Awaitable[Handled]]:
        """Run a step command its transition just committed, without the broker.

        Calls the port and returns how to apply the result (the caller marks that
        phase, which must not be cancelled). The saga is as that transition left it
        (no read needed); the command's outbox row stands in for the delivery, with
        the body the queue would carry.
        """
        command, instance = step.command, step.instance
        finished = await self._call_port(
            step.definition, instance, command, step.message_id, row.trace_context
        )
        delivery = InboundMessage(
            message_id=row.message_id,
            message_type=RunStep.message_type,
            body=row.body,
            headers=row.headers,
            queue=step.queue,
            exchange=row.exchange,
            routing_key=row.routing_key,
            trace_context=row.trace_context,
        )
        arrival = Arrival(
            step.definition,
            command.saga_id,
            instance.correlation_key,
            finished,
            row.message_id,
            known=instance,
            body_hash=body_hash(row.body),
            delivery=delivery,
            trace_context=row.trace_context,
        )
        return lambda: self._apply(arrival)

    async def _call_port(
        self,
        definition: SagaDefinition[Any],
        instance: SagaInstance,
        command: RunStep,
        message_id: str,
        trace_context: str | None,
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
        facts = StepCall(
            definition.name,
            instance.id,
            step.name,
            step.port,
            command.kind,
            command.attempt,
            trace_context,
        )
        with self._telemetry.step_call(facts) as record:
            try:
                result = await self._caller.call(step.port, lambda: function(port, call))
            except BusinessFailure as refusal:
                record.failed(refusal.reason, business=True, retry_scheduled=False)
                failure = Failure(refusal.reason, business=True)
                return _finished(command, message_id, failure=failure)
            except (PortUnavailable, TimeoutError) as error:
                now = self._clock.now()
                retry_at = self._caller.next_retry_at(step.port, command.attempt, now)
                reason = f"{type(error).__name__}: {error}"
                record.failed(reason, business=False, retry_scheduled=retry_at is not None)
                failure = Failure(reason, business=False, retry_at=retry_at)
                return _finished(command, message_id, failure=failure)
            record.succeeded()
        return _finished(command, message_id, result=result)

    def _refused(self, inbound: InboundMessage) -> Rejected | None:
        """Step commands carry an id and come from sagaworks' own broker users only."""
        if not inbound.message_id:
            return missing_id()
        if inbound.user_id in self._own_users:
            return None
        who = f'user "{inbound.user_id}"' if inbound.user_id else "a publisher that set no user_id"
        own = ", ".join(sorted(self._own_users)) or "(none)"
        return Rejected(
            "unauthorised_publisher",
            "UnauthorisedPublisher",
            f"{who} may not send step commands; only sagaworks' own broker users ({own}: "
            "the user of SAGAWORKS_AMQP_URL) may",
        )

    async def _dead_letter(self, inbound: InboundMessage, why: Rejected) -> Handled:
        letter = dead_letter(
            inbound, why.reason, why.exception_type, why.exception_message, handler="run_step"
        )
        async with self._store.transaction() as tx:
            await tx.dead_letter(letter, self._clock.now())
        return Handled("dead_lettered", why.reason)


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
