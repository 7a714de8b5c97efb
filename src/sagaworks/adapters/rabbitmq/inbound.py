"""Reading a delivery into a transport-neutral `InboundMessage`.

The CloudEvents attributes are read from the headers of any CloudEvents
binding, else from the AMQP properties (`cloudevents.py`); an attribute that
came only as a property is added to the headers too, so a stored delivery
sent again loses none of them.

A structured-mode message (`application/cloudevents+json`) is read as binary
mode carries it: its attributes become `cloudEvents_*` headers and its data
the body, so everything after this module (the boundary, the body's
validation, the inbox's body hash, a dead letter and its replay) sees one
form.

RabbitMQ's death records (`x-death`, else `x-first-death-*`) become
`PriorFailure`s: the use cases never read a broker header.

Anyone who can publish chooses these bytes, so reading never fails: a broker
header of the wrong type reads as absent, and a text field no store could keep
(a NUL, bytes that are not UTF-8) is escaped (`storable_text`) with its
original bytes kept in `raw_fields`. `x-delivery-count` says how often this
delivery was tried, not what the message is, so it becomes `delivery_count`
and is left out of `headers`: a redelivered message has the same headers.

The id is judged on the raw AMQP message (FastStream's own message object
invents one when there is none): a message without one gets a `content_key`
instead, so id-less messages are told apart by what they carry.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from sagaworks.adapters.rabbitmq.cloudevents import (
    CE_PREFIX,
    HEADER_PREFIXES,
    is_broker_owned,
    is_structured,
    parse_time,
    read_structured,
    trace_context_of,
)
from sagaworks.application.ports import InboundMessage, PriorFailure
from sagaworks.application.stored import original_bytes, storable_text

__all__ = ["content_key", "inbound_of", "prior_failures", "to_inbound"]


_DELIVERY_COUNT = "x-delivery-count"
_PROPERTY = {"id": "message_id", "source": "app_id", "correlationid": "correlation_id"}
"""The AMQP property a CloudEvents attribute comes from, where the names differ."""


def _text_of(value: str, path: str, raw: dict[str, bytes]) -> str:
    """A text field as it can be stored; its original bytes go to `raw` when it had to change."""
    safe = storable_text(value)
    if safe != value:
        raw[path] = original_bytes(value)
    return safe


def _name_of(key: object, path: str, raw: dict[str, bytes]) -> str:
    """A header's (or a nested table key's) name as stored; paths in `raw` use this form.

    The paths are themselves stored (JSON keys of `raw_fields`), so a path made of
    the name as it came would carry the NUL the escaping keeps out.
    """
    name = storable_text(str(key))
    if name != str(key):
        raw[f"{path}/{name}#name"] = original_bytes(str(key))
    return name


def _plain(value: Any, path: str, raw: dict[str, bytes]) -> Any:
    """Header values as storable JSON-friendly Python (AMQP tables hold bytes, datetimes, NaN)."""
    if isinstance(value, str):
        return _text_of(value, path, raw)
    if isinstance(value, bytes | bytearray):
        try:
            return _text_of(value.decode(), path, raw)
        except UnicodeDecodeError:
            raw[path] = bytes(value)
            return storable_text(value.decode(errors="surrogateescape"))
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, dict):
        table = {}
        for key, item in value.items():
            name = _name_of(key, path, raw)
            table[name] = _plain(item, f"{path}/{name}", raw)
        return table
    if isinstance(value, list | tuple):
        return [_plain(v, f"{path}/{i}", raw) for i, v in enumerate(value)]
    return value


def _count(value: Any) -> int:
    """`x-delivery-count` when it is a count; any other value reads as absent (0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return max(value, 0)
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    return 0


def to_inbound(
    raw: AbstractIncomingMessage, queue: str, *, unwrap_up_to: int | None = None
) -> InboundMessage:
    """The delivery as aio-pika received it: properties as sent, none made up.

    A structured-mode body over `unwrap_up_to` bytes is left whole, unparsed,
    for the size check to refuse.
    """
    return inbound_of(
        raw.headers or {},
        raw.body,
        queue=queue,
        exchange=raw.exchange or "",
        routing_key=raw.routing_key or "",
        message_id=raw.message_id,
        message_type=raw.type,
        app_id=raw.app_id,
        timestamp=raw.timestamp,
        correlation_id=raw.correlation_id,
        user_id=raw.user_id,
        content_type=raw.content_type,
        unwrap_up_to=unwrap_up_to,
    )


def inbound_of(
    raw_headers: Mapping[str, Any],
    body: bytes,
    *,
    queue: str,
    exchange: str,
    routing_key: str,
    message_id: str | None = None,
    message_type: str | None = None,
    app_id: str | None = None,
    timestamp: datetime | None = None,
    correlation_id: str | None = None,
    user_id: str | None = None,
    content_type: str | None = None,
    unwrap_up_to: int | None = None,
) -> InboundMessage:
    """The `InboundMessage` for a delivery's properties, headers and body; never raises.

    A structured-mode body (at most `unwrap_up_to` bytes, when given) that is a
    JSON object gives its attributes, over any header of the same name, and its
    data as the body; one that is not is read as it came.
    """
    if is_structured(content_type) and (unwrap_up_to is None or len(body) <= unwrap_up_to):
        event = read_structured(body)
        if event is not None:
            body = event.data
            attributes = {f"{CE_PREFIX}{name}": value for name, value in event.attributes.items()}
            raw_headers = {**raw_headers, **attributes}
    raw: dict[str, bytes] = {}
    headers = {}
    for key, value in raw_headers.items():
        if key != _DELIVERY_COUNT:
            name = _name_of(key, "headers", raw)
            headers[name] = _plain(value, f"headers/{name}", raw)
    time = _attribute("time", headers, timestamp, raw)
    identity = _attribute("id", headers, message_id, raw) or ""
    return InboundMessage(
        message_id=identity,
        message_type=_attribute("type", headers, message_type, raw) or "",
        body=body,
        headers=headers,
        queue=queue,
        exchange=_text_of(exchange, "exchange", raw),
        routing_key=_text_of(routing_key, "routing_key", raw),
        source=_attribute("source", headers, app_id, raw) or "",
        time=parse_time(time),
        correlation_id=_attribute("correlationid", headers, correlation_id, raw),
        causation_id=_attribute("causationid", headers, None, raw),
        user_id=None if user_id is None else _text_of(user_id, "user_id", raw),
        delivery_count=_count(raw_headers.get(_DELIVERY_COUNT)),
        failures=prior_failures(headers),
        raw_fields=raw,
        content_key="" if identity else content_key(body, headers),
        trace_context=trace_context_of(headers),
    )


def content_key(body: bytes, headers: Mapping[str, Any]) -> str:
    """`no-id:` and the SHA-256 of the body and the publisher's headers, sorted by name.

    The broker's headers (delivery count, death records) are left out: a
    redelivery of the same message has the same key.
    """
    own = {k: v for k, v in headers.items() if not is_broker_owned(k)}
    digest = hashlib.sha256(body)
    digest.update(b"\0")
    digest.update(json.dumps(own, sort_keys=True, default=str).encode())
    return f"no-id:{digest.hexdigest()}"


def _attribute(
    name: str, headers: dict[str, Any], prop: object | None, raw: dict[str, bytes]
) -> str | None:
    """`read_attribute`, and a value that came only as a property is copied into `headers`."""
    in_headers: str | None = None
    for prefix in HEADER_PREFIXES:
        value = headers.get(f"{prefix}{name}")
        if value not in (None, ""):
            in_headers = value if isinstance(value, str) else str(value)
            break
    if in_headers is not None and (name != "time" or parse_time(in_headers) is not None):
        return in_headers
    if prop in (None, ""):
        return in_headers
    found = (
        prop.isoformat()
        if isinstance(prop, datetime)
        else _text_of(str(prop), _PROPERTY.get(name, name), raw)
    )
    if in_headers is None and (name != "time" or parse_time(found) is not None):
        headers[f"{CE_PREFIX}{name}"] = found
    return found


def prior_failures(headers: Mapping[str, Any]) -> tuple[PriorFailure, ...]:
    """RabbitMQ's death records, newest first; fields missing or of an odd type read as absent.

    `x-death` holds one entry per (queue, reason), newest first. Without it,
    the `x-first-death-*` headers say where the message died first.
    """
    deaths = headers.get("x-death")
    if isinstance(deaths, list):
        return tuple(_failure(d) for d in deaths if isinstance(d, Mapping))
    reason = _text(headers.get("x-first-death-reason"))
    queue = _text(headers.get("x-first-death-queue"))
    exchange = _text(headers.get("x-first-death-exchange"))
    if not (reason or queue or exchange):
        return ()
    return (PriorFailure(reason, queue, exchange, (), 0, None),)


def _failure(death: Mapping[str, Any]) -> PriorFailure:
    keys = death.get("routing-keys")
    count = death.get("count")
    when = death.get("time")
    return PriorFailure(
        reason=_text(death.get("reason")),
        queue=_text(death.get("queue")),
        exchange=_text(death.get("exchange")),
        routing_keys=tuple(k for k in keys if isinstance(k, str)) if isinstance(keys, list) else (),
        count=count if isinstance(count, int) and not isinstance(count, bool) else 0,
        time=parse_time(when) if isinstance(when, str) else None,
    )


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""
