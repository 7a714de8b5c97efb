"""A `PortCaller` for runs with no I/O: one attempt per delivery, delayed retries on the clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from random import Random
from typing import TypeVar

from sagaworks.application.config import PortPolicy

__all__ = ["DirectCaller"]

T = TypeVar("T")


class DirectCaller:
    """A `PortCaller` with one attempt per delivery and no timeout.

    Immediate retries would only sleep on the wall clock; a transient failure
    goes straight to the delayed retries of the port's `PortPolicy`, which run
    on the fake clock when the harness advances it. Their jitter comes from a
    random source seeded with `seed`, so the same scenario schedules the same
    retries on every run.
    """

    def __init__(
        self,
        policies: Mapping[str, PortPolicy] | None = None,
        default: PortPolicy | None = None,
        *,
        seed: int = 0,
    ) -> None:
        self._policies = dict(policies or {})
        self._default = default or PortPolicy()
        self._rng = Random(seed)  # noqa: S311 - reproducible jitter, not security

    async def call(self, port: str, attempt: Callable[[], Awaitable[T]]) -> T:
        return await attempt()

    def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
        return self._policies.get(port, self._default).next_retry_at(attempt, now, self._rng)
