"""How a delivery is kept in a store, and how failures are grouped: one rule for every store.

A parked event and a dead letter must come back exactly as they arrived, and
both the PostgreSQL and the in-memory store must group failures the same way,
so the encoding and the fingerprint live here, not in either adapter.
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

from sagaworks.application.ports import InboundMessage

__all__ = ["fingerprint", "inbound_from_meta", "inbound_meta"]

_VOLATILE = re.compile(r"[0-9a-f]{8,}|\d+")


def fingerprint(
    reason: str, exception_type: str | None, message: str | None, handler: str | None
) -> str:
    """Groups failures that share a cause: digits and hex ids are blanked out of the message."""
    normalised = _VOLATILE.sub("#", (message or "").lower())[:300]
    raw = "\x1f".join((reason, exception_type or "", normalised, handler or ""))
    return hashlib.sha1(raw.encode(), usedforsecurity=False).hexdigest()[:16]


def inbound_meta(inbound: InboundMessage) -> dict[str, Any]:
    """A delivery's attributes other than id, type and body, as JSON-ready values."""
    return {
        "headers": dict(inbound.headers),
        "queue": inbound.queue,
        "exchange": inbound.exchange,
        "routing_key": inbound.routing_key,
        "source": inbound.source,
        "time": inbound.time.isoformat() if inbound.time else None,
        "correlation_id": inbound.correlation_id,
        "causation_id": inbound.causation_id,
        "user_id": inbound.user_id,
    }


def inbound_from_meta(
    message_id: str, message_type: str, body: bytes, meta: dict[str, Any]
) -> InboundMessage:
    time = meta.get("time")
    return InboundMessage(
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
    )
