"""Operators find sagas fast and see the stuck ones: list indexes and `sagaworks_read.stuck_sagas`.

Revision ID: 0007
Revises: 0006

Indexes serve `sagaworks saga list` filters (type and status, current step,
age, business key by prefix), the learning of usual step durations (history
rows that end a port call, by step and time), and `saga show` (a saga's
unpublished outbox rows, dead letters named after its id), and a saga's
last delayed retry (why it is retrying).

The schema `sagaworks_read` holds the operators' views:

- `dead_letter_sagas(dead_letter_id, saga_id)`: which saga a dead letter
  belongs to. A message sagaworks published carries `<saga id>/...` as its
  id; any other is matched by saga type and CloudEvents correlation id.
- `stuck_sagas`: one row per saga that needs a person or looks wrong, with
  the first reason that applies (in the order of `reason_rank`), what was
  seen, since when, and the command that addresses it.

The view's bounds are PostgreSQL settings with defaults, so a site can tune
them without a migration (`ALTER DATABASE ... SET sagaworks.stuck_timer_grace
= '30 seconds'`); `sagaworks_read.setting()` reads them. See
docs/operations.md, "Stuck sagas".
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CALL_ENDS = (
    "kind IN ('step_completed', 'compensation_completed', 'step_failed', 'retry_scheduled')"
)

_CAN_CREATE_SCHEMA = """
DO $$ BEGIN
  IF NOT has_database_privilege(current_database(), 'CREATE') THEN
    RAISE EXCEPTION 'role % may not create the schema sagaworks_read in this database',
      current_user
      USING HINT = 'run `sagaworks db roles` as an administrator (it grants the migrator '
                   'CREATE on the database), then `sagaworks db upgrade` again';
  END IF;
END $$
"""

_SETTING = """
CREATE FUNCTION sagaworks_read.setting(name text, fallback text) RETURNS text
LANGUAGE sql STABLE AS $$
  SELECT coalesce(nullif(current_setting('sagaworks.' || name, true), ''), fallback)
$$
"""

_DEAD_LETTER_SAGAS = """
CREATE VIEW sagaworks_read.dead_letter_sagas AS
SELECT d.id AS dead_letter_id, s.id AS saga_id
FROM dead_letters d
JOIN saga_instances s ON s.id = CASE
  WHEN d.message_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/'
  THEN left(d.message_id, 36)::uuid END
UNION
SELECT d.id, s.id
FROM dead_letters d
JOIN saga_instances s
  ON s.saga_type = d.saga_type AND s.correlation_key = d.headers->>'cloudEvents_correlationid'
