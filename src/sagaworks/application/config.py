"""How the engine is tuned: the limits the use cases enforce, and each port's call policy.

`EngineOptions` is set from `Settings` by the bootstrap. `PortPolicy` is
declared with a port adapter (never in a saga definition): how patient to be
with a participant is a property of that participant. Both live in the
application layer so that sagas can declare a policy through the public API
without importing an adapter.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from random import Random

__all__ = ["EngineOptions", "PortPolicy"]


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
    timer_max_attempts: int = 10
    """Failed applications of one timer before it is parked with its error."""
    timer_retry_base: timedelta = timedelta(seconds=1)
    """Wait after a timer's first failed application; doubled after each further one."""
    timer_retry_max: timedelta = timedelta(minutes=5)
    """The longest wait between two applications of a failing timer."""

    def timer_retry_at(self, attempts: int, now: datetime) -> datetime | None:
        """When a timer that failed `attempts` times runs again; None once it is to be parked."""
        if attempts >= self.timer_max_attempts:
            return None
        doublings = min(attempts - 1, 30)  # beyond that the cap has long been reached
        return now + min(self.timer_retry_max, self.timer_retry_base * (1 << doublings))


@dataclass(frozen=True, slots=True)
class PortPolicy:
    call_timeout_s: float = 5.0
    """Deadline of one call; a slower answer counts as a transient failure."""
    immediate_attempts: int = 3
    """Tries within one delivery (tenacity), for transient errors only."""
    immediate_wait_s: float = 0.05
    immediate_wait_max_s: float = 0.5
    delayed_retries: int = 5
    """Further attempts through PostgreSQL timers before the step fails."""
    delayed_base_s: float = 1.0
    delayed_max_s: float = 60.0
    breaker_failures: int = 5
    """Consecutive transient failures that open the port's circuit breaker."""
    breaker_reset_s: float = 30.0
    """How long an open breaker refuses calls before one trial call may decide."""

    def __post_init__(self) -> None:
        if (
            self.call_timeout_s <= 0
            or self.immediate_attempts < 1
            or self.delayed_retries < 0
            or self.breaker_failures < 1
            or self.breaker_reset_s <= 0
        ):
            raise ValueError(
                "a port policy needs call_timeout_s > 0, immediate_attempts >= 1, "
                "delayed_retries >= 0, breaker_failures >= 1 and breaker_reset_s > 0"
            )

    @property
    def longest_delivery_s(self) -> float:
        """The longest one delivery's calls can take: every immediate attempt running to its
        deadline, with the longest wait between them."""
        return (
            self.immediate_attempts * self.call_timeout_s
            + (self.immediate_attempts - 1) * self.immediate_wait_max_s
        )

    def next_retry_at(self, attempt: int, now: datetime, rng: Random) -> datetime | None:
        """Capped exponential backoff, jittered within [half, all] of it; None once spent.

        The jitter comes from `rng`, owned by the caller that schedules the
        retry: a seeded one makes the schedule reproducible.
        """
        if attempt > self.delayed_retries:
            return None
        ceiling = min(self.delayed_max_s, self.delayed_base_s * 2 ** (attempt - 1))
        return now + timedelta(seconds=rng.uniform(ceiling / 2, ceiling))
