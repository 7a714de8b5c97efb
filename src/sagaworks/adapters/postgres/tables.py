"""The saga store's schema as SQLAlchemy Core tables, for the queries built with Core.

The tables mirror the hand-written Alembic migrations in `migrations/versions`;
an integration test compares the two, so a column added here without a
migration fails CI. Triggers and their functions exist only in the migrations
(see docs/schema.md).

The Core queries (`dead_letters.py`, `queries.py`), the migration runner and
the notify channel take their names from here. The hot path's hand-written
asyncpg SQL (`store.py`, `breakers.py`) names tables and columns literally, so
a rename must be made there too; the store contract run on PostgreSQL catches
a miss in `store.py`.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, INET, JSONB, UUID

__all__ = [
    "ALEMBIC_VERSION_TABLE",
    "BREAKER_STATES",
    "DEAD_LETTER_STATUSES",
    "OUTBOX_CHANNEL",
    "READ_MODELS_SCHEMA",
    "SAGA_STATUSES",
    "dead_letter_audit",
    "dead_letters",
    "inbox",
    "metadata",
    "operator_audit",
    "operator_plan_targets",
    "operator_plans",
    "outbox",
    "parked_messages",
    "port_breakers",
    "read_latency_minutes",
    "read_rollup_state",
    "read_saga_minutes",
    "read_step_minutes",
    "read_step_ports",
    "saga_history",
    "saga_instances",
    "timers",
    "worker_heartbeats",
]

ALEMBIC_VERSION_TABLE = "sagaworks_alembic_version"
"""Alembic's revision table; named for sagaworks so the database can be shared with other apps."""

OUTBOX_CHANNEL = "sagaworks_outbox"
"""`LISTEN` channel notified (empty payload) after every statement that inserts into `outbox`."""

READ_MODELS_SCHEMA = "sagaworks_read"
"""Schema of the views operators and dashboards read (made by migrations, not by `metadata`)."""

BREAKER_STATES = ("closed", "open", "half_open")
SAGA_STATUSES = ("running", "compensating", "completed", "compensated", "needs_attention")
DEAD_LETTER_STATUSES = ("active", "replayed", "archived")
PLAN_STATUSES = ("planned", "applying", "halted", "finished")

