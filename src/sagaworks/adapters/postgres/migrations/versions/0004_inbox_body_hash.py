"""Keep a hash of each processed body in the inbox, so an id seen again with another body shows.

Revision ID: 0004
Revises: 0003

A message id is an identity: the same id with a different body is a
conflict, not a duplicate. Rows written before this revision have no hash
(NULL), and a repeat of one of them is accepted as a duplicate, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("inbox", sa.Column("body_hash", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("inbox", "body_hash")
