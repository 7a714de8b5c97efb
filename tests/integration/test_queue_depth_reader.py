"""Reading queue depths under deadlines never costs the connection they are read on.

The heartbeat reads its queues' depths on the publisher's connection with a
deadline. Cut short in flight, such a reading once made RabbitMQ close the
whole connection (504 "expected 'channel.open'") and the outbox's publishing
stopped until it reconnected; here thousands of deadlines far shorter than the
broker's answer, with a missing queue among those read, leave it open. And a
reading the connection's death cuts off is an error the heartbeat logs, not a
cancellation that would end it.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractRobustConnection
from aiormq.exceptions import ChannelInvalidStateError
from broker_tools import AMQP_URL
from tcp_proxy import BlackHoleProxy

from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.depths import QueueDepthReader
from sagaworks.application.ports import QueueDepth

pytestmark = pytest.mark.integration

READINGS = 1500
"""Deadlines tried; cut short in flight, readings lost the connection well within these."""


@pytest.fixture
async def queue_with_three(broker: AbstractRobustConnection, run_id: str) -> AsyncIterator[str]:
    name = f"{run_id}.depths.{secrets.token_hex(3)}"
    async with broker.channel() as channel:
        await channel.declare_queue(name)
        for n in range(3):
            await channel.default_exchange.publish(
                aio_pika.Message(str(n).encode()), routing_key=name
            )
    yield name
    async with broker.channel() as channel:
        await channel.queue_delete(name)


async def test_deadlines_shorter_than_the_answer_leave_the_connection_open(
    broker: AbstractRobustConnection, queue_with_three: str
) -> None:
    lost: list[BaseException | None] = []
    broker.close_callbacks.add(lambda _sender, error=None: lost.append(error))
    missing = f"{queue_with_three}.missing"
    reader = QueueDepthReader(broker, [queue_with_three, missing, queue_with_three])
    rng = random.Random(7)
    late = answered = 0
    try:
        for n in range(READINGS):
            try:
                await reader.read(0 if n % 2 else rng.uniform(0, 0.004))
            except TimeoutError:
                late += 1
            else:
                answered += 1
            assert not lost, f"the connection closed after {n} readings: {lost}"
        depths = await reader.read(10)
        with pytest.raises(TimeoutError):
            await reader.read(0)
    finally:
        await reader.stop(10)
    assert late >= READINGS // 2, "every other reading has no time at all"
    assert answered > 0, "the answers of late readings serve later calls"
    assert depths == {queue_with_three: QueueDepth(messages=3, consumers=0)}
    assert not lost


async def test_a_reading_cut_off_by_a_dead_connection_is_an_error_and_the_next_one_works(
    queue_with_three: str,
) -> None:
    broker = urlsplit(AMQP_URL)
    proxy = BlackHoleProxy(broker.port or 5672)
    await proxy.start()
    via_proxy = proxy.routed(AMQP_URL)
    connection = await connect(via_proxy, timeout_s=10, heartbeat_s=1)
    reader = QueueDepthReader(connection, [queue_with_three])
    three = {queue_with_three: QueueDepth(messages=3, consumers=0)}
    try:
        assert await reader.read(10) == three
        proxy.black_hole()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "the dead connection never ended the reading"
            try:
                await reader.read(1)
            except TimeoutError:
                continue
            except ConnectionError:
                break
        proxy.reset()
        deadline = time.monotonic() + 60
        while True:
            assert time.monotonic() < deadline, "no reading after the connection came back"
            try:
                assert await reader.read(1) == three
                break
            except (TimeoutError, ConnectionError, ChannelInvalidStateError):
                await asyncio.sleep(0.1)
    finally:
        await reader.stop(1)
        await connection.close()
        await proxy.stop()
