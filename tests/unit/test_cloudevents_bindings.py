"""Every CloudEvents binding an SDK lays out on RabbitMQ reads into the same inbound message.

The messages are built by the official `cloudevents` SDK itself: the AMQP
binding (`cloudEvents_*` headers, `time` in epoch milliseconds), the RabbitMQ
binding (`ce-*` headers) and structured mode (`application/cloudevents+json`).
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.bindings import amqp, rabbitmq
from cloudevents.core.v1.event import CloudEvent

from sagaworks.adapters.rabbitmq.cloudevents import parse_time, read_attribute, read_structured
from sagaworks.adapters.rabbitmq.inbound import inbound_of
from sagaworks.application.ports import InboundMessage

pytestmark = pytest.mark.unit

WHEN = datetime(2026, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
DATA = {"order_id": "o-1", "note": "ünïcode"}


def event(**extra: Any) -> CloudEvent:
    attributes = {
        "id": "evt-1",
        "type": "order.placed",
        "source": "/order-service",
        "time": WHEN,
        "datacontenttype": "application/json",
        "correlationid": "corr-1",
        **extra,
    }
    return CloudEvent(attributes=attributes, data=DATA)


def read(headers: dict[str, Any], body: bytes, **properties: Any) -> InboundMessage:
    return inbound_of(
        headers, body, queue="q", exchange="orders", routing_key="order.placed", **properties
    )


def assert_envelope(inbound: InboundMessage) -> None:
    assert inbound.message_id == "evt-1"
    assert inbound.message_type == "order.placed"
    assert inbound.source == "/order-service"
    assert inbound.correlation_id == "corr-1"
    assert inbound.time == WHEN.replace(microsecond=250000)
    assert json.loads(inbound.body) == DATA
    assert inbound.content_key == ""


def test_the_amqp_binding_with_time_in_epoch_milliseconds() -> None:
    message = amqp.to_binary_event(event())
    assert isinstance(message.application_properties["cloudEvents_time"], int)
    inbound = read(
        message.application_properties,
        message.application_data,
        content_type=message.properties["content-type"],
    )
    assert_envelope(inbound)


def test_the_rabbitmq_binding_reads_ce_headers() -> None:
    message = rabbitmq.to_binary_event(event())
    assert "ce-type" in message.headers
    inbound = read(message.headers, message.body, content_type=message.content_type)
    assert_envelope(inbound)


def test_structured_mode_reads_attributes_and_data_from_the_body() -> None:
    message = rabbitmq.to_structured_event(event(causationid="cause-1"))
    assert message.content_type == "application/cloudevents+json"
    inbound = read(message.headers, message.body, content_type=message.content_type)
    assert_envelope(inbound)
    assert inbound.causation_id == "cause-1"
    # Kept as binary mode carries it, so a stored letter is sent again whole.
    assert inbound.headers["cloudEvents_type"] == "order.placed"
    assert inbound.headers["cloudEvents_datacontenttype"] == "application/json"


def test_structured_mode_over_the_limit_is_left_whole_and_unparsed() -> None:
    message = rabbitmq.to_structured_event(event())
    inbound = inbound_of(
        {},
        message.body,
        queue="q",
        exchange="orders",
        routing_key="order.placed",
        content_type=message.content_type,
        unwrap_up_to=len(message.body) - 1,
    )
    assert inbound.body == message.body
    assert inbound.message_id == ""
    assert inbound.content_key.startswith("no-id:")


def test_the_bindings_attributes_win_over_amqp_properties() -> None:
    # aio-pika (aiormq) gives every message without one a random `message_id`.
    message = rabbitmq.to_binary_event(event())
    inbound = read(message.headers, message.body, message_id="made-up", message_type="other")
    assert inbound.message_id == "evt-1"
    assert inbound.message_type == "order.placed"


def test_structured_mode_attributes_win_over_headers_and_properties() -> None:
    message = rabbitmq.to_structured_event(event())
    inbound = read(
        {"cloudEvents_type": "order.cancelled", "ce-source": "/elsewhere"},
        message.body,
        content_type="application/cloudevents+json; charset=utf-8",
        message_id="prop-id",
    )
    assert inbound.message_type == "order.placed"
    assert inbound.source == "/order-service"
    assert inbound.message_id == "evt-1"


@pytest.mark.parametrize(
    "body",
    [b"not json", b"[1, 2]", b'{"id": "x", "data_base64": "***"}'],
    ids=["not-json", "not-an-object", "bad-base64"],
)
def test_a_structured_body_that_is_no_event_is_read_as_it_came(body: bytes) -> None:
    inbound = read({}, body, content_type="application/cloudevents+json")
    assert inbound.body == body
    assert inbound.message_id == ""


def test_structured_data_base64_and_text_data() -> None:
    binary = read_structured(
        json.dumps({"id": "1", "data_base64": base64.b64encode(b"\x00\x01").decode()}).encode()
    )
    assert binary is not None
    assert binary.data == b"\x00\x01"
    text = read_structured(
        json.dumps({"id": "1", "datacontenttype": "text/plain", "data": "héllo"}).encode()
    )
    assert text is not None
    assert text.data == "héllo".encode()
    json_string = read_structured(json.dumps({"id": "1", "data": "x"}).encode())
    assert json_string is not None
    assert json_string.data == b'"x"'


def test_a_content_type_that_only_resembles_structured_mode_is_binary() -> None:
    body = json.dumps({"id": "in-body", "type": "order.placed"}).encode()
    inbound = read({}, body, content_type="application/cloudevents-batch+json")
    assert inbound.body == body
    assert inbound.message_id == ""


def test_time_forms() -> None:
    assert parse_time("1746102615250") == datetime(2025, 5, 1, 12, 30, 15, 250000, tzinfo=UTC)
    assert parse_time("2026-05-01T12:30:15Z") == datetime(2026, 5, 1, 12, 30, 15, tzinfo=UTC)
    assert parse_time("9" * 40) is None
    assert parse_time("yesterday") is None
    assert read_attribute("time", {"ce-time": "2026-05-01T12:30:15Z"}) == "2026-05-01T12:30:15Z"
