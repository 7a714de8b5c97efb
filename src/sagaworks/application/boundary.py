"""Who may send what, and where from: checked on every delivery before its body is read.

An event type's allowed publishers are declared on its message class
(`publishers=`) and may be overridden per type by settings; sagaworks' own
broker users publish its commands and replays. Which exchange and routing key
an event travels on is declared on its class too (`domain`, `routing_key`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaworks.domain.definition import SagaDefinition

__all__ = ["Boundary", "UnconfiguredPublishers", "allow_list", "unconfigured"]


class UnconfiguredPublishers(Exception):
    """A production worker would accept some event types from any broker user."""

    def __init__(self, message_types: Sequence[str]) -> None:
        self.message_types = tuple(message_types)
        super().__init__(
            "no allowed publishers for event type(s) "
            + ", ".join(message_types)
            + '; set SAGAWORKS_PUBLISHERS (e.g. {"order.placed": ["order-service"]}) or declare '
            "publishers=(...) on the message classes (SAGAWORKS_PROFILE=production refuses to "
            "start without them)"
        )


@dataclass(frozen=True, slots=True)
class Boundary:
    """What a delivery must show: its type on its own exchange and key, from a known user."""

    exchange_for: Callable[[str], str]
    """The exchange a domain's events travel on (prefix included)."""
    publishers: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Event type -> broker users allowed to publish it; a type not listed: any named user."""
    own_users: frozenset[str] = frozenset()
    """sagaworks' own broker users: they publish step commands and replays."""

    def allowed(self, message_type: str, user_id: str | None) -> bool:
        """Whether `user_id` may publish `message_type` through its domain's exchange."""
        if not user_id:
            return False
        users = self.publishers.get(message_type)
        return users is None or user_id in users

    def allowed_direct(self, message_type: str, user_id: str | None) -> bool:
        """Whether `user_id` may send `message_type` straight to a queue (a replay does)."""
        if not user_id:
            return False
        users = self.publishers.get(message_type)
        return user_id in self.own_users or (users is not None and user_id in users)


def allow_list(
    definitions: Iterable[SagaDefinition[Any]], overrides: Mapping[str, Sequence[str]]
) -> dict[str, frozenset[str]]:
    """Each consumed event type's publishers: the settings' entry, else the class's declaration."""
    allowed: dict[str, frozenset[str]] = {}
    for definition in definitions:
        for event in definition.consumed_events():
            declared = overrides.get(event.message_type, event.publishers)
            if declared:
                allowed[event.message_type] = frozenset(declared)
    return allowed


def unconfigured(
    definitions: Iterable[SagaDefinition[Any]], allowed: Mapping[str, frozenset[str]]
) -> list[str]:
    """The consumed event types nobody said who may publish: any named user may, for now."""
    return sorted({e.message_type for d in definitions for e in d.consumed_events()} - set(allowed))
