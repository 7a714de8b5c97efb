"""Autovacuum tuned for the tables retention deletes from and the hot path churns.

Revision ID: 0011
Revises: 0010

PostgreSQL's defaults vacuum a table once a fifth of it is dead
(`autovacuum_vacuum_scale_factor` 0.2): on a large inbox or outbox that
is millions of dead rows bloating it and slowing the index scans of the
hot path and of `sagaworks db prune`. These tables are insert/delete (and
for the outbox, update) heavy, so they are vacuumed and analysed after a
small fraction changed, with a fixed floor so small tables are not
vacuumed constantly, and without cost-based throttling slowing it down.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TUNED = {
    "inbox": 0.02,
    "outbox": 0.01,
    "saga_instances": 0.02,
    "saga_history": 0.02,
    "timers": 0.02,
    "parked_messages": 0.02,
    "dead_letters": 0.05,
    "port_breakers": 0.05,
}
"""Table -> the fraction of it changed that triggers a vacuum (and an analyse)."""

_OPTIONS = (
    "autovacuum_vacuum_scale_factor",
    "autovacuum_vacuum_threshold",
    "autovacuum_vacuum_insert_scale_factor",
    "autovacuum_vacuum_insert_threshold",
    "autovacuum_analyze_scale_factor",
    "autovacuum_analyze_threshold",
    "autovacuum_vacuum_cost_delay",
)


def upgrade() -> None:
    for table, fraction in _TUNED.items():
        op.execute(
            f"ALTER TABLE {table} SET ("
            f"autovacuum_vacuum_scale_factor = {fraction}, "
            "autovacuum_vacuum_threshold = 1000, "
            f"autovacuum_vacuum_insert_scale_factor = {fraction}, "
            "autovacuum_vacuum_insert_threshold = 1000, "
            f"autovacuum_analyze_scale_factor = {fraction}, "
            "autovacuum_analyze_threshold = 1000, "
            "autovacuum_vacuum_cost_delay = 0)"
        )


def downgrade() -> None:
    for table in _TUNED:
        op.execute(f"ALTER TABLE {table} RESET ({', '.join(_OPTIONS)})")