"""

_STUCK_SAGAS = """
CREATE VIEW sagaworks_read.stuck_sagas AS
WITH
flight AS MATERIALIZED (
  SELECT s.id, s.saga_type, s.correlation_key, s.status, s.current_step, s.updated_at,
         s.progress->'in_flight'->>'step' AS step,
         s.progress->'in_flight'->>'kind' AS kind,
         (s.progress->'in_flight'->>'attempt')::int AS attempt,
         (s.progress->'in_flight'->>'retry_at')::timestamptz AS retry_at
  FROM saga_instances s
  WHERE s.status IN ('running', 'compensating')
    AND jsonb_typeof(s.progress->'in_flight') = 'object'
),
idle AS MATERIALIZED (
  SELECT f.* FROM flight f
  WHERE f.retry_at IS NULL
    AND f.updated_at < now() - sagaworks_read.setting('stuck_idle_floor', '5 minutes')::interval
),
learned AS MATERIALIZED (
  SELECT k.saga_type, k.step, l.p95, l.samples
  FROM (SELECT DISTINCT saga_type, step FROM idle) k
  CROSS JOIN LATERAL (
    SELECT percentile_cont(0.95) WITHIN GROUP (ORDER BY e.at - st.at) AS p95,
           count(*) AS samples
    FROM (
      SELECT h.saga_id, h.seq, h.at
      FROM saga_history h
      JOIN saga_instances i ON i.id = h.saga_id AND i.saga_type = k.saga_type
      WHERE h.step = k.step
        AND h.kind IN ('step_completed', 'compensation_completed', 'step_failed',
                       'retry_scheduled')
        AND h.at > now() - sagaworks_read.setting('stuck_learn_window', '7 days')::interval
      ORDER BY h.at DESC
      LIMIT 300
    ) e
    CROSS JOIN LATERAL (
      SELECT x.at FROM saga_history x
      WHERE x.saga_id = e.saga_id AND x.seq < e.seq AND x.kind = 'step_started'
      ORDER BY x.seq DESC LIMIT 1
    ) st
  ) l
),
waiting AS MATERIALIZED (
  SELECT s.id, s.saga_type, s.correlation_key, s.status, s.current_step, s.updated_at,
         t.id AS timer_id, t.attempts, t.last_error
  FROM saga_instances s
  LEFT JOIN timers t ON t.saga_id = s.id AND t.name = 'deadline:' || s.current_step
  WHERE s.status = 'running' AND s.current_step IS NOT NULL
    AND jsonb_typeof(s.progress->'in_flight') IS DISTINCT FROM 'object'
    AND (t.id IS NULL OR t.parked_at IS NOT NULL)
),
open_ports AS (
  SELECT b.port, count(*) AS workers, min(b.changed_at) AS since
  FROM port_breakers b
  WHERE b.state = 'open'
    AND b.changed_at > now() - sagaworks_read.setting('stuck_breaker_fresh', '5 minutes')::interval
  GROUP BY b.port
),
candidates AS (
  SELECT s.id AS saga_id, s.saga_type, s.correlation_key, s.status, s.current_step,
         'needs_attention' AS reason,
         format('stopped at %s: %s', coalesce(s.current_step, 'the end'),
                coalesce(s.progress->>'error', 'no error recorded')) AS detail,
         s.updated_at AS since,
         format('sagaworks saga resume %s --reason "..."', s.id) AS command
  FROM saga_instances s
  WHERE s.status = 'needs_attention'
  UNION ALL
  SELECT f.id, f.saga_type, f.correlation_key, f.status, f.current_step, 'compensation_failing',
         format('compensation of %s failed %s time(s)%s%s', f.step,
                CASE WHEN f.retry_at IS NULL THEN f.attempt - 1 ELSE f.attempt END,
                coalesce(' (' || (
                  SELECT h.detail->>'reason' FROM saga_history h
                  WHERE h.saga_id = f.id AND h.kind = 'retry_scheduled'
                  ORDER BY h.seq DESC LIMIT 1) || ')', ''),
                coalesce('; next attempt at ' || sagaworks_read.utc(f.retry_at),
                         '; attempt running')),
         f.updated_at,
         format('sagaworks saga retry %s --reason "..."', f.id)
  FROM flight f
  WHERE f.status = 'compensating' AND f.kind = 'compensation'
    AND (f.retry_at IS NOT NULL OR f.attempt > 1)
  UNION ALL
  SELECT f.id, f.saga_type, f.correlation_key, f.status, f.current_step, 'port_breaker_open',
         format('%s of %s waits on port %s, whose breaker is open in %s worker(s)',
                f.kind, f.step, o.port, o.workers),
         o.since,
         format('sagaworks saga retry %s --reason "..."', f.id)
  FROM flight f
  CROSS JOIN LATERAL (
    SELECT h.detail->>'port' AS port FROM saga_history h
    WHERE h.saga_id = f.id AND h.kind = 'step_started' AND h.step = f.step
    ORDER BY h.seq DESC LIMIT 1
  ) p
  JOIN open_ports o ON o.port = p.port
  UNION ALL
  SELECT s.id, s.saga_type, s.correlation_key, s.status, s.current_step, 'dead_lettered',
         format('dead letter %s (%s) of message %s: %s', d.id, d.reason, d.message_id,
                coalesce(d.exception_type || ': ', '') || coalesce(d.exception_message, '')),
         d.last_failed_at,
         format('sagaworks dlq replay %s', d.id)
  FROM sagaworks_read.dead_letter_sagas ds
  JOIN dead_letters d ON d.id = ds.dead_letter_id AND d.status = 'active'
  JOIN saga_instances s ON s.id = ds.saga_id
  UNION ALL
  SELECT w.id, w.saga_type, w.correlation_key, w.status, w.current_step,
         'waiting_past_deadline',
         format('waiting at %s; its deadline %s passed and %s', w.current_step,
                sagaworks_read.utc(u.until),
                CASE WHEN w.timer_id IS NULL THEN 'no timer is set to fire it'
                     ELSE format('its timer is parked after %s failed attempt(s): %s',
                                 w.attempts, coalesce(w.last_error, 'no error recorded'))
                END),
         u.until,
         format('sagaworks saga cancel %s --reason "..."', w.id)
  FROM waiting w
  CROSS JOIN LATERAL (
    SELECT (h.detail->>'until')::timestamptz AS until FROM saga_history h
    WHERE h.saga_id = w.id AND h.kind = 'waiting' AND h.step = w.current_step
    ORDER BY h.seq DESC LIMIT 1
  ) u
  WHERE u.until < now()
  UNION ALL
  SELECT s.id, s.saga_type, s.correlation_key, s.status, s.current_step, 'timer_overdue',
         format('timer %s was due at %s and no worker has fired it', t.name,
                sagaworks_read.utc(t.fire_at)),
         t.fire_at,
         format('sagaworks saga retry %s --reason "..."', s.id)
  FROM timers t
  JOIN saga_instances s ON s.id = t.saga_id
  WHERE t.parked_at IS NULL
    AND t.fire_at < now() - sagaworks_read.setting('stuck_timer_grace', '1 minute')::interval
  UNION ALL
  SELECT s.id, s.saga_type, s.correlation_key, s.status, s.current_step, 'timer_overdue',
         format('timer %s is parked after %s failed attempt(s): %s', t.name, t.attempts,
                coalesce(t.last_error, 'no error recorded')),
         t.parked_at,
         format('sagaworks saga retry %s --reason "..."', s.id)
  FROM timers t
  JOIN saga_instances s ON s.id = t.saga_id
  WHERE t.parked_at IS NOT NULL
  UNION ALL
  SELECT f.id, f.saga_type, f.correlation_key, f.status, f.current_step, 'step_retrying',
         format('%s of %s failed %s time(s)%s; next attempt at %s', f.kind, f.step, f.attempt,
                coalesce(' (' || (
                  SELECT h.detail->>'reason' FROM saga_history h
                  WHERE h.saga_id = f.id AND h.kind = 'retry_scheduled'
                  ORDER BY h.seq DESC LIMIT 1) || ')', ''),
                sagaworks_read.utc(f.retry_at)),
         f.updated_at,
         format('sagaworks saga retry %s --reason "..."', f.id)
  FROM flight f
  WHERE f.retry_at IS NOT NULL
    AND f.attempt >= sagaworks_read.setting('stuck_retry_attempts', '2')::int
  UNION ALL
  SELECT p.saga_id, p.saga_type, p.correlation_key, s.status, s.current_step,
         'parked_expiring',
         format('event %s (%s) parked because %s %s at %s', p.message_type,
                p.message_id, p.reason,
                CASE WHEN p.expires_at < now() THEN 'expired' ELSE 'expires' END,
                sagaworks_read.utc(p.expires_at)),
         p.received_at,
         format('sagaworks saga show %s', p.saga_id)
  FROM parked_messages p
  LEFT JOIN saga_instances s ON s.id = p.saga_id
  WHERE p.expires_at < now()
        + sagaworks_read.setting('stuck_parked_within', '10 minutes')::interval
  UNION ALL
  SELECT i.id, i.saga_type, i.correlation_key, i.status, i.current_step, 'idle_too_long',
         format('%s of %s in flight since %s; usually done within %s', i.kind, i.step,
                sagaworks_read.utc(i.updated_at),
                CASE WHEN l.samples > 0
                     THEN format('%s s (p95 of %s calls)',
                                 to_char(extract(epoch FROM l.p95), 'FM9999990.000'), l.samples)
                     ELSE 'an unknown time (no finished calls in history)' END),
         i.updated_at,
         format('sagaworks saga retry %s --reason "..."', i.id)
  FROM idle i
  LEFT JOIN learned l ON l.saga_type = i.saga_type AND l.step = i.step
  WHERE l.p95 IS NULL OR i.updated_at < now()
        - l.p95 * sagaworks_read.setting('stuck_idle_factor', '3')::float8
)
SELECT DISTINCT ON (c.saga_id)
       c.saga_id, c.saga_type, c.correlation_key, c.status, c.current_step,
       c.reason, c.detail, c.since, c.command
