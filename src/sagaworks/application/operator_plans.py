"""Use cases: bulk work as a plan, then an apply.

`MakeSagaPlan` freezes the sagas a filter selects now, each with its version,
and says what they are (counts by status, step and stuck reason); nothing acts.
`MakeReplayPlan` does the same for dead letters. `ApplyPlan` acts on a frozen
set: a canary first, then the rest at a given rate, halting by itself when
the failure rate passes a bound. Each target's outcome is written in the
transaction that acts on it, so an apply that is killed and run again
continues where it stopped and acts on nothing twice; a saga whose version
moved since the plan was made is skipped and reported. Sagas and dead letters
share this code; only the act on one target differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

from sagaworks.application.dead_letters import ReplayDeadLetters, resolve_selection
from sagaworks.application.operations.filters import SagaFilter
from sagaworks.application.operator_actions import ActionRequest, ActOnSaga, OperatorError
from sagaworks.application.ports import Clock, DeadLetterFilter, DeadLetterRepository
from sagaworks.application.ports.operator import (
    ActionAudit,
    OperatorStore,
    Plan,
    PlanTarget,
    TargetOutcome,
)
from sagaworks.domain.operator import Action

__all__ = [
    "MIN_SAMPLE",
    "REPLAY",
    "ApplyPlan",
    "ApplyProgress",
    "ApplyReport",
    "ApplyRequest",
    "MadePlan",
    "MakeReplayPlan",
    "MakeSagaPlan",
    "ReplayPlanRequest",
    "SagaPlanRequest",
]

REPLAY = "replay"
"""The action of a plan of dead letters."""

FAILED: frozenset[TargetOutcome] = frozenset({"refused", "failed"})
"""Outcomes that count against `--halt-on`; skipped and repeated targets do not."""

MIN_SAMPLE = 5
"""Targets settled before the failure rate can halt an apply (the canary decides earlier)."""

_PAGE = 100


@dataclass(frozen=True, slots=True)
class SagaPlanRequest:
    action: Action
    selection: SagaFilter
    reason: str
    operator: str
    filters: Mapping[str, Any]
    """The filters as the operator gave them, kept with the plan for whoever reads it later."""
    step: str | None = None
    note: str | None = None


@dataclass(frozen=True, slots=True)
class ReplayPlanRequest:
    selection: DeadLetterFilter
    reason: str
    operator: str
    filters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class MadePlan:
    plan: Plan
    counts: Mapping[str, Mapping[str, int]]


class EmptyPlan(OperatorError):
    def __init__(self) -> None:
        super().__init__(
            "nothing matches the filters, so no plan was made; `sagaworks saga list` with the "
            "same filters shows what they select"
        )


class UnknownPlan(OperatorError):
    def __init__(self, plan_id: UUID) -> None:
        super().__init__(f"no plan {plan_id}; `sagaworks saga plans` lists them")


def _new_plan(
    action: str,
    reason: str,
    operator: str,
    filters: Mapping[str, Any],
    now: datetime,
    step: str | None = None,
    note: str | None = None,
) -> Plan:
    return Plan(uuid4(), now, operator, action, reason, step, note, dict(filters), 0, "planned")


async def _audit_plan(store: OperatorStore, plan: Plan, total: int) -> None:
    await store.record_action(
        ActionAudit(
            id=uuid4(),
            operator=plan.operator,
            action=f"plan {plan.action}",
            reason=plan.reason,
            result="planned",
            step=plan.step,
            note=plan.note,
            plan_id=plan.id,
            detail={"total": total, "filters": dict(plan.filters)},
        )
    )


class MakeSagaPlan:
    def __init__(self, store: OperatorStore, clock: Clock) -> None:
        self._store = store
        self._clock = clock

    async def __call__(self, request: SagaPlanRequest) -> MadePlan:
        plan = _new_plan(
            request.action,
            request.reason,
            request.operator,
            request.filters,
            self._clock.now(),
            request.step,
            request.note,
        )
        total = await self._store.freeze_saga_plan(plan, request.selection)
        if not total:
            raise EmptyPlan()
        await _audit_plan(self._store, plan, total)
        stored = await self._store.plan(plan.id)
        assert stored is not None
        return MadePlan(stored, await self._store.plan_counts(plan.id))


class MakeReplayPlan:
    """Freezes dead letters (active ones, with their replay count) into a plan of replays."""

    def __init__(
        self,
        store: OperatorStore,
        letters: DeadLetterRepository,
        replay: ReplayDeadLetters,
        clock: Clock,
    ) -> None:
        self._store = store
        self._letters = letters
        self._replay = replay
        self._clock = clock

    async def __call__(self, request: ReplayPlanRequest) -> MadePlan:
        ids = await resolve_selection(self._letters, request.selection)
        plan = _new_plan(
            REPLAY, request.reason, request.operator, request.filters, self._clock.now()
        )
        await self._replay.refuse_undeclared(ids, request.operator, plan.id)
        found = await self._letters.find(
            DeadLetterFilter(ids=tuple(ids), statuses=()), limit=max(len(ids), 1)
        )
        letters = sorted(found, key=lambda x: x.id)
        targets = [
            PlanTarget(
                plan.id,
                seq,
                letter.times_replayed,
                dead_letter_id=letter.id,
                status=letter.status,
                step=letter.queue,
                stuck_reason=letter.reason,
            )
            for seq, letter in enumerate(letters, start=1)
        ]
        await self._store.create_plan(replace(plan, total=len(targets)), targets)
        await _audit_plan(self._store, plan, len(targets))
        stored = await self._store.plan(plan.id)
        assert stored is not None
        return MadePlan(stored, await self._store.plan_counts(plan.id))


@dataclass(frozen=True, slots=True)
class ApplyRequest:
    """`canary`: act on this many first and halt if any failed; `rate`: targets per second at
    most; `halt_on`: halt when more than this percentage of settled targets failed."""

    plan_id: UUID
    operator: str
    canary: int = 0
    rate: float | None = None
    halt_on: float | None = None


@dataclass(frozen=True, slots=True)
class ApplyReport:
    plan: Plan
    acted_now: int
    halted: str | None = None
    outcomes_now: Mapping[str, int] = field(default_factory=dict)


Progress = Callable[[int, int], None]
"""Called with (targets settled so far, the plan's total) after each target."""


class ApplyPlan:
    def __init__(
        self,
        store: OperatorStore,
        act: ActOnSaga,
        letters: DeadLetterRepository | None = None,
        replay: ReplayDeadLetters | None = None,
    ) -> None:
        self._store = store
        self._act = act
        self._letters = letters
        self._replay = replay

    async def __call__(
        self, request: ApplyRequest, progress: Progress | None = None
    ) -> ApplyReport:
        plan = await self._store.plan(request.plan_id)
        if plan is None:
            raise UnknownPlan(request.plan_id)
        if plan.status == "finished":
            return ApplyReport(plan, 0)
        await self._store.set_plan_status(plan.id, "applying")
        run = ApplyProgress(plan, request)
        halted = await self._work(plan, request, run, progress)
        await self._store.set_plan_status(plan.id, "halted" if halted else "finished", halted)
        await self._store.record_action(
            ActionAudit(
                id=uuid4(),
                operator=request.operator,
                action=f"apply {plan.action}",
                reason=plan.reason,
                result="halted" if halted else "finished",
                plan_id=plan.id,
                detail={
                    "canary": request.canary,
                    "rate": request.rate,
                    "halt_on": request.halt_on,
                    "acted_now": run.acted,
                    "outcomes_now": dict(run.outcomes),
                    "halted": halted,
                },
            )
        )
        final = await self._store.plan(plan.id)
        assert final is not None
        return ApplyReport(final, run.acted, halted, dict(run.outcomes))

    async def _work(
        self, plan: Plan, request: ApplyRequest, run: ApplyProgress, progress: Progress | None
    ) -> str | None:
        interval = 1.0 / request.rate if request.rate else 0.0
        started = time.monotonic()
        while targets := await self._store.pending_targets(plan.id, _PAGE):
            for target in targets:
                if interval:
                    delay = started + run.acted * interval - time.monotonic()
                    await asyncio.sleep(max(0.0, delay))
                outcome = await self._one(plan, target, request.operator)
                halted = run.settle(outcome)
                if progress is not None:
                    progress(run.settled, plan.total)
                if halted:
                    return halted
        return None

    async def _one(self, plan: Plan, target: PlanTarget, operator: str) -> TargetOutcome:
        if target.dead_letter_id is not None:
            return await self._replay_letter(plan, target, operator)
        if target.saga_id is None or target.saga_type is None:
            await self._store.settle_target(target, "skipped", "the saga is gone", uuid4())
            return "skipped"
        request = ActionRequest(
            plan.action,  # type: ignore[arg-type]
            target.saga_id,
            target.saga_type,
            plan.reason,
            operator,
            f"plan:{plan.id}",
            plan.step,
            plan.note,
            plan.id,
        )
        try:
            return (await self._act(request, target)).outcome
        except Exception as error:  # noqa: BLE001 - one target's error is reported, not fatal
            text = f"{type(error).__name__}: {error}"
            await self._audit_target(plan, target, operator, "failed", {"error": text})
            return "failed"

    async def _replay_letter(self, plan: Plan, target: PlanTarget, operator: str) -> TargetOutcome:
        assert self._letters is not None
        assert self._replay is not None
        assert target.dead_letter_id is not None
        letter = await self._letters.get(target.dead_letter_id)
        if letter is None or letter.status != "active" or letter.times_replayed != target.version:
            why = (
                "the dead letter is gone"
                if letter is None
                else f"it moved since the plan was made (now {letter.status}, replayed "
                f"{letter.times_replayed} times; {target.version} then)"
            )
            await self._audit_target(plan, target, operator, "skipped", {"message": why})
            return "skipped"
        error = await self._replay.replay_one(letter, operator, plan.id)
        outcome: TargetOutcome = "failed" if error else "applied"
        await self._audit_target(plan, target, operator, outcome, {"error": error})
        return outcome

    async def _audit_target(
        self,
        plan: Plan,
        target: PlanTarget,
        operator: str,
        outcome: TargetOutcome,
        detail: Mapping[str, Any],
    ) -> None:
        audit_id = uuid4()
        await self._store.record_action(
            ActionAudit(
                id=audit_id,
                operator=operator,
                action=plan.action,
                reason=plan.reason,
                result=outcome,
                saga_id=target.saga_id,
                saga_type=target.saga_type,
                dead_letter_id=target.dead_letter_id,
                request_id=f"plan:{plan.id}",
                plan_id=plan.id,
                detail=dict(detail),
            )
        )
        text = detail.get("message") or detail.get("error")
        await self._store.settle_target(target, outcome, text, audit_id)


class ApplyProgress:
    """One apply's counts, from where the plan stood, and the rules that halt it."""

    def __init__(self, plan: Plan, request: ApplyRequest) -> None:
        self.request = request
        self.plan_id = plan.id
        self.settled = plan.settled
        self.failed = sum(n for o, n in plan.outcomes.items() if o in FAILED)
        self.canary_left = max(0, request.canary - plan.settled)
        self.canary_failed = 0
        self.acted = 0
        self.outcomes: dict[str, int] = {}

    def settle(self, outcome: TargetOutcome) -> str | None:
        """Count one target; the reason to halt, if this one makes the run halt."""
        self.acted += 1
        self.settled += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        failed = outcome in FAILED
        self.failed += failed
        if self.canary_left:
            self.canary_left -= 1
            self.canary_failed += failed
            if not self.canary_left and self.canary_failed:
                return (
                    f"the canary failed: {self.canary_failed} of {self.request.canary} targets "
                    f"refused or failed; look at them (`sagaworks saga plans {self.plan_id}`), "
                    "then apply again to go on"
                )
            return None
        bound = self.request.halt_on
        if bound is not None and self.settled >= MIN_SAMPLE:
            rate = 100.0 * self.failed / self.settled
            if rate > bound:
                return (
                    f"{self.failed} of {self.settled} targets refused or failed ({rate:.0f}% > "
                    f"--halt-on {bound:g}%); look at them (`sagaworks saga plans "
                    f"{self.plan_id}`), then apply again to go on"
                )
        return None
