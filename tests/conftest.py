"""Shared fixtures: a private database and a private name prefix per test session.

Integration tests talk to the real RabbitMQ and PostgreSQL named by
`SAGAWORKS_AMQP_URL` / `SAGAWORKS_DATABASE_URL` (defaults: localhost). Each
test session works in databases and under exchange/queue names of its own and
removes them afterwards, so runs never see each other's data.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import asyncpg
import pytest
import structlog
from aio_pika.abc import AbstractRobustConnection

from sagas.order_fulfilment.simulation.shop import simulated_publishers
from sagaworks.adapters.observability.logging import clear_message_context
from sagaworks.bootstrap import own_user
from sagaworks.settings import Settings

BASE = Settings.load(secrets_dir=None)


_UNTIMED_MARKERS = ("soak", "cluster", "fuzz")
"""Opt-in runs that last as long as they are told to: no per-test limit (pyproject's `timeout`)."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    long_faults = os.environ.get("SAGAWORKS_FAULT_LONG") == "1"
    for item in items:
        if any(item.get_closest_marker(m) for m in _UNTIMED_MARKERS) or (
            long_faults and item.get_closest_marker("fault")
        ):
            item.add_marker(pytest.mark.timeout(0))


_LOGGERS = ("faststream", "aio_pika", "aiormq", "asyncio", "sqlalchemy", "alembic", "asyncpg")
"""The libraries whose loggers `configure_logging` sets."""


def _pytests(handler: logging.Handler) -> bool:
    return type(handler).__module__.startswith("_pytest")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put back the process' logging after each test.

    A command run in-process configures logging process-wide, on a stream that
    is closed after the test; left in place, every later log line fails to write.
    pytest's own handlers change from phase to phase and are left as they are.
    """
    root = logging.getLogger()
    handlers, level = [h for h in root.handlers if not _pytests(h)], root.level
    libraries = {
        name: (logger.level, logger.propagate, logger.handlers[:])
        for name in _LOGGERS
        for logger in (logging.getLogger(name),)
    }
    config = structlog.get_config()
    yield
    clear_message_context()
    root.handlers[:] = handlers + [h for h in root.handlers if _pytests(h)]
    root.setLevel(level)
    for name, (saved, propagate, saved_handlers) in libraries.items():
        logger = logging.getLogger(name)
        logger.setLevel(saved)
        logger.propagate = propagate
        logger.handlers[:] = saved_handlers
    structlog.configure(**config)


_SESSION_LOOP: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True)
async def _remember_the_loop() -> None:
    """The session's event loop, for the report of a test that times out."""
    _SESSION_LOOP[:] = [asyncio.get_running_loop()]


def _write_tasks(item: pytest.Item) -> None:
    """Where every task of the loop waits: the thread dump of a hung asyncio test shows
    only the loop's `select()`."""
    if not _SESSION_LOOP:
        return
    sys.stderr.write(f"\n--- asyncio tasks when {item.nodeid} timed out ---\n")
    for task in asyncio.all_tasks(_SESSION_LOOP[0]):
        sys.stderr.write(f"{task.get_name()}:\n")
        awaiting: Any = task.get_coro()
        while awaiting is not None:
            frame = getattr(awaiting, "cr_frame", None) or getattr(awaiting, "ag_frame", None)
            if frame is None:
                break
            sys.stderr.write(
                f"  {frame.f_code.co_filename}:{frame.f_lineno} {frame.f_code.co_name}\n"
            )
            awaiting = getattr(awaiting, "cr_await", None) or getattr(awaiting, "ag_await", None)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    marker = item.get_closest_marker("timeout")
    limit = (
        float(marker.args[0])
        if marker and marker.args
        else float(item.config.getini("timeout") or 0)
    )
    timer = threading.Timer(limit - 1.0, _write_tasks, (item,)) if limit > 1 else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _admin_dsn() -> str:
    return _asyncpg_dsn(_with_database(BASE.database_url.get_secret_value(), "postgres"))


@pytest.fixture(scope="session")
def run_id() -> str:
    return f"t{os.getpid()}{secrets.token_hex(3)}"


@pytest.fixture(scope="session")
def database_factory(run_id: str) -> Iterator[Callable[[], Awaitable[str]]]:
    """Returns an async callable giving the URL of a new, empty database (dropped at the end)."""
    created: list[str] = []

    async def make() -> str:
        name = f"sagaworks_{run_id}_{len(created)}"
        conn = await asyncpg.connect(_admin_dsn())
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return _with_database(BASE.database_url.get_secret_value(), name)

    yield make

    async def drop_all() -> None:
        conn = await asyncpg.connect(_admin_dsn())
        try:
            for name in created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    if created:
        import asyncio

        asyncio.run(drop_all())


@pytest.fixture(scope="session")
def unused_database_url(run_id: str) -> Iterator[str]:
    """URL of a database that does not exist yet (dropped at the end if something made it)."""
    name = f"sagaworks_{run_id}_missing"
    yield _with_database(BASE.database_url.get_secret_value(), name)

    async def drop() -> None:
        conn = await asyncpg.connect(_admin_dsn())
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    import asyncio

    asyncio.run(drop())


@pytest.fixture
def settings_factory(run_id: str) -> Callable[..., Settings]:
    """Settings for this test session: private exchange/queue prefix, overrides applied."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {"exchange_prefix": f"{run_id}."}
        values.update(overrides)
        settings = Settings.load(secrets_dir=None, **values)
        if "publishers" in overrides:
            return settings
        # The simulated services publish as the worker's broker user, the tests as theirs.
        for user in dict.fromkeys((own_user(settings), own_user(BASE))):
            settings = simulated_publishers(settings, user)
        return settings

    return make


@pytest.fixture
async def migrated_database_url(database_factory: Callable[[], Awaitable[str]]) -> str:
    """A fresh database at the newest schema revision."""
    from sagaworks.adapters.postgres.migrations_runner import upgrade

    url = await database_factory()
    await upgrade(url, "head")
    return url


@pytest.fixture
async def db(migrated_database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to `migrated_database_url`, closed after the test."""
    conn = await asyncpg.connect(_asyncpg_dsn(migrated_database_url))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """The port of a local server that accepts connections and never answers."""

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def broker() -> AsyncIterator[AbstractRobustConnection]:
    """A robust connection to the configured RabbitMQ, closed after the test."""
    connection = await aio_pika.connect_robust(BASE.amqp_url.get_secret_value())
    yield connection
    await connection.close()