FROM candidates c
ORDER BY c.saga_id, sagaworks_read.reason_rank(c.reason), c.since DESC
"""

_UTC = """
CREATE FUNCTION sagaworks_read.utc(at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
  SELECT to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
$$
"""

_REASON_RANK = """
CREATE FUNCTION sagaworks_read.reason_rank(reason text) RETURNS int
LANGUAGE sql IMMUTABLE AS $$
  SELECT array_position(ARRAY['needs_attention', 'compensation_failing', 'port_breaker_open',
    'dead_lettered', 'waiting_past_deadline', 'timer_overdue', 'step_retrying',
    'parked_expiring', 'idle_too_long'], reason)
$$
"""


def upgrade() -> None:
    op.create_index(
        op.f("ix_saga_instances_saga_type_status_updated_at"),
        "saga_instances",
        ["saga_type", "status", "updated_at"],
    )
    op.create_index(
        op.f("ix_saga_instances_current_step_updated_at"),
        "saga_instances",
        ["current_step", "updated_at"],
    )
    op.create_index(op.f("ix_saga_instances_created_at"), "saga_instances", ["created_at"])
    op.create_index(op.f("ix_saga_instances_updated_at"), "saga_instances", ["updated_at"])
    op.create_index(
        op.f("ix_saga_instances_correlation_key"),
        "saga_instances",
        ["correlation_key"],
        postgresql_ops={"correlation_key": "text_pattern_ops"},
    )
    op.create_index(
        op.f("ix_saga_history_step_at"),
        "saga_history",
        ["step", "at"],
        postgresql_where=sa.text(_CALL_ENDS),
    )
    op.create_index(
        op.f("ix_saga_history_saga_id_seq_retries"),
        "saga_history",
        ["saga_id", "seq"],
        postgresql_where=sa.text("kind = 'retry_scheduled'"),
    )
    op.create_index(
        op.f("ix_outbox_saga_id_unpublished"),
        "outbox",
        ["saga_id"],
        postgresql_where=sa.text("published_at IS NULL"),
    )
    op.create_index(
        op.f("ix_dead_letters_message_id"),
        "dead_letters",
        ["message_id"],
        postgresql_ops={"message_id": "text_pattern_ops"},
    )
    op.execute(_CAN_CREATE_SCHEMA)
    op.execute("CREATE SCHEMA IF NOT EXISTS sagaworks_read")
    op.execute(_SETTING)
    op.execute(_REASON_RANK)
    op.execute(_UTC)
    op.execute(_DEAD_LETTER_SAGAS)
    op.execute(_STUCK_SAGAS)


def downgrade() -> None:
    op.execute("DROP VIEW sagaworks_read.stuck_sagas")
    op.execute("DROP VIEW sagaworks_read.dead_letter_sagas")
    op.execute("DROP FUNCTION sagaworks_read.utc(timestamptz)")
    op.execute("DROP FUNCTION sagaworks_read.reason_rank(text)")
    op.execute("DROP FUNCTION sagaworks_read.setting(text, text)")
    op.execute(
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n "
        "ON n.oid = c.relnamespace WHERE n.nspname = 'sagaworks_read') AND NOT EXISTS "
        "(SELECT 1 FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = 'sagaworks_read') THEN DROP SCHEMA sagaworks_read; END IF; END $$"
    )
    op.drop_index(op.f("ix_dead_letters_message_id"), table_name="dead_letters")
    op.drop_index(op.f("ix_outbox_saga_id_unpublished"), table_name="outbox")
    op.drop_index(op.f("ix_saga_history_saga_id_seq_retries"), table_name="saga_history")
    op.drop_index(op.f("ix_saga_history_step_at"), table_name="saga_history")
    op.drop_index(op.f("ix_saga_instances_correlation_key"), table_name="saga_instances")
    op.drop_index(op.f("ix_saga_instances_updated_at"), table_name="saga_instances")
    op.drop_index(op.f("ix_saga_instances_created_at"), table_name="saga_instances")
    op.drop_index(op.f("ix_saga_instances_current_step_updated_at"), table_name="saga_instances")
    op.drop_index(
        op.f("ix_saga_instances_saga_type_status_updated_at"), table_name="saga_instances"
    )
