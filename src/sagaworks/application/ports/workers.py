"""Where a worker says it is alive and what it is doing, for the `workers` read model."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sagaworks.application.ports.breakers import BreakerState

__all__ = ["Heartbeat", "HeartbeatLog", "QueueDepth"]


@dataclass(frozen=True, slots=True)
class QueueDepth:
    """A queue as the broker last described it to a worker."""

    messages: int
    consumers: int


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """One worker process at one beat: who it is, what it runs, how busy it is."""

    worker: str
    """`<host>:<pid>`, the name its breaker rows carry too."""
    host: str
    pid: int
    version: str
    sagas: tuple[str, ...]
    ports: tuple[str, ...]
    started_at: datetime
    beat_interval_s: float
    """How often it beats; a row three intervals old is a worker that is gone."""
    in_flight: int
    """Deliveries being handled right now."""
    breakers: Mapping[str, BreakerState]
    queue_depths: Mapping[str, QueueDepth]


class HeartbeatLog(Protocol):
    async def beat(self, heartbeat: Heartbeat) -> None:
        """Record `heartbeat` as the worker's latest, stamped with the database's clock."""
        ...

    async def remove(self, worker: str) -> None:
        """Forget the worker: it stopped on purpose, so it is not shown as gone."""
        ...
