"""The wire form of outgoing messages: CloudEvents attributes on AMQP.

Each message carries the CloudEvents attributes as AMQP properties where
AMQP has one (`message_id`, `type`, `app_id` for `source`, `timestamp`,
`correlation_id`, `content_type`) and as `cloudEvents_*` headers, which is how
the CloudEvents AMQP binding names application properties. Inbound messages
are read from either form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sagaworks.domain.decide import Outgoing

__all__ = ["CE_PREFIX", "PendingMessage", "Wire", "read_attribute"]

CE_PREFIX = "cloudEvents_"
SPEC_VERSION = "1.0"


@dataclass(frozen=True, slots=True)
class PendingMessage:
    message_id: str
    exchange: str
    routing_key: str
    headers: dict[str, Any]
    body: bytes


class Wire:
    """Encodes decisions' outgoing messages for the outbox; `exchange_for` maps a domain."""

    def __init__(self, exchange_for: Callable[[str], str]) -> None:
        self._exchange_for = exchange_for

    def encode(self, outgoing: Outgoing) -> PendingMessage:
        env = outgoing.envelope
        ce: dict[str, Any] = {
            f"{CE_PREFIX}specversion": SPEC_VERSION,
            f"{CE_PREFIX}id": env.id,
            f"{CE_PREFIX}type": env.type,
            f"{CE_PREFIX}source": env.source,
            f"{CE_PREFIX}time": env.time.isoformat(),
            f"{CE_PREFIX}datacontenttype": "application/json",
        }
        if env.correlation_id:
            ce[f"{CE_PREFIX}correlationid"] = env.correlation_id
        if env.causation_id:
            ce[f"{CE_PREFIX}causationid"] = env.causation_id
        properties = {
            "message_id": env.id,
            "type": env.type,
            "app_id": env.source,
            "timestamp": env.time.isoformat(),
            "correlation_id": env.correlation_id,
            "content_type": "application/json",
            "headers": ce,
        }
        return PendingMessage(
            message_id=env.id,
            exchange=self._exchange_for(outgoing.domain),
            routing_key=outgoing.routing_key,
            headers=properties,
            body=outgoing.body.model_dump_json().encode(),
        )


def read_attribute(name: str, headers: Mapping[str, Any], prop: object | None = None) -> str | None:
    """A CloudEvents attribute: the AMQP property, else a `cloudEvents_`/`cloudEvents:` header."""
    if prop not in (None, ""):
        return prop.isoformat() if isinstance(prop, datetime) else str(prop)
    for key in (f"{CE_PREFIX}{name}", f"cloudEvents:{name}"):
        value = headers.get(key)
        if value not in (None, ""):
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
