"""Where circuit-breaker changes are recorded: the port's row for dashboards, and its event."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from sagaworks.application.ports.messages import OutboxRow, PendingMessage

__all__ = ["BreakerChange", "BreakerLog", "BreakerState"]

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(frozen=True, slots=True)
class BreakerChange:
    """One breaker of one worker process moved from `previous` to `state`."""

    port: str
    worker: str
    previous: BreakerState
    state: BreakerState
    failures: int
    """Consecutive failures counted when the change happened (0 once closed)."""
    at: datetime


class BreakerLog(Protocol):
    async def record(self, change: BreakerChange, event: PendingMessage) -> Sequence[OutboxRow]:
        """In one transaction: the port's state for dashboards, and `event` in the outbox."""
        ...
