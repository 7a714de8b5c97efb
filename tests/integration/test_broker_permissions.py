"""A worker whose RabbitMQ user may configure nothing: topology applied by deploy, checked here.

The user is created for the test with exactly what `worker_permissions`
grants, on the test's own names, and deleted afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused
from broker_tools import AMQP_URL, vhost_of
from engine_harness import EngineHarness
from pydantic import SecretStr

from sagas.order_fulfilment import order_fulfilment
from sagas.order_fulfilment.messages import OrderLine, OrderPlaced
from sagas.order_fulfilment.simulation.participants import DECLINED_CUSTOMER_PREFIX
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.errors import TopologyMissing
from sagaworks.adapters.rabbitmq.topology import apply_topology, worker_permissions
from sagaworks.application.registry import SagaRegistry
from sagaworks.bootstrap import topology_for
from sagaworks.settings import Settings

pytestmark = pytest.mark.integration


async def _ctl(*args: str) -> None:
    executable = shutil.which("rabbitmqctl")
    if executable is None:
        pytest.fail("this test creates a broker user with rabbitmqctl, which is not on PATH")
    process = await asyncio.create_subprocess_exec(
        executable,
        "-q",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()


def _as_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{quote(user)}:{quote(password)}@{parts.hostname}" + (
        f":{parts.port}" if parts.port else ""
    )
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@pytest.fixture
async def harness(
    migrated_database_url: str, run_id: str, settings_factory: Callable[..., Settings]
) -> AsyncIterator[EngineHarness]:
    settings = settings_factory(
        database_url=migrated_database_url,
        exchange_prefix=f"{run_id}.{secrets.token_hex(3)}.",
        grace_period_s=5.0,
        db_pool_size=3,
    )
    opened = EngineHarness(settings, migrated_database_url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_worker_without_configure_permission_runs_on_topology_deploy_applied(
    harness: EngineHarness, run_id: str
) -> None:
    admin = harness.settings
    spec = topology_for(admin, SagaRegistry([order_fulfilment]))
    permissions = worker_permissions(spec)
    user, password = f"{run_id}-worker-{secrets.token_hex(2)}", secrets.token_urlsafe(12)
    vhost = vhost_of(AMQP_URL)
    await _ctl("add_user", user, password)
    try:
        await _ctl(
            "set_permissions",
            "-p",
            vhost,
            user,
            permissions.configure,
            permissions.write,
            permissions.read,
        )
        limited_url = _as_user(AMQP_URL, user, password)
        # The harness publishes and cleans up as the admin; its workers connect as `user`.
        harness.settings = admin.model_copy(
            update={"amqp_url": SecretStr(limited_url), "declare_topology": False}
        )

        # Before deploy applied the topology: one clear error, nothing declared.
        with pytest.raises(TopologyMissing, match="sagaworks topology apply"):
            await harness.start_worker()

        admin_connection = await connect(AMQP_URL, timeout_s=5)
        try:
            await apply_topology(admin_connection, spec)
        finally:
            await admin_connection.close()

        await harness.start_worker()
        oid = "o-limited-user"
        await harness.publish(
            OrderPlaced(
                order_id=oid,
                customer_id=f"{DECLINED_CUSTOMER_PREFIX}{oid}",
                lines=(OrderLine(sku="sku-1", quantity=1),),
                amount_cents=100,
                currency="EUR",
                dispatch_by=datetime.now(UTC) + timedelta(minutes=5),
            ),
            f"{oid}/placed",
        )
        saga = await harness.wait_for_status(oid, "compensated", timeout_s=20)
        assert saga.status == "compensated"

        limited = await aio_pika.connect(limited_url)
        try:
            for declare in (
                lambda ch: ch.declare_queue(f"{harness.prefix}sagaworks.probe", durable=True),
                lambda ch: ch.declare_exchange(f"{harness.prefix}probe", durable=True),
                lambda ch: ch.declare_queue(spec.dead_letter_queue, durable=True),
            ):
                channel = await limited.channel()
                with pytest.raises(ChannelAccessRefused):
                    await declare(channel)
        finally:
            await limited.close()
    finally:
        await _ctl("delete_user", user)


async def test_the_worker_command_names_the_missing_topology_in_one_line(
    migrated_database_url: str, run_id: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAWORKS_")}
    env.update(
        SAGAWORKS_AMQP_URL=AMQP_URL,
        SAGAWORKS_DATABASE_URL=migrated_database_url,
        SAGAWORKS_EXCHANGE_PREFIX=f"{run_id}.{secrets.token_hex(3)}.",
        SAGAWORKS_SAGAS='["sagas.order_fulfilment.simulation"]',
        SAGAWORKS_DECLARE_TOPOLOGY="false",
    )
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "sagaworks"),
        "worker",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 6
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "does not exist" in lines[0]
    assert '"sagaworks topology apply"' in lines[0]
