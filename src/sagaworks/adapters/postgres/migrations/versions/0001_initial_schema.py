"""Initial schema: sagas, history, inbox, outbox, timers, parked messages, dead letters.

Revision ID: 0001
Revises: (none)

Written by hand (Core operations, explicit constraint names) so it never
depends on the current `tables.py`; it creates the two trigger functions too:
the append-only guard of `saga_history` and the `LISTEN/NOTIFY` wake-up of the
outbox relay.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_EMPTY_JSON = sa.text("'{}'::jsonb")


def _uuid() -> postgresql.UUID[uuid.UUID]:
    return postgresql.UUID(as_uuid=True)


def _tz() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def _identity() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False)


def upgrade() -> None:
    op.create_table(
        "saga_instances",
        sa.Column("id", _uuid(), nullable=False),
        sa.Column("saga_type", sa.Text(), nullable=False),
        sa.Column("correlation_key", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("current_step", sa.Text(), nullable=True),
        sa.Column("state", postgresql.JSONB(), nullable=False),
        sa.Column("state_schema_version", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("progress", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.Column("created_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.Column("updated_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saga_instances")),
        sa.CheckConstraint(
            "status IN ('running', 'compensating', 'completed', 'compensated', 'needs_attention')",
            name=op.f("ck_saga_instances_status"),
        ),
        sa.CheckConstraint("version >= 1", name=op.f("ck_saga_instances_version")),
        sa.UniqueConstraint(
            "saga_type",
            "correlation_key",
            name=op.f("uq_saga_instances_saga_type_correlation_key"),
        ),
    )
    op.create_index(
        op.f("ix_saga_instances_status_updated_at"),
        "saga_instances",
        ["status", "updated_at"],
    )

    op.create_table(
        "saga_history",
        _identity(),
        sa.Column("saga_id", _uuid(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("message_id", sa.Text(), nullable=True),
        sa.Column("detail", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_saga_history")),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["saga_instances.id"],
            name=op.f("fk_saga_history_saga_id_saga_instances"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("saga_id", "seq", name=op.f("uq_saga_history_saga_id_seq")),
    )
    op.execute(
        """
        CREATE FUNCTION sagaworks_saga_history_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            -- A cascade from deleting the saga runs inside the foreign key's trigger.
            IF TG_OP = 'DELETE' AND pg_trigger_depth() > 1 THEN
                RETURN OLD;
            END IF;
            RAISE EXCEPTION 'saga_history is append-only: % of a history row is not allowed',
                TG_OP
                USING HINT = 'append a new row instead; deleting the saga removes its history';
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER saga_history_append_only
        BEFORE UPDATE OR DELETE ON saga_history
        FOR EACH ROW EXECUTE FUNCTION sagaworks_saga_history_append_only()
        """
    )

    op.create_table(
        "inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("saga_id", _uuid(), nullable=True),
        sa.Column("processed_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "message_id", name=op.f("pk_inbox")),
    )
    op.create_index(op.f("ix_inbox_processed_at"), "inbox", ["processed_at"])

    op.create_table(
        "outbox",
        _identity(),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("saga_id", _uuid(), nullable=True),
        sa.Column("exchange", sa.Text(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.Column("published_at", _tz(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_outbox")),
        sa.UniqueConstraint("message_id", name=op.f("uq_outbox_message_id")),
    )
    op.create_index(
        op.f("ix_outbox_unpublished"),
        "outbox",
        ["id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.execute(
        """
        CREATE FUNCTION sagaworks_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM inserted) THEN
                PERFORM pg_notify('sagaworks_outbox', '');
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER outbox_notify
        AFTER INSERT ON outbox
        REFERENCING NEW TABLE AS inserted
        FOR EACH STATEMENT EXECUTE FUNCTION sagaworks_outbox_notify()
        """
    )

    op.create_table(
        "timers",
        _identity(),
        sa.Column("saga_id", _uuid(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("fire_at", _tz(), nullable=False),
        sa.Column("payload", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.Column("created_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_timers")),
        sa.ForeignKeyConstraint(
            ["saga_id"],
            ["saga_instances.id"],
            name=op.f("fk_timers_saga_id_saga_instances"),
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("saga_id", "name", name=op.f("uq_timers_saga_id_name")),
    )
    op.create_index(op.f("ix_timers_fire_at"), "timers", ["fire_at"])

    op.create_table(
        "parked_messages",
        _identity(),
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("saga_type", sa.Text(), nullable=False),
        sa.Column("saga_id", _uuid(), nullable=False),
        sa.Column("correlation_key", sa.Text(), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=False),
        sa.Column("headers", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("received_at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.Column("expires_at", _tz(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parked_messages")),
        sa.UniqueConstraint(
            "consumer", "message_id", name=op.f("uq_parked_messages_consumer_message_id")
        ),
    )
    op.create_index(op.f("ix_parked_messages_saga_id"), "parked_messages", ["saga_id"])
    op.create_index(
        op.f("ix_parked_messages_saga_type_correlation_key"),
        "parked_messages",
        ["saga_type", "correlation_key"],
    )
    op.create_index(op.f("ix_parked_messages_expires_at"), "parked_messages", ["expires_at"])

    op.create_table(
        "dead_letters",
        _identity(),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("exchange", sa.Text(), nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("message_type", sa.Text(), nullable=True),
        sa.Column("saga_type", sa.Text(), nullable=True),
        sa.Column("headers", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("original_body", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("exception_type", sa.Text(), nullable=True),
        sa.Column("exception_message", sa.Text(), nullable=True),
        sa.Column("handler", sa.Text(), nullable=True),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column("first_failed_at", _tz(), nullable=False),
        sa.Column("last_failed_at", _tz(), nullable=False),
        sa.Column("times_failed", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.Column("times_replayed", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("status", sa.Text(), server_default=sa.text("'active'"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letters")),
        sa.CheckConstraint(
            "status IN ('active', 'replayed', 'archived')", name=op.f("ck_dead_letters_status")
        ),
        sa.CheckConstraint("times_failed >= 1", name=op.f("ck_dead_letters_times_failed")),
        sa.CheckConstraint("times_replayed >= 0", name=op.f("ck_dead_letters_times_replayed")),
        sa.UniqueConstraint("queue", "message_id", name=op.f("uq_dead_letters_queue_message_id")),
    )
    op.create_index(op.f("ix_dead_letters_fingerprint"), "dead_letters", ["fingerprint"])
    op.create_index(op.f("ix_dead_letters_reason"), "dead_letters", ["reason"])
    op.create_index(op.f("ix_dead_letters_last_failed_at"), "dead_letters", ["last_failed_at"])
    op.create_index(
        op.f("ix_dead_letters_status_last_failed_at"),
        "dead_letters",
        ["status", "last_failed_at"],
    )

    op.create_table(
        "dead_letter_audit",
        _identity(),
        sa.Column("at", _tz(), server_default=sa.func.now(), nullable=False),
        sa.Column("operator", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("batch_id", _uuid(), nullable=True),
        sa.Column("dead_letter_id", sa.BigInteger(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("detail", postgresql.JSONB(), server_default=_EMPTY_JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dead_letter_audit")),
        sa.ForeignKeyConstraint(
            ["dead_letter_id"],
            ["dead_letters.id"],
            name=op.f("fk_dead_letter_audit_dead_letter_id_dead_letters"),
            ondelete="SET NULL",
        ),
    )
    op.create_index(
        op.f("ix_dead_letter_audit_dead_letter_id"), "dead_letter_audit", ["dead_letter_id"]
    )
    op.create_index(op.f("ix_dead_letter_audit_at"), "dead_letter_audit", ["at"])


def downgrade() -> None:
    op.drop_table("dead_letter_audit")
    op.drop_table("dead_letters")
    op.drop_table("parked_messages")
    op.drop_table("timers")
    op.execute("DROP TRIGGER outbox_notify ON outbox")
    op.drop_table("outbox")
    op.execute("DROP FUNCTION sagaworks_outbox_notify()")
    op.drop_table("inbox")
    op.execute("DROP TRIGGER saga_history_append_only ON saga_history")
    op.drop_table("saga_history")
    op.execute("DROP FUNCTION sagaworks_saga_history_append_only()")
    op.drop_table("saga_instances")
