"""Pure rules: replay envelopes and targets, body edits, remembered errors, timer backoff."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from sagaworks.adapters.rabbitmq.publisher import amqp_properties
from sagaworks.application.config import EngineOptions
from sagaworks.application.dead_letters import (
    REPLAY_HEADER,
    DeadLetterError,
    LastErrors,
    UndeclaredQueue,
    replay_envelope,
    set_path,
    undeclared_queues,
)
from sagaworks.application.ports import OutboxRow, StoredDeadLetter

pytestmark = pytest.mark.unit

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def letter(headers: dict[str, object]) -> StoredDeadLetter:
    return StoredDeadLetter(
        id=7,
        message_id="m-1",
        queue="sagaworks.order_fulfilment",
        exchange="orders",
        routing_key="order.placed",
        message_type="order.placed",
        saga_type="order_fulfilment",
        headers=headers,
        body=b"{}",
        original_body=None,
        reason="rejected",
        exception_type="Rejected",
        exception_message="no",
        handler=None,
        fingerprint="f",
        first_failed_at=NOW,
        last_failed_at=NOW,
        times_failed=1,
        times_replayed=0,
        status="active",
    )


def test_replay_strips_the_broker_death_records_and_numbers_the_replay() -> None:
    envelope = replay_envelope(
        letter(
            {
                "x-death": [{"queue": "q"}],
                "x-first-death-queue": "q",
                "x-first-death-reason": "rejected",
                "x-last-death-exchange": "orders",
                "x-delivery-count": 3,
                "x-trace": "kept",
                "cloudEvents_source": "shop",
                "cloudEvents_correlationid": "c-1",
                "cloudEvents_time": "2024-05-01T11:00:00+00:00",
            }
        ),
        2,
    )
    row = OutboxRow(1, "m-1#replay-7-2", "", "sagaworks.order_fulfilment", envelope, b"{}")
    properties = amqp_properties(row)
    assert properties.headers == {
        "x-trace": "kept",
        "cloudEvents_source": "shop",
        "cloudEvents_correlationid": "c-1",
        "cloudEvents_time": "2024-05-01T11:00:00+00:00",
        REPLAY_HEADER: 2,
    }
    assert (properties.message_id, properties.message_type, properties.app_id) == (
        "m-1",
        "order.placed",
        "shop",
    )
    assert properties.correlation_id == "c-1"
    assert properties.timestamp == datetime(2024, 5, 1, 11, 0, tzinfo=UTC)


def test_replay_envelope_names_no_transport_and_keeps_the_stored_headers() -> None:
    stored = {"x-trace": "kept", REPLAY_HEADER: 1}
    assert replay_envelope(letter(stored), 2) == {
        "id": "m-1",
        "type": "order.placed",
        "headers": {"x-trace": "kept", REPLAY_HEADER: 2},
    }
    assert stored[REPLAY_HEADER] == 1


def test_set_path_replaces_nested_values_without_touching_the_original() -> None:
    document = {"lines": [{"sku": "a", "quantity": 0}], "currency": "EUR"}
    changed = set_path(document, "lines.0.quantity", 2)
    assert changed == {"lines": [{"sku": "a", "quantity": 2}], "currency": "EUR"}
    assert document["lines"][0]["quantity"] == 0  # type: ignore[index]
    assert set_path(document, "note", "new")["note"] == "new"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("lines.5.quantity", "not an index"),
        ("missing.field", 'no field "missing"'),
        ("currency.code", "not an object or a list"),
        ("", "not a field path"),
    ],
)
def test_set_path_refuses_paths_that_lead_nowhere(path: str, message: str) -> None:
    with pytest.raises(DeadLetterError, match=message):
        set_path({"lines": [{}], "currency": "EUR"}, path, 1)


def test_last_errors_keep_the_newest_per_message_and_forget_the_oldest() -> None:
    errors = LastErrors(size=2)
    errors.remember("q", "m-1", RuntimeError("first"))
    errors.remember("q", "m-1", ValueError("second"))
    errors.remember("q", "m-2", KeyError("k"))
    assert errors.get("q", "m-1") == ("ValueError", "second")
    errors.remember("q", "m-3", RuntimeError("third"))
    assert errors.get("q", "m-1") is None
    assert errors.get("q", "m-3") == ("RuntimeError", "third")
    assert errors.get("other", "m-3") is None


def test_replay_targets_only_declared_queues_and_the_refusal_says_what_to_do() -> None:
    declared = {"sagaworks.order_fulfilment", "sagaworks.port.payments"}
    ours = letter({})
    stray = replace(ours, id=8, queue="billing.internal")
    other = replace(ours, id=9, queue="billing.internal")
    assert undeclared_queues([ours], declared) == {}
    strays = undeclared_queues([ours, stray, other], declared)
    assert strays == {"billing.internal": [8, 9]}
    text = str(UndeclaredQueue(strays))
    assert 'refusing to replay to "billing.internal" (dead letter 8, 9)' in text
    assert "sagaworks dlq archive 8" in text
    assert "--allow-queue" in text


def test_a_failing_timer_backs_off_exponentially_up_to_the_cap_then_parks() -> None:
    options = EngineOptions(
        timer_max_attempts=6,
        timer_retry_base=timedelta(seconds=1),
        timer_retry_max=timedelta(seconds=10),
    )
    waits = [options.timer_retry_at(n, NOW) for n in range(1, 7)]
    assert [w - NOW for w in waits[:5] if w is not None] == [
        timedelta(seconds=s) for s in (1, 2, 4, 8, 10)
    ]
    assert waits[5] is None
    assert EngineOptions(timer_max_attempts=1000).timer_retry_at(999, NOW) == NOW + timedelta(
        minutes=5
    )
