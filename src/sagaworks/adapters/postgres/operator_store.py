"""The saga store as operators' commands use it: actions in the engine's own transaction, the
append-only audit, and bulk plans with their frozen targets.

An action locks, reads and writes its saga with the statements every message
uses (`store.py`); this module adds the audit row and the plan target's
outcome to that transaction, and the reads `sagaworks saga` needs.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg
from sqlalchemy import and_, func, insert, literal, select, true

from sagaworks.adapters.postgres.saga_queries import saga_conditions, stuck_sagas
from sagaworks.adapters.postgres.store import PostgresStore, _Transaction
from sagaworks.adapters.postgres.tables import operator_plan_targets, saga_instances
from sagaworks.application.operations.filters import SagaFilter
from sagaworks.application.ports.operator import (
    ActionAudit,
    AuditedAction,
    Plan,
    PlanTarget,
    TargetOutcome,
)

__all__ = ["PostgresOperatorStore"]

_AUDIT = """
INSERT INTO operator_audit (id, operator, client_hostname, action, saga_id, saga_type,
                            dead_letter_id, step, reason, note, request_id, plan_id, result, detail)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
"""

_AUDIT_COLUMNS = """
id, at, operator, db_role, host(client_addr) AS client_addr, client_hostname, action, saga_id,
saga_type, dead_letter_id, step, reason, note, request_id, plan_id, result, detail
"""

_SETTLE = """
UPDATE operator_plan_targets
SET outcome = $3, detail = $4, audit_id = $5, settled_at = now()
WHERE plan_id = $1 AND seq = $2 AND outcome IS NULL
"""

_PLAN = """
SELECT p.*, COALESCE((
  SELECT jsonb_object_agg(outcome, n) FROM (
    SELECT outcome, count(*) AS n FROM operator_plan_targets t
    WHERE t.plan_id = p.id AND t.outcome IS NOT NULL GROUP BY outcome) c
), '{}'::jsonb) AS outcomes
FROM operator_plans p
"""

_TARGET_COLUMNS = """
plan_id, seq, version, saga_id, dead_letter_id, status, step, stuck_reason, outcome, detail,
(SELECT s.saga_type FROM saga_instances s WHERE s.id = t.saga_id) AS saga_type
"""


def _audited(row: asyncpg.Record) -> AuditedAction:
    return AuditedAction(
        ActionAudit(
            id=row["id"],
            operator=row["operator"],
            action=row["action"],
            reason=row["reason"],
            result=row["result"],
            saga_id=row["saga_id"],
            saga_type=row["saga_type"],
            dead_letter_id=row["dead_letter_id"],
            step=row["step"],
            note=row["note"],
            request_id=row["request_id"],
            plan_id=row["plan_id"],
            detail=row["detail"],
        ),
        at=row["at"],
        db_role=row["db_role"],
        client_addr=row["client_addr"],
        client_hostname=row["client_hostname"],
    )


def _plan(row: asyncpg.Record) -> Plan:
    return Plan(
        id=row["id"],
        created_at=row["created_at"],
        operator=row["operator"],
        action=row["action"],
        reason=row["reason"],
        step=row["step"],
        note=row["note"],
        filters=row["filters"],
        total=row["total"],
        status=row["status"],
        halted_reason=row["halted_reason"],
        outcomes={k: int(v) for k, v in row["outcomes"].items()},
    )


def _target(row: asyncpg.Record) -> PlanTarget:
    return PlanTarget(
        plan_id=row["plan_id"],
        seq=row["seq"],
        version=row["version"],
        saga_id=row["saga_id"],
        saga_type=row["saga_type"],
        dead_letter_id=row["dead_letter_id"],
        status=row["status"],
        step=row["step"],
        stuck_reason=row["stuck_reason"],
        outcome=row["outcome"],
        detail=row["detail"],
    )


async def _record(conn: asyncpg.Connection, audit: ActionAudit, hostname: str | None) -> None:
    await conn.execute(
        _AUDIT,
        audit.id,
        audit.operator,
        hostname,
        audit.action,
        audit.saga_id,
        audit.saga_type,
        audit.dead_letter_id,
        audit.step,
        audit.reason,
        audit.note,
        audit.request_id,
        audit.plan_id,
        audit.result,
        json.dumps(dict(audit.detail), default=str),
    )


async def _settle(
    conn: asyncpg.Connection,
    target: PlanTarget,
    outcome: TargetOutcome,
    detail: str | None,
    audit_id: UUID,
) -> None:
    await conn.execute(_SETTLE, target.plan_id, target.seq, outcome, detail, audit_id)


class _OperatorTransaction(_Transaction):
    def __init__(self, conn: asyncpg.Connection, hostname: str | None) -> None:
        super().__init__(conn)
        self._hostname = hostname

    async def record_action(self, audit: ActionAudit) -> None:
        await _record(self._conn, audit, self._hostname)

    async def earlier_action(self, saga_id: UUID, request_id: str) -> AuditedAction | None:
        row = await self._conn.fetchrow(
            f"SELECT {_AUDIT_COLUMNS} FROM operator_audit "  # noqa: S608 - fixed column list
            "WHERE saga_id = $1 AND request_id = $2 ORDER BY at, id LIMIT 1",
            saga_id,
            request_id,
        )
        return None if row is None else _audited(row)

    async def settle_target(
        self, target: PlanTarget, outcome: TargetOutcome, detail: str | None, audit_id: UUID
    ) -> None:
        await _settle(self._conn, target, outcome, detail, audit_id)


class PostgresOperatorStore(PostgresStore):
    """`PostgresStore` with the audit and plans; `hostname` is recorded with every audit row."""

    def __init__(self, *args: Any, hostname: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._hostname = hostname

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_OperatorTransaction]:
        async with self._connection() as conn, conn.transaction():
            yield _OperatorTransaction(conn, self._hostname)

    async def audit(
        self, *, saga_id: UUID | None = None, plan_id: UUID | None = None, limit: int = 100
    ) -> list[AuditedAction]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT * FROM (SELECT {_AUDIT_COLUMNS} FROM operator_audit "  # noqa: S608
                "WHERE ($1::uuid IS NULL OR saga_id = $1) AND ($2::uuid IS NULL OR plan_id = $2) "
                "ORDER BY at DESC, id DESC LIMIT $3) newest ORDER BY at, id",
                saga_id,
                plan_id,
                limit,
            )
        return [_audited(r) for r in rows]

    async def targets(self, plan_id: UUID, outcomes: Sequence[str], limit: int) -> list[PlanTarget]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_TARGET_COLUMNS} FROM operator_plan_targets t "  # noqa: S608
                "WHERE plan_id = $1 AND outcome = ANY($2::text[]) ORDER BY seq LIMIT $3",
                plan_id,
                list(outcomes),
                limit,
            )
        return [_target(r) for r in rows]

    async def record_action(self, audit: ActionAudit) -> None:
        async with self._connection() as conn:
            await _record(conn, audit, self._hostname)

    async def create_plan(self, plan: Plan, targets: Sequence[PlanTarget]) -> None:
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO operator_plans (id, operator, action, reason, step, note, filters, "
                "total, status) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                plan.id,
                plan.operator,
                plan.action,
                plan.reason,
                plan.step,
                plan.note,
                json.dumps(dict(plan.filters), default=str),
                plan.total,
                plan.status,
            )
            await conn.executemany(
                "INSERT INTO operator_plan_targets (plan_id, seq, version, saga_id, "
                "dead_letter_id, status, step, stuck_reason) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                [
                    (
                        t.plan_id,
                        t.seq,
                        t.version,
                        t.saga_id,
                        t.dead_letter_id,
                        t.status,
                        t.step,
                        t.stuck_reason,
                    )
                    for t in targets
                ],
            )

    async def freeze_saga_plan(self, plan: Plan, selection: SagaFilter) -> int:
        s, v = saga_instances.c, stuck_sagas.c
        chosen = (
            select(
                literal(plan.id).label("plan_id"),
                func.row_number().over(order_by=(s.saga_type, s.id)).label("seq"),
                s.version,
                s.id,
                s.status,
                s.current_step,
                v.reason,
            )
            .select_from(saga_instances.outerjoin(stuck_sagas, v.saga_id == s.id))
            .where(and_(true(), *saga_conditions(selection)))
        )
        freeze = insert(operator_plan_targets).from_select(
            ["plan_id", "seq", "version", "saga_id", "status", "step", "stuck_reason"], chosen
        )
        async with self._engine.begin() as conn:
            await conn.exec_driver_sql(
                "INSERT INTO operator_plans (id, operator, action, reason, step, note, filters, "
                "total, status) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, 0, 'planned')",
                (
                    plan.id,
                    plan.operator,
                    plan.action,
                    plan.reason,
                    plan.step,
                    plan.note,
                    json.dumps(dict(plan.filters), default=str),
                ),
            )
            frozen = (await conn.execute(freeze)).rowcount
            if not frozen:
                await conn.rollback()
                return 0
            await conn.exec_driver_sql(
                "UPDATE operator_plans SET total = $2 WHERE id = $1", (plan.id, frozen)
            )
        return int(frozen)

    async def plan_counts(self, plan_id: UUID) -> dict[str, dict[str, int]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT 'status' AS dim, COALESCE(status, '-') AS value, count(*) AS n "
                "FROM operator_plan_targets WHERE plan_id = $1 GROUP BY 2 UNION ALL "
                "SELECT 'step', COALESCE(step, '-'), count(*) FROM operator_plan_targets "
                "WHERE plan_id = $1 GROUP BY 2 UNION ALL "
                "SELECT 'stuck_reason', COALESCE(stuck_reason, 'not stuck'), count(*) "
                "FROM operator_plan_targets WHERE plan_id = $1 GROUP BY 2 ORDER BY 1, 3 DESC",
                plan_id,
            )
        counts: dict[str, dict[str, int]] = {"status": {}, "step": {}, "stuck_reason": {}}
        for row in rows:
            counts[row["dim"]][row["value"]] = int(row["n"])
        return counts

    async def plan(self, plan_id: UUID) -> Plan | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(_PLAN + " WHERE p.id = $1", plan_id)
        return None if row is None else _plan(row)

    async def plans(self, limit: int) -> list[Plan]:
        async with self._connection() as conn:
            rows = await conn.fetch(_PLAN + " ORDER BY p.created_at DESC LIMIT $1", limit)
        return [_plan(r) for r in rows]

    async def pending_targets(self, plan_id: UUID, limit: int) -> list[PlanTarget]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {_TARGET_COLUMNS} FROM operator_plan_targets t "  # noqa: S608
                "WHERE plan_id = $1 AND outcome IS NULL ORDER BY seq LIMIT $2",
                plan_id,
                limit,
            )
        return [_target(r) for r in rows]

    async def settle_target(
        self, target: PlanTarget, outcome: TargetOutcome, detail: str | None, audit_id: UUID
    ) -> None:
        async with self._connection() as conn:
            await _settle(conn, target, outcome, detail, audit_id)

    async def set_plan_status(
        self, plan_id: UUID, status: str, halted_reason: str | None = None
    ) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE operator_plans SET status = $2, halted_reason = $3, updated_at = now() "
                "WHERE id = $1",
                plan_id,
                status,
                halted_reason,
            )
