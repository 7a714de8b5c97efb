"""What a use case did with one delivery; the entry point logs it and settles the message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Handled"]


@dataclass(frozen=True, slots=True)
class Handled:
    """`outcome` is what happened; every outcome is settled by acknowledging the delivery."""

    outcome: Literal["applied", "ignored", "parked", "duplicate", "stale", "dead_lettered"]
    reason: str = ""
    saga_id: str | None = None
