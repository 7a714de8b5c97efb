"""The heartbeat loop outlives a cancellation that is not its own, and stops on its own.

aiormq cancels the calls in flight on a connection it declares dead; a beat
that awaited one must count as missed, or the loop ends and the worker's
health file goes stale for good while the worker itself recovers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from sagas.order_fulfilment.saga import order_fulfilment
from sagas.order_fulfilment.simulation.participants import simulated_ports
from sagaworks.application.ports import Heartbeat
from sagaworks.entrypoints.health import ServiceState, read_report
from sagaworks.entrypoints.heartbeat import HeartbeatLoop
from sagaworks.settings import Settings
from sagaworks.testing import SagaHarness

pytestmark = pytest.mark.unit


class CutOffOnce:
    """A heartbeat log whose first beat is cancelled from below, as a library would."""

    def __init__(self) -> None:
        self.calls = 0
        self.beats: list[Heartbeat] = []

    async def beat(self, heartbeat: Heartbeat) -> None:
        self.calls += 1
        if self.calls == 1:
            raise asyncio.CancelledError
        self.beats.append(heartbeat)

    async def remove(self, worker: str) -> None:
        raise AssertionError("a loop that stops is not forgotten by the loop itself")


async def test_a_beat_cut_off_from_below_is_missed_and_the_loop_beats_on(tmp_path: Path) -> None:
    settings = Settings.load(secrets_dir=None).model_copy(
        update={"health_file": tmp_path / "health.json", "heartbeat_interval_s": 0.01}
    )
    async with SagaHarness(order_fulfilment, simulated_ports(), settings=settings) as harness:
        log = CutOffOnce()
        loop = HeartbeatLoop(await harness.system(), log, lambda: 0, lambda: ServiceState(up=True))
        beating = asyncio.create_task(loop.run())
        try:
            async with asyncio.timeout(10):
                while len(log.beats) < 2:
                    assert not beating.done(), "the loop ended at the cut-off beat"
                    await asyncio.sleep(0.01)
            assert read_report(tmp_path / "health.json").database.up
        finally:
            beating.cancel()
            with pytest.raises(asyncio.CancelledError):
                await beating
