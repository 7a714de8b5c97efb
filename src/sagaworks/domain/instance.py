"""A running saga: immutable; every transition yields a new instance."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from uuid import NAMESPACE_URL, UUID, uuid5

from pydantic import BaseModel

__all__ = ["InFlight", "SagaInstance", "Status", "saga_id_for"]

_NAMESPACE = uuid5(NAMESPACE_URL, "urn:sagaworks:saga")


def saga_id_for(saga_type: str, correlation_key: str) -> UUID:
    """The saga id is derived from what correlates it, so every worker computes the same one."""
    return uuid5(_NAMESPACE, f"{saga_type}\x1f{correlation_key}")


class Status(StrEnum):
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    NEEDS_ATTENTION = "needs_attention"

    @property
    def terminal(self) -> bool:
        return self in {Status.COMPLETED, Status.COMPENSATED, Status.NEEDS_ATTENTION}

    @property
    def ended(self) -> bool:
        """Over for good; a saga that needs attention may still be resumed by a person."""
        return self in {Status.COMPLETED, Status.COMPENSATED}


@dataclass(frozen=True, slots=True)
class InFlight:
    """A port call the saga waits for; `retry_at` is set while a delayed retry is pending."""

    step: str
    kind: Literal["action", "compensation"]
    attempt: int
    retry_at: datetime | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "kind": self.kind,
            "attempt": self.attempt,
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InFlight:
        retry_at = data.get("retry_at")
        return cls(
            step=data["step"],
            kind=data["kind"],
            attempt=int(data["attempt"]),
            retry_at=datetime.fromisoformat(retry_at) if retry_at else None,
        )


@dataclass(frozen=True, slots=True)
class SagaInstance:
    """Everything `decide` needs to know about one saga.

    `position` indexes the definition's steps (equal to their count once all
    are done); `done` lists the actions that succeeded and are not yet
    compensated, oldest first.
    """

    id: UUID
    saga_type: str
    correlation_key: str
    correlation_id: str
    status: Status
    position: int
    state: BaseModel
    version: int
    in_flight: InFlight | None = None
    done: tuple[str, ...] = ()
    reason: str | None = None
    error: str | None = None
    stopped: InFlight | None = None
    """For a saga that needs attention: the step attempt that stopped it (None: a wait did)."""
    paused: bool = False
    """An operator paused it: it runs no step and fires no timer; events for it are kept."""

    def progress_json(self) -> dict[str, Any]:
        """The engine's bookkeeping, stored beside the saga's own state."""
        return {
            "position": self.position,
            "in_flight": self.in_flight.to_json() if self.in_flight else None,
            "done": list(self.done),
            "reason": self.reason,
            "error": self.error,
            "correlation_id": self.correlation_id,
            "stopped": self.stopped.to_json() if self.stopped else None,
            "paused": self.paused,
        }
