"""`sagaworks publish` against a running worker: valid bodies go out whole, others never leave.

Run as an operator runs it (in-process through the CLI, the settings from the
environment), on the real broker: a valid order starts its saga under the
given id; an invalid body, an unknown type, a message nobody's queue takes
and a missing exchange each end in one line that says what to do, and a
distinct exit code.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from click.testing import Result
from engine_harness import EngineHarness, running_harness
from typer.testing import CliRunner

from sagas.order_fulfilment.messages import ShipmentDispatched
from sagaworks.entrypoints.cli.app import app
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def harness(
    migrated_database_url: str, settings_factory: Callable[..., Settings], run_id: str
) -> AsyncIterator[EngineHarness]:
    async with running_harness(settings_factory, migrated_database_url, run_id) as h:
        yield h


def order_body(order_id: str, **changes: Any) -> dict[str, Any]:
    body = {
        "order_id": order_id,
        "customer_id": f"c-{order_id}",
        "lines": [{"sku": "sku-1", "quantity": 1}],
        "amount_cents": 900,
        "currency": "EUR",
        "dispatch_by": (datetime.now(UTC) + timedelta(minutes=5)).isoformat(),
    }
    body.update(changes)
    return body


async def sagaworks(harness: EngineHarness, *args: str, prefix: str | None = None) -> Result:
    env = {
        "SAGAWORKS_AMQP_URL": harness.settings.amqp_url.get_secret_value(),
        "SAGAWORKS_EXCHANGE_PREFIX": harness.prefix if prefix is None else prefix,
        "SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]',
        "SAGAWORKS_PUBLISHERS": None,
    }
    return await asyncio.to_thread(CliRunner().invoke, app, ["publish", *args], env=env)


async def test_a_valid_body_starts_its_saga_under_the_given_id(
    harness: EngineHarness, tmp_path: Path
) -> None:
    oid = f"cli-{secrets.token_hex(3)}"
    harness.plans[oid] = [(0.05, ShipmentDispatched(order_id=oid, shipment_id="s-1"), f"{oid}/d")]
    data = tmp_path / "order.json"
    data.write_text(json.dumps(order_body(oid)), encoding="utf-8")
    run = await sagaworks(
        harness, "order.placed", "--data", f"@{data}", "--id", f"{oid}/placed",
        "--correlation-id", f"corr-{oid}",
    )  # fmt: skip
    assert run.exit_code == 0, run.output
    assert f"published order.placed id {oid}/placed" in run.stdout
    assert "persistent, routed and confirmed" in run.stdout
    # The CLI's own settings name only the class's publishers: it says so, and sends anyway.
    assert "may not publish order.placed" in run.stderr
    await harness.wait_for_status(oid, "completed")
    [handled] = harness.handled_for(f"{oid}/placed")
    assert handled.outcome == "applied"
    assert handled.headers["cloudEvents_correlationid"] == f"corr-{oid}"


async def test_an_invalid_body_is_refused_before_anything_is_sent(harness: EngineHarness) -> None:
    oid = f"cli-bad-{secrets.token_hex(3)}"
    run = await sagaworks(
        harness, "order.placed", "--data", json.dumps(order_body(oid, currency="euro")),
        "--id", f"{oid}/placed",
    )  # fmt: skip
    assert run.exit_code == 2, run.output
    assert "not a valid order.placed (docs/schemas/order.placed.json)" in run.stderr
    assert "currency" in run.stderr
    not_json = await sagaworks(harness, "order.placed", "--data", "{oops")
    assert not_json.exit_code == 2
    assert "--data is not JSON" in not_json.stderr
    await asyncio.sleep(0.5)
    assert harness.handled_for(f"{oid}/placed") == []


async def test_an_unknown_type_names_the_known_ones(harness: EngineHarness) -> None:
    run = await sagaworks(harness, "order.teleported", "--data", "{}")
    assert run.exit_code == 2
    assert 'no message type "order.teleported"' in run.stderr
    assert "order.placed" in run.stderr
    command = await sagaworks(harness, "sagaworks.step.run", "--data", "{}")
    assert command.exit_code == 2
    assert "step command" in command.stderr


async def test_a_returned_and_a_refused_message_say_what_to_check(harness: EngineHarness) -> None:
    lonely = f"{harness.prefix}lonely."
    connection = await aio_pika.connect(harness.settings.amqp_url.get_secret_value())
    try:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            f"{lonely}orders", aio_pika.ExchangeType.TOPIC, auto_delete=True
        )
        body = json.dumps(order_body("nobody"))
        returned = await sagaworks(harness, "order.placed", "--data", body, prefix=lonely)
        await exchange.delete()
    finally:
        await connection.close()
    assert returned.exit_code == 5, returned.output
    assert "returned" in returned.stderr
    assert "no queue is bound" in returned.stderr
    assert f'exchange "{lonely}orders"' in returned.stderr

    absent = f"{harness.prefix}absent."
    refused = await sagaworks(harness, "order.placed", "--data", body, prefix=absent)
    assert refused.exit_code == 5, refused.output
    assert f'exchange "{absent}orders" does not exist' in refused.stderr
