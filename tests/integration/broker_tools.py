"""Looking at the real broker from tests: `rabbitmqctl` as JSON, in the configured vhost."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from sagaworks.settings import Settings

__all__ = ["AMQP_URL", "rabbitmqctl", "vhost_of"]

AMQP_URL = Settings.load(secrets_dir=None).amqp_url.get_secret_value()


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path[1:]) or "/"


async def rabbitmqctl(*args: str) -> list[dict[str, Any]]:
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        pytest.fail("these tests inspect the broker with rabbitmqctl, which is not on PATH")
    process = await asyncio.create_subprocess_exec(
        executable,
        "-q",
        *args,
        "-p",
        vhost_of(AMQP_URL),
        "--formatter",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode()
    rows: list[dict[str, Any]] = json.loads(stdout)
    return rows
