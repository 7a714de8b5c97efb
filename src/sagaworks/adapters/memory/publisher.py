"""A `Publisher` that keeps what it is given, and can be told to fail like a broker would."""

from __future__ import annotations

from collections.abc import Sequence

from sagaworks.application.ports import OutboxRow

__all__ = ["InMemoryPublisher"]


class InMemoryPublisher:
    """Implements `Publisher`: every confirmed row is appended to `published`, in order.

    `fail()` makes the next `times` calls (or every call until `heal()`) raise
    without publishing anything, as a broker that confirms nothing would: the
    outbox rows stay unpublished for the sweeper, which is what tests of
    recovery need to see.
    """

    def __init__(self) -> None:
        self.published: list[OutboxRow] = []
        self.calls = 0
        """Every call to `publish`, failed ones included."""
        self.failures = 0
        self._fail_times: int | None = 0
        self._error: Exception | None = None

    def fail(self, times: int | None = 1, error: Exception | None = None) -> None:
        """Fail the next `times` publishes; `None` fails every publish until `heal()`."""
        if times is not None and times < 0:
            raise ValueError("times must be 0 or more, or None for until heal()")
        self._fail_times = times
        self._error = error

    def heal(self) -> None:
        """Publish normally again."""
        self._fail_times = 0
        self._error = None

    @property
    def failing(self) -> bool:
        return self._fail_times is None or self._fail_times > 0

    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        self.calls += 1
        if self.failing:
            if self._fail_times is not None:
                self._fail_times -= 1
            self.failures += 1
            raise self._error or ConnectionError(
                f"{len(rows)} message(s) not confirmed (InMemoryPublisher told to fail)"
            )
        self.published.extend(rows)
