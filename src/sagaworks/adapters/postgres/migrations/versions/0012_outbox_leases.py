"""Outbox rows a worker runs itself (eager steps) carry a lease.

Revision ID: 0012
Revises: 0011

`lease_until`: set on a step command the committing worker runs in its own
process instead of publishing it; the sweeper leaves the row alone until
then, and publishes it to the port's queue if the lease ran out (the worker
died or stalled) before the step's result was committed. NULL for every
other row.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("outbox", sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("outbox", "lease_until")
