"""The committed contract documents are what the code generates, and say what the broker carries.

docs/asyncapi.yaml and docs/schemas/ are generated from the reference saga
(`sagaworks contract ...`); a change to a message class or a saga that is
not regenerated fails here, with the command that regenerates them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from sagas.order_fulfilment.messages import OrderPlaced
from sagaworks.application.contract import REJECTION_REASONS
from sagaworks.entrypoints.cli.app import app
from sagaworks.entrypoints.cli.contract import Contract, contract_of
from sagaworks.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
REGENERATE = (
    "SAGAWORKS_SAGAS='[\"sagas.order_fulfilment\"]' uv run sagaworks contract asyncapi "
    "-o docs/asyncapi.yaml && SAGAWORKS_SAGAS='[\"sagas.order_fulfilment\"]' uv run sagaworks "
    "contract schemas -o docs/schemas"
)


@pytest.fixture(scope="module")
def contract() -> Contract:
    # As committed: the reference saga, no prefix, the publishers its classes declare.
    settings = Settings.load(
        secrets_dir=None, sagas=("sagas.order_fulfilment",), exchange_prefix="", publishers={}
    )
    return contract_of(settings)


@pytest.fixture(scope="module")
def document(contract: Contract) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(contract.asyncapi_yaml())
    return loaded


def test_docs_asyncapi_yaml_is_current(contract: Contract) -> None:
    committed = (DOCS / "asyncapi.yaml").read_text(encoding="utf-8")
    assert committed == contract.asyncapi_yaml(), f"docs/asyncapi.yaml is stale: {REGENERATE}"


def test_docs_schemas_are_current(contract: Contract) -> None:
    committed = {p.name: p.read_text(encoding="utf-8") for p in (DOCS / "schemas").glob("*.json")}
    assert committed == contract.schema_files(), f"docs/schemas/ is stale: {REGENERATE}"


def test_every_message_has_a_channel_of_exchange_and_routing_key(document: dict[str, Any]) -> None:
    channels = document["channels"]
    placed = channels["order.placed"]
    assert placed["address"] == "order.placed"
    assert placed["bindings"]["amqp"]["is"] == "routingKey"
    assert placed["bindings"]["amqp"]["exchange"] == {
        "name": "orders",
        "type": "topic",
        "durable": True,
        "autoDelete": False,
    }
    assert channels["shipment.dispatched"]["bindings"]["amqp"]["exchange"]["name"] == "warehouse"
    alert = channels["sagaworks.saga.needs_attention"]
    assert alert["address"] == "saga.needs_attention.{saga}"
    assert alert["parameters"]["saga"]["enum"] == ["order_fulfilment"]
    opened = channels["sagaworks.breaker.opened"]
    assert opened["address"] == "breaker.open.{port}"
    assert opened["parameters"]["port"]["enum"] == ["inventory", "payments", "shipping"]


def test_operations_say_what_sagaworks_consumes_and_publishes(document: dict[str, Any]) -> None:
    actions = {name: op["action"] for name, op in document["operations"].items()}
    assert actions == {
        "receive.order.placed": "receive",
        "receive.order.cancellation_requested": "receive",
        "receive.shipment.dispatched": "receive",
        "send.order.fulfilled": "send",
        "send.order.cancelled": "send",
        "send.sagaworks.saga.needs_attention": "send",
        "send.sagaworks.breaker.opened": "send",
        "send.sagaworks.breaker.half_open": "send",
        "send.sagaworks.breaker.closed": "send",
        "send.sagaworks.step.run": "send",
        "receive.sagaworks.step.run": "receive",
    }
    for operation in document["operations"].values():
        assert operation["bindings"]["amqp"]["deliveryMode"] == 2  # persistent, both ways
    placed = document["operations"]["receive.order.placed"]
    assert placed["x-sagaworks-allowed-publishers"] == ["order-service"]
    [queue] = placed["x-sagaworks-queues"]
    assert queue["name"] == "sagaworks.order_fulfilment"
    assert queue["arguments"]["x-queue-type"] == "quorum"
    assert document["operations"]["send.sagaworks.step.run"]["bindings"]["amqp"]["mandatory"]


def test_messages_carry_their_schema_and_the_cloudevents_headers(
    document: dict[str, Any],
) -> None:
    message = document["components"]["messages"]["order.placed"]
    assert message["contentType"] == "application/json"
    assert message["bindings"]["amqp"]["messageType"] == "order.placed"
    payload = document["components"]["schemas"]["OrderPlaced"]
    assert message["payload"] == {"$ref": "#/components/schemas/OrderPlaced"}
    assert set(payload["required"]) == set(OrderPlaced.model_fields)
    assert payload["additionalProperties"] is False
    base, own = message["headers"]["allOf"]
    assert base == {"$ref": "#/components/schemas/CloudEventsHeaders"}
    assert own["properties"]["cloudEvents_type"] == {"const": "order.placed"}
    assert "required" not in own  # inbound, AMQP properties or other bindings may carry them
    headers = document["components"]["schemas"]["CloudEventsHeaders"]["properties"]
    assert {"cloudEvents_id", "cloudEvents_specversion", "traceparent"} <= set(headers)
    fulfilled = document["components"]["messages"]["order.fulfilled"]["headers"]["allOf"][1]
    assert "cloudEvents_id" in fulfilled["required"]


def test_the_dead_letter_reasons_are_in_the_document_and_match_the_message_doc(
    document: dict[str, Any],
) -> None:
    listed = [r["const"] for r in document["components"]["schemas"]["DeadLetterReason"]["oneOf"]]
    assert listed == list(REJECTION_REASONS)
    table = (DOCS / "messages.md").read_text(encoding="utf-8").split("## Rejected messages")[1]
    in_doc = set(re.findall(r"^\| `([a-z_]+)`(?:, `([a-z_]+)`)? \|", table, re.MULTILINE))
    documented = {name for pair in in_doc for name in pair if name}
    assert documented, "the rejection table of docs/messages.md was not found"
    assert documented <= set(REJECTION_REASONS)


def test_json_schemas_are_standalone_2020_12(contract: Contract) -> None:
    files = contract.schema_files()
    placed = json.loads(files["order.placed.json"])
    assert placed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert placed["properties"]["dispatch_by"]["format"] == "date-time"
    assert placed["properties"]["lines"]["items"] == {"$ref": "#/$defs/OrderLine"}
    assert set(files) == {f"{m.message_type}.json" for m in contract.messages}


def test_the_contract_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]', "SAGAWORKS_PUBLISHERS": None}
    printed = runner.invoke(app, ["contract", "asyncapi"], env=env)
    assert printed.exit_code == 0, printed.output
    assert yaml.safe_load(printed.stdout)["asyncapi"] == "3.0.0"
    (tmp_path / "gone.type.json").write_text("{}", encoding="utf-8")
    written = runner.invoke(app, ["contract", "schemas", "-o", str(tmp_path)], env=env)
    assert written.exit_code == 0, written.output
    assert "removed" in written.stdout
    names = {p.name for p in tmp_path.glob("*.json")}
    assert "gone.type.json" not in names
    assert "order.placed.json" in names
    unset = runner.invoke(app, ["contract", "asyncapi"], env={"SAGAWORKS_SAGAS": None})
    assert unset.exit_code == 7
    assert "SAGAWORKS_SAGAS" in unset.stderr
    missing = runner.invoke(
        app, ["contract", "asyncapi"], env={"SAGAWORKS_SAGAS": '["no.such.module"]'}
    )
    assert missing.exit_code == 2
    assert 'cannot import saga module "no.such.module"' in missing.stderr
