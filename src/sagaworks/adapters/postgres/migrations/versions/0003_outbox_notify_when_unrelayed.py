"""Notify the outbox sweeper only for rows nobody is about to publish.

Revision ID: 0003
Revises: 0002

A worker publishes the rows its transaction wrote right after the commit, so
waking every sweeper for them is wasted work — and `pg_notify` makes every
notifying commit take one database-wide lock through its WAL flush, which
serialises commits. A transaction that publishes its own rows says so with
`SET LOCAL sagaworks.publishes_own_outbox = 'on'` (the store does it in the
statement that takes the saga lock); the trigger stays silent for it. Rows
written by anyone else still wake the sweepers at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION sagaworks_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF coalesce(current_setting('sagaworks.publishes_own_outbox', true), '') <> 'on'
               AND EXISTS (SELECT 1 FROM inserted) THEN
                PERFORM pg_notify('sagaworks_outbox', '');
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )


def downgrade() -> None:
    op.execute(
        """
        CREATE OR REPLACE FUNCTION sagaworks_outbox_notify() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF EXISTS (SELECT 1 FROM inserted) THEN
                PERFORM pg_notify('sagaworks_outbox', '');
            END IF;
            RETURN NULL;
        END;
        $$
        """
    )
