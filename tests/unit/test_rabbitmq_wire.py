"""The RabbitMQ edge: deliveries into neutral inbound records, neutral outbox rows onto AMQP."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiormq
import pytest

from sagaworks.adapters.rabbitmq.inbound import inbound_of, prior_failures
from sagaworks.adapters.rabbitmq.publisher import amqp_properties
from sagaworks.application.ports import OutboxRow, PriorFailure
from sagaworks.application.wire import Wire
from sagaworks.domain.decide import Outgoing
from sagaworks.domain.messages import Envelope, Message

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
EARLIER = datetime(2024, 5, 1, 11, 0, tzinfo=UTC)


def delivered(headers: dict[str, Any], **properties: Any) -> Any:
    return inbound_of(
        headers,
        b"{}",
        queue="sagaworks.dead_letters",
        exchange="sagaworks.dlx",
        routing_key="order.placed",
        **properties,
    )


def test_x_death_becomes_prior_failures_newest_first_across_queues() -> None:
    # As aiormq decodes it: a list of tables, newest first, times as datetimes.
    headers = {
        "x-death": [
            {
                "count": 1,
                "reason": "delivery_limit",
                "queue": "sagaworks.port.payments",
                "time": NOW,
                "exchange": "",
                "routing-keys": ["sagaworks.port.payments"],
            },
            {
                "count": 3,
                "reason": "rejected",
                "queue": "sagaworks.order_fulfilment",
                "time": EARLIER,
                "exchange": "shop.orders",
                "routing-keys": ["order.placed", "order.any"],
            },
        ],
        "x-first-death-queue": "sagaworks.order_fulfilment",
        "x-first-death-reason": "rejected",
    }
    assert delivered(headers).failures == (
        PriorFailure(
            "delivery_limit", "sagaworks.port.payments", "", ("sagaworks.port.payments",), 1, NOW
        ),
        PriorFailure(
            "rejected",
            "sagaworks.order_fulfilment",
            "shop.orders",
            ("order.placed", "order.any"),
            3,
            EARLIER,
        ),
    )


def test_missing_or_odd_typed_death_fields_read_as_absent() -> None:
    headers = {
        "x-death": [
            {
                "count": "2",
                "reason": 7,
                "queue": None,
                "time": "not a time",
                "routing-keys": "order.placed",
            },
            "not a table",
            {"count": True, "time": 1714564800, "routing-keys": ["order.placed", 3]},
        ]
    }
    assert prior_failures(headers) == (
        PriorFailure("", "", "", (), 0, None),
        PriorFailure("", "", "", ("order.placed",), 0, None),
    )


def test_without_x_death_the_first_death_headers_say_where_it_died() -> None:
    headers = {
        "x-first-death-queue": "sagaworks.order_fulfilment",
        "x-first-death-reason": "expired",
        "x-first-death-exchange": "shop.orders",
    }
    assert prior_failures(headers) == (
        PriorFailure("expired", "sagaworks.order_fulfilment", "shop.orders", (), 0, None),
    )
    assert prior_failures({"x-death": "odd"}) == ()
    assert prior_failures({"cloudEvents_id": "m-1"}) == ()


def test_attributes_that_came_only_as_properties_are_kept_as_headers() -> None:
    inbound = delivered(
        {"cloudEvents_source": "from-header"},
        message_id="m-1",
        message_type="order.placed",
        app_id="from-property",
        timestamp=NOW,
        correlation_id="c-1",
    )
    assert inbound.source == "from-header"  # the binding's header wins over the property
    assert inbound.headers == {
        "cloudEvents_source": "from-header",
        "cloudEvents_id": "m-1",
        "cloudEvents_type": "order.placed",
        "cloudEvents_time": NOW.isoformat(),
        "cloudEvents_correlationid": "c-1",
    }
    assert inbound.failures == ()


class _Placed(Message, type="order.placed", domain="orders"):
    order_id: str


SENT_PROPERTIES = (
    "m-1",
    "order.placed",
    "sagaworks/order_fulfilment",
    "c-1",
    "application/json",
    NOW,
)
"""The envelope's AMQP properties, as `envelope_properties` lists them."""
SENT_HEADERS = {
    "cloudEvents_specversion": "1.0",
    "cloudEvents_id": "m-1",
    "cloudEvents_type": "order.placed",
    "cloudEvents_source": "sagaworks/order_fulfilment",
    "cloudEvents_time": NOW.isoformat(),
    "cloudEvents_datacontenttype": "application/json",
    "cloudEvents_correlationid": "c-1",
}
"""The same envelope as `cloudEvents_*` headers (without a causation id)."""


def envelope_properties(properties: aiormq.spec.Basic.Properties) -> tuple[Any, ...]:
    return (
        properties.message_id,
        properties.message_type,
        properties.app_id,
        properties.correlation_id,
        properties.content_type,
        properties.timestamp,
    )


def test_a_fresh_outbox_row_is_published_as_cloudevents_on_amqp() -> None:
    envelope = Envelope(
        id="m-1",
        type="order.placed",
        source="sagaworks/order_fulfilment",
        time=NOW,
        correlation_id="c-1",
        causation_id="cause-1",
    )
    pending = Wire(lambda domain: f"x.{domain}").encode(
        Outgoing(envelope, "orders", "order.placed", _Placed(order_id="o-1"))
    )
    assert "headers" not in pending.headers
    assert not any(key.startswith("cloudEvents") for key in pending.headers)
    row = OutboxRow(
        1, pending.message_id, pending.exchange, pending.routing_key, pending.headers, pending.body
    )
    properties = amqp_properties(row)
    assert envelope_properties(properties) == SENT_PROPERTIES
    assert properties.delivery_mode == 2
    assert properties.headers == {**SENT_HEADERS, "cloudEvents_causationid": "cause-1"}
    # What a consumer reads back is the envelope that was sent.
    inbound = delivered(
        properties.headers or {},
        message_id=properties.message_id,
        message_type=properties.message_type,
        app_id=properties.app_id,
        timestamp=properties.timestamp,
        correlation_id=properties.correlation_id,
    )
    assert (inbound.message_id, inbound.message_type, inbound.source, inbound.time) == (
        "m-1",
        "order.placed",
        "sagaworks/order_fulfilment",
        NOW,
    )
    assert (inbound.correlation_id, inbound.causation_id) == ("c-1", "cause-1")


def test_an_outbox_row_written_in_the_earlier_amqp_form_publishes_as_before() -> None:
    """Rows committed before an upgrade held AMQP properties; they must go out unchanged."""
    earlier = {
        "message_id": "m-1",
        "type": "order.placed",
        "app_id": "sagaworks/order_fulfilment",
        "timestamp": NOW.isoformat(),
        "correlation_id": "c-1",
        "content_type": "application/json",
        "headers": SENT_HEADERS,
    }
    properties = amqp_properties(OutboxRow(1, "m-1", "x.orders", "order.placed", earlier, b"{}"))
    assert envelope_properties(properties) == SENT_PROPERTIES
    assert properties.headers == SENT_HEADERS
    assert properties.delivery_mode == 2
