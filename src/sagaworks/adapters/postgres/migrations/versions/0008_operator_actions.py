"""Operator actions: an append-only audit of every action and plan, and bulk plans with targets.

Revision ID: 0008
Revises: 0007

`operator_audit` has one row per action on one saga (retry, resume, cancel,
resolve, pause, unpause; applied, refused, skipped or a repeated request), per
plan made or applied, and per dead letter a plan replayed: who (the declared
name, and the database role and client address a trigger stamps whatever the
insert says), why, the request id, the plan id and the result. The saga's
history row of the action carries the audit row's id (`detail.audit_id`).
Like `saga_history`, a trigger refuses UPDATE, DELETE and TRUNCATE.

`operator_plans` freezes a bulk action's target set (`operator_plan_targets`,
one row per saga or dead letter, with its version when the plan was made); a
target's `outcome` is written in the transaction that acts on it, so an
interrupted apply continues where it stopped and acts on nothing twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "operator_audit",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("db_role", sa.Text(), server_default=sa.text("current_user"), nullable=False),
        sa.Column(
            "client_addr",
            postgresql.INET(),
            server_default=sa.text("inet_client_addr()"),
            nullable=True,
        ),
        sa.Column("client_hostname", sa.Text(), nullable=True),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("saga_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("saga_type", sa.Text(), nullable=True),
        sa.Column("dead_letter_id", sa.BigInteger(), nullable=True),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("request_id", sa.Text(), nullable=True),
        sa.Column("plan_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("result", sa.Text(), nullable=False),
        sa.Column(
            "detail",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_audit")),
    )
    op.create_index(op.f("ix_operator_audit_saga_id"), "operator_audit", ["saga_id"])
    op.create_index(op.f("ix_operator_audit_plan_id"), "operator_audit", ["plan_id"])
    op.create_index(op.f("ix_operator_audit_request_id"), "operator_audit", ["request_id"])
    op.create_index(op.f("ix_operator_audit_at"), "operator_audit", ["at"])
    op.execute(
        """
        CREATE FUNCTION sagaworks_operator_audit_stamp() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            NEW.db_role := current_user;
            NEW.client_addr := inet_client_addr();
            RETURN NEW;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER operator_audit_stamp
        BEFORE INSERT ON operator_audit
        FOR EACH ROW EXECUTE FUNCTION sagaworks_operator_audit_stamp()
        """
    )
    op.execute(
        """
        CREATE FUNCTION sagaworks_operator_audit_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'operator_audit is append-only: % of an audit row is not allowed',
                TG_OP
                USING HINT = 'the audit keeps every operator action as it was recorded';
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER operator_audit_append_only
        BEFORE UPDATE OR DELETE ON operator_audit
        FOR EACH ROW EXECUTE FUNCTION sagaworks_operator_audit_append_only()
        """
    )
    op.execute(
        """
        CREATE TRIGGER operator_audit_no_truncate
        BEFORE TRUNCATE ON operator_audit
        FOR EACH STATEMENT EXECUTE FUNCTION sagaworks_operator_audit_append_only()
        """
    )

    op.create_table(
        "operator_plans",
        sa.Column("id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column(
            "filters",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'planned'"), nullable=False),
        sa.Column("halted_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_operator_plans")),
        sa.CheckConstraint(
            "status IN ('planned', 'applying', 'halted', 'finished')",
            name=op.f("ck_operator_plans_status"),
        ),
    )
    op.create_table(
        "operator_plan_targets",
        sa.Column("plan_id", postgresql.UUID(as_uuid=True), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("saga_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("dead_letter_id", sa.BigInteger(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("status", sa.Text(), nullable=True),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("stuck_reason", sa.Text(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("audit_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["operator_plans.id"],
            name=op.f("fk_operator_plan_targets_plan_id_operator_plans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("plan_id", "seq", name=op.f("pk_operator_plan_targets")),
        sa.CheckConstraint(
            "(saga_id IS NULL) <> (dead_letter_id IS NULL)",
            name=op.f("ck_operator_plan_targets_one_target"),
        ),
    )
    op.create_index(
        op.f("ix_operator_plan_targets_pending"),
        "operator_plan_targets",
        ["plan_id", "seq"],
        postgresql_where=sa.text("outcome IS NULL"),
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_operator_plan_targets_pending"), table_name="operator_plan_targets")
    op.drop_table("operator_plan_targets")
    op.drop_table("operator_plans")
    op.execute("DROP TRIGGER operator_audit_no_truncate ON operator_audit")
    op.execute("DROP TRIGGER operator_audit_append_only ON operator_audit")
    op.execute("DROP FUNCTION sagaworks_operator_audit_append_only()")
    op.execute("DROP TRIGGER operator_audit_stamp ON operator_audit")
    op.execute("DROP FUNCTION sagaworks_operator_audit_stamp()")
    op.drop_index(op.f("ix_operator_audit_at"), table_name="operator_audit")
    op.drop_index(op.f("ix_operator_audit_request_id"), table_name="operator_audit")
    op.drop_index(op.f("ix_operator_audit_plan_id"), table_name="operator_audit")
    op.drop_index(op.f("ix_operator_audit_saga_id"), table_name="operator_audit")
    op.drop_table("operator_audit")
