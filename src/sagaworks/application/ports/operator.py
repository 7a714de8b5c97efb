"""What operators' actions need from the store: the audit, bulk plans, and finding a saga.

An action on a saga goes through the same transaction as a message
(`SagaTransaction`: the saga's lock, its inbox, the versioned write, history,
outbox); `OperatorTransaction` adds the audit row, and the plan target it
settles, to that same transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol
from uuid import UUID

from sagaworks.application.ports.store import SagaTransaction, Store

if TYPE_CHECKING:
    from sagaworks.application.operations.filters import SagaFilter

__all__ = [
    "ActionAudit",
    "AuditedAction",
    "OperatorStore",
    "OperatorTransaction",
    "Plan",
    "PlanTarget",
    "TargetOutcome",
]

TargetOutcome = Literal["applied", "refused", "skipped", "failed", "duplicate"]
"""What became of one target: acted on, refused by the saga, skipped because it moved since
the plan was made, failed with an error, or already acted on by the same request."""


@dataclass(frozen=True, slots=True)
class ActionAudit:
    """One audit row to write: who did what to which saga (or letter, or plan), why, and how
    it went. The store adds when, and the database role and client address."""

    id: UUID
    operator: str
    action: str
    reason: str
    result: str
    saga_id: UUID | None = None
    saga_type: str | None = None
    dead_letter_id: int | None = None
    step: str | None = None
    note: str | None = None
    request_id: str | None = None
    plan_id: UUID | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AuditedAction:
    """One audit row as stored."""

    audit: ActionAudit
    at: datetime
    db_role: str
    client_addr: str | None
    client_hostname: str | None


@dataclass(frozen=True, slots=True)
class PlanTarget:
    """One saga (or dead letter) a plan froze, with its version then; `outcome` None: pending."""

    plan_id: UUID
    seq: int
    version: int
    saga_id: UUID | None = None
    saga_type: str | None = None
    dead_letter_id: int | None = None
    status: str | None = None
    step: str | None = None
    stuck_reason: str | None = None
    outcome: TargetOutcome | None = None
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class Plan:
    """A bulk action and its frozen targets' progress (`outcomes`: count by outcome so far)."""

    id: UUID
    created_at: datetime
    operator: str
    action: str
    reason: str
    step: str | None
    note: str | None
    filters: Mapping[str, Any]
    total: int
    status: Literal["planned", "applying", "halted", "finished"]
    halted_reason: str | None = None
    outcomes: Mapping[str, int] = field(default_factory=dict)

    @property
    def settled(self) -> int:
        return sum(self.outcomes.values())


class OperatorTransaction(SagaTransaction, Protocol):
    async def record_action(self, audit: ActionAudit) -> None:
        """Append one audit row in this transaction."""
        ...

    async def earlier_action(self, saga_id: UUID, request_id: str) -> AuditedAction | None:
        """The audit row of the first action of `request_id` on the saga, if any."""
        ...

    async def settle_target(
        self, target: PlanTarget, outcome: TargetOutcome, detail: str | None, audit_id: UUID
    ) -> None:
        """Record what became of a plan's target, in the transaction that acted on it."""
        ...


class OperatorStore(Store, Protocol):
    """The saga store, seen by operators' commands; reads and plan bookkeeping."""

    def transaction(self) -> AbstractAsyncContextManager[OperatorTransaction]: ...

    async def audit(
        self, *, saga_id: UUID | None = None, plan_id: UUID | None = None, limit: int = 100
    ) -> list[AuditedAction]:
        """The newest audit rows (of one saga, of one plan, or all), oldest of them first."""
        ...

    async def targets(self, plan_id: UUID, outcomes: Sequence[str], limit: int) -> list[PlanTarget]:
        """A plan's targets that ended with one of `outcomes`, in plan order."""
        ...

    async def record_action(self, audit: ActionAudit) -> None:
        """Append one audit row on its own (a plan made, applied, halted)."""
        ...

    async def create_plan(self, plan: Plan, targets: Sequence[PlanTarget]) -> None:
        """Store a plan and its frozen targets in one transaction."""
        ...

    async def freeze_saga_plan(self, plan: Plan, selection: SagaFilter) -> int:
        """Store a plan with every saga `selection` matches now, each with its version, in one
        statement; returns how many (none: nothing is stored)."""
        ...

    async def plan_counts(self, plan_id: UUID) -> Mapping[str, Mapping[str, int]]:
        """The plan's targets counted by `status`, `step` and `stuck_reason` when planned."""
        ...

    async def plan(self, plan_id: UUID) -> Plan | None: ...

    async def plans(self, limit: int) -> list[Plan]:
        """Newest first."""
        ...

    async def pending_targets(self, plan_id: UUID, limit: int) -> list[PlanTarget]:
        """Targets not acted on yet, in plan order."""
        ...

    async def settle_target(
        self, target: PlanTarget, outcome: TargetOutcome, detail: str | None, audit_id: UUID
    ) -> None:
        """`OperatorTransaction.settle_target` on its own (a dead letter's replay)."""
        ...

    async def set_plan_status(
        self, plan_id: UUID, status: str, halted_reason: str | None = None
    ) -> None: ...
