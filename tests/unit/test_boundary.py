"""What a delivery must show before its body is read: id, type on its exchange, publisher."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagaworks import Message
from sagaworks.adapters.rabbitmq.inbound import inbound_of
from sagaworks.application.boundary import (
    Boundary,
    UnconfiguredPublishers,
    allow_list,
    unconfigured,
)
from sagaworks.application.parsing import Rejected, parse_event
from sagaworks.application.registry import SagaRegistry
from sagaworks.application.stored import body_hash, dead_letter
from sagaworks.bootstrap import boundary_for
from sagaworks.settings import Settings

BOUNDARY = Boundary(
    lambda domain: f"p.{domain}",
    {"order.placed": frozenset({"order-service"})},
    frozenset({"sagaworks"}),
)


def body(**changes: Any) -> bytes:
    placed = OrderPlaced(
        order_id="o-1",
        customer_id="c-1",
        lines=(OrderLine(sku="s", quantity=1),),
        amount_cents=100,
        currency="EUR",
        dispatch_by=datetime(2030, 1, 1, tzinfo=UTC),
    ).model_dump(mode="json")
    return json.dumps({**placed, **changes}).encode()


def delivery(**given: Any) -> Any:
    values: dict[str, Any] = {
        "queue": "p.sagaworks.order_fulfilment",
        "exchange": "p.orders",
        "routing_key": "order.placed",
        "message_id": "m-1",
        "message_type": "order.placed",
        "user_id": "order-service",
    }
    values.update(given)
    headers = values.pop("headers", {})
    raw = values.pop("body", body())
    return inbound_of(headers, raw, **values)


def reason(**given: Any) -> str | None:
    parsed = parse_event(order_fulfilment, delivery(**given), 1 << 20, BOUNDARY)
    return parsed.reason if isinstance(parsed, Rejected) else None


def test_a_valid_delivery_passes() -> None:
    assert reason() is None


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"message_id": None}, "missing_id"),
        ({"exchange": "p.warehouse", "routing_key": "shipment.dispatched"}, "type_mismatch"),
        ({"routing_key": "order.cancellation_requested"}, "type_mismatch"),
        ({"user_id": None}, "unauthorised_publisher"),
        ({"user_id": "warehouse"}, "unauthorised_publisher"),
        ({"body": body(dispatch_by="2030-01-01T00:00:00")}, "schema_invalid"),
        ({"body": body(amount_cents=10**30)}, "schema_invalid"),
    ],
)
def test_each_breach_has_its_reason(given: dict[str, Any], expected: str) -> None:
    assert reason(**given) == expected


def test_a_cloudevents_id_header_is_an_id() -> None:
    assert reason(message_id=None, headers={"cloudEvents_id": "ce-1"}) is None


def test_straight_to_the_queue_only_own_users_and_allowed_publishers() -> None:
    direct = {"exchange": "", "routing_key": "p.sagaworks.order_fulfilment"}
    assert reason(**direct, user_id="sagaworks") is None
    assert reason(**direct, user_id="order-service") is None
    assert reason(**direct, user_id="warehouse") == "unauthorised_publisher"


def test_an_unconfigured_type_takes_any_named_publisher_but_not_an_anonymous_one() -> None:
    open_door = Boundary(lambda d: f"p.{d}")
    assert open_door.allowed("order.placed", "anyone")
    assert not open_door.allowed("order.placed", None)
    assert not open_door.allowed_direct("order.placed", "anyone")


def test_id_less_deliveries_are_keyed_by_content_not_by_broker_headers() -> None:
    one = delivery(message_id=None)
    again = delivery(message_id=None, headers={"x-delivery-count": 3})
    other = delivery(message_id=None, body=body(order_id="o-2"))
    keys = {
        "one": dead_letter(one, "missing_id").inbound.message_id,
        "again": dead_letter(again, "missing_id").inbound.message_id,
        "other": dead_letter(other, "missing_id").inbound.message_id,
    }
    assert keys["one"].startswith("no-id:")
    assert keys["one"] == keys["again"]
    assert keys["one"] != keys["other"]
    assert dead_letter(delivery(), "x").inbound.message_id == "m-1"


def test_body_hash_tells_bodies_apart() -> None:
    assert body_hash(b"a") == body_hash(b"a")
    assert body_hash(b"a") != body_hash(b"b")


def test_the_allow_list_is_declared_on_classes_and_overridden_by_settings() -> None:
    declared = allow_list([order_fulfilment], {})
    assert declared["order.placed"] == {"order-service"}
    assert declared["shipment.dispatched"] == {"warehouse"}
    overridden = allow_list([order_fulfilment], {"order.placed": ("shop",)})
    assert overridden["order.placed"] == {"shop"}
    assert unconfigured([order_fulfilment], declared) == []
    assert unconfigured([order_fulfilment], {}) == sorted(
        e.message_type for e in order_fulfilment.consumed_events()
    )


def test_production_refuses_to_start_without_an_allow_list(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bare = {e.message_type: e.publishers for e in order_fulfilment.consumed_events()}
    for event in order_fulfilment.consumed_events():
        monkeypatch.setattr(event, "publishers", ())
    registry = SagaRegistry([order_fulfilment])
    with pytest.raises(UnconfiguredPublishers, match="SAGAWORKS_PUBLISHERS"):
        boundary_for(Settings(profile="production"), registry)
    assert boundary_for(Settings(), registry).publishers == {}
    configured = Settings(profile="production", publishers={k: ("u",) for k in bare})
    assert boundary_for(configured, registry).own_users == {"guest"}


def test_publishers_must_be_named_users() -> None:
    with pytest.raises(TypeError, match="tuple of broker user names"):

        class Bad(Message, type="x.y", domain="x", publishers="order-service"):  # type: ignore[arg-type]
            pass

    with pytest.raises(ValidationError, match="at least one broker user"):
        Settings(publishers={"order.placed": ()})


def test_deadlines_need_a_timezone() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        OrderPlaced.model_validate_json(body(dispatch_by="2030-01-01T00:00:00"))
    aware = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    assert OrderPlaced.model_validate_json(body(dispatch_by=aware))