metadata = MetaData(
    naming_convention={
        "pk": "pk_%(table_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    }
)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    listed = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({listed})"


def _timestamp(name: str, *, nullable: bool = False, now: bool = False) -> Column[object]:
    return Column(
        name,
        DateTime(timezone=True),
        nullable=nullable,
        server_default=func.now() if now else None,
    )


def _identity() -> Column[int]:
    return Column("id", BigInteger, Identity(), primary_key=True)


saga_instances = Table(
    "saga_instances",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    Column("saga_type", Text, nullable=False),
    Column("correlation_key", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("current_step", Text, nullable=True),
    Column("state", JSONB, nullable=False),
    Column("state_schema_version", Integer, nullable=False),
    Column("version", Integer, nullable=False, server_default=text("1")),
    Column("progress", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _timestamp("created_at", now=True),
    _timestamp("updated_at", now=True),
    Column("trace_context", Text, nullable=True),
    CheckConstraint(_one_of("status", SAGA_STATUSES), name="status"),
    CheckConstraint("version >= 1", name="version"),
    UniqueConstraint("saga_type", "correlation_key"),
    Index("ix_saga_instances_status_updated_at", "status", "updated_at"),
    Index("ix_saga_instances_saga_type_status_updated_at", "saga_type", "status", "updated_at"),
    Index("ix_saga_instances_current_step_updated_at", "current_step", "updated_at"),
    Index("ix_saga_instances_created_at", "created_at"),
    Index("ix_saga_instances_updated_at", "updated_at"),
    Index(
        "ix_saga_instances_correlation_key",
        "correlation_key",
        postgresql_ops={"correlation_key": "text_pattern_ops"},
    ),
)
"""One row per saga: state, position (`progress`) and a row version for optimistic checks."""

saga_history = Table(
    "saga_history",
    metadata,
    _identity(),
    Column(
        "saga_id",
        UUID(as_uuid=True),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    _timestamp("at", now=True),
    Column("kind", Text, nullable=False),
    Column("step", Text, nullable=True),
    Column("message_id", Text, nullable=True),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    UniqueConstraint("saga_id", "seq"),
    Index(
        "ix_saga_history_at_brin",
        "at",
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    ),
    Index(
        "ix_saga_history_step_at",
        "step",
        "at",
        postgresql_where=text(
            "kind IN ('step_completed', 'compensation_completed', 'step_failed', 'retry_scheduled')"
        ),
    ),
    Index(
        "ix_saga_history_saga_id_seq_retries",
        "saga_id",
        "seq",
        postgresql_where=text("kind = 'retry_scheduled'"),
    ),
)
"""Append-only timeline of a saga (a trigger refuses UPDATE and direct DELETE)."""

inbox = Table(
    "inbox",
    metadata,
    Column("consumer", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("saga_id", UUID(as_uuid=True), nullable=True),
    _timestamp("processed_at", now=True),
    Column("body_hash", LargeBinary, nullable=True),
    Column("body", LargeBinary, nullable=True),
    PrimaryKeyConstraint("consumer", "message_id"),
    Index("ix_inbox_processed_at", "processed_at"),
)
"""Message ids each consumer has processed: a duplicate delivery is acked and skipped.

`body_hash` tells a duplicate (same body) from an id conflict (another body); NULL: unknown.
`body`: the body processed, for the letter of a later conflict; NULL: not kept.
"""

outbox = Table(
    "outbox",
    metadata,
    _identity(),
    Column("message_id", Text, nullable=False),
    Column("saga_id", UUID(as_uuid=True), nullable=True),
    Column("exchange", Text, nullable=False),
    Column("routing_key", Text, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("body", LargeBinary, nullable=False),
    _timestamp("created_at", now=True),
    _timestamp("published_at", nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    Column("trace_context", Text, nullable=True),
    _timestamp("lease_until", nullable=True),
    UniqueConstraint("message_id"),
    Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    Index(
        "ix_outbox_saga_id_unpublished", "saga_id", postgresql_where=text("published_at IS NULL")
    ),
)
"""Messages committed with a transition and not yet (or already) published by the relay.

A step command the committing worker runs itself (an eager step) has `lease_until`: the
sweeper publishes it only once the lease ran out; `published_at` is set when its result
committed (or it was published after all).
"""

timers = Table(
    "timers",
    metadata,
    _identity(),
    Column(
        "saga_id",
        UUID(as_uuid=True),
        ForeignKey("saga_instances.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    _timestamp("fire_at"),
    Column("payload", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    _timestamp("created_at", now=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("last_error", Text, nullable=True),
    _timestamp("parked_at", nullable=True),
    Column("trace_context", Text, nullable=True),
    CheckConstraint("attempts >= 0", name="attempts"),
    UniqueConstraint("saga_id", "name"),
    Index("ix_timers_due", "fire_at", postgresql_where=text("parked_at IS NULL")),
    Index("ix_timers_parked", "parked_at", postgresql_where=text("parked_at IS NOT NULL")),
)
"""Step deadlines and delayed retries, claimed when due; failing ones back off, then park."""

parked_messages = Table(
    "parked_messages",
    metadata,
    _identity(),
    Column("consumer", Text, nullable=False),
    Column("saga_type", Text, nullable=False),
    Column("saga_id", UUID(as_uuid=True), nullable=False),
    Column("correlation_key", Text, nullable=False),
    Column("message_id", Text, nullable=False),
    Column("message_type", Text, nullable=False),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("body", LargeBinary, nullable=False),
    Column("reason", Text, nullable=False),
    _timestamp("received_at", now=True),
    _timestamp("expires_at"),
    UniqueConstraint("consumer", "message_id"),
    Index("ix_parked_messages_saga_id", "saga_id"),
    Index("ix_parked_messages_saga_type_correlation_key", "saga_type", "correlation_key"),
    Index("ix_parked_messages_expires_at", "expires_at"),
)
"""Events that arrived before their saga could take them, replayed when it can."""

dead_letters = Table(
    "dead_letters",
    metadata,
    _identity(),
    Column("message_id", Text, nullable=False),
    Column("queue", Text, nullable=False),
    Column("exchange", Text, nullable=False),
    Column("routing_key", Text, nullable=False),
    Column("message_type", Text, nullable=True),
    Column("saga_type", Text, nullable=True),
    Column("headers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("body", LargeBinary, nullable=False),
    Column("original_body", LargeBinary, nullable=True),
    Column("reason", Text, nullable=False),
    Column("exception_type", Text, nullable=True),
    Column("exception_message", Text, nullable=True),
    Column("handler", Text, nullable=True),
    Column("fingerprint", Text, nullable=False),
    _timestamp("first_failed_at"),
    _timestamp("last_failed_at"),
    Column("times_failed", Integer, nullable=False, server_default=text("1")),
    Column("times_replayed", Integer, nullable=False, server_default=text("0")),
    Column("status", Text, nullable=False, server_default=text("'active'")),
    Column("raw_fields", JSONB, nullable=True),
    Column("body_length", BigInteger, nullable=True),
    Column("body_sha256", Text, nullable=True),
    Column("first_body", LargeBinary, nullable=True),
    CheckConstraint(_one_of("status", DEAD_LETTER_STATUSES), name="status"),
    CheckConstraint("(body_length IS NULL) = (body_sha256 IS NULL)", name="whole_body"),
    CheckConstraint("times_failed >= 1", name="times_failed"),
    CheckConstraint("times_replayed >= 0", name="times_replayed"),
    UniqueConstraint("queue", "message_id"),
    Index("ix_dead_letters_fingerprint", "fingerprint"),
    Index("ix_dead_letters_reason", "reason"),
    Index("ix_dead_letters_last_failed_at", "last_failed_at"),
    Index("ix_dead_letters_status_last_failed_at", "status", "last_failed_at"),
    Index(
        "ix_dead_letters_message_id",
        "message_id",
        postgresql_ops={"message_id": "text_pattern_ops"},
    ),
)
"""Messages the broker dead-lettered, with why they failed; edited, replayed or archived here.

`raw_fields`: original bytes (base64 by field) of text fields escaped to be stored;
`body_length`/`body_sha256`: the whole body's, when `body` keeps only its start;
`first_body`: for an `id_conflict`, the body processed first under the id (never replayed).
"""

dead_letter_audit = Table(
    "dead_letter_audit",
    metadata,
    _identity(),
    _timestamp("at", now=True),
    Column("operator", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("batch_id", UUID(as_uuid=True), nullable=True),
    Column(
        "dead_letter_id",
        BigInteger,
        ForeignKey("dead_letters.id", ondelete="SET NULL"),
        nullable=True,
    ),
    Column("outcome", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("db_role", Text, nullable=False, server_default=text("current_user")),
    Column("client_addr", INET, nullable=True, server_default=text("inet_client_addr()")),
    Column("client_hostname", Text, nullable=True),
    Index("ix_dead_letter_audit_dead_letter_id", "dead_letter_id"),
    Index("ix_dead_letter_audit_at", "at"),
)
"""Who did what to which dead letter, from where, and how it went; append-only (a trigger
stamps the database role and client address and refuses UPDATE, DELETE and TRUNCATE); rows
survive a purge of the letter."""

port_breakers = Table(
    "port_breakers",
    metadata,
    Column("port", Text, nullable=False),
    Column("worker", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("failures", Integer, nullable=False),
    Column("times_opened", Integer, nullable=False, server_default=text("0")),
    _timestamp("changed_at"),
    PrimaryKeyConstraint("port", "worker"),
    CheckConstraint(_one_of("state", BREAKER_STATES), name="state"),
    CheckConstraint("failures >= 0", name="failures"),
)
"""Circuit-breaker state of each port in each worker process (upserted on every change)."""

worker_heartbeats = Table(
    "worker_heartbeats",
    metadata,
    Column("worker", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", Text, nullable=False),
    Column("sagas", ARRAY(Text), nullable=False),
    Column("ports", ARRAY(Text), nullable=False),
    _timestamp("started_at"),
    _timestamp("last_beat_at"),
    Column("beat_interval_s", Float, nullable=False),
    Column("in_flight", Integer, nullable=False, server_default=text("0")),
    Column("breakers", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("queue_depths", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    CheckConstraint("beat_interval_s > 0", name="beat_interval"),
    CheckConstraint("in_flight >= 0", name="in_flight"),
)
"""One row per live worker process (`worker` = `<host>:<pid>`, as in `port_breakers`),
upserted every heartbeat interval and deleted on a graceful stop; a row older than three
intervals is a worker that is gone. `breakers`: port -> state; `queue_depths`: queue ->
{messages, consumers} as the worker last saw them."""
read_rollup_state = Table(
    "read_rollup_state",
    metadata,
    Column("id", Integer, primary_key=True, server_default=text("1")),
    _timestamp("rolled_up_to"),
    _timestamp("rolled_at", nullable=True),
    CheckConstraint("id = 1", name="one_row"),
)
"""The one row of the history rollup: history before `rolled_up_to` is counted in the
`read_*_minutes` tables; the views add what came after it from `saga_history` itself."""

read_saga_minutes = Table(
    "read_saga_minutes",
    metadata,
    _timestamp("minute"),
    Column("saga_type", Text, nullable=False),
    *(
        Column(name, BigInteger, nullable=False, server_default=text("0"))
        for name in ("started", "completed", "compensated", "needs_attention", "steps_run")
    ),
    PrimaryKeyConstraint("minute", "saga_type"),
)
"""Sagas started and ended, and steps run, per minute and saga type (the history rollup)."""

read_step_minutes = Table(
    "read_step_minutes",
    metadata,
    _timestamp("minute"),
    Column("saga_type", Text, nullable=False),
    Column("step", Text, nullable=False),
    *(
        Column(name, BigInteger, nullable=False, server_default=text("0"))
        for name in (
            "calls",
            "transient_failures",
            "business_failures",
            "retries_scheduled",
            "needs_attention",
        )
    ),
    PrimaryKeyConstraint("minute", "saga_type", "step"),
)
"""Port calls and their failures per minute and step (the history rollup)."""

read_latency_minutes = Table(
    "read_latency_minutes",
    metadata,
    _timestamp("minute"),
    Column("saga_type", Text, nullable=False),
    Column("step", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("measure", Text, nullable=False),
    Column("bucket", Integer, nullable=False),
    Column("samples", BigInteger, nullable=False),
    PrimaryKeyConstraint("minute", "saga_type", "step", "kind", "measure", "bucket"),
    CheckConstraint("measure IN ('attempt', 'stay')", name="measure"),
    CheckConstraint("bucket BETWEEN 0 AND 99", name="bucket"),
)
"""How long attempts took and steps were stayed in, per minute of their end, as a histogram:
`bucket` 0 is under 1 ms, bucket b ≥ 1 is [1 ms × 1.25^(b-1), 1 ms × 1.25^b)."""

read_step_ports = Table(
    "read_step_ports",
    metadata,
    Column("saga_type", Text, nullable=False),
    Column("step", Text, nullable=False),
    Column("port", Text, nullable=False),
    _timestamp("seen_at"),
    PrimaryKeyConstraint("saga_type", "step"),
)
"""The port each step last called, as its history said (the history rollup)."""

operator_audit = Table(
    "operator_audit",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    _timestamp("at", now=True),
    Column("operator", Text, nullable=False),
    Column("db_role", Text, nullable=False, server_default=text("current_user")),
    Column("client_addr", INET, nullable=True, server_default=text("inet_client_addr()")),
    Column("client_hostname", Text, nullable=True),
    Column("action", Text, nullable=False),
    Column("saga_id", UUID(as_uuid=True), nullable=True),
    Column("saga_type", Text, nullable=True),
    Column("dead_letter_id", BigInteger, nullable=True),
    Column("step", Text, nullable=True),
    Column("reason", Text, nullable=False),
    Column("note", Text, nullable=True),
    Column("request_id", Text, nullable=True),
    Column("plan_id", UUID(as_uuid=True), nullable=True),
    Column("result", Text, nullable=False),
    Column("detail", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Index("ix_operator_audit_saga_id", "saga_id"),
    Index("ix_operator_audit_plan_id", "plan_id"),
    Index("ix_operator_audit_request_id", "request_id"),
    Index("ix_operator_audit_at", "at"),
)
"""Every operator action on a saga and every plan: who, why, the request, the plan, the result.

Append-only (a trigger stamps the database role and client address and refuses UPDATE,
DELETE and TRUNCATE); the saga's history row of an action names its `id` (`detail.audit_id`)."""

operator_plans = Table(
    "operator_plans",
    metadata,
    Column("id", UUID(as_uuid=True), primary_key=True),
    _timestamp("created_at", now=True),
    _timestamp("updated_at", now=True),
    Column("operator", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Column("step", Text, nullable=True),
    Column("note", Text, nullable=True),
    Column("filters", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    Column("total", Integer, nullable=False),
    Column("status", Text, nullable=False, server_default=text("'planned'")),
    Column("halted_reason", Text, nullable=True),
    CheckConstraint(_one_of("status", PLAN_STATUSES), name="status"),
)
"""A bulk action: what, why, the filters that chose its targets, and how far it got."""

operator_plan_targets = Table(
    "operator_plan_targets",
    metadata,
    Column(
        "plan_id",
        UUID(as_uuid=True),
        ForeignKey("operator_plans.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("seq", Integer, nullable=False),
    Column("saga_id", UUID(as_uuid=True), nullable=True),
    Column("dead_letter_id", BigInteger, nullable=True),
    Column("version", Integer, nullable=False),
    Column("status", Text, nullable=True),
    Column("step", Text, nullable=True),
    Column("stuck_reason", Text, nullable=True),
    Column("outcome", Text, nullable=True),
    Column("detail", Text, nullable=True),
    Column("audit_id", UUID(as_uuid=True), nullable=True),
    _timestamp("settled_at", nullable=True),
    PrimaryKeyConstraint("plan_id", "seq"),
    CheckConstraint("(saga_id IS NULL) <> (dead_letter_id IS NULL)", name="one_target"),
    Index(
        "ix_operator_plan_targets_pending",
        "plan_id",
        "seq",
        postgresql_where=text("outcome IS NULL"),
    ),
)
"""A plan's frozen targets (a saga, or a dead letter), each with its version when planned;
`outcome` NULL: not acted on yet. Written in the transaction that acts, so nothing is acted
on twice."""
