"""Calling participants, and telling the time: the two ports every step needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Protocol, TypeVar

__all__ = ["Clock", "PortCaller"]

T = TypeVar("T")


class Clock(Protocol):
    def now(self) -> datetime: ...


class PortCaller(Protocol):
    """Calls a port through its resilience policy (timeout, retries, breaker)."""

    async def call(self, port: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Raises `circuit.CircuitOpen` when the port"s breaker refused: not a step failure."""
        ...

    def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
        """When a delayed retry of a failed attempt may run; None when the budget is spent."""
        ...
