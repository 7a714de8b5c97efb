"""Which sagas an operator means, and in which order they are listed.

Empty fields do not filter. A filter selects rows of `saga_instances`; a
`stuck_reasons` filter selects those the stuck view lists with one of the
reasons, and `failure_group` those with an active dead letter of that group
(the fingerprint `sagaworks dlq groups` shows).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Literal

__all__ = ["STUCK_REASONS", "SagaFilter", "SagaSort", "SortKey", "StuckReason"]


class StuckReason(StrEnum):
    """Why a saga needs a person or looks wrong; the stuck view gives each saga one."""

    NEEDS_ATTENTION = "needs_attention"
    COMPENSATION_FAILING = "compensation_failing"
    PORT_BREAKER_OPEN = "port_breaker_open"
    DEAD_LETTERED = "dead_lettered"
    WAITING_PAST_DEADLINE = "waiting_past_deadline"
    TIMER_OVERDUE = "timer_overdue"
    STEP_RETRYING = "step_retrying"
    PARKED_EXPIRING = "parked_expiring"
    IDLE_TOO_LONG = "idle_too_long"


STUCK_REASONS: tuple[str, ...] = tuple(r.value for r in StuckReason)
"""In order of precedence: a saga with several reasons is listed with the first."""

SortKey = Literal["updated", "created", "type", "key", "status", "step"]


@dataclass(frozen=True, slots=True)
class SagaSort:
    """Listing order; the saga id breaks ties, so pages never overlap."""

    key: SortKey = "updated"
    descending: bool = True


@dataclass(frozen=True, slots=True)
class SagaFilter:
    """Which sagas an operator means; every given field must match."""

    saga_types: tuple[str, ...] = ()
    statuses: tuple[str, ...] = ()
    current_steps: tuple[str, ...] = ()
    correlation_key: str | None = None
    """Exact business key, e.g. an order id."""
    correlation_key_prefix: str | None = None
    older_than: timedelta | None = None
    """Created at least this long ago."""
    younger_than: timedelta | None = None
    """Created less than this long ago."""
    changed_before: datetime | None = None
    """Last transition before this time."""
    changed_after: datetime | None = None
    """Last transition at or after this time."""
    stuck_reasons: tuple[str, ...] = ()
    any_stuck: bool = False
    """Only sagas the stuck view lists, whatever their reason."""
    failure_group: str | None = None
    failure: str | None = None
    """Exact error (needs attention) or compensation reason recorded on the saga."""

    def is_empty(self) -> bool:
        """True when the filter selects every saga."""
        return self == SagaFilter()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.stuck_reasons) - set(STUCK_REASONS))
        if unknown:
            raise ValueError(
                f"unknown stuck reason(s) {', '.join(unknown)}; "
                f"use one of {', '.join(STUCK_REASONS)}"
            )
