"""Keeping the dashboards' read models cheap to read: the per-minute rollup of the history."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

__all__ = ["HistoryRollup", "RollUp", "RolledUp"]


@dataclass(frozen=True, slots=True)
class RollUp:
    """One step of the rollup: how settled history must be, how much to take, what to keep."""

    settle: timedelta
    """History younger than this may still have rows in transactions not yet committed."""
    span: timedelta
    """At most this much history per transaction, so catching up never holds a long one."""
    keep: timedelta
    """Per-minute rows older than this are deleted."""


@dataclass(frozen=True, slots=True)
class RolledUp:
    since: datetime
    until: datetime
    """History in [since, until) was added to the per-minute rows."""
    caught_up: bool
    """False: more settled history waits for the next step."""
    skipped: timedelta
    """History older than the longest window no view reads, left out after a long pause."""


class HistoryRollup(Protocol):
    async def roll_up(self, step: RollUp) -> RolledUp | None:
        """Fold the next span of settled history in; None while another process is doing it."""
        ...
