"""How a store keeps deliveries and sagas, and groups failures: one rule for every store.

A parked event and a dead letter must come back exactly as they arrived, a
saga row must read back as the same instance, batches must lock in one order,
and both the PostgreSQL and the in-memory store must group failures the same
way, so these rules live here, not in either adapter.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from uuid import UUID

from sagaworks.application.ports import InboundMessage
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.instance import InFlight, SagaInstance, Status

__all__ = [
    "fingerprint",
    "inbound_from_meta",
    "inbound_meta",
    "lock_key",
    "refuse_repeats",
    "saga_from_row",
]

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


def lock_key(saga_id: UUID) -> int:
    """A signed 64-bit key from the saga id: the advisory lock key, and the order of batches."""
    return int.from_bytes(saga_id.bytes[:8], "big", signed=True)


def refuse_repeats(saga_ids: Iterable[UUID]) -> None:
    """A batch names each saga once; a second entry would be a second, conflicting write."""
    ids = list(saga_ids)
    if len(set(ids)) != len(ids):
        repeated = sorted({str(i) for i in ids if ids.count(i) > 1})
        raise ValueError(f"saga(s) {', '.join(repeated)} appear twice in one batch; at most once")


def saga_from_row(
    definition: SagaDefinition[Any],
    saga_id: UUID,
    *,
    correlation_key: str,
    status: str,
    state: str,
    version: int,
    progress: Mapping[str, Any],
) -> SagaInstance:
    """The instance a `saga_instances` row holds; `state` is the state model as JSON."""
    flight = progress.get("in_flight")
    return SagaInstance(
        id=saga_id,
        saga_type=definition.name,
        correlation_key=correlation_key,
        correlation_id=progress.get("correlation_id") or correlation_key,
        status=Status(status),
        position=int(progress["position"]),
        state=definition.state.model_validate_json(state),
        version=version,
        in_flight=InFlight.from_json(flight) if flight else None,
        done=tuple(progress.get("done", ())),
        reason=progress.get("reason"),
        error=progress.get("error"),
    )
