"""Operator errors become one line on stderr and a distinct exit code, never a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Coroutine, Iterator
from typing import Any, NoReturn, TypeVar

from pydantic import ValidationError

from sagaworks.adapters.observability.environment import TelemetryMisconfigured
from sagaworks.adapters.postgres.errors import (
    DatabaseUnreachable,
    InvalidDatabaseUrl,
    RolesNotApplied,
    SchemaNotCurrent,
)
from sagaworks.adapters.rabbitmq.errors import (
    InvalidBrokerUrl,
    RabbitMQError,
    TopologyConflict,
    TopologyMissing,
)
from sagaworks.application.boundary import UnconfiguredPublishers
from sagaworks.application.registry import UnknownSaga
from sagaworks.domain.errors import DefinitionError
from sagaworks.entrypoints.cli.loading import NoSagaToRun, SagaModuleError
from sagaworks.settings import DEFAULT_SECRETS_DIR, Settings

__all__ = [
    "EXIT_CODES",
    "fail",
    "load_settings",
    "quiet_first_connect",
    "run_async",
    "settings_error_lines",
]

T = TypeVar("T")

EXIT_CODES: dict[type[BaseException], int] = {
    ValidationError: 2,
    InvalidDatabaseUrl: 2,
    InvalidBrokerUrl: 2,
    DefinitionError: 2,
    UnknownSaga: 2,
    SagaModuleError: 2,
    UnconfiguredPublishers: 2,
    TelemetryMisconfigured: 2,
    DatabaseUnreachable: 3,
    RolesNotApplied: 3,
    SchemaNotCurrent: 4,
    TopologyConflict: 6,
    TopologyMissing: 6,
    RabbitMQError: 5,
    NoSagaToRun: 7,
}
"""2 configuration, 3 database unreachable (or roles not applied), 4 schema not current,
5 broker, 6 topology (conflicting or missing),
7 no saga configured for the worker."""


def settings_error_lines(error: ValidationError) -> list[str]:
    lines = []
    for e in error.errors():
        field = ".".join(str(p) for p in e["loc"])
        lines.append(f"SAGAWORKS_{field.upper()}: {e['msg']}")
    return lines


@contextlib.contextmanager
def quiet_first_connect() -> Iterator[None]:
    """Silence aiormq's own log of a failed first broker connection.

    `connect` turns that failure into one clear error line; aiormq's ERROR record of the
    same failure would be a second, rawer line. Later reconnections still log.
    """
    logger = logging.getLogger("aiormq.connection")
    disabled = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = disabled


def load_settings() -> Settings:
    """The settings in effect, or one line and exit code 2 when one is invalid."""
    try:
        return Settings.load(secrets_dir=DEFAULT_SECRETS_DIR)
    except ValidationError as error:
        fail("invalid settings: " + "; ".join(settings_error_lines(error)), 2)


def fail(message: str, code: int) -> NoReturn:
    print(f"sagaworks: error: {message}", file=sys.stderr)  # noqa: T201 - the CLI's own output
    raise SystemExit(code)


def run_async(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; known operator errors exit with their line and code."""
    try:
        return _run(coroutine)
    except ValidationError as error:
        fail("invalid settings: " + "; ".join(settings_error_lines(error)), 2)
    except tuple(EXIT_CODES) as error:
        code = next(c for kind, c in EXIT_CODES.items() if isinstance(error, kind))
        fail(str(error), code)


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is optional on some platforms
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)
