"""Fixtures of the integration tests that start `sagaworks worker` processes."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aio_pika.abc import AbstractRobustConnection
from broker_tools import delete_prefixed
from worker_processes import SAGAWORKS, Spawn, WorkerProcess


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Spawn]:
    """Starts `sagaworks worker` subprocesses; any still running at the end is killed."""
    started: list[WorkerProcess] = []

    async def start(env: dict[str, str], name: str = "worker") -> WorkerProcess:
        stdout_path = tmp_path / f"{name}-{len(started)}.stdout"
        stderr_path = tmp_path / f"{name}-{len(started)}.stderr"
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            SAGAWORKS,
            "worker",
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
        )
        worker = WorkerProcess(process, stdout_path, stderr_path, [stdout, stderr])
        started.append(worker)
        return worker

    yield start
    for worker in started:
        await worker.kill()


@pytest.fixture
async def prefix(run_id: str, broker: AbstractRobustConnection) -> AsyncIterator[str]:
    """A name prefix for one test; its queues and exchanges are deleted afterwards."""
    test_prefix = f"{run_id}.wl{secrets.token_hex(3)}."
    yield test_prefix
    await delete_prefixed(broker, test_prefix)
