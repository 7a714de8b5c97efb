"""Port breakers: the circuit-breaker state of every port in every worker, for dashboards.

Revision ID: 0002
Revises: 0001

One row per (port, worker process), upserted by the worker on every state
change of that port's breaker; `times_opened` counts how often it opened.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "port_breakers",
        sa.Column("port", sa.Text(), nullable=False),
        sa.Column("worker", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("times_opened", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("port", "worker", name=op.f("pk_port_breakers")),
        sa.CheckConstraint(
            "state IN ('closed', 'open', 'half_open')", name=op.f("ck_port_breakers_state")
        ),
        sa.CheckConstraint("failures >= 0", name=op.f("ck_port_breakers_failures")),
    )


def downgrade() -> None:
    op.drop_table("port_breakers")
