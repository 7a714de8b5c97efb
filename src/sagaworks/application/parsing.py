"""Turning a delivery into a typed domain message, or saying exactly why not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from sagaworks.application.ports import InboundMessage
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.messages import Envelope, Message

__all__ = ["Rejected", "envelope_of", "parse_event"]


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why a delivery can never be processed: it goes to the dead-letter store at once."""

    reason: str
    exception_type: str
    exception_message: str


def envelope_of(inbound: InboundMessage, now: datetime) -> Envelope:
    return Envelope(
        id=inbound.message_id,
        type=inbound.message_type,
        source=inbound.source,
        time=inbound.time or now,
        correlation_id=inbound.correlation_id,
        causation_id=inbound.causation_id,
    )


def parse_event(
    definition: SagaDefinition[Any], inbound: InboundMessage, max_bytes: int
) -> Message | Rejected:
    if len(inbound.body) > max_bytes:
        return Rejected(
            "oversized",
            "MessageTooLarge",
            f"body is {len(inbound.body)} bytes; the limit is {max_bytes} "
            "(SAGAWORKS_MAX_MESSAGE_BYTES)",
        )
    if not inbound.message_id:
        return Rejected("missing_id", "MissingMessageId", "the message has no message_id")
    event_type = definition.event_type(inbound.message_type)
    if event_type is None:
        known = ", ".join(e.message_type for e in definition.consumed_events())
        return Rejected(
            "unknown_type",
            "UnknownMessageType",
            f'saga "{definition.name}" does not consume type "{inbound.message_type}" '
            f"(it consumes: {known})",
        )
    try:
        return event_type.model_validate_json(inbound.body)
    except ValidationError as error:
        malformed = any(e["type"] == "json_invalid" for e in error.errors())
        return Rejected(
            "malformed_json" if malformed else "schema_invalid",
            "ValidationError",
            _summarise(error),
        )


def _summarise(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
