"""Keep each processed body and its hash in the inbox, and both bodies in an id conflict's letter.

Revision ID: 0004
Revises: 0003

A message id is an identity: the same id with a different body is a
conflict, not a duplicate. `inbox.body_hash` tells the two apart;
`inbox.body` keeps the body processed, so the conflict's dead letter can
hold it as `dead_letters.first_body` next to the conflicting body. Rows
written before this revision have neither (NULL), and a repeat of one of
them is accepted as a duplicate, as before.
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
    op.add_column("inbox", sa.Column("body", sa.LargeBinary(), nullable=True))
    op.add_column("dead_letters", sa.Column("first_body", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    op.drop_column("dead_letters", "first_body")
    op.drop_column("inbox", "body")
    op.drop_column("inbox", "body_hash")
