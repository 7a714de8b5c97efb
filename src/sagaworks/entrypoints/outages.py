"""One line when the worker's background work starts failing for an outage, one when it ends.

The outbox sweeper, the timers and the parked-event expiry each poll the
database (the sweeper also publishes) every second or so; during an outage of
either service each poll fails again. Logged
every time, a partition of a few minutes is hundreds of identical warnings
that bury the one that matters. `OutageLog` says it once, naming what it is,
then quietly counts until work succeeds again and says how long it lasted.
Errors that are not an outage (a bug) are logged every time.
"""

from __future__ import annotations

import time

from sagaworks.adapters.observability.logging import get_logger

__all__ = ["OutageLog"]

_log = get_logger("sagaworks.worker")


def _what_it_is(error: BaseException, statement_deadline_s: float) -> str:
    if isinstance(error, TimeoutError):
        return (
            f"no answer within {statement_deadline_s:g} s (the database statement deadline): "
            "the network is dropping traffic or the server is frozen"
        )
    return f"unreachable or restarting ({type(error).__name__}: {error})"


class OutageLog:
    """Tracks one outage at a time across the worker's background loops."""

    def __init__(self, transient: tuple[type[BaseException], ...], deadline_s: float) -> None:
        self._transient = transient
        self._deadline_s = deadline_s
        self._since: float | None = None
        self._failures = 0

    def failed(self, what: str, error: BaseException) -> None:
        if not isinstance(error, self._transient):
            _log.warning(f"{what} failed; will retry", error=f"{type(error).__name__}: {error}")
            return
        self._failures += 1
        if self._since is None:
            self._since = time.monotonic()
            _log.warning(
                "outage: background work (outbox, timers, parked events) failing; "
                "retrying until the database and broker answer",
                cause=_what_it_is(error, self._deadline_s),
                noticed_by=what,
            )

    def succeeded(self) -> None:
        if self._since is None:
            return
        _log.warning(
            "outage over: background work resumed",
            lasted_s=round(time.monotonic() - self._since, 1),
            failed_polls=self._failures,
        )
        self._since, self._failures = None, 0
