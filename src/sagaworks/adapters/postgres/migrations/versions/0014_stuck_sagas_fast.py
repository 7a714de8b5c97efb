"""Stuck sagas in milliseconds: letters look their saga up, and the query is never JIT-compiled.

Revision ID: 0014
Revises: 0013

`sagaworks_read.dead_letter_sagas` joined every dead letter to every saga
(by the saga id in the message id, or by type and correlation key) and only
then did `stuck_sagas` keep the active letters: the planner hashed all saga
rows, 0.4 s with a million sagas and ten thousand active letters. Each
letter now looks its saga up (`LATERAL`, two primary or unique key probes),
so a query that keeps some letters pays for those alone.

What was left of `stuck_sagas` ran in under 20 ms, and then PostgreSQL spent
about 90 ms compiling it (JIT: its estimated cost is high, its real work
small). The query now runs inside `sagaworks_read.stuck_sagas_now()`, a
function that turns JIT off for itself alone, and the view reads the
function. Both views keep their names and columns, so `CREATE OR REPLACE`
keeps their grants, and dashboards, alerts and the CLI read them as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from sagaworks.adapters.postgres.migrations.released import released_revision

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DEAD_LETTER_SAGAS = """
CREATE OR REPLACE VIEW sagaworks_read.dead_letter_sagas AS
SELECT d.id AS dead_letter_id, s.saga_id
FROM dead_letters d
CROSS JOIN LATERAL (
  SELECT i.id AS saga_id FROM saga_instances i
  WHERE i.id = CASE
    WHEN d.message_id ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/'
    THEN left(d.message_id, 36)::uuid END
  UNION
  SELECT i.id FROM saga_instances i
  WHERE i.saga_type = d.saga_type AND i.correlation_key = d.headers->>'cloudEvents_correlationid'
) s
"""


_STUCK_COLUMNS = (
    "saga_id uuid, saga_type text, correlation_key text, status text, current_step text, "
    "reason text, detail text, since timestamptz, command text"
)
_STUCK_VIEW_HEAD = "CREATE VIEW sagaworks_read.stuck_sagas AS"


def upgrade() -> None:
    op.execute(_DEAD_LETTER_SAGAS)
    query = _stuck_sagas_of_0007().removeprefix(_STUCK_VIEW_HEAD)
    op.execute(
        f"CREATE FUNCTION sagaworks_read.stuck_sagas_now() RETURNS TABLE ({_STUCK_COLUMNS}) "
        f"LANGUAGE sql STABLE SET jit = off AS $stuck$ {query} $stuck$"
    )
    op.execute(
        "CREATE OR REPLACE VIEW sagaworks_read.stuck_sagas AS "
        "SELECT * FROM sagaworks_read.stuck_sagas_now()"
    )


def downgrade() -> None:
    op.execute(_stuck_sagas_of_0007().replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))
    op.execute("DROP FUNCTION sagaworks_read.stuck_sagas_now()")
    joined: str = released_revision("0007_operator_indexes.py")._DEAD_LETTER_SAGAS
    op.execute(joined.replace("CREATE VIEW", "CREATE OR REPLACE VIEW", 1))


def _stuck_sagas_of_0007() -> str:
    view: str = released_revision("0007_operator_indexes.py")._STUCK_SAGAS.strip()
    assert view.startswith(_STUCK_VIEW_HEAD), "revision 0007 is released and never changes"
    return view
