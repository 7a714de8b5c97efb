"""A per-minute rollup of the saga history behind the dashboard views.

Revision ID: 0013
Revises: 0012

Views that aggregated an hour of `saga_history` on every refresh took
seconds on a busy database, and their cost grew with the traffic. A worker
now folds history into per-minute rows (`read_saga_minutes`,
`read_step_minutes`, `read_latency_minutes`, `read_step_ports`) a few
seconds at a time, one worker at a time (the row of `read_rollup_state` is
locked, `SKIP LOCKED`), and `throughput_per_minute`, `port_activity` and
`step_latency` read those rows plus only the history written since the last
rollup. Their names and columns are unchanged, so dashboards, alerts and
`sagaworks top` read them as before.

The history is read through set-returning functions, so the rollup and the
views count it by one definition. Each runs its query with `EXECUTE … USING`,
so it is planned knowing its bounds (a view's recent seconds, not a third of
the history as a generic plan guesses), and without JIT, whose compiling took
seconds for queries that run in milliseconds. Latency is kept as a histogram of
logarithmic buckets (25 % wide) and percentiles are interpolated within a
bucket (`sagaworks_bucket_quantile`).

The rollup starts an hour back, the longest window a view shows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import sqlalchemy as sa
from alembic import op

from sagaworks.adapters.postgres.migrations.released import released_revision

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ATTEMPT_KINDS = (
    "'step_started', 'step_completed', 'step_failed', 'retry_scheduled', "
    "'compensation_completed', 'needs_attention', 'step_abandoned'"
)
_STAY_ENDS = (
    "'waiting', 'step_completed', 'step_failed', 'compensation_completed', "
    "'needs_attention', 'step_abandoned', 'event_received', 'deadline_missed'"
)

_FUNCTIONS: dict[str, str] = {
    "sagaworks_latency_bucket(seconds float8)": """
        RETURNS int LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT CASE WHEN seconds < 0.001 THEN 0
                        ELSE least(1 + floor(ln(seconds / 0.001) / ln(1.25))::int, 99) END
        $$
    """,
    "sagaworks_bucket_quantile(q float8, buckets int[], samples bigint[])": """
        RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
            SELECT (low + (q * total - (upto - n)) / n * (high - low))::float8
            FROM (
                SELECT u.b, u.n::float8 AS n,
                       (sum(u.n) OVER (ORDER BY u.b))::float8 AS upto,
                       (sum(u.n) OVER ())::float8 AS total,
                       CASE WHEN u.b = 0 THEN 0 ELSE 0.001 * power(1.25, u.b - 1) END AS low,
                       0.001 * power(1.25, u.b) AS high
                FROM unnest(buckets, samples) AS u(b, n)
                WHERE u.n > 0
            ) cumulative
            WHERE upto >= q * total
            ORDER BY b
            LIMIT 1
        $$
    """,
    "sagaworks_history_outcomes(since timestamptz, before timestamptz)": """
        RETURNS TABLE (minute timestamptz, saga_type text, started bigint, completed bigint,
                       compensated bigint, needs_attention bigint, steps_run bigint)
        LANGUAGE plpgsql STABLE SET jit = off AS $fn$
        BEGIN
        RETURN QUERY EXECUTE $q$
            SELECT date_trunc('minute', h.at), s.saga_type,
                   count(*) FILTER (WHERE h.kind = 'started'),
                   count(*) FILTER (WHERE h.kind = 'completed'),
                   count(*) FILTER (WHERE h.kind = 'compensated'),
                   count(*) FILTER (WHERE h.kind = 'needs_attention'),
                   count(*) FILTER (WHERE h.kind = 'step_started')
            FROM saga_history h
            JOIN saga_instances s ON s.id = h.saga_id AND s.updated_at >= $1
            WHERE h.at >= $1 AND h.at < $2
              AND h.kind IN ('started', 'completed', 'compensated', 'needs_attention',
                             'step_started')
            GROUP BY 1, 2
        $q$ USING since, before;
        END
        $fn$
    """,
    "sagaworks_history_step_counts(since timestamptz, before timestamptz)": """
        RETURNS TABLE (minute timestamptz, saga_type text, step text, calls bigint,
                       transient_failures bigint, business_failures bigint,
                       retries_scheduled bigint, needs_attention bigint)
        LANGUAGE plpgsql STABLE SET jit = off AS $fn$
        BEGIN
        RETURN QUERY EXECUTE $q$
            SELECT date_trunc('minute', h.at), s.saga_type, h.step,
                   count(*) FILTER (WHERE h.kind = 'step_started'),
                   count(*) FILTER (WHERE h.kind = 'retry_scheduled'
                       OR (h.kind = 'step_failed' AND h.detail->>'outcome_unknown' = 'true')),
                   count(*) FILTER (WHERE h.kind = 'step_failed'
                       AND h.detail->>'outcome_unknown' = 'false'),
                   count(*) FILTER (WHERE h.kind = 'retry_scheduled'),
                   count(*) FILTER (WHERE h.kind = 'needs_attention')
            FROM saga_history h
            JOIN saga_instances s ON s.id = h.saga_id AND s.updated_at >= $1
            WHERE h.at >= $1 AND h.at < $2 AND h.step IS NOT NULL
              AND h.kind IN ('step_started', 'step_failed', 'retry_scheduled', 'needs_attention')
            GROUP BY 1, 2, 3
        $q$ USING since, before;
        END
        $fn$
    """,
    "sagaworks_history_step_ports(since timestamptz, before timestamptz)": """
        RETURNS TABLE (saga_type text, step text, port text, seen_at timestamptz)
        LANGUAGE plpgsql STABLE SET jit = off AS $fn$
        BEGIN
        RETURN QUERY EXECUTE $q$
            SELECT DISTINCT ON (s.saga_type, h.step) s.saga_type, h.step, h.detail->>'port', h.at
            FROM saga_history h
            JOIN saga_instances s ON s.id = h.saga_id AND s.updated_at >= $1
            WHERE h.at >= $1 AND h.at < $2 AND h.kind = 'step_started'
              AND h.step IS NOT NULL AND h.detail->>'port' IS NOT NULL
            ORDER BY s.saga_type, h.step, h.at DESC
        $q$ USING since, before;
        END
        $fn$
    """,
    # An attempt: from `step_started` to the next row of its step among the attempt rows.
    # A stay: from the first attempt's `step_started` (or `waiting`) to the row that ends it.
    # Each belongs to the minute it ended in, so the sagas with a row in the range are read
    # whole (a few rows each, by their index) to find where what ended there began.
    "sagaworks_history_step_times(since timestamptz, before timestamptz)": f"""
        RETURNS TABLE (at timestamptz, saga_type text, step text, kind text, measure text,
                       seconds float8)
        LANGUAGE plpgsql STABLE SET jit = off AS $fn$
        BEGIN
        RETURN QUERY EXECUTE $q$
            WITH touched AS (
                SELECT DISTINCT h.saga_id, s.saga_type
                FROM saga_history h
                JOIN saga_instances s ON s.id = h.saga_id AND s.updated_at >= $1
                WHERE h.at >= $1 AND h.at < $2 AND h.step IS NOT NULL
                  AND h.kind IN ({_ATTEMPT_KINDS}, {_STAY_ENDS})
            ),
            steps AS (
                SELECT t.saga_type, p.saga_id, p.seq, p.at, p.kind, p.step,
                       p.detail->>'kind' AS step_kind, p.detail->>'attempt' AS attempt
                FROM touched t
                JOIN saga_history p ON p.saga_id = t.saga_id
                WHERE p.at < $2 AND p.step IS NOT NULL
            ),
            attempts AS (
                SELECT saga_type, step, kind, step_kind, at, lead(at) OVER w AS ended_at
                FROM steps
                WHERE kind IN ({_ATTEMPT_KINDS})
                WINDOW w AS (PARTITION BY saga_id, step ORDER BY seq)
            ),
            stays AS (
                SELECT saga_type, step, kind, step_kind, at, lead(at) OVER w AS ended_at
                FROM steps
                WHERE (kind = 'step_started' AND attempt = '1') OR kind IN ({_STAY_ENDS})
                WINDOW w AS (PARTITION BY saga_id, step ORDER BY seq)
            )
            SELECT ended_at, saga_type, step, coalesce(step_kind, 'action'), 'attempt',
                   extract(epoch FROM ended_at - at)::float8
            FROM attempts
            WHERE kind = 'step_started' AND ended_at >= $1
            UNION ALL
            SELECT ended_at, saga_type, step,
                   CASE WHEN kind = 'waiting' THEN 'wait' ELSE coalesce(step_kind, 'action') END,
                   'stay', extract(epoch FROM ended_at - at)::float8
            FROM stays
            WHERE kind IN ('step_started', 'waiting') AND ended_at >= $1
        $q$ USING since, before;
        END
        $fn$
    """,  # noqa: S608 - fixed text
}
"""Functions (in the migrations' schema, named `sagaworks_*` like the triggers'), in order."""

_TAIL = (
    "FROM read_rollup_state st CROSS JOIN LATERAL {function}("
    "greatest(st.rolled_up_to, {window}), 'infinity') t WHERE st.id = 1"
)
"""History since the last rollup. `st.id = 1` (its primary key) tells the planner there is one
row, whatever its statistics say: a larger guess made the plan cost enough to be compiled (JIT)
on every read, which took seconds."""
_PORTS = f"""
    ports AS (
        SELECT DISTINCT ON (saga_type, step) saga_type, step, port
        FROM (
            SELECT saga_type, step, port, seen_at FROM read_step_ports
            UNION ALL
            SELECT t.saga_type, t.step, t.port, t.seen_at
            {_TAIL.format(function="sagaworks_history_step_ports", window="'-infinity'")}
        ) known
        ORDER BY saga_type, step, seen_at DESC
    )
