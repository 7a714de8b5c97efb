"""Whatever a publisher puts in a delivery, reading and storing it never fails.

Text no store can keep is escaped with its original bytes kept; broker headers of
the wrong type read as absent; an oversized body is stored cut short, unparsed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from pamqp import commands, header

from sagaworks.adapters.memory.store import InMemoryStore
from sagaworks.adapters.rabbitmq.frames import tolerate_undecodable_properties
from sagaworks.adapters.rabbitmq.inbound import inbound_of
from sagaworks.application.dead_letters import QueueOwner
from sagaworks.application.oversized import KEPT_BYTES, RejectOversized
from sagaworks.application.ports import BodyDigest, InboundMessage, PriorFailure
from sagaworks.application.stored import original_bytes, storable_text
from sagaworks.testing import FakeClock

pytestmark = pytest.mark.unit

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
SAGA_QUEUE = "sagaworks.order_fulfilment"
DLQ = "sagaworks.dead-letters"


def undecodable(raw: bytes) -> str:
    """Text as pamqp's lenient decoder hands over bytes that are not UTF-8."""
    return raw.decode("utf-8", "surrogateescape")


def read(headers: dict[str, Any], **properties: Any) -> InboundMessage:
    return inbound_of(
        headers,
        b"{}",
        queue=SAGA_QUEUE,
        exchange="orders",
        routing_key="order.placed",
        **properties,
    )


def test_storable_text_escapes_nul_and_undecodable_bytes_and_keeps_the_rest() -> None:
    assert storable_text("plain é") == "plain é"
    assert storable_text("a\x00b") == "a\\u0000b"
    assert storable_text(undecodable(b"t\xff\xfe")) == "t\\xff\\xfe"
    assert original_bytes(undecodable(b"t\xff\x00")) == b"t\xff\x00"


def test_unstorable_properties_and_headers_are_escaped_with_their_bytes_kept() -> None:
    inbound = read(
        {
            "x-note": b"\xff\xfe",
            "x-nul": "x\x00y",
            "x-nested": {"k\x00": ["ok", "bad\x00"]},
            "x-nan": float("nan"),
        },
        message_id="m-\x00-1",
        message_type=undecodable(b"order.\xff"),
        correlation_id="c\x00",
    )
    assert inbound.message_id == "m-\\u0000-1"
    assert inbound.message_type == "order.\\xff"
    assert inbound.correlation_id == "c\\u0000"
    assert inbound.headers["x-note"] == "\\xff\\xfe"
    assert inbound.headers["x-nul"] == "x\\u0000y"
    assert inbound.headers["x-nested"] == {"k\\u0000": ["ok", "bad\\u0000"]}
    assert inbound.headers["x-nan"] == "nan"
    assert inbound.raw_fields == {
        "message_id": b"m-\x00-1",
        "type": b"order.\xff",
        "correlation_id": b"c\x00",
        "headers/x-note": b"\xff\xfe",
        "headers/x-nul": b"x\x00y",
        "headers/x-nested/k\\u0000#name": b"k\x00",
        "headers/x-nested/k\\u0000/1": b"bad\x00",
    }
    assert all(storable_text(name) == name for name in inbound.raw_fields), "keys jsonb takes"


def test_a_plain_delivery_has_no_raw_fields() -> None:
    inbound = read({"cloudEvents_source": "shop"}, message_id="m-1", message_type="order.placed")
    assert inbound.raw_fields == {}
    assert inbound.headers["cloudEvents_source"] == "shop"


@pytest.mark.parametrize(
    ("value", "count"),
    [(3, 3), ("4", 4), ("abc", 0), ("²", 0), (True, 0), (-2, 0), (1.5, 0), (b"7", 0), (None, 0)],
)
def test_a_delivery_count_of_the_wrong_type_reads_as_absent(value: Any, count: int) -> None:
    inbound = read({"x-delivery-count": value, "x-trace": "t"}, message_id="m-1")
    assert inbound.delivery_count == count
    assert "x-delivery-count" not in inbound.headers, "a redelivery has the same headers"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-death": "nope"},
        {"x-death": 12},
        {"x-death": ["nope", 3, None]},
        {"x-death": [{"queue": 5, "reason": b"\xff", "count": "x", "time": 7}]},
        {"x-first-death-queue": 5, "x-first-death-reason": ["a"], "x-first-death-exchange": {}},
    ],
)
def test_death_records_of_the_wrong_type_read_as_absent(headers: dict[str, Any]) -> None:
    inbound = read(headers, message_id="m-1")
    for failure in inbound.failures:
        assert isinstance(failure.queue, str)
        assert isinstance(failure.reason, str)
        assert isinstance(failure.count, int)


def test_pamqp_reads_a_header_frame_with_undecodable_text_and_an_impossible_timestamp() -> None:
    tolerate_undecodable_properties()
    properties = commands.Basic.Properties(message_id="m-1", message_type="order.placed")
    frame = header.ContentHeader(body_size=2, properties=properties).marshal()
    # Corrupt the type (a short string) into bytes that are not UTF-8.
    frame = frame.replace(b"\x0corder.placed", b"\x0corder.\xff\xfeaced")
    decoded = header.ContentHeader()
    decoded.unmarshal(frame)
    assert original_bytes(decoded.properties.message_type) == b"order.\xff\xfeaced"

    stamped = commands.Basic.Properties(timestamp=NOW)
    frame = header.ContentHeader(body_size=2, properties=stamped).marshal()
    seconds = struct.pack(">Q", int(NOW.timestamp()))
    frame = frame.replace(seconds, struct.pack(">Q", 2**64 - 1))
    decoded = header.ContentHeader()
    decoded.unmarshal(frame)
    assert decoded.properties.timestamp is None


async def test_an_oversized_delivery_is_stored_as_its_start_length_and_digest() -> None:
    store = InMemoryStore()
    body = b'{"huge": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    reject = RejectOversized(
        store,
        FakeClock(NOW),
        256 * 1024,
        {SAGA_QUEUE: QueueOwner(saga_type="order_fulfilment")},
        DLQ,
    )
    inbound = replace(read({}, message_id="big-1", message_type="order.placed"), body=body)
    handled = await reject(inbound)
    assert (handled.outcome, handled.reason) == ("dead_lettered", "oversized")
    (letter,) = store.dead_letters()
    assert letter.body == body[:KEPT_BYTES]
    assert letter.whole_body == BodyDigest(len(body), hashlib.sha256(body).hexdigest())
    assert (letter.queue, letter.reason, letter.saga_type) == (
        SAGA_QUEUE,
        "oversized",
        "order_fulfilment",
    )
    assert str(len(body)) in (letter.exception_message or "")


async def test_an_oversized_dead_letter_is_kept_under_the_queue_that_failed_it() -> None:
    store = InMemoryStore()
    failed = PriorFailure("delivery_limit", "sagaworks.port.inventory", "", ("port.x",), 1, NOW)
    inbound = InboundMessage(
        message_id="",
        message_type="",
        body=b"y" * 300_000,
        headers={},
        queue=DLQ,
        exchange="sagaworks.dlx",
        routing_key="port.x",
        failures=(failed,),
    )
    owners = {"sagaworks.port.inventory": QueueOwner(runs_steps=True)}
    await RejectOversized(store, FakeClock(NOW), 256 * 1024, owners, DLQ)(inbound)
    (letter,) = store.dead_letters()
    assert (letter.queue, letter.handler, len(letter.body)) == (
        "sagaworks.port.inventory",
        "run_step",
        KEPT_BYTES,
    )
    assert letter.message_id.startswith("no-id:")
