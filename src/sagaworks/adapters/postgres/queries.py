"""Read-only queries for operators and the demo: counts by status, dead letters."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from sagaworks.adapters.postgres.tables import dead_letters, saga_instances

__all__ = ["dead_letter_reasons", "saga_status_counts"]


async def saga_status_counts(
    engine: AsyncEngine, saga_type: str, key_prefix: str
) -> dict[str, int]:
    """Sagas of one type whose correlation key starts with `key_prefix`, by status."""
    query = (
        select(saga_instances.c.status, func.count())
        .where(saga_instances.c.saga_type == saga_type)
        .where(saga_instances.c.correlation_key.startswith(key_prefix, autoescape=True))
        .group_by(saga_instances.c.status)
    )
    async with engine.connect() as conn:
        return {status: count for status, count in (await conn.execute(query)).all()}


async def dead_letter_reasons(engine: AsyncEngine, message_id_prefix: str) -> dict[str, int]:
    """Dead letters whose message id starts with `message_id_prefix`, by reason."""
    query = (
        select(dead_letters.c.reason, func.count())
        .where(dead_letters.c.message_id.startswith(message_id_prefix, autoescape=True))
        .group_by(dead_letters.c.reason)
    )
    async with engine.connect() as conn:
        return {reason: count for reason, count in (await conn.execute(query)).all()}