"""  # noqa: S608 - fixed text
"""The port each step calls: as last rolled up, or as the history since says if it changed."""
_HOUR = "date_trunc('minute', now()) - interval '59 minutes'"
_QUARTER = "date_trunc('minute', now()) - interval '14 minutes'"

_VIEWS: dict[str, str] = {
    "throughput_per_minute": f"""
        SELECT minute, saga_type,
               sum(started)::bigint AS started, sum(completed)::bigint AS completed,
               sum(compensated)::bigint AS compensated,
               sum(needs_attention)::bigint AS needs_attention,
               sum(steps_run)::bigint AS steps_run
        FROM (
            SELECT minute, saga_type, started, completed, compensated, needs_attention,
                   steps_run
            FROM read_saga_minutes WHERE minute >= {_HOUR}
            UNION ALL
            SELECT t.minute, t.saga_type, t.started, t.completed, t.compensated,
                   t.needs_attention, t.steps_run
            {_TAIL.format(function="sagaworks_history_outcomes", window=_HOUR)}
        ) m
        GROUP BY minute, saga_type
    """,  # noqa: S608 - fixed text
    "step_latency": f"""
        WITH samples AS (
            SELECT saga_type, step, kind, measure, bucket, samples
            FROM read_latency_minutes WHERE minute >= {_QUARTER}
            UNION ALL
            SELECT t.saga_type, t.step, t.kind, t.measure,
                   sagaworks_latency_bucket(t.seconds), 1::bigint
            {_TAIL.format(function="sagaworks_history_step_times", window=_QUARTER)}
        ),
        merged AS (
            SELECT saga_type, step, kind, measure, bucket, sum(samples)::bigint AS samples
            FROM samples GROUP BY 1, 2, 3, 4, 5
        ),
        histograms AS (
            SELECT saga_type, step, kind, measure, sum(samples)::bigint AS n,
                   array_agg(bucket ORDER BY bucket) AS buckets,
                   array_agg(samples ORDER BY bucket) AS counts
            FROM merged GROUP BY 1, 2, 3, 4
        ),
        attempts AS (SELECT * FROM histograms WHERE measure = 'attempt'),
        stays AS (SELECT * FROM histograms WHERE measure = 'stay'),
        {_PORTS}
        SELECT saga_type, step, p.port, kind,
               coalesce(a.n, 0)::bigint AS attempts,
               sagaworks_bucket_quantile(0.5, a.buckets, a.counts) AS attempt_p50_s,
               sagaworks_bucket_quantile(0.95, a.buckets, a.counts) AS attempt_p95_s,
               sagaworks_bucket_quantile(0.99, a.buckets, a.counts) AS attempt_p99_s,
               coalesce(st.n, 0)::bigint AS stays,
               sagaworks_bucket_quantile(0.5, st.buckets, st.counts) AS in_step_p50_s,
               sagaworks_bucket_quantile(0.95, st.buckets, st.counts) AS in_step_p95_s,
               sagaworks_bucket_quantile(0.99, st.buckets, st.counts) AS in_step_p99_s
        FROM attempts a
        FULL JOIN stays st USING (saga_type, step, kind)
        LEFT JOIN ports p USING (saga_type, step)
    """,  # noqa: S608 - fixed text
    "port_activity": f"""
        WITH {_PORTS}
        SELECT p.port,
               sum(c.calls)::bigint AS calls,
               sum(c.transient_failures)::bigint AS transient_failures,
               sum(c.business_failures)::bigint AS business_failures,
               sum(c.retries_scheduled)::bigint AS retries_scheduled,
               sum(c.needs_attention)::bigint AS needs_attention
        FROM (
            SELECT saga_type, step, calls, transient_failures, business_failures,
                   retries_scheduled, needs_attention
            FROM read_step_minutes WHERE minute >= {_QUARTER}
            UNION ALL
            SELECT t.saga_type, t.step, t.calls, t.transient_failures, t.business_failures,
                   t.retries_scheduled, t.needs_attention
            {_TAIL.format(function="sagaworks_history_step_counts", window=_QUARTER)}
        ) c
        JOIN ports p USING (saga_type, step)
        GROUP BY p.port
    """,  # noqa: S608 - fixed text
}
"""The views this revision redefines: same names, same columns, same types as in 0009."""


def _timestamp(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _counts(*names: str) -> list[sa.Column[object]]:
    return [
        sa.Column(name, sa.BigInteger(), server_default=sa.text("0"), nullable=False)
        for name in names
    ]


def upgrade() -> None:
    op.create_table(
        "read_rollup_state",
        sa.Column("id", sa.Integer(), server_default=sa.text("1"), nullable=False),
        _timestamp("rolled_up_to"),
        _timestamp("rolled_at", nullable=True),
        sa.CheckConstraint("id = 1", name=op.f("ck_read_rollup_state_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_read_rollup_state")),
    )
    op.execute(
        "INSERT INTO read_rollup_state (id, rolled_up_to) VALUES (1, now() - interval '1 hour')"
    )
    op.create_table(
        "read_saga_minutes",
        _timestamp("minute"),
        sa.Column("saga_type", sa.Text(), nullable=False),
        *_counts("started", "completed", "compensated", "needs_attention", "steps_run"),
        sa.PrimaryKeyConstraint("minute", "saga_type", name=op.f("pk_read_saga_minutes")),
    )
    op.create_table(
        "read_step_minutes",
        _timestamp("minute"),
        sa.Column("saga_type", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        *_counts(
            "calls",
            "transient_failures",
            "business_failures",
            "retries_scheduled",
            "needs_attention",
        ),
        sa.PrimaryKeyConstraint("minute", "saga_type", "step", name=op.f("pk_read_step_minutes")),
    )
    op.create_table(
        "read_latency_minutes",
        _timestamp("minute"),
        sa.Column("saga_type", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("measure", sa.Text(), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "measure IN ('attempt', 'stay')", name=op.f("ck_read_latency_minutes_measure")
        ),
        sa.CheckConstraint("bucket BETWEEN 0 AND 99", name=op.f("ck_read_latency_minutes_bucket")),
        sa.PrimaryKeyConstraint(
            *("minute", "saga_type", "step", "kind", "measure", "bucket"),
            name=op.f("pk_read_latency_minutes"),
        ),
    )
    op.create_table(
        "read_step_ports",
        sa.Column("saga_type", sa.Text(), nullable=False),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("port", sa.Text(), nullable=False),
        _timestamp("seen_at"),
        sa.PrimaryKeyConstraint("saga_type", "step", name=op.f("pk_read_step_ports")),
    )
    for signature, body in _FUNCTIONS.items():
        op.execute(f"CREATE FUNCTION {signature} {body}")
    _replace_views(_VIEWS)


def downgrade() -> None:
    _replace_views({name: _views_of_0009()[name] for name in _VIEWS})
    for signature in reversed(_FUNCTIONS):
        op.execute(f"DROP FUNCTION {signature}")
    for table in (
        "read_step_ports",
        "read_latency_minutes",
        "read_step_minutes",
        "read_saga_minutes",
        "read_rollup_state",
    ):
        op.drop_table(table)


def _replace_views(views: Mapping[str, str]) -> None:
    """Same columns, so `CREATE OR REPLACE` keeps the views' grants to the read roles."""
    for name, query in views.items():
        op.execute(f"CREATE OR REPLACE VIEW sagaworks_read.{name} AS {query}")


def _views_of_0009() -> Mapping[str, str]:
    """The views as revision 0009 made them."""
    views: Mapping[str, str] = released_revision("0009_read_models.py")._VIEWS
    return views
