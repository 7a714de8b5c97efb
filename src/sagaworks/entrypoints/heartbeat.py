"""The worker's heartbeat: every few seconds, one row saying it is alive and how busy it is.

Each beat also rewrites the worker's health file (`entrypoints/health.py`):
the database is up when the beat's upsert went through, the broker when the
consumers' connection is not lost; `sagaworks health` reads it.

What it reports: the sagas and ports it runs, deliveries in flight, its breakers'
states and its queues' depths as the broker last told it (a passive declaration
per queue, which needs no configure permission). A beat that fails is logged
and the next one tries again; a failed or late depth reading keeps the last
depths seen, and a late one is left to finish for the next beat (`depths.py`).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version

from sagaworks.adapters.observability.logging import get_logger
from sagaworks.adapters.rabbitmq.depths import QueueDepthReader
from sagaworks.application.ports import Heartbeat, HeartbeatLog, QueueDepth
from sagaworks.bootstrap import System
from sagaworks.entrypoints.health import HealthReport, ServiceState, write_report

__all__ = ["HeartbeatLoop"]

_log = get_logger("sagaworks.heartbeat")

_REMOVE_DEADLINE_S = 2.0
_DEPTHS_DEADLINE_S = 2.0


def _version() -> str:
    try:
        return version("sagaworks")
    except PackageNotFoundError:
        return "unknown"


class HeartbeatLoop:
    """Beats for one worker process while it runs; forgets it when it stops gracefully."""

    def __init__(
        self,
        system: System,
        log: HeartbeatLog,
        in_flight: Callable[[], int],
        broker: Callable[[], ServiceState],
    ) -> None:
        self._system = system
        self._broker = broker
        self._database = ServiceState(up=True)
        self._log = log
        self._in_flight = in_flight
        self._host = socket.gethostname()
        self._pid = os.getpid()
        breakers = system.breakers
        self.worker = breakers.worker if breakers is not None else f"{self._host}:{self._pid}"
        self._started_at = datetime.now(UTC)
        self._queues = [route.queue for route in system.routes()]
        self._depths: Mapping[str, QueueDepth] = {}
        self._depth_reader: QueueDepthReader | None = None

    async def run(self) -> None:
        """Beat every `SAGAWORKS_HEARTBEAT_INTERVAL_S` until cancelled."""
        interval = self._system.settings.heartbeat_interval_s
        try:
            while True:
                await self._beat_and_report(interval)
                await asyncio.sleep(interval)
        finally:
            if self._depth_reader is not None:
                await self._depth_reader.stop(_DEPTHS_DEADLINE_S)

    async def _beat_and_report(self, interval: float) -> None:
        try:
            await self.beat_once()
        except asyncio.CancelledError as cancelled:
            task = asyncio.current_task()
            if task is None or task.cancelling():
                raise
            # A library cancelled a call the beat awaited, not this loop: a missed beat.
            self._missed(ConnectionError(f"interrupted: {cancelled!r}"))
        except Exception as error:  # noqa: BLE001 - a missed beat must not stop the worker
            self._missed(error)
        else:
            self._database = ServiceState(up=True)
        self._write_health(interval)

    def _missed(self, error: Exception) -> None:
        cause = f"{type(error).__name__}: {error}"
        _log.warning("heartbeat failed; will retry", error=cause)
        if self._database.up:
            self._database = ServiceState(up=False, down_since=time.time(), cause=cause)

    def _write_health(self, interval: float) -> None:
        report = HealthReport(
            pid=self._pid,
            host=self._host,
            beat_at=time.time(),
            interval_s=interval,
            broker=self._broker(),
            database=self._database,
        )
        try:
            write_report(self._system.settings.health_file, report)
        except OSError as error:
            _log.warning(
                "health file not written; `sagaworks health` will report this worker stuck",
                path=str(self._system.settings.health_file),
                error=f"{type(error).__name__}: {error}",
            )

    async def beat_once(self) -> None:
        await self._read_depths()
        breakers = self._system.breakers
        await self._log.beat(
            Heartbeat(
                worker=self.worker,
                host=self._host,
                pid=self._pid,
                version=_version(),
                sagas=tuple(d.name for d in self._system.registry),
                ports=tuple(self._system.registry.ports()),
                started_at=self._started_at,
                beat_interval_s=self._system.settings.heartbeat_interval_s,
                in_flight=self._in_flight(),
                breakers=breakers.states() if breakers is not None else {},
                queue_depths=self._depths,
            )
        )

    async def forget(self) -> None:
        """Delete this worker's row: it stopped on purpose and should not show as gone."""
        try:
            async with asyncio.timeout(_REMOVE_DEADLINE_S):
                await self._log.remove(self.worker)
        except Exception as error:  # noqa: BLE001 - the row then ages into "gone"
            _log.warning("heartbeat row not removed", error=f"{type(error).__name__}: {error}")

    async def _read_depths(self) -> None:
        connection = self._system.connection
        if connection is None:
            return
        if self._depth_reader is None:
            self._depth_reader = QueueDepthReader(connection, self._queues)
        try:
            self._depths = await self._depth_reader.read(_DEPTHS_DEADLINE_S)
        except Exception as error:  # noqa: BLE001 - the last depths seen are reported instead
            _log.warning("queue depths not read", error=f"{type(error).__name__}: {error}")
