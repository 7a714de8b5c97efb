"""Carry each saga's trace: a W3C `traceparent` on sagas, outbox rows and timers.

Revision ID: 0010
Revises: 0009

A saga runs in one trace, the one its start event came with. The saga keeps
it (`saga_instances.trace_context`) so that an event arriving later from
outside, in a trace of its own or none, does not split the saga's trace; an
outbox row keeps the context its message is published with, and a timer the
one it continues when it fires. NULL where nothing was traced (rows written
before this revision, or by a publisher that sent no `traceparent`).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TABLES = ("saga_instances", "outbox", "timers")


def upgrade() -> None:
    for table in _TABLES:
        op.add_column(table, sa.Column("trace_context", sa.Text(), nullable=True))


def downgrade() -> None:
    for table in reversed(_TABLES):
        op.drop_column(table, "trace_context")
