"""Which trace a saga's work continues: the saga's own, so one saga is one trace.

A `traceparent` is `00-<trace id>-<parent span id>-<flags>`. Work caused by a
delivery in the saga's trace continues that delivery (its span is the parent);
an event from outside in another trace, or in none, continues the saga's
trace from where the saga started.
"""

from __future__ import annotations

from datetime import datetime

from sagaworks.application.ports import FinishedSaga, LockedSaga
from sagaworks.domain.decide import Decision

__all__ = ["continued_trace", "finished_saga", "trace_id"]


def trace_id(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` (None for None)."""
    return None if traceparent is None else traceparent[3:35]


def continued_trace(arrival: str | None, saga: str | None) -> str | None:
    """The context the saga's change continues: the arrival's if in the saga's trace."""
    if saga is None or trace_id(arrival) == trace_id(saga):
        return arrival
    return saga


def finished_saga(locked: LockedSaga, decision: Decision) -> FinishedSaga | None:
    """The saga's end, when this decision is what ended it."""
    instance = decision.instance
    if decision.outcome != "applied" or instance is None or not instance.status.terminal:
        return None
    if locked.instance is not None and locked.instance.status.terminal:
        return None
    return FinishedSaga(
        instance.saga_type, instance.status.value, _seconds(locked.started_at, decision.at)
    )


def _seconds(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else max((end - start).total_seconds(), 0.0)
