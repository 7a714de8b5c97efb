"""A `Clock` that moves only when told, so deadlines and retries are reproducible."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

__all__ = ["FakeClock"]

_EPOCH = datetime(2030, 1, 1, 9, 0, tzinfo=UTC)


class FakeClock:
    """A clock that moves only when told, so deadlines and retries are reproducible."""

    def __init__(self, start: datetime = _EPOCH) -> None:
        if start.tzinfo is None:
            raise ValueError("the fake clock needs a timezone-aware start")
        self._now = start

    def now(self) -> datetime:
        return self._now

    def set(self, moment: datetime) -> None:
        if moment < self._now:
            raise ValueError(f"time does not go backwards ({moment} is before {self._now})")
        self._now = moment

    def advance(self, by: timedelta | float) -> datetime:
        self.set(self._now + (by if isinstance(by, timedelta) else timedelta(seconds=by)))
        return self._now
