"""How many messages wait in each queue, asked of the broker without declaring anything."""

from __future__ import annotations

from collections.abc import Iterable

import aio_pika
from aio_pika.abc import AbstractConnection
from aio_pika.exceptions import ChannelNotFoundEntity

from sagaworks.application.ports import QueueDepth

__all__ = ["queue_depths"]


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
