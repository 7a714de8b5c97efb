"""The message contract of docs/messages.md, to the letter, on the real broker and database.

Each rejection is dead-lettered on its first delivery with the reason the
contract names, and the worker goes on: a valid order published after the
probes completes. Publishers are told apart by the AMQP `user_id`, which
RabbitMQ verifies; a second broker user is created for the test and removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
from broker_tools import AMQP_URL, USER, broker_user, publish_without_id
from engine_harness import EngineHarness, running_harness
from pamqp import commands
from typer.testing import CliRunner

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagaworks.domain.decide import RunStep
from sagaworks.entrypoints.cli.app import app
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[EngineHarness]:
    async with running_harness(settings_factory, migrated_database_url, run_id) as h:
        yield h


def order(order_id: str, **changes: Any) -> dict[str, Any]:
    body = OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=1),),
        amount_cents=1_000,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
    ).model_dump(mode="json")
    body.update(changes)
    return body


def encoded(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


async def letters(db: asyncpg.Connection, reason: str) -> list[asyncpg.Record]:
    return list(await db.fetch("SELECT * FROM dead_letters WHERE reason = $1 ORDER BY id", reason))


async def wait_for_letters(harness: EngineHarness, reason: str, count: int) -> list[asyncpg.Record]:
    async def enough() -> list[asyncpg.Record] | None:
        found = await letters(harness.db, reason)
        return found if len(found) >= count else None

    return await harness.eventually(enough, what=f"{count} dead letter(s) {reason}")


async def assert_still_works(harness: EngineHarness) -> None:
    """The worker survived the probes: a valid order from an allowed publisher completes."""
    oid = f"ok-{secrets.token_hex(3)}"
    harness.plans[oid] = [(0.05, _dispatched(oid), f"{oid}/dispatched")]
    await harness.publish(OrderPlaced.model_validate(order(oid)), f"{oid}/placed")
    await harness.wait_for_status(oid, "completed")


def _dispatched(oid: str) -> ShipmentDispatched:
    return ShipmentDispatched(order_id=oid, shipment_id=f"shp-{oid}")


async def test_a_message_without_id_is_missing_id_and_kept_by_content(
    harness: EngineHarness,
) -> None:
    first, second = encoded(order("no-id-1")), encoded(order("no-id-2"))
    properties = commands.Basic.Properties(
        message_type="order.placed",
        user_id=USER,
        content_type="application/json",
        delivery_mode=2,
        headers={"cloudEvents_specversion": "1.0"},
    )
    for body in (first, second, first):
        await publish_without_id(f"{harness.prefix}orders", "order.placed", body, properties)

    await harness.eventually(
        lambda: _handled_without_id(harness, 3), what="three id-less deliveries handled"
    )
    found = await letters(harness.db, "missing_id")
    assert len(found) == 2, "two bodies, two letters; the repeat is the same letter"
    assert {bytes(row["body"]) for row in found} == {first, second}
    assert all(row["message_id"].startswith("no-id:") for row in found)
    assert all(row["times_failed"] == 1 for row in found)
    assert await harness.saga("no-id-1") is None
    assert await harness.saga("no-id-2") is None
    await assert_still_works(harness)


async def _handled_without_id(harness: EngineHarness, count: int) -> bool:
    handled = [h for h in harness.handled_for("") if h.use_case == "handle_event"]
    assert all(h.outcome == "dead_lettered" for h in handled), handled
    return len(handled) >= count


async def test_the_same_id_with_another_body_is_an_id_conflict_keeping_both(
    harness: EngineHarness,
) -> None:
    oid = "conflict-1"
    harness.plans[oid] = [(0.05, _dispatched(oid), f"{oid}/dispatched")]
    body = encoded(order(oid))
    await harness.publish_raw(
        "orders", "order.placed", body, message_id="m-conflict", message_type="order.placed"
    )
    await harness.wait_for_status(oid, "completed")
    await harness.publish_raw(
        "orders", "order.placed", body, message_id="m-conflict", message_type="order.placed"
    )
    other = encoded(order(oid, amount_cents=999_999))
    await harness.publish_raw(
        "orders", "order.placed", other, message_id="m-conflict", message_type="order.placed"
    )

    (letter,) = await wait_for_letters(harness, "id_conflict", 1)
    outcomes = [h.outcome for h in await harness.wait_for_handled("m-conflict", 3)]
    assert outcomes == ["applied", "duplicate", "dead_lettered"]
    assert bytes(letter["body"]) == other, "the conflicting body is the letter's"
    assert bytes(letter["first_body"]) == body, "and so is the body processed first"
    first_hash, kept = await harness.db.fetchrow(
        "SELECT body_hash, body FROM inbox WHERE message_id = 'm-conflict'"
    )
    assert first_hash is not None
    assert bytes(kept) == body, "the inbox keeps the body it processed"
    assert bytes(first_hash).hex() in letter["exception_message"], "and the first body's hash"
    shown = await asyncio.to_thread(dlq_show_json, harness, letter["id"])
    assert (shown["body"], shown["first_body"]) == (other.decode(), body.decode())
    saga = await harness.saga(oid)
    assert saga is not None
    assert saga.state["amount_cents"] == 1_000, "the conflicting body changed nothing"
    await assert_still_works(harness)


def dlq_show_json(harness: EngineHarness, letter_id: int) -> Any:
    """`sagaworks dlq show ID --json`, as an operator runs it against the harness's database."""
    env = {
        "SAGAWORKS_DATABASE_URL": harness.database_url,
        "SAGAWORKS_AMQP_URL": harness.settings.amqp_url.get_secret_value(),
        "SAGAWORKS_EXCHANGE_PREFIX": harness.prefix,
        "SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]',
    }
    run = CliRunner().invoke(app, ["dlq", "show", str(letter_id), "--json"], env=env)
    assert run.exit_code == 0, run.output
    return json.loads(run.stdout)


