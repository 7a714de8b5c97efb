"""Calls ports under their policy: a deadline per call and jittered immediate retries.

Only transient failures (`PortUnavailable`, timeouts) are retried; a
`BusinessFailure` or any other exception goes straight to the caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sagaworks.adapters.resilience.policy import PortPolicy
from sagaworks.domain.errors import PortUnavailable

__all__ = ["ResilientCaller"]

T = TypeVar("T")

_TRANSIENT = (PortUnavailable, TimeoutError)


class ResilientCaller:
    """Implements the `PortCaller` port."""

    def __init__(
        self, policies: Mapping[str, PortPolicy], default: PortPolicy | None = None
    ) -> None:
        self._policies = dict(policies)
        self._default = default or PortPolicy()

    def policy(self, port: str) -> PortPolicy:
        return self._policies.get(port, self._default)

    async def call(self, port: str, attempt: Callable[[], Awaitable[T]]) -> T:
        policy = self.policy(port)
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(_TRANSIENT),
            stop=stop_after_attempt(policy.immediate_attempts),
            wait=wait_exponential_jitter(
                initial=policy.immediate_wait_s, max=policy.immediate_wait_max_s
            ),
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                return await asyncio.wait_for(attempt(), policy.call_timeout_s)
        raise AssertionError("tenacity re-raises the last error")  # pragma: no cover

    def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
        return self.policy(port).next_retry_at(attempt, now)
