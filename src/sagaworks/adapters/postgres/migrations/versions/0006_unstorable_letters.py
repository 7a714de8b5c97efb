"""Dead letters keep what could not be stored as it came: escaped fields' bytes, cut bodies.

Revision ID: 0006
Revises: 0005

`raw_fields`: the original bytes (base64, by field name) of every text field
that had to be escaped to be stored (a NUL, bytes that are not UTF-8); NULL
when none was. `body_length` and `body_sha256`: set when the message was too
large to keep and `body` holds only its first bytes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("raw_fields", postgresql.JSONB(), nullable=True))
    op.add_column("dead_letters", sa.Column("body_length", sa.BigInteger(), nullable=True))
    op.add_column("dead_letters", sa.Column("body_sha256", sa.Text(), nullable=True))
    op.create_check_constraint(
        op.f("ck_dead_letters_whole_body"),
        "dead_letters",
        "(body_length IS NULL) = (body_sha256 IS NULL)",
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_dead_letters_whole_body"), "dead_letters", type_="check")
    op.drop_column("dead_letters", "body_sha256")
    op.drop_column("dead_letters", "body_length")
    op.drop_column("dead_letters", "raw_fields")
