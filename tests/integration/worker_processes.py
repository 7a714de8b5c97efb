"""`sagaworks worker` as a subprocess, for tests that start, stop, kill and watch workers.

Output goes to files (a full pipe would block the worker); `eventually` polls a
condition and fails early, with the workers' output, if one of them died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

import pytest
from broker_tools import AMQP_URL, PUBLISHERS_JSON

__all__ = ["SAGAWORKS", "Spawn", "WorkerProcess", "eventually", "worker_env"]

T = TypeVar("T")

SAGAWORKS = str(Path(sys.executable).parent / "sagaworks")


def worker_env(database_url: str, prefix: str, **extra: str) -> dict[str, str]:
    """The test process's environment, pointed at a private database and name prefix."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().startswith(("SAGAWORKS_", "ORDER_FULFILMENT_SIM_"))
    }
    env["SAGAWORKS_AMQP_URL"] = AMQP_URL
    env["SAGAWORKS_DATABASE_URL"] = database_url
    env["SAGAWORKS_EXCHANGE_PREFIX"] = prefix
    env["SAGAWORKS_PUBLISHERS"] = PUBLISHERS_JSON
    env["SAGAWORKS_LOG_FORMAT"] = "json"
    env["SAGAWORKS_SAGAS"] = '["sagas.order_fulfilment.simulation"]'
    env.update(extra)
    return env


@dataclass
class WorkerProcess:
    """A `sagaworks worker` subprocess whose output goes to files (a full pipe would block it)."""

    process: asyncio.subprocess.Process
    stdout_path: Path
    stderr_path: Path
    files: list[IO[bytes]] = field(default_factory=list)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def output(self) -> str:
        for file in self.files:
            file.flush()
        return (
            f"--- stdout\n{self.stdout_path.read_text(errors='replace')}"
            f"--- stderr\n{self.stderr_path.read_text(errors='replace')}"
        )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    async def wait_for_exit(self, timeout_s: float) -> int:
        try:
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        except TimeoutError:
            pytest.fail(f"the worker did not exit within {timeout_s} s\n{self.output()}")

    async def stop(self, stop_signal: signal.Signals, timeout_s: float) -> tuple[int, float]:
        """Send `stop_signal`; return the exit code and the seconds until the process ended."""
        started = time.monotonic()
        self.process.send_signal(stop_signal)
        code = await self.wait_for_exit(timeout_s)
        return code, time.monotonic() - started

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for file in self.files:
            file.close()


Spawn = Callable[..., Awaitable[WorkerProcess]]


async def eventually(
    check: Callable[[], Awaitable[T | None]],
    what: str,
    *,
    timeout_s: float,
    workers: tuple[WorkerProcess, ...] = (),
) -> T:
    """Poll `check` until it returns something truthy; fail at the deadline or if a worker dies."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = await check()
        if result:
            return result
        for worker in workers:
            if worker.returncode is not None:
                pytest.fail(
                    f"the worker exited ({worker.returncode}) while waiting for {what}\n"
                    f"{worker.output()}"
                )
        if time.monotonic() > deadline:
            details = "".join(f"\n{w.output()}" for w in workers)
            pytest.fail(f"waited {timeout_s} s for {what} in vain{details}")
        await asyncio.sleep(0.1)
