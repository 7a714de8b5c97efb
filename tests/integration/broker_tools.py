"""Looking at the real broker from tests: `rabbitmqctl` as JSON, in the configured vhost."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any
from urllib.parse import unquote, urlsplit

import pamqp.exceptions
import pytest
from aio_pika.abc import AbstractRobustConnection
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from sagas.order_fulfilment.simulation.shop import simulated_publishers
from sagaworks.bootstrap import own_user
from sagaworks.settings import Settings

__all__ = [
    "AMQP_URL",
    "PUBLISHERS_JSON",
    "USER",
    "delete_prefixed",
    "publish_without_id",
    "rabbitmqctl",
    "vhost_of",
]

_BASE = Settings.load(secrets_dir=None)
AMQP_URL = _BASE.amqp_url.get_secret_value()
USER = own_user(_BASE)
"""The tests' broker user: what they publish as (`user_id`)."""
PUBLISHERS_JSON = json.dumps(simulated_publishers(_BASE, USER).publishers)
"""`SAGAWORKS_PUBLISHERS` for a worker the tests publish to as `USER`."""


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:]) or "/"


async def rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        pytest.fail("these tests inspect the broker with rabbitmqctl, which is not on PATH")
    process = await asyncio.create_subprocess_exec(
        executable,
        "-q",
        *args,
        "-p",
        vhost_of(AMQP_URL),
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    rows: list[dict[str, Any]] = json.loads(stdout)
    return rows


async def delete_prefixed(broker: AbstractRobustConnection, prefix: str) -> None:
    """Delete every queue and exchange of the configured vhost whose name starts with `prefix`."""
    queues, exchanges = await asyncio.gather(
        rabbitmqctl("list_queues", "name"), rabbitmqctl("list_exchanges", "name")
    )
    async with broker.channel() as channel:
        for row in queues:
            if row["name"].startswith(prefix):
                await channel.queue_delete(row["name"])
        for row in exchanges:
            if row["name"].startswith(prefix):
                await channel.exchange_delete(row["name"])


async def publish_without_id(
    exchange: str, routing_key: str, body: bytes, properties: commands.Basic.Properties
) -> None:
    """Publish with the properties exactly as given, `message_id` absent included.

    aiormq (under aio-pika) gives every message it publishes an id of its
    own; a publisher that sets none is only possible on the wire, so this
    speaks AMQP 0-9-1 itself (pamqp frames), and waits for the broker's confirm.
    """
    url = urlsplit(AMQP_URL)
    reader, writer = await asyncio.open_connection(url.hostname, url.port or 5672)
    buffer = b""

    async def receive(*kinds: type[Any]) -> Any:
        nonlocal buffer
        while True:
            if buffer:
                try:
                    used, _channel, value = frame.unmarshal(buffer)
                except pamqp.exceptions.UnmarshalingException:
                    used = 0
                if used:
                    buffer = buffer[used:]
                    if isinstance(value, kinds):
                        return value
                    continue
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, "the broker closed the connection"
            buffer += chunk

    def send(channel: int, *values: Any) -> None:
        for value in values:
            writer.write(frame.marshal(value, channel))

    try:
        writer.write(frame.marshal(header.ProtocolHeader(), 0))
        await receive(commands.Connection.Start)
        user, password = unquote(url.username or "guest"), unquote(url.password or "guest")
        send(0, commands.Connection.StartOk(response=f"\0{user}\0{password}"))
        tune = await receive(commands.Connection.Tune)
        send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        send(0, commands.Connection.Open(virtual_host=vhost_of(AMQP_URL)))
        await receive(commands.Connection.OpenOk)
        send(1, commands.Channel.Open())
        await receive(commands.Channel.OpenOk)
        send(1, commands.Confirm.Select())
        await receive(commands.Confirm.SelectOk)
        send(
            1,
            commands.Basic.Publish(exchange=exchange, routing_key=routing_key),
            header.ContentHeader(0, len(body), properties),
            pamqp_body.ContentBody(body),
        )
        confirmed = await receive(commands.Basic.Ack, commands.Basic.Nack, commands.Channel.Close)
        assert isinstance(confirmed, commands.Basic.Ack), confirmed
        send(0, commands.Connection.Close(200, "bye", 0, 0))
        await receive(commands.Connection.CloseOk)
    finally:
        writer.close()
