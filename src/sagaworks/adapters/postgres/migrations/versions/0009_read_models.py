"""Read models for dashboards: worker heartbeats and the views of schema `sagaworks_read`.

Revision ID: 0009
Revises: 0008

`worker_heartbeats`: one row per live worker process, upserted every
`SAGAWORKS_HEARTBEAT_INTERVAL_S` and deleted when the worker stops gracefully;
a row whose beat is older than three intervals is a worker that is gone.

The views in `sagaworks_read` are what Grafana, alerts and `sagaworks top`
read (docs/operations.md documents them column by column). Views over the
saga history look at a fixed recent window and find it through the BRIN
index `ix_saga_history_at_brin`: a few kilobytes for millions of rows, and
next to nothing per insert, because history rows arrive in time order; it
summarizes each block range as soon as it fills (`autosummarize`), so a query
never scans a long unsummarized tail. They
join only sagas changed within the window (`ix_saga_instances_updated_at`):
every transition that writes history also sets the saga's `updated_at` to the
same instant, so a saga with history in the window was changed in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_VIEWS: dict[str, str] = {
    "sagas_in_progress": """
        SELECT saga_type, status, current_step,
               count(*)::bigint AS sagas,
               min(created_at) AS oldest_started_at,
               extract(epoch FROM now() - min(created_at))::float8 AS oldest_age_s,
               extract(epoch FROM now() - min(updated_at))::float8 AS longest_unchanged_s
        FROM saga_instances
        WHERE status IN ('running', 'compensating', 'needs_attention')
        GROUP BY saga_type, status, current_step
    """,
    "activity_now": """
        SELECT
            (count(*) FILTER (WHERE kind = 'started') / 10.0)::float8 AS sagas_started_per_s,
            (count(*) FILTER (WHERE kind IN ('completed', 'compensated', 'needs_attention'))
                / 10.0)::float8 AS sagas_ended_per_s,
            (count(*) FILTER (WHERE kind = 'step_started') / 10.0)::float8 AS steps_per_s
        FROM saga_history
        WHERE at >= now() - interval '10 seconds'
    """,
    "throughput_per_minute": """
        SELECT date_trunc('minute', h.at) AS minute, s.saga_type,
               count(*) FILTER (WHERE h.kind = 'started')::bigint AS started,
               count(*) FILTER (WHERE h.kind = 'completed')::bigint AS completed,
               count(*) FILTER (WHERE h.kind = 'compensated')::bigint AS compensated,
               count(*) FILTER (WHERE h.kind = 'needs_attention')::bigint AS needs_attention,
               count(*) FILTER (WHERE h.kind = 'step_started')::bigint AS steps_run
        FROM saga_history h
        JOIN saga_instances s ON s.id = h.saga_id
         AND s.updated_at >= date_trunc('minute', now()) - interval '59 minutes'
        WHERE h.at >= date_trunc('minute', now()) - interval '59 minutes'
          AND h.kind IN ('started', 'completed', 'compensated', 'needs_attention', 'step_started')
        GROUP BY 1, 2
    """,
    "step_latency": """
        WITH recent AS (
            SELECT h.saga_id, h.seq, h.at, h.kind, h.step, s.saga_type,
                   h.detail->>'port' AS port, h.detail->>'kind' AS step_kind,
                   h.detail->>'attempt' AS attempt
            FROM saga_history h
            JOIN saga_instances s ON s.id = h.saga_id
             AND s.updated_at >= now() - interval '15 minutes'
            WHERE h.at >= now() - interval '15 minutes' AND h.step IS NOT NULL
        ),
        ports AS (
            SELECT DISTINCT saga_type, step, port
            FROM recent WHERE kind = 'step_started' AND port IS NOT NULL
        ),
        attempts AS (
            SELECT saga_type, step, step_kind AS kind,
                   extract(epoch FROM lead(at) OVER w - at) AS seconds,
                   kind AS row_kind
            FROM recent
            WHERE kind IN ('step_started', 'step_completed', 'step_failed', 'retry_scheduled',
                           'compensation_completed', 'needs_attention', 'step_abandoned')
            WINDOW w AS (PARTITION BY saga_id, step ORDER BY seq)
        ),
        stays AS (
            SELECT saga_type, step,
                   CASE WHEN kind = 'waiting' THEN 'wait' ELSE step_kind END AS kind,
                   extract(epoch FROM lead(at) OVER w - at) AS seconds,
                   kind AS row_kind
            FROM recent
            WHERE (kind = 'step_started' AND attempt = '1')
               OR kind IN ('waiting', 'step_completed', 'step_failed', 'compensation_completed',
                           'needs_attention', 'step_abandoned', 'event_received',
                           'deadline_missed')
            WINDOW w AS (PARTITION BY saga_id, step ORDER BY seq)
        ),
        per_attempt AS (
            SELECT saga_type, step, kind, count(*)::bigint AS attempts,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS attempt_p50_s,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS attempt_p95_s,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds) AS attempt_p99_s
            FROM attempts
            WHERE row_kind = 'step_started' AND seconds IS NOT NULL
            GROUP BY saga_type, step, kind
        ),
        per_stay AS (
            SELECT saga_type, step, kind, count(*)::bigint AS stays,
                   percentile_cont(0.5) WITHIN GROUP (ORDER BY seconds) AS in_step_p50_s,
                   percentile_cont(0.95) WITHIN GROUP (ORDER BY seconds) AS in_step_p95_s,
                   percentile_cont(0.99) WITHIN GROUP (ORDER BY seconds) AS in_step_p99_s
            FROM stays
            WHERE row_kind IN ('step_started', 'waiting') AND seconds IS NOT NULL
            GROUP BY saga_type, step, kind
        )
        SELECT saga_type, step, p.port, kind,
               coalesce(a.attempts, 0) AS attempts,
               a.attempt_p50_s, a.attempt_p95_s, a.attempt_p99_s,
               coalesce(st.stays, 0) AS stays,
               st.in_step_p50_s, st.in_step_p95_s, st.in_step_p99_s
        FROM per_attempt a
        FULL JOIN per_stay st USING (saga_type, step, kind)
        LEFT JOIN ports p USING (saga_type, step)
    """,
    "port_activity": """
        WITH recent AS (
            SELECT h.kind, h.step, h.detail, s.saga_type
            FROM saga_history h
            JOIN saga_instances s ON s.id = h.saga_id
             AND s.updated_at >= now() - interval '15 minutes'
            WHERE h.at >= now() - interval '15 minutes'
              AND h.kind IN ('step_started', 'step_failed', 'retry_scheduled', 'needs_attention')
        ),
        ports AS (
            SELECT DISTINCT saga_type, step, detail->>'port' AS port
            FROM recent WHERE kind = 'step_started' AND detail->>'port' IS NOT NULL
        )
        SELECT p.port,
               count(*) FILTER (WHERE r.kind = 'step_started')::bigint AS calls,
               count(*) FILTER (WHERE r.kind = 'retry_scheduled'
                   OR (r.kind = 'step_failed' AND r.detail->>'outcome_unknown' = 'true')
               )::bigint AS transient_failures,
               count(*) FILTER (WHERE r.kind = 'step_failed'
                   AND r.detail->>'outcome_unknown' = 'false')::bigint AS business_failures,
               count(*) FILTER (WHERE r.kind = 'retry_scheduled')::bigint AS retries_scheduled,
               count(*) FILTER (WHERE r.kind = 'needs_attention')::bigint AS needs_attention
        FROM recent r
        JOIN ports p USING (saga_type, step)
        GROUP BY p.port
    """,
    "breakers": """
        SELECT b.port, b.worker, b.state, b.failures, b.times_opened, b.changed_at,
               extract(epoch FROM now() - b.changed_at)::float8 AS in_state_s,
               coalesce(w.last_beat_at >= now() - 3 * w.beat_interval_s * interval '1 second',
                        false) AS worker_alive
        FROM port_breakers b
        LEFT JOIN worker_heartbeats w ON w.worker = b.worker
    """,
    "backlog": """
        SELECT
            (SELECT count(*) FROM outbox WHERE published_at IS NULL)::bigint
                AS outbox_unpublished,
            coalesce((SELECT extract(epoch FROM now() - min(created_at)) FROM outbox
                      WHERE published_at IS NULL), 0)::float8 AS outbox_oldest_age_s,
            (SELECT count(*) FROM timers WHERE parked_at IS NULL AND fire_at < now())::bigint
                AS timers_overdue,
            coalesce((SELECT extract(epoch FROM now() - min(fire_at)) FROM timers
                      WHERE parked_at IS NULL AND fire_at < now()), 0)::float8
                AS timer_oldest_lateness_s,
            (SELECT count(*) FROM timers WHERE parked_at IS NOT NULL)::bigint AS timers_parked,
            (SELECT count(*) FROM parked_messages)::bigint AS parked_messages,
            (SELECT min(expires_at) FROM parked_messages) AS parked_next_expiry_at
    """,
    "queue_depths": """
        SELECT DISTINCT ON (q.queue)
               q.queue, (q.depth->>'messages')::bigint AS messages,
               (q.depth->>'consumers')::bigint AS consumers,
               w.worker AS seen_by, w.last_beat_at AS seen_at
        FROM worker_heartbeats w
        CROSS JOIN LATERAL jsonb_each(w.queue_depths) AS q(queue, depth)
        ORDER BY q.queue, w.last_beat_at DESC
    """,
    "dead_letter_groups": """
        SELECT fingerprint, reason, saga_type, handler,
               count(*)::bigint AS letters,
               count(*) FILTER (WHERE first_failed_at >= now() - interval '1 hour')::bigint
                   AS new_last_hour,
               count(*) FILTER (WHERE first_failed_at >= now() - interval '1 day')::bigint
                   AS new_last_day,
               min(first_failed_at) AS first_failed_at,
               max(last_failed_at) AS last_failed_at,
               min(message_type) AS message_type
        FROM dead_letters
        WHERE status = 'active'
        GROUP BY fingerprint, reason, saga_type, handler
    """,
    "dead_letters_per_minute": """
        SELECT date_trunc('minute', first_failed_at) AS minute, reason,
               count(*)::bigint AS letters
        FROM dead_letters
        WHERE first_failed_at >= date_trunc('minute', now()) - interval '59 minutes'
        GROUP BY 1, 2
    """,
    "workers": """
        SELECT worker, host, pid, version, sagas, ports, started_at, last_beat_at,
               extract(epoch FROM now() - last_beat_at)::float8 AS beat_age_s,
               last_beat_at >= now() - 3 * beat_interval_s * interval '1 second' AS alive,
               in_flight, breakers, queue_depths
        FROM worker_heartbeats
    """,
}
"""Each view's query, created in this order (none depends on another)."""


