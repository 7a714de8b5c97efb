"""`sagaworks publish TYPE --data JSON|@file`: one message of the contract, sent as it should be.

For people and scripts: the body is validated as the worker will validate
it, the envelope is set by `sagaworks.client` (id, type, source, time,
CloudEvents headers, `user_id`), and the message goes out persistent,
confirmed and mandatory. A message the broker returns or refuses is an
error (exit 5) that says what to check.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from sagaworks.adapters.rabbitmq.connection import broker_user
from sagaworks.application.contract import ContractMessage
from sagaworks.client import EventPublisher, PublishFailed
from sagaworks.domain.errors import DefinitionError
from sagaworks.domain.messages import Message
from sagaworks.entrypoints.cli.contract import contract_of
from sagaworks.entrypoints.cli.errors import fail, load_settings, quiet_first_connect, run_async
from sagaworks.entrypoints.cli.loading import NoSagaToRun, SagaModuleError

__all__ = ["publish"]

_BROKER_EXIT = 5


def publish(
    message_type: Annotated[str, typer.Argument(metavar="TYPE", help="e.g. order.placed")],
    data: Annotated[
        str, typer.Option(help="The body: JSON, @FILE to read it from a file, or @- for stdin.")
    ],
    message_id: Annotated[
        str | None,
        typer.Option("--id", help="The message id; keep it when sending the same event again."),
    ] = None,
    correlation_id: Annotated[str | None, typer.Option(help="CloudEvents correlationid.")] = None,
    causation_id: Annotated[str | None, typer.Option(help="CloudEvents causationid.")] = None,
    source: Annotated[str, typer.Option(help="CloudEvents source.")] = "sagaworks-cli",
    traceparent: Annotated[str | None, typer.Option(help="W3C trace context to carry.")] = None,
) -> None:
    """Validate a body and publish it as TYPE: persistent, confirmed, mandatory."""
    settings = load_settings()
    try:
        contract = contract_of(settings)
    except (NoSagaToRun, SagaModuleError, DefinitionError, ValueError) as error:
        fail(str(error), 7 if isinstance(error, NoSagaToRun) else 2)
    known = {m.message_type: m for m in contract.messages}
    entry = known.get(message_type)
    if entry is None:
        fail(
            f'no message type "{message_type}" in the contract of SAGAWORKS_SAGAS; known: '
            + ", ".join(sorted(t for t, m in known.items() if m.direction != "internal")),
            2,
        )
    if entry.direction == "internal":
        fail(f"{message_type} is a step command sagaworks sends itself; publish an event", 2)
    body = _validated(entry, _read(data))
    user = broker_user(settings.amqp_url.get_secret_value())
    if entry.publishers and user not in entry.publishers:
        typer.echo(
            f'warning: broker user "{user}" may not publish {message_type} (allowed: '
            f"{', '.join(entry.publishers)}); the worker will dead-letter it as "
            "unauthorised_publisher",
            err=True,
        )

    async def go() -> str:
        with quiet_first_connect():
            async with EventPublisher.connect(
                settings.amqp_url.get_secret_value(),
                source=source,
                exchange_prefix=settings.exchange_prefix,
                connect_timeout_s=settings.amqp_connect_timeout_s,
            ) as publisher:
                return await publisher.publish(
                    body,
                    message_id=message_id,
                    correlation_id=correlation_id,
                    causation_id=causation_id,
                    traceparent=traceparent,
                )

    try:
        sent = run_async(go())
    except PublishFailed as error:
        fail(str(error), _BROKER_EXIT)
    exchange = f"{settings.exchange_prefix}{entry.domain}"
    typer.echo(
        f"published {message_type} id {sent} to exchange {exchange} with routing key "
        f"{entry.routing_key} as {user}: persistent, routed and confirmed"
    )


def _read(data: str) -> str:
    if not data.startswith("@"):
        return data
    name = data[1:]
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        fail(f"cannot read --data file {name}: {error}", 2)


def _validated(entry: ContractMessage, text: str) -> Message:
    """The body as the model the worker validates it with, or one line saying what is wrong."""
    try:
        json.loads(text)
    except ValueError as error:
        fail(f"--data is not JSON: {error}", 2)
    try:
        return entry.model.model_validate_json(text)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}" for e in error.errors()
        )
        fail(
            f"the body is not a valid {entry.message_type} "
            f"(docs/schemas/{entry.message_type}.json): {problems}",
            2,
        )
