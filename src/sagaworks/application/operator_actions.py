"""Use case: a person acts on one saga (retry, resume, cancel, resolve, pause, unpause).

The action takes the path of a message: the saga's advisory lock, its inbox
(the request id, so the same request twice acts once), `decide()` through
`apply_to_locked_saga` (the version-checked write, a history row naming who
and why, outbox rows, timers, and kept events applied on unpause), then the
outbox rows are published at once, so a worker's next move sees the action.
An audit row is written in the same transaction, whatever the result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from uuid import UUID, uuid4

from sagaworks.application.apply_inputs import apply_to_locked_saga
from sagaworks.application.operations import SagaNotFound
from sagaworks.application.outbox import OutboxRelay
from sagaworks.application.ports import Clock, OutboxRow
from sagaworks.application.ports.operator import (
    ActionAudit,
    OperatorStore,
    OperatorTransaction,
    PlanTarget,
    TargetOutcome,
)
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import Decision, OperatorCommand, RunStep, decide
from sagaworks.domain.instance import SagaInstance
from sagaworks.domain.operator import Action, PlannedCompensation, compensation_plan

__all__ = [
    "ActOnSaga",
    "ActionRequest",
    "ActionResult",
    "OperatorError",
    "Preview",
    "inbox_id",
]


class OperatorError(Exception):
    """An operator's request that cannot be carried out; the message says what to do."""


@dataclass(frozen=True, slots=True)
class ActionRequest:
    """One action on one saga, by whom and why; `request_id` makes a repeat act once."""

    action: Action
    saga_id: UUID
    saga_type: str
    reason: str
    operator: str
    request_id: str
    step: str | None = None
    note: str | None = None
    plan_id: UUID | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What became of the request; `message` says it in a sentence."""

    outcome: TargetOutcome
    message: str
    audit_id: UUID
    version: int | None = None
    """The saga's version after the action (applied), or as found."""


@dataclass(frozen=True, slots=True)
class Preview:
    """What the action would do now, written nowhere (`--dry-run`)."""

    refused: str | None
    history: list[str]
    commands: list[str] = field(default_factory=list)
    """Step commands it would send, as `step kind #attempt -> port`."""
    compensations: list[PlannedCompensation] = field(default_factory=list)
    """For a cancel: the compensations, in the order they would run."""


def inbox_id(request_id: str, saga_id: UUID) -> str:
    """The id the saga's inbox records the request under (one per saga for a plan's request)."""
    return f"operator:{request_id}:{saga_id}"


class ActOnSaga:
    def __init__(
        self,
        store: OperatorStore,
        relay: OutboxRelay,
        clock: Clock,
        registry: SagaRegistry,
        wire: Wire,
    ) -> None:
        self._store = store
        self._relay = relay
        self._clock = clock
        self._registry = registry
        self._wire = wire

    async def __call__(
        self, request: ActionRequest, target: PlanTarget | None = None
    ) -> ActionResult:
        """Act (or refuse, or recognise a repeat); `target`: a plan's, settled in the same
        transaction, and skipped when the saga's version moved since the plan was made."""
        definition = self._registry.get(request.saga_type)
        audit_id = uuid4()
        async with self._store.transaction() as tx:
            locked = await tx.lock_saga(
                definition,
                request.saga_id,
                message_id=inbox_id(request.request_id, request.saga_id),
            )
            if locked.duplicate:
                result = await self._repeated(tx, request, audit_id)
            elif locked.instance is None:
                raise SagaNotFound(str(request.saga_id), request.saga_type)
            elif target is not None and locked.instance.version != target.version:
                result = ActionResult(
                    "skipped",
                    f"the saga moved since the plan was made (version {target.version} then, "
                    f"{locked.instance.version} now); not acted on",
                    audit_id,
                    locked.instance.version,
                )
            else:
                command = self._command(request, audit_id)
                now = self._clock.now()
                decision = await apply_to_locked_saga(
                    tx, self._wire, definition, locked, command, now, locked.trace_context
                )
                result = _result(decision, audit_id, locked.instance)
            await tx.record_action(_audit(request, result))
            if target is not None:
                await tx.settle_target(target, result.outcome, result.message, audit_id)
            rows: list[OutboxRow] = tx.written_outbox()
        await self._relay.publish_now(rows)
        return result

    async def preview(self, request: ActionRequest) -> Preview:
        """`decide()` on the saga as it is now, without writing anything."""
        definition = self._registry.get(request.saga_type)
        (instance,) = await self._store.load_sagas([(definition, request.saga_id)])
        if instance is None:
            raise SagaNotFound(str(request.saga_id), request.saga_type)
        command = self._command(request, uuid4())
        decision = decide(definition, instance, command, self._clock.now())
        if decision.outcome != "applied":
            return Preview(decision.reason, [])
        plan = compensation_plan(definition, instance) if request.action == "cancel" else []
        return Preview(
            None,
            [f"{h.kind} {h.step or ''}".rstrip() for h in decision.history],
            [_command_line(o.body) for o in decision.outgoing if isinstance(o.body, RunStep)],
            plan,
        )

    def _command(self, request: ActionRequest, audit_id: UUID) -> OperatorCommand:
        return OperatorCommand(
            request.action,
            request.operator,
            request.reason,
            inbox_id(request.request_id, request.saga_id),
            str(audit_id),
            request.step,
            request.note,
        )

    async def _repeated(
        self, tx: OperatorTransaction, request: ActionRequest, audit_id: UUID
    ) -> ActionResult:
        earlier = await tx.earlier_action(request.saga_id, request.request_id)
        if earlier is None:
            told = "its result was not recorded"
        else:
            told = (
                f"by {earlier.audit.operator} at {earlier.at:%Y-%m-%d %H:%M:%S}, "
                f"{earlier.audit.result} (audit {earlier.audit.id})"
            )
        return ActionResult(
            "duplicate",
            f'request "{request.request_id}" was already carried out on this saga {told}; '
            "nothing was done again",
            audit_id,
        )


def _command_line(body: RunStep) -> str:
    return f"{body.step} {body.kind} #{body.attempt} -> port {body.port}"


def _result(decision: Decision, audit_id: UUID, before: SagaInstance) -> ActionResult:
    if decision.outcome == "applied":
        assert decision.instance is not None
        kinds = ", ".join(h.kind for h in decision.history)
        return ActionResult("applied", f"recorded {kinds}", audit_id, decision.instance.version)
    return ActionResult("refused", decision.reason, audit_id, before.version)


def _audit(request: ActionRequest, result: ActionResult) -> ActionAudit:
    detail: dict[str, Any] = {"message": result.message}
    if result.version is not None:
        detail["version"] = result.version
    return ActionAudit(
        id=result.audit_id,
        operator=request.operator,
        action=request.action,
        reason=request.reason,
        result=result.outcome,
        saga_id=request.saga_id,
        saga_type=request.saga_type,
        step=request.step,
        note=request.note,
        request_id=request.request_id,
        plan_id=request.plan_id,
        detail=detail,
    )
