"""Engine limits the use cases enforce, set from `Settings` by the bootstrap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

__all__ = ["EngineOptions"]


@dataclass(frozen=True, slots=True)
class EngineOptions:
    park_for: timedelta = timedelta(minutes=5)
    """How long an event that arrived too early (or before its saga) is kept."""
    max_message_bytes: int = 256 * 1024
    """Larger bodies are dead-lettered as `oversized` on first delivery."""
    batch_size: int = 256
    """At most this many messages share one transaction (1: one transaction per message)."""
    batch_concurrency: int = 1
    """Transactions of batched messages in flight at once, each on its own connection."""
