"""Errors a saga author or a port can meet in the domain."""

from __future__ import annotations

__all__ = ["BusinessFailure", "DefinitionError", "PortUnavailable"]


class DefinitionError(ValueError):
    """A saga definition is inconsistent; raised when the definition is built (at import)."""

    def __init__(self, saga: str, problem: str, *, step: str | None = None) -> None:
        where = f'saga "{saga}"' + (f', step "{step}"' if step else "")
        super().__init__(f"{where}: {problem}")
        self.saga = saga
        self.step = step


class BusinessFailure(Exception):
    """A port refused the request for a business reason (a decline, no stock).

    It is never retried: the saga compensates at once with `reason`.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class PortUnavailable(Exception):
    """A port could not be reached or answered with a transient error; the call is retried."""
