"""CloudEvents on AMQP: which AMQP names carry the envelope, and which headers the broker owns.

Each message carries the CloudEvents attributes as AMQP properties where AMQP
has one (`message_id`, `type`, `app_id` for `source`, `timestamp`,
`correlation_id`, `content_type`) and as `cloudEvents_*` headers, which is how
the CloudEvents AMQP binding names application properties. Inbound messages
are read from either form. A trace context travels as the W3C `traceparent`
header, where tracing tools (FastStream's middleware among them) look for it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

__all__ = [
    "CE_PREFIX",
    "SPEC_VERSION",
    "TRACEPARENT",
    "is_broker_owned",
    "parse_time",
    "read_attribute",
    "trace_context_of",
]

CE_PREFIX = "cloudEvents_"
SPEC_VERSION = "1.0"
TRACEPARENT = "traceparent"

_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
"""Version 00 of W3C Trace Context, all-zero ids being invalid."""

_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-")


def is_broker_owned(header: str) -> bool:
    """RabbitMQ writes these on delivery and dead-lettering; a message sent again drops them."""
    return header in _BROKER_HEADERS or header.startswith(_BROKER_PREFIXES)


def read_attribute(name: str, headers: Mapping[str, Any], prop: object | None = None) -> str | None:
    """A CloudEvents attribute: the AMQP property, else a `cloudEvents_`/`cloudEvents:` header."""
    if prop not in (None, ""):
        return prop.isoformat() if isinstance(prop, datetime) else str(prop)
    for key in (f"{CE_PREFIX}{name}", f"cloudEvents:{name}"):
        value = headers.get(key)
        if value not in (None, ""):
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def parse_time(value: str | None) -> datetime | None:
    """The `time` attribute as a datetime; None when absent or not ISO 8601, never an error."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def trace_context_of(headers: Mapping[str, Any]) -> str | None:
    """The delivery's W3C `traceparent`; None when absent or not one (never an error)."""
    value = headers.get(TRACEPARENT)
    if isinstance(value, str) and _TRACEPARENT.fullmatch(value.strip()):
        return value.strip()
    return None
