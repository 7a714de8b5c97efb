"""CloudEvents on RabbitMQ: where each binding puts the envelope, and which headers the broker owns.

Each message sagaworks publishes carries the CloudEvents attributes as AMQP
properties where AMQP has one (`message_id`, `type`, `app_id` for `source`,
`timestamp`, `correlation_id`, `content_type`) and as `cloudEvents_*`
headers, which is how the CloudEvents AMQP binding names application
properties. CloudEvents receivers take what every binding sends, so inbound
messages are read from any of:

- the AMQP binding in binary mode: `cloudEvents_*` (or `cloudEvents:*`)
  headers, `time` as RFC 3339 text or as epoch milliseconds;
- the RabbitMQ binding in binary mode: `ce-*` headers;
- structured mode (`content_type: application/cloudevents+json`): the
  attributes and the data in the JSON body (`read_structured`).

A trace context travels as the W3C `traceparent` header, where tracing
tools (FastStream's middleware among them) look for it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "CE_PREFIX",
    "HEADER_PREFIXES",
    "SPEC_VERSION",
    "STRUCTURED_CONTENT_TYPE",
    "TRACEPARENT",
    "StructuredEvent",
    "is_broker_owned",
    "is_structured",
    "parse_time",
    "read_attribute",
    "read_structured",
    "trace_context_of",
]

CE_PREFIX = "cloudEvents_"
HEADER_PREFIXES = (CE_PREFIX, "cloudEvents:", "ce-")
"""Header name prefixes of the attributes: the AMQP binding's two forms, the RabbitMQ binding's."""
SPEC_VERSION = "1.0"
STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
TRACEPARENT = "traceparent"

_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
"""Version 00 of W3C Trace Context, all-zero ids being invalid."""

_BROKER_HEADERS = frozenset({"x-death", "x-delivery-count"})
_BROKER_PREFIXES = ("x-first-death-", "x-last-death-")
_DATA_FIELDS = frozenset({"data", "data_base64"})


def is_broker_owned(header: str) -> bool:
    """RabbitMQ writes these on delivery and dead-lettering; a message sent again drops them."""
    return header in _BROKER_HEADERS or header.startswith(_BROKER_PREFIXES)


def read_attribute(name: str, headers: Mapping[str, Any], prop: object | None = None) -> str | None:
    """A CloudEvents attribute: a `cloudEvents_`, `cloudEvents:` or `ce-` header, else the AMQP
    property.

    The binding's header wins: AMQP clients make up a `message_id` when the
    publisher gave none (aiormq does), so the property may name nothing the
    publisher chose.
    """
    for prefix in HEADER_PREFIXES:
        value = headers.get(f"{prefix}{name}")
        if value not in (None, ""):
            return value.decode() if isinstance(value, bytes) else str(value)
    if prop not in (None, ""):
        return prop.isoformat() if isinstance(prop, datetime) else str(prop)
    return None


def parse_time(value: str | None) -> datetime | None:
    """The `time` attribute as a datetime; None when absent or unreadable, never an error.

    RFC 3339 text, or epoch milliseconds (the AMQP binding's timestamp type).
    """
    if not value:
        return None
    if value.isascii() and value.isdigit():
        try:
            return datetime.fromtimestamp(int(value) / 1000, UTC)
        except (OverflowError, OSError, ValueError):
            return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def is_structured(content_type: str | None) -> bool:
    """Whether a message's `content_type` says the body is a structured-mode CloudEvent."""
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    return media_type == STRUCTURED_CONTENT_TYPE


@dataclass(frozen=True, slots=True)
class StructuredEvent:
    """A structured-mode event split as binary mode carries it: attributes apart, data as body."""

    attributes: dict[str, Any]
    data: bytes


def read_structured(body: bytes) -> StructuredEvent | None:
    """The attributes and data of a structured-mode JSON body; None when it is not one.

    The data becomes the body a binary-mode message would carry: JSON data as
    compact JSON, text data of another content type as its UTF-8 bytes,
    `data_base64` decoded. Attribute values keep their JSON type when AMQP
    headers can hold it (text, numbers, booleans).
    """
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(event, dict):
        return None
    attributes: dict[str, Any] = {}
    for name, value in event.items():
        if name in _DATA_FIELDS or value is None:
            continue
        plain = isinstance(value, str | int | float | bool)
        attributes[name] = value if plain else json.dumps(value)
    content_type = attributes.get("datacontenttype")
    if "data_base64" in event:
        try:
            data = base64.b64decode(str(event["data_base64"]), validate=True)
        except (binascii.Error, ValueError):
            return None
    elif "data" not in event:
        data = b""
    elif isinstance(event["data"], str) and not _is_json(content_type):
        data = event["data"].encode(errors="surrogatepass")
    else:
        text = json.dumps(event["data"], ensure_ascii=False, separators=(",", ":"))
        data = text.encode(errors="surrogatepass")
    return StructuredEvent(attributes, data)


def _is_json(content_type: object) -> bool:
    """JSON data, as the JSON event format reads `datacontenttype` (absent means JSON)."""
    if not isinstance(content_type, str) or not content_type:
        return True
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith(("/json", "+json"))


def trace_context_of(headers: Mapping[str, Any]) -> str | None:
    """The delivery's W3C `traceparent`; None when absent or not one (never an error)."""
    value = headers.get(TRACEPARENT)
    if isinstance(value, str) and _TRACEPARENT.fullmatch(value.strip()):
        return value.strip()
    return None
