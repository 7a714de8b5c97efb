"""How many messages wait in each queue, asked of the broker without declaring anything."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from sagaworks.application.ports import QueueDepth

__all__ = ["QueueDepthReader", "queue_depths"]


async def queue_depths(
    connection: AbstractConnection, queues: Iterable[str]
) -> dict[str, QueueDepth]:
    """Messages ready and consumers of each queue that exists (a passive declaration each).

    A passive declaration needs no configure permission. A missing queue closes
    the channel, so each queue after it is asked on a new one; it is left out.
    """
    depths: dict[str, QueueDepth] = {}
    pending = list(queues)
    while pending:
        async with aio_pika.Channel(connection, publisher_confirms=False) as channel:
            while pending:
                name = pending.pop(0)
                try:
                    queue = await channel.declare_queue(name, passive=True)
                except ChannelNotFoundEntity:
                    break
                result = queue.declaration_result
                depths[name] = QueueDepth(result.message_count or 0, result.consumer_count or 0)
    return depths


class QueueDepthReader:
    """One reading of the depths at a time, in the background, never cut short by a deadline.

    Cancelling a declaration in flight makes aiormq close its channel while the
    broker may be closing it too, and RabbitMQ can answer that with a connection
    error (504 "expected 'channel.open'"): the whole connection closes, and with
    it the outbox's publishing. So a reading that outlasts the caller's deadline
    goes on, and its answer serves a later call.
    """

    def __init__(self, connection: AbstractConnection, queues: Iterable[str]) -> None:
        self._connection = connection
        self._queues = tuple(queues)
        self._reading: asyncio.Task[dict[str, QueueDepth]] | None = None

    async def read(self, deadline_s: float) -> Mapping[str, QueueDepth]:
        """The depths, if the reading in flight (or a new one) ends within `deadline_s`.

        Raises `TimeoutError` when it does not, and what the reading raised when it failed.
        aiormq cancels the calls in flight on a connection it declares dead; that ends
        the reading as cancelled, raised here as `ConnectionError`, not as a cancellation
        the caller would take for its own.
        """
        if self._reading is None:
            self._reading = asyncio.create_task(
                queue_depths(self._connection, self._queues), name="queue-depths"
            )
        reading = self._reading
        await asyncio.wait({reading}, timeout=deadline_s)
        if not reading.done():
            raise TimeoutError(
                f"the broker has not answered within {deadline_s:g} s; "
                "the reading goes on and serves the next call"
            )
        self._reading = None
        if reading.cancelled():
            raise ConnectionError("the broker connection closed under the reading")
        return reading.result()

    async def stop(self, wait_s: float) -> None:
        """Let a reading in flight end, for up to `wait_s`; never cut it short.

        The worker flushes its outbox on this connection after the heartbeat stops.
        A reading still going after `wait_s` ends when the connection closes.
        """
        reading, self._reading = self._reading, None
        if reading is None:
            return
        await asyncio.wait({reading}, timeout=wait_s)
        reading.add_done_callback(_forget_outcome)


def _forget_outcome(reading: asyncio.Task[dict[str, QueueDepth]]) -> None:
    """Retrieve a stopped reading's error: nobody will read its depths."""
    if not reading.cancelled():
        reading.exception()
