"""Looking at the real broker from tests: `rabbitmqctl` as JSON, in the configured vhost."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from aio_pika.abc import AbstractRobustConnection

from sagas.order_fulfilment.simulation.shop import simulated_publishers
from sagaworks.bootstrap import own_user
from sagaworks.settings import Settings

__all__ = [
    "AMQP_URL",
    "PUBLISHERS_JSON",
    "USER",
    "delete_prefixed",
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
