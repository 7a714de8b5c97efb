"""A publish the connection dies under fails as an outage, never as the caller's cancellation.

aiormq cancels the confirms a channel still awaits when its connection is
declared dead (missed heartbeats). Raised as is, that `CancelledError` ended
the worker's outbox sweeper for good after a network cut, leaving committed
rows unpublished; the fault suite's broker partition found it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sagaworks.adapters.rabbitmq.publisher import RabbitPublisher
from sagaworks.application.ports import OutboxRow

pytestmark = pytest.mark.unit

ROW = OutboxRow(1, "m-1", "orders", "order.fulfilled", {"id": "m-1"}, b"{}")


class _Channel:
    """A confirming channel whose publishes end as `behaviour` says."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.is_closed = False

    async def get_underlay_channel(self) -> _Channel:
        return self

    async def basic_publish(self, *_: Any, **__: Any) -> None:
        if self.behaviour == "cancelled":
            raise asyncio.CancelledError  # what aiormq does to pending confirms
        await asyncio.Event().wait()  # a confirm that never comes


class _Connection:
    def __init__(self, channel: _Channel) -> None:
        self._channel = channel

    async def channel(self, **_: Any) -> _Channel:
        return self._channel


def _publisher(behaviour: str, timeout_s: float = 5.0) -> RabbitPublisher:
    return RabbitPublisher(
        _Connection(_Channel(behaviour)),  # type: ignore[arg-type]
        set(),
        "sagaworks",
        confirm_timeout_s=timeout_s,
    )


async def test_confirms_cancelled_by_a_dying_connection_raise_a_connection_error() -> None:
    with pytest.raises(ConnectionError, match="broker connection closed before confirming"):
        await _publisher("cancelled").publish([ROW])


async def test_confirms_that_never_come_time_out() -> None:
    with pytest.raises(TimeoutError):
        await _publisher("silent", timeout_s=0.05).publish([ROW])


async def test_cancelling_the_caller_still_cancels_it() -> None:
    task = asyncio.create_task(_publisher("silent").publish([ROW]))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
