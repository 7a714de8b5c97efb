"""Cancelling and restoring one AMQP consumer of a FastStream subscriber.

FastStream can only stop a subscriber as a whole, which waits for its handlers
and drops prefetched deliveries unsettled. The worker needs `basic.cancel`
alone (at shutdown, and while a port's breaker is open), so this is the one
place that reaches into the subscriber's private `_queue_obj` and
`_consumer_tag`: recheck it on a FastStream upgrade.
"""

from __future__ import annotations

from faststream.rabbit.subscriber import RabbitSubscriber

__all__ = ["cancel_consumer", "resume_consumer"]


async def cancel_consumer(subscriber: RabbitSubscriber) -> bool:
    """`basic.cancel` the subscriber's consumer; False when it was not consuming."""
    queue, tag = subscriber._queue_obj, subscriber._consumer_tag
    if queue is None or tag is None or queue.channel.is_closed:
        return False
    subscriber._consumer_tag = None
    await queue.cancel(tag)
    return True


async def resume_consumer(subscriber: RabbitSubscriber) -> bool:
    """Consume again with the callback FastStream registers; False when already consuming."""
    queue = subscriber._queue_obj
    if queue is None or subscriber._consumer_tag is not None:
        return False
    subscriber._consumer_tag = await queue.consume(
        subscriber.consume,  # type: ignore[arg-type]
        no_ack=False,
        arguments=subscriber.consume_args,
    )
    return True
