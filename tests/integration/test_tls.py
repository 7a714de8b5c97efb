"""TLS to both services, verified: the worker's connections and its refusals.

A private PostgreSQL cluster and a private RabbitMQ node (tests/private_services.py)
accept TLS only, with a certificate for 127.0.0.1 signed by a CA made in this
test, and require a client certificate of that CA. The worker's three kinds of
connection (the SQLAlchemy engine, the hot-path asyncpg pool, the AMQP
connection) must verify the server against `sslrootcert` / `cafile`, present the
client certificate, and refuse a server whose certificate another CA signed,
with one line on stderr that names the cause and shows no password.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from engine_harness import EngineHarness
from private_services import (
    CertificateAuthority,
    KeyPair,
    PrivatePostgres,
    PrivateRabbitMQ,
    private_postgres,
    private_rabbitmq,
)
from sqlalchemy import text

from sagas.order_fulfilment.messages import OrderLine, OrderPlaced, ShipmentDispatched
from sagas.order_fulfilment.simulation.shop import simulated_publishers
from sagaworks.adapters.postgres.engine import create_engine, probe_database
from sagaworks.adapters.postgres.errors import DatabaseUnreachable
from sagaworks.adapters.postgres.migrations_runner import upgrade
from sagaworks.adapters.postgres.pool import ConnectionPool
from sagaworks.adapters.rabbitmq.connection import connect
from sagaworks.adapters.rabbitmq.errors import BrokerTlsFailed
from sagaworks.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SAGAWORKS = str(Path(sys.executable).parent / "sagaworks")
DATABASE = "sagaworks_tls"
AMQP_USER = "sagaworks-tls"
SSL_QUERY = "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


@dataclass(frozen=True)
class Services:
    postgres: PrivatePostgres
    rabbitmq: PrivateRabbitMQ
    trusted: CertificateAuthority
    other: CertificateAuthority
    client: KeyPair
    amqp_password: str

    def database_url(self, *, root: Path | None = None, spelling: str = "sslmode") -> str:
        """verify-full against `root` (the trusted CA by default), with the client certificate."""
        return self.postgres.url(
            DATABASE,
            **{spelling: "verify-full"},
            sslrootcert=str(root or self.trusted.cert),
            sslcert=str(self.client.cert),
            sslkey=str(self.client.key),
        )

    def amqp_url(self, *, root: Path | None = None) -> str:
        return self.rabbitmq.url(
            AMQP_USER,
            self.amqp_password,
            cafile=str(root or self.trusted.cert),
            certfile=str(self.client.cert),
            keyfile=str(self.client.key),
        )


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Services]:
    folder = tmp_path_factory.mktemp("tls")
    trusted = CertificateAuthority.create(folder, "trusted-ca")
    other = CertificateAuthority.create(folder, "other-ca")
    server = trusted.issue("server", hosts=("127.0.0.1", "localhost"))
    client = trusted.issue("client", common_name="sagaworks-worker")
    with ExitStack() as stack:
        postgres = stack.enter_context(private_postgres(server, trusted, require_client_cert=True))
        rabbitmq = stack.enter_context(
            private_rabbitmq(folder, server, trusted, require_client_cert=True)
        )
        password = f"pw-{secrets.token_hex(8)}"
        rabbitmq.rabbitmqctl("add_user", AMQP_USER, password)
        rabbitmq.rabbitmqctl("set_permissions", "-p", "/", AMQP_USER, ".*", ".*", ".*")
        found = Services(postgres, rabbitmq, trusted, other, client, password)
        asyncio.run(upgrade(found.database_url()))
        yield found


# --- PostgreSQL: both pools read the URL the same way ----------------------------------------


@pytest.mark.parametrize("spelling", ["sslmode", "ssl"])
async def test_engine_and_pool_both_verify_the_server_and_present_the_client_certificate(
    services: Services, spelling: str
) -> None:
    url = services.database_url(spelling=spelling)
    engine = create_engine(url, pool_size=1, max_overflow=0)
    pool = ConnectionPool(url, size=1, connect_timeout_s=10)
    try:
        async with engine.connect() as conn:
            engine_row = (await conn.execute(text(SSL_QUERY))).one()
        async with pool.acquire() as raw:
            pool_row = await raw.fetchrow(SSL_QUERY)
    finally:
        await engine.dispose()
        await pool.close()

    assert tuple(engine_row) == (True, "/CN=sagaworks-worker")
    assert pool_row is not None
    assert tuple(pool_row) == (True, "/CN=sagaworks-worker")


@pytest.mark.parametrize("spelling", ["sslmode", "ssl"])
async def test_engine_and_pool_both_refuse_a_certificate_another_ca_signed(
    services: Services, spelling: str
) -> None:
    url = services.database_url(root=services.other.cert, spelling=spelling)

    with pytest.raises(DatabaseUnreachable) as refused:
        await probe_database(url, 10)
    pool = ConnectionPool(url, size=1, connect_timeout_s=10)
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            async with pool.acquire():
                pass
    finally:
        await pool.close()

    assert "does not verify" in str(refused.value)
    assert "sslrootcert" in str(refused.value)


# --- the worker, end to end -------------------------------------------------------------------


async def test_a_worker_runs_an_order_over_verified_tls_to_both_services(
    services: Services,
) -> None:
    url = services.database_url()
    settings = Settings(
        amqp_url=services.amqp_url(),
        database_url=url,
        exchange_prefix="tls.",
        db_pool_size=3,
        grace_period_s=5.0,
        timer_poll_interval_s=0.1,
    )
    settings = simulated_publishers(settings, AMQP_USER)
    harness = EngineHarness(settings, url)
    await harness.open()
    try:
        await harness.start_worker()
        order_id = f"o-tls-{secrets.token_hex(3)}"
        harness.plans[order_id] = [
            (
                0.05,
                ShipmentDispatched(order_id=order_id, shipment_id=f"shp-{order_id}"),
                f"{order_id}/dispatched",
            )
        ]
        await harness.publish(_placed(order_id), f"{order_id}/placed", correlation_id=order_id)

        saga = await harness.wait_for_status(order_id, "completed", timeout_s=30)

        backends = await harness.db.fetch(
            "SELECT s.ssl, s.client_dn FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.application_name = 'sagaworks'"
        )
        connections = services.rabbitmq.rabbitmqctl(
            "list_connections", "user", "ssl", "peer_cert_subject", "-q"
        ).splitlines()
    finally:
        await harness.close()

    assert saga.status == "completed"
    # The engine (sweeper, breaker log) and the hot-path pool: all of them TLS, with our cert.
    assert len(backends) >= 2
    assert {(row["ssl"], row["client_dn"]) for row in backends} == {(True, "/CN=sagaworks-worker")}
    worker_lines = [line.split("\t") for line in connections if line.startswith(AMQP_USER)]
    assert worker_lines, connections
    assert {(line[1], line[2]) for line in worker_lines} == {("true", "CN=sagaworks-worker")}


def _placed(order_id: str) -> OrderPlaced:
    return OrderPlaced(
        order_id=order_id,
        customer_id=f"c-{order_id}",
        lines=(OrderLine(sku="sku-1", quantity=2),),
        amount_cents=4_250,
        currency="EUR",
        dispatch_by=datetime.now(UTC) + timedelta(seconds=120),
    )


# --- refusals at start-up: one line, exit code, no password ------------------------------------


async def _start_worker(database_url: str, amqp_url: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("SAGAWORKS_")}
    env.update(
        SAGAWORKS_DATABASE_URL=database_url,
        SAGAWORKS_AMQP_URL=amqp_url,
        SAGAWORKS_SAGAS='["sagas.order_fulfilment.http_ports"]',
        SAGAWORKS_EXCHANGE_PREFIX="tls-refused.",
        SAGAWORKS_LOG_FORMAT="json",
    )
    process = await asyncio.create_subprocess_exec(
        SAGAWORKS,
        "worker",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, (stdout + stderr).decode()


def _with_password(url: str, password: str) -> str:
    return url.replace("://postgres@", f"://postgres:{password}@", 1)


async def test_the_worker_refuses_a_database_whose_certificate_does_not_verify(
    services: Services,
) -> None:
    password = f"db-{secrets.token_hex(8)}"  # trust authentication ignores it
    database_url = _with_password(services.database_url(root=services.other.cert), password)

    code, output = await _start_worker(database_url, services.amqp_url())

    assert code == 3, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith(
        "sagaworks: error: cannot use PostgreSQL at postgresql://postgres:***@"
    )
    assert "does not verify" in lines[0]
    assert password not in output


async def test_the_worker_refuses_a_broker_whose_certificate_does_not_verify(
    services: Services,
) -> None:
    code, output = await _start_worker(
        services.database_url(), services.amqp_url(root=services.other.cert)
    )

    assert code == 5, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("sagaworks: error: cannot open TLS to RabbitMQ at 127.0.0.1:")
    assert "does not verify" in lines[0]
    assert f"{AMQP_USER}:***@" in lines[0]
    assert services.amqp_password not in output


async def test_connect_refuses_a_broker_certificate_another_ca_signed(
    services: Services,
) -> None:
    with pytest.raises(BrokerTlsFailed) as refused:
        await connect(services.amqp_url(root=services.other.cert), timeout_s=10)

    assert "does not verify" in str(refused.value)
    assert services.amqp_password not in str(refused.value)


async def test_a_plain_connection_is_refused_by_the_private_database(services: Services) -> None:
    """The servers really are TLS-only: what passed above did not pass in clear text."""
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        await asyncpg.connect(services.postgres.url(DATABASE, sslmode="disable"), timeout=10)
