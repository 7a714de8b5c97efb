"""One circuit breaker per port per worker process, used correctly from asyncio.

pybreaker keeps the count of consecutive failures, the state and the
listeners, but it has no asyncio support (a coroutine "succeeds" when it is
created, half-open lets every concurrent caller through, a cancellation
counts as a failure). So this module:

- decides admission itself, on an injectable monotonic clock: while open, a
  call raises `CircuitOpen` without reaching pybreaker or the port;
- serialises the half-open trial with an `asyncio.Lock`: exactly one call
  runs, the others wait for its verdict;
- reports each finished call to pybreaker synchronously after the await
  (`with breaker.calling(): raise error`), and only as the port's health
  dictates: transient errors are failures, a business refusal is an answer
  (a success), a cancellation or a bug in the adapter is neither.

A failure that opens (or re-opens) the breaker is reported as `CircuitOpen`
too: the port is down, which is not the request's fault, so it costs the
request no retry budget.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import pybreaker

from sagaworks.application.circuit import CircuitOpen
from sagaworks.application.config import PortPolicy
from sagaworks.application.ports import BreakerChange, BreakerState
from sagaworks.domain.errors import BusinessFailure, PortUnavailable

__all__ = ["TRANSIENT", "PortBreaker", "PortBreakers", "worker_name"]

T = TypeVar("T")

TRANSIENT: tuple[type[Exception], ...] = (PortUnavailable, TimeoutError)
"""Errors that say the port is unwell: retried, and counted by its breaker."""

_STATES: dict[str, BreakerState] = {
    pybreaker.STATE_CLOSED: "closed",
    pybreaker.STATE_OPEN: "open",
    pybreaker.STATE_HALF_OPEN: "half_open",
}

Listener = Callable[[BreakerChange], None]


def worker_name() -> str:
    """Names this process in breaker records: `<host>:<pid>`."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _Relay(pybreaker.CircuitBreakerListener):
    def __init__(self, owner: PortBreaker) -> None:
        self._owner = owner

    def state_change(self, cb: pybreaker.CircuitBreaker, old: Any, new: Any) -> None:
        self._owner._changed(_STATES[old.name] if old is not None else "closed", _STATES[new.name])


class PortBreaker:
    """The breaker of one port in this process."""

    def __init__(
        self,
        port: str,
        policy: PortPolicy,
        *,
        worker: str,
        on_change: Listener,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.port = port
        self._reset_s = policy.breaker_reset_s
        self._worker = worker
        self._on_change = on_change
        self._clock = clock
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._opened_at = 0.0
        self._trial = asyncio.Lock()
        self._breaker = pybreaker.CircuitBreaker(
            fail_max=policy.breaker_failures,
            reset_timeout=policy.breaker_reset_s,
            name=port,
            listeners=[_Relay(self)],
        )

    @property
    def state(self) -> BreakerState:
        return _STATES[self._breaker.current_state]

    @property
    def failures(self) -> int:
        return int(self._breaker.fail_counter)

    def retry_in(self) -> float:
        """Seconds until a trial call may run; 0 unless the breaker is open."""
        if self.state != "open":
            return 0.0
        return max(0.0, self._opened_at + self._reset_s - self._clock())

    async def until_trial(self) -> None:
        """Return once a call may be attempted again (at once unless open)."""
        while (wait := self.retry_in()) > 0:
            await self._sleep(wait)

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run `attempt` if the breaker admits it; raise `CircuitOpen` if not."""
        self._admit()
        if self.state == "half_open":
            async with self._trial:
                self._admit()
                if self.state == "half_open":
                    return await self._run(attempt)
        return await self._run(attempt)

    def _admit(self) -> None:
        if self.state != "open":
            return
        wait = self.retry_in()
        if wait > 0:
            raise CircuitOpen(self.port, wait)
        self._breaker.half_open()

    async def _run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        try:
            result = await attempt()
        except TRANSIENT as error:
            self._report(error)
            raise
        except BusinessFailure:
            self._report(None)
            raise
        self._report(None)
        return result

    def _report(self, error: Exception | None) -> None:
        """Tell pybreaker how a call ended; raise `CircuitOpen` if that opened the breaker."""
        if self.state == "open":
            return  # a call admitted before the breaker opened: its answer decides nothing
        try:
            with self._breaker.calling():
                if error is not None:
                    raise error  # noqa: TRY301 - raising inside calling() is how pybreaker hears of it
        except pybreaker.CircuitBreakerError:
            raise CircuitOpen(self.port, self._reset_s) from error
        except Exception as same:
            if same is not error:
                raise

    def _changed(self, previous: BreakerState, state: BreakerState) -> None:
        if state == "open":
            self._opened_at = self._clock()
        self._on_change(
            BreakerChange(
                port=self.port,
                worker=self._worker,
                previous=previous,
                state=state,
                failures=self.failures,
                at=self._wall_clock(),
            )
        )


class PortBreakers:
    """Every port's breaker in this process, made on first use from the port's policy."""

    def __init__(
        self,
        policy_for: Callable[[str], PortPolicy],
        *,
        worker: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.worker = worker or worker_name()
        self._policy_for = policy_for
        self._clock = clock
        self._sleep = sleep
        self._breakers: dict[str, PortBreaker] = {}
        self._listeners: list[Listener] = []

    def __getitem__(self, port: str) -> PortBreaker:
        breaker = self._breakers.get(port)
        if breaker is None:
            breaker = PortBreaker(
                port,
                self._policy_for(port),
                worker=self.worker,
                on_change=self._notify,
                clock=self._clock,
                sleep=self._sleep,
            )
            self._breakers[port] = breaker
        return breaker

    def states(self) -> dict[str, BreakerState]:
        """The state of every breaker made so far, by port (for the worker's heartbeat)."""
        return {port: breaker.state for port, breaker in self._breakers.items()}

    def listen(self, listener: Listener) -> None:
        """Call `listener` (synchronously, keep it short) on every state change of any breaker."""
        self._listeners.append(listener)

    def _notify(self, change: BreakerChange) -> None:
        for listener in self._listeners:
            listener(change)
