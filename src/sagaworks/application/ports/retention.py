"""Deleting what the engine no longer needs, a small batch at a time."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from datetime import datetime
from enum import StrEnum
from typing import Protocol

__all__ = ["Prunable", "Retention"]


class Prunable(StrEnum):
    """What retention deletes, each older than its own cut-off."""

    INBOX = "inbox"
    """Inbox rows: the ids that make a redelivery a no-op (by `processed_at`)."""
    OUTBOX = "outbox"
    """Published outbox rows (by `published_at`); unpublished ones are never deleted."""
    SAGAS = "sagas"
    """Completed and compensated sagas (by `updated_at`), with their history and timers."""
    DEAD_LETTERS = "dead_letters"
    """Replayed and archived dead letters untouched since the cut-off; their audit stays."""
    BREAKERS = "breakers"
    """Breaker rows not changed since the cut-off: workers that are gone, or long closed."""


class Retention(Protocol):
    async def count(self, what: Prunable, before: datetime) -> int:
        """How many rows a prune with this cut-off would delete now."""
        ...

    async def delete_batch(self, what: Prunable, before: datetime, limit: int) -> int:
        """Delete at most `limit` rows older than `before` in one short transaction."""
        ...

    def exclusively(self) -> AbstractAsyncContextManager[bool]:
        """Hold the cluster-wide prune lock while inside: True if taken, False if held elsewhere."""
        ...
