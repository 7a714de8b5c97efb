"""Reading a delivery's CloudEvents attributes into a transport-neutral `InboundMessage`."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from sagaworks.application.ports import InboundMessage
from sagaworks.application.wire import read_attribute

__all__ = ["to_inbound"]


def _plain(value: Any) -> Any:
    """Header values as JSON-friendly Python (AMQP tables may hold bytes and datetimes)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_inbound(raw: AbstractIncomingMessage, queue: str) -> InboundMessage:
    headers = {str(k): _plain(v) for k, v in (raw.headers or {}).items()}
    time = read_attribute("time", headers, raw.timestamp)
    delivery_count = headers.get("x-delivery-count", 0)
    return InboundMessage(
        message_id=read_attribute("id", headers, raw.message_id) or "",
        message_type=read_attribute("type", headers, raw.type) or "",
        body=raw.body,
        headers=headers,
        queue=queue,
        exchange=raw.exchange or "",
        routing_key=raw.routing_key or "",
        source=read_attribute("source", headers, raw.app_id) or "",
        time=_parse_time(time),
        correlation_id=read_attribute("correlationid", headers, raw.correlation_id),
        causation_id=read_attribute("causationid", headers),
        user_id=raw.user_id,
        delivery_count=int(delivery_count) if isinstance(delivery_count, int | str) else 0,
    )


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None
