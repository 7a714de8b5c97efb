"""Messages in and out as the use cases see them, and the ports that move them.

An inbound delivery and an outgoing message in transport-neutral form; the
RabbitMQ adapter maps them onto AMQP, an in-memory one keeps them in lists.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "BodyDigest",
    "InboundMessage",
    "OutboxRow",
    "OutboxWakeUp",
    "OutboxWakeUps",
    "PendingMessage",
    "PriorFailure",
    "Publisher",
    "decode_raw_fields",
    "encode_raw_fields",
]


@dataclass(frozen=True, slots=True)
class PriorFailure:
    """One earlier failure of a delivery, as the transport recorded it; "" when it did not say."""

    reason: str
    """Why it left the queue: `rejected`, `expired`, `maxlen`, `delivery_limit`, …"""
    queue: str
    exchange: str
    routing_keys: tuple[str, ...]
    count: int
    """How often it failed this way in this queue (0: not recorded)."""
    time: datetime | None


@dataclass(frozen=True, slots=True)
class BodyDigest:
    """A whole body's length and SHA-256 (hex), kept when only its start is stored."""

    length: int
    sha256: str


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """One delivery, transport-neutral: what a use case needs to know about it.

    `headers` are carried, not read: they hold the message as the transport
    delivered it (envelope attributes included), so a stored delivery can be
    sent again as it came. Everything a use case reads has a field of its own.
    """

    message_id: str
    message_type: str
    body: bytes
    headers: Mapping[str, Any]
    queue: str
    exchange: str
    routing_key: str
    source: str = ""
    time: datetime | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    user_id: str | None = None
    delivery_count: int = 0
    failures: tuple[PriorFailure, ...] = ()
    """Where and why it failed before it came here, newest first (dead letters have some)."""
    content_key: str = ""
    """For a message without an id: a key from its body and own headers (not the broker's)."""
    raw_fields: Mapping[str, bytes] = field(default_factory=dict)
    """The original bytes of every text field the transport had to escape to make it
    storable (a NUL, bytes that are not UTF-8), by field: `message_id`, `type`,
    `headers/<name>`, …; empty for nearly every message."""
    trace_context: str | None = None
    """The W3C `traceparent` the work on this delivery continues (None: not traced)."""

    def meta(self) -> dict[str, Any]:
        """How every store keeps a delivery (a parked event) besides id, type and body: JSON."""
        meta: dict[str, Any] = {
            "headers": dict(self.headers),
            "queue": self.queue,
            "exchange": self.exchange,
            "routing_key": self.routing_key,
            "source": self.source,
            "time": self.time.isoformat() if self.time else None,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
            "user_id": self.user_id,
        }
        if self.raw_fields:
            meta["raw_fields"] = encode_raw_fields(self.raw_fields)
        return meta

    @classmethod
    def from_meta(
        cls, message_id: str, message_type: str, body: bytes, meta: Mapping[str, Any]
    ) -> InboundMessage:
        """The delivery a store kept with `meta()`, exactly as it arrived."""
        time = meta.get("time")
        return cls(
            message_id=message_id,
            message_type=message_type,
            body=body,
            headers=meta.get("headers", {}),
            queue=meta.get("queue", ""),
            exchange=meta.get("exchange", ""),
            routing_key=meta.get("routing_key", ""),
            source=meta.get("source", ""),
            time=datetime.fromisoformat(time) if time else None,
            correlation_id=meta.get("correlation_id"),
            causation_id=meta.get("causation_id"),
            user_id=meta.get("user_id"),
            raw_fields=decode_raw_fields(meta.get("raw_fields") or {}),
        )


def encode_raw_fields(raw_fields: Mapping[str, bytes]) -> dict[str, str]:
    """Original bytes as JSON: base64 per field."""
    return {name: base64.b64encode(value).decode() for name, value in raw_fields.items()}


def decode_raw_fields(encoded: Mapping[str, str]) -> dict[str, bytes]:
    return {name: base64.b64decode(value) for name, value in encoded.items()}


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """A committed message waiting to be published (`id` is the outbox row id).

    `headers` is the envelope in neutral form (see `wire.py`), which the
    publisher maps onto its transport.
    """

    id: int
    message_id: str
    exchange: str
    routing_key: str
    headers: Mapping[str, Any]
    body: bytes
    trace_context: str | None = None
    """The W3C `traceparent` the message is published with (None: none)."""
    created_at: datetime | None = field(default=None, compare=False)
    """When the row was committed, for the outbox lag (None: not known); not what it is."""


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """An outbox row before it has an id, encoded by `wire.Wire`: what a store writes."""

    message_id: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes
    trace_context: str | None = None
    lease_s: float | None = None
    """Set on a step command its worker runs itself (an eager step): nobody publishes the row
    for this long after commit; if its result is not committed by then, the sweeper does."""


class Publisher(Protocol):
    async def publish(self, rows: Sequence[OutboxRow]) -> None:
        """Publish persistently and wait for every confirm; raise if any is not confirmed."""
        ...


class OutboxWakeUp(Protocol):
    async def wait(self, timeout_s: float) -> None:
        """Return once rows were committed since the last call, or after `timeout_s`."""
        ...


class OutboxWakeUps(Protocol):
    """Wakes the outbox sweeper when rows are committed, so it need not wait a whole interval."""

    def listen(self) -> AbstractAsyncContextManager[OutboxWakeUp]:
        """Listen for commits while the context is open."""
        ...
