"""Calls ports under their policy: a deadline per call, jittered immediate retries, a breaker.

Only transient failures (`PortUnavailable`, timeouts) are retried, and each
try goes through the port's circuit breaker: a `BusinessFailure`, any other
exception, and `CircuitOpen` (the breaker refused or just opened) go
straight to the caller, so an open breaker is never retried.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from random import Random
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from sagaworks.adapters.resilience.breaker import TRANSIENT, PortBreakers
from sagaworks.application.config import PortPolicy

__all__ = ["ResilientCaller"]

T = TypeVar("T")


class ResilientCaller:
    """Implements the `PortCaller` port; owns this process's breakers (`breakers`)."""

    def __init__(
        self,
        policies: Mapping[str, PortPolicy],
        default: PortPolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Random | None = None,
    ) -> None:
        """`clock` (monotonic seconds) and `sleep` drive backoff and breakers; tests fake them.

        `rng` jitters delayed retries; by default one seeded from the system's entropy.
        """
        self._policies = dict(policies)
        self._default = default or PortPolicy()
        self._sleep = sleep
        self._rng = rng or Random()  # noqa: S311 - jitter, not security
        self.breakers = PortBreakers(self.policy, clock=clock, sleep=sleep)

    def policy(self, port: str) -> PortPolicy:
        return self._policies.get(port, self._default)

    async def call(self, port: str, attempt: Callable[[], Awaitable[T]]) -> T:
        policy = self.policy(port)
        breaker = self.breakers[port]

        async def timed() -> T:
            async with asyncio.timeout(policy.call_timeout_s):
                return await attempt()

        try:  # the common case builds no retry machinery
            return await breaker.call(timed)
        except TRANSIENT as error:
            first: BaseException | None = error
        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT),
            stop=stop_after_attempt(policy.immediate_attempts),
            wait=wait_exponential_jitter(
                multiplier=policy.immediate_wait_s,
                jitter=policy.immediate_wait_s,  # tenacity's default jitter is a whole second
                max=policy.immediate_wait_max_s,
            ),
            sleep=self._sleep,
            reraise=True,
        )
        async for trial in retrying:
            with trial:
                if first is not None:  # tenacity's first attempt is the one that just failed
                    failed, first = first, None
                    raise failed
                return await breaker.call(timed)
        raise AssertionError("tenacity re-raises the last error")  # pragma: no cover

    def next_retry_at(self, port: str, attempt: int, now: datetime) -> datetime | None:
        return self.policy(port).next_retry_at(attempt, now, self._rng)
