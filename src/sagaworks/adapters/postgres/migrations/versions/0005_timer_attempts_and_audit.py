"""Timers that fail back off and are parked; the dead-letter audit says who, from where, for good.

Revision ID: 0005
Revises: 0004

A timer whose application fails keeps its row: `attempts` and `last_error`
record the failures, `fire_at` moves by a capped backoff, and after the
configured bound `parked_at` is set and the timer is no longer claimed (the
partial index `ix_timers_due` serves the claim). Setting the timer again starts it afresh.

Every audit row records the database role that wrote it (`current_user`) and
the client's address (`inet_client_addr()`), stamped by a trigger whatever
the insert says, besides the operator's declared name and the host the CLI
ran on. The audit is append-only like `saga_history`: a trigger refuses
UPDATE, DELETE and TRUNCATE; the one change it lets through is the foreign
key's own `ON DELETE SET NULL` when a letter is purged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "timers", sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False)
    )
    op.add_column("timers", sa.Column("last_error", sa.Text(), nullable=True))
    op.add_column("timers", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    op.create_check_constraint(op.f("ck_timers_attempts"), "timers", "attempts >= 0")
    op.drop_index(op.f("ix_timers_fire_at"), table_name="timers")
    op.create_index(
        op.f("ix_timers_due"), "timers", ["fire_at"], postgresql_where=sa.text("parked_at IS NULL")
    )
    op.create_index(
        op.f("ix_timers_parked"),
        "timers",
        ["parked_at"],
        postgresql_where=sa.text("parked_at IS NOT NULL"),
    )

    op.add_column(
        "dead_letter_audit",
        sa.Column("db_role", sa.Text(), server_default=sa.text("current_user"), nullable=False),
    )
    op.add_column(
        "dead_letter_audit",
        sa.Column(
            "client_addr",
            postgresql.INET(),
            server_default=sa.text("inet_client_addr()"),
            nullable=True,
        ),
    )
    op.add_column("dead_letter_audit", sa.Column("client_hostname", sa.Text(), nullable=True))
    op.execute(
        """
        CREATE FUNCTION sagaworks_dead_letter_audit_stamp() RETURNS trigger
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
        CREATE TRIGGER dead_letter_audit_stamp
        BEFORE INSERT ON dead_letter_audit
        FOR EACH ROW EXECUTE FUNCTION sagaworks_dead_letter_audit_stamp()
        """
    )
    op.execute(
        """
        CREATE FUNCTION sagaworks_dead_letter_audit_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            -- Purging a letter: the foreign key's SET NULL, run inside its own trigger,
            -- may clear the link and nothing else.
            IF TG_OP = 'UPDATE' AND pg_trigger_depth() > 1
               AND OLD.dead_letter_id IS NOT NULL AND NEW.dead_letter_id IS NULL
               AND (to_jsonb(NEW) - 'dead_letter_id') = (to_jsonb(OLD) - 'dead_letter_id') THEN
                RETURN NEW;
            END IF;
            RAISE EXCEPTION 'dead_letter_audit is append-only: % of an audit row is not allowed',
                TG_OP
                USING HINT = 'the audit keeps every operator action; purging a dead letter '
                             'keeps its audit rows';
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER dead_letter_audit_append_only
        BEFORE UPDATE OR DELETE ON dead_letter_audit
        FOR EACH ROW EXECUTE FUNCTION sagaworks_dead_letter_audit_append_only()
        """
    )
    op.execute(
        """
        CREATE TRIGGER dead_letter_audit_no_truncate
        BEFORE TRUNCATE ON dead_letter_audit
        FOR EACH STATEMENT EXECUTE FUNCTION sagaworks_dead_letter_audit_append_only()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER dead_letter_audit_no_truncate ON dead_letter_audit")
    op.execute("DROP TRIGGER dead_letter_audit_append_only ON dead_letter_audit")
    op.execute("DROP FUNCTION sagaworks_dead_letter_audit_append_only()")
    op.execute("DROP TRIGGER dead_letter_audit_stamp ON dead_letter_audit")
    op.execute("DROP FUNCTION sagaworks_dead_letter_audit_stamp()")
    op.drop_column("dead_letter_audit", "client_hostname")
    op.drop_column("dead_letter_audit", "client_addr")
    op.drop_column("dead_letter_audit", "db_role")
    op.drop_index(op.f("ix_timers_parked"), table_name="timers")
    op.drop_index(op.f("ix_timers_due"), table_name="timers")
    op.create_index(op.f("ix_timers_fire_at"), "timers", ["fire_at"])
    op.drop_constraint(op.f("ck_timers_attempts"), "timers", type_="check")
    op.drop_column("timers", "parked_at")
    op.drop_column("timers", "last_error")
    op.drop_column("timers", "attempts")
