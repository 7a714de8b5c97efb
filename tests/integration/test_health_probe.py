"""`sagaworks health` against a real worker: healthy, broker cut off, frozen, killed.

The worker reaches RabbitMQ through a proxy that can black-hole the
connection; the probe runs as Kubernetes would run it, as a separate process
reading the worker's health file.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from broker_tools import AMQP_URL
from tcp_proxy import BlackHoleProxy
from worker_processes import SAGAWORKS, Spawn, eventually, worker_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def _probe(env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        "health",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode().strip()


async def test_the_probe_follows_the_worker_through_a_cut_a_freeze_and_a_kill(
    spawn: Spawn, prefix: str, migrated_database_url: str, tmp_path: Path
) -> None:
    broker = urlsplit(AMQP_URL)
    proxy = BlackHoleProxy(broker.port or 5672)
    await proxy.start()
    via_proxy = proxy.routed(AMQP_URL)
    env = worker_env(
        migrated_database_url,
        prefix,
        SAGAWORKS_AMQP_URL=via_proxy,
        SAGAWORKS_HEALTH_FILE=str(tmp_path / "health.json"),
        SAGAWORKS_HEARTBEAT_INTERVAL_S="1",
        SAGAWORKS_AMQP_HEARTBEAT_S="2",
    )
    try:
        worker = await spawn(env)
        last: list[str] = []

        async def probe_says(code: int, text: str) -> bool:
            got, line = await _probe(env)
            last[:] = [line]
            return got == code and text in line

        await eventually(
            lambda: probe_says(0, f"ok: worker pid {worker.process.pid} beat"),
            "the probe to pass",
            timeout_s=120,
            workers=(worker,),
        )

        proxy.black_hole()
        await eventually(
            lambda: probe_says(1, "has had no RabbitMQ connection for"),
            f"the probe to see the broker gone (last: {last})",
            timeout_s=60,
            workers=(worker,),
        )
        proxy.reset()
        await eventually(
            lambda: probe_says(0, "RabbitMQ and PostgreSQL connected"),
            f"the probe to pass again (last: {last})",
            timeout_s=90,
            workers=(worker,),
        )

        os.kill(worker.process.pid, signal.SIGSTOP)
        try:
            await eventually(
                lambda: probe_says(1, "expected every 1 s: it is stuck"),
                f"the probe to see the worker frozen (last: {last})",
                timeout_s=30,
            )
        finally:
            os.kill(worker.process.pid, signal.SIGCONT)

        await worker.kill()
        code, line = await _probe(env)
        assert code == 1
        assert f"the worker (pid {worker.process.pid}) is not running; it last beat" in line
    finally:
        await proxy.stop()