async def test_a_type_from_another_domain_is_a_type_mismatch(harness: EngineHarness) -> None:
    body = encoded(order("smuggled-1"))
    await harness.publish_raw(
        "warehouse",
        "shipment.dispatched",
        body,
        message_id="m-smuggled",
        message_type="order.placed",
    )

    (letter,) = await wait_for_letters(harness, "type_mismatch", 1)
    assert letter["message_id"] == "m-smuggled"
    assert "order.placed" in letter["exception_message"]
    assert await harness.saga("smuggled-1") is None
    await assert_still_works(harness)


async def test_a_publisher_not_allowed_or_unnamed_is_unauthorised(
    harness: EngineHarness,
) -> None:
    async with _broker_user() as (stranger, name):
        channel = await stranger.channel(publisher_confirms=True, on_return_raises=True)
        await harness.publish_raw(
            "orders",
            "order.placed",
            encoded(order("stranger-1")),
            message_id="m-stranger",
            message_type="order.placed",
            user_id=name,
            channel=channel,
        )
        command = RunStep(
            saga_type="order_fulfilment",
            saga_id=harness.saga_id("stranger-2"),
            step="reserve_stock",
            kind="action",
            attempt=1,
            port="inventory",
        )
        await harness.publish_raw(
            "sagaworks.commands",
            "port.inventory.reserve_stock",
            command.model_dump_json().encode(),
            message_id="m-stranger-command",
            message_type=RunStep.message_type,
            user_id=name,
            channel=channel,
        )
    await harness.publish_raw(
        "orders",
        "order.placed",
        encoded(order("anonymous-1")),
        message_id="m-anonymous",
        message_type="order.placed",
        user_id=None,
    )

    found = await wait_for_letters(harness, "unauthorised_publisher", 3)
    by_id = {row["message_id"]: row for row in found}
    assert set(by_id) == {"m-stranger", "m-stranger-command", "m-anonymous"}
    assert "may not publish" in by_id["m-stranger"]["exception_message"]
    assert "no user_id" in by_id["m-anonymous"]["exception_message"]
    assert "step commands" in by_id["m-stranger-command"]["exception_message"]
    for oid in ("stranger-1", "anonymous-1"):
        assert await harness.saga(oid) is None
    assert harness.effects("stranger-2") == {}
    await assert_still_works(harness)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"dispatch_by": "2030-01-01T12:00:00"}, "dispatch_by"),
        ({"amount_cents": 10**30}, "amount_cents"),
        ({"lines": [{"sku": "s", "quantity": 1}] * 201}, "lines"),
        ({"customer_id": "c" * 65}, "customer_id"),
    ],
)
async def test_naive_deadlines_and_unbounded_values_are_schema_invalid(
    harness: EngineHarness, changes: dict[str, Any], field: str
) -> None:
    oid = f"bounds-{secrets.token_hex(3)}"
    await harness.publish_raw(
        "orders",
        "order.placed",
        encoded(order(oid, **changes)),
        message_id=f"m-{oid}",
        message_type="order.placed",
    )

    (letter,) = await wait_for_letters(harness, "schema_invalid", 1)
    assert letter["message_id"] == f"m-{oid}"
    assert field in letter["exception_message"]
    assert await harness.saga(oid) is None


# -- a second broker user -------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def _broker_user() -> AsyncIterator[tuple[aio_pika.abc.AbstractRobustConnection, str]]:
    """A connection as a RabbitMQ user of its own (`broker_user`), closed before it is deleted."""
    async with broker_user() as (name, password):
        parts = urlsplit(AMQP_URL)
        netloc = f"{name}:{password}@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        connection = await aio_pika.connect_robust(urlunsplit(parts._replace(netloc=netloc)))
        try:
            yield connection, name
        finally:
            await connection.close()