def upgrade() -> None:
    op.create_table(
        "worker_heartbeats",
        sa.Column("worker", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("sagas", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("ports", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("beat_interval_s", sa.Float(), nullable=False),
        sa.Column("in_flight", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "breakers",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column(
            "queue_depths",
            postgresql.JSONB(),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.CheckConstraint("beat_interval_s > 0", name=op.f("ck_worker_heartbeats_beat_interval")),
        sa.CheckConstraint("in_flight >= 0", name=op.f("ck_worker_heartbeats_in_flight")),
        sa.PrimaryKeyConstraint("worker", name=op.f("pk_worker_heartbeats")),
    )
    op.create_index(
        op.f("ix_saga_history_at_brin"),
        "saga_history",
        ["at"],
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
    )
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'sagaworks_read') THEN
                IF NOT has_database_privilege(current_database(), 'CREATE') THEN
                    RAISE EXCEPTION 'the migrations role % may not create schema sagaworks_read',
                        current_user
                        USING HINT = 'run "sagaworks db roles" as an administrator first, '
                            'or CREATE SCHEMA sagaworks_read AUTHORIZATION ' || current_user;
                END IF;
                CREATE SCHEMA sagaworks_read;
            END IF;
        END
        $$
        """
    )
    for name, query in _VIEWS.items():
        op.execute(f"CREATE VIEW sagaworks_read.{name} AS {query}")


def downgrade() -> None:
    for name in reversed(_VIEWS):
        op.execute(f"DROP VIEW IF EXISTS sagaworks_read.{name}")
    op.execute(
        """
        DO $$
        BEGIN
            IF NOT EXISTS (
                SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE n.nspname = 'sagaworks_read'
            ) AND NOT EXISTS (
                SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                WHERE n.nspname = 'sagaworks_read'
            ) THEN
                DROP SCHEMA IF EXISTS sagaworks_read;
            END IF;
        END
        $$
        """
    )
    op.drop_index(op.f("ix_saga_history_at_brin"), table_name="saga_history")
    op.drop_table("worker_heartbeats")
