"""Turning a delivery into a typed domain message, or saying exactly why not."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from sagaworks.application.boundary import Boundary
from sagaworks.application.ports import InboundMessage
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.messages import Envelope, Message

__all__ = ["Rejected", "envelope_of", "missing_id", "parse_event"]


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


def missing_id() -> Rejected:
    return Rejected(
        "missing_id",
        "MissingMessageId",
        "the message has neither a message_id property nor a cloudEvents_id header; "
        "the publisher must give every message a unique id",
    )


def parse_event(
    definition: SagaDefinition[Any],
    inbound: InboundMessage,
    max_bytes: int,
    boundary: Boundary | None,
) -> Message | Rejected:
    """The event a delivery carries, or why not; `boundary` None: it was checked on arrival."""
    if len(inbound.body) > max_bytes:
        return Rejected(
            "oversized",
            "MessageTooLarge",
            f"body is {len(inbound.body)} bytes; the limit is {max_bytes} "
            "(SAGAWORKS_MAX_MESSAGE_BYTES)",
        )
    if not inbound.message_id:
        return missing_id()
    event_type = definition.event_type(inbound.message_type)
    if event_type is None:
        known = ", ".join(e.message_type for e in definition.consumed_events())
        return Rejected(
            "unknown_type",
            "UnknownMessageType",
            f'saga "{definition.name}" does not consume type "{inbound.message_type}" '
            f"(it consumes: {known})",
        )
    if boundary is not None:
        refused = _check_boundary(event_type, inbound, boundary)
        if refused is not None:
            return refused
    try:
        return event_type.model_validate_json(inbound.body)
    except ValidationError as error:
        malformed = any(e["type"] == "json_invalid" for e in error.errors())
        return Rejected(
            "malformed_json" if malformed else "schema_invalid",
            "ValidationError",
            _summarise(error),
        )


def _check_boundary(
    event_type: type[Message], inbound: InboundMessage, boundary: Boundary
) -> Rejected | None:
    """Type against exchange and routing key, then the publisher; "" is the default exchange.

    A message sent straight to the queue (through the default exchange, as a
    replay is) has no exchange to check: only sagaworks' own users and the
    type's allowed publishers may send one.
    """
    kind = event_type.message_type
    direct = inbound.exchange == ""
    if not direct:
        exchange = boundary.exchange_for(event_type.domain)
        if (inbound.exchange, inbound.routing_key) != (exchange, event_type.routing_key):
            return Rejected(
                "type_mismatch",
                "MessageTypeMismatch",
                f'type "{kind}" travels on exchange "{exchange}" with routing key '
                f'"{event_type.routing_key}", but this message came from exchange '
                f'"{inbound.exchange}" with routing key "{inbound.routing_key}"; '
                "publish each event type only where its domain publishes it",
            )
    allowed = boundary.allowed_direct if direct else boundary.allowed
    if allowed(kind, inbound.user_id):
        return None
    who = f'user "{inbound.user_id}"' if inbound.user_id else "a publisher that set no user_id"
    return Rejected(
        "unauthorised_publisher",
        "UnauthorisedPublisher",
        f'{who} may not publish "{kind}"'
        + (" straight to the queue" if direct else "")
        + "; publishers set the AMQP user_id property to their broker user, and the allowed "
        "users of a type are declared on its message class or in SAGAWORKS_PUBLISHERS",
    )


def _summarise(error: ValidationError) -> str:
    parts = []
    for e in error.errors()[:5]:
        where = ".".join(str(p) for p in e["loc"]) or "body"
        parts.append(f"{where}: {e['msg']}")
    more = error.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
