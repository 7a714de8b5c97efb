"""Looking at the real broker from tests: `rabbitmqctl` as JSON, in the configured vhost."""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
from collections.abc import AsyncIterator
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
    "RawPublisher",
    "broker_user",
    "delete_prefixed",
    "publish_without_id",
    "rabbitmqctl",
    "raw_publisher",
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


@contextlib.asynccontextmanager
async def broker_user() -> AsyncIterator[tuple[str, str]]:
    """A RabbitMQ user of its own (name, password), full rights on the tests' vhost; deleted."""
    name, password = f"stranger-{secrets.token_hex(4)}", secrets.token_hex(12)
    await _ctl("add_user", name, password)
    try:
        await _ctl("set_permissions", "-p", vhost_of(AMQP_URL), name, ".*", ".*", ".*")
        yield name, password
    finally:
        await _ctl("delete_user", name)


async def _ctl(*args: str) -> None:
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        pytest.fail("this test creates a broker user with rabbitmqctl, which is not on PATH")
    process = await asyncio.create_subprocess_exec(
        executable, "-q", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, f"rabbitmqctl {args[0]}: {out.decode()} {err.decode()}"


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
    speaks AMQP 0-9-1 itself (`RawPublisher`), and waits for the broker's confirm.
    """
    async with raw_publisher() as publisher:
        await publisher.publish(exchange, routing_key, body, properties)


@contextlib.asynccontextmanager
async def raw_publisher(
    user: str | None = None, password: str | None = None
) -> AsyncIterator[RawPublisher]:
    """A `RawPublisher` logged in as `user` (default: the tests' user), closed afterwards."""
    url = urlsplit(AMQP_URL)
    publisher = RawPublisher(
        *await asyncio.open_connection(url.hostname, url.port or 5672),
        user or unquote(url.username or "guest"),
        password if user else unquote(url.password or "guest"),
    )
    try:
        await publisher.open()
        yield publisher
    finally:
        await publisher.close()


class RawPublisher:
    """One AMQP 0-9-1 connection spoken in pamqp frames: publishes exactly what it is given.

    No client library in between adds an id or checks a property; each
    publish waits for the broker's confirm, and a body larger than a frame
    is sent in frames of the negotiated size.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, user: str, password: str
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._user = user
        self._password = password
        self._buffer = b""
        self._frame_max = 131072

    async def open(self) -> None:
        self._writer.write(frame.marshal(header.ProtocolHeader(), 0))
        await self._receive(commands.Connection.Start)
        self._send(0, commands.Connection.StartOk(response=f"\0{self._user}\0{self._password}"))
        tune = await self._receive(commands.Connection.Tune)
        self._frame_max = tune.frame_max or self._frame_max
        self._send(0, commands.Connection.TuneOk(tune.channel_max, tune.frame_max, 0))
        self._send(0, commands.Connection.Open(virtual_host=vhost_of(AMQP_URL)))
        await self._receive(commands.Connection.OpenOk)
        self._send(1, commands.Channel.Open())
        await self._receive(commands.Channel.OpenOk)
        self._send(1, commands.Confirm.Select())
        await self._receive(commands.Confirm.SelectOk)

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: commands.Basic.Properties,
    ) -> None:
        """Publish one message and wait until the broker confirmed it (fails on a nack)."""
        self._send(
            1,
            commands.Basic.Publish(exchange=exchange, routing_key=routing_key),
            header.ContentHeader(0, len(body), properties),
        )
        step = self._frame_max - 8
        for start in range(0, len(body), step):
            self._send(1, pamqp_body.ContentBody(body[start : start + step]))
        confirmed = await self._receive(
            commands.Basic.Ack,
            commands.Basic.Nack,
            commands.Channel.Close,
            commands.Connection.Close,
        )
        assert isinstance(confirmed, commands.Basic.Ack), getattr(
            confirmed, "reply_text", confirmed
        )

    async def close(self) -> None:
        try:
            self._send(0, commands.Connection.Close(200, "bye", 0, 0))
            await self._receive(commands.Connection.CloseOk)
        finally:
            self._writer.close()

    async def _receive(self, *kinds: type[Any]) -> Any:
        while True:
            if self._buffer:
                try:
                    used, _channel, value = frame.unmarshal(self._buffer)
                except pamqp.exceptions.UnmarshalingException:
                    used = 0
                if used:
                    self._buffer = self._buffer[used:]
                    if isinstance(value, kinds):
                        return value
                    continue
            chunk = await asyncio.wait_for(self._reader.read(65536), 10)
            assert chunk, "the broker closed the connection"
            self._buffer += chunk

    def _send(self, channel: int, *values: Any) -> None:
        for value in values:
            self._writer.write(frame.marshal(value, channel))
