"""The `saga` commands' shared options: which sagas (`SagaFilter`) and how to reach the database.

`saga list`, `saga stuck` and the bulk commands take the same filter options,
added by `with_saga_filter`; the command receives them as one
`selection: SagaFilter`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.application.operations import STUCK_REASONS, SagaFilter
from sagaworks.application.ports import SagaQueries
from sagaworks.entrypoints.cli.errors import fail, settings_error_lines
from sagaworks.settings import DEFAULT_SECRETS_DIR, Settings

__all__ = ["parse_age", "parse_when", "saga_queries", "with_saga_filter"]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_age(value: str | None, option: str) -> timedelta | None:
    """`30s`, `15m`, `2h`, `7d`; anything else ends the command with a line saying so."""
    if value is None:
        return None
    age = _AGE.match(value.strip())
    if not age:
        fail(f"{option} {value!r} is not an age like 30s, 15m, 2h or 7d", 2)
    amount, unit = age.groups()
    return timedelta(**{_UNITS[unit]: float(amount)})


def parse_when(value: str | None, option: str) -> datetime | None:
    """An ISO 8601 time (UTC when no zone is given) or an age meaning that long ago."""
    if value is None:
        return None
    if _AGE.match(value.strip()):
        age = parse_age(value, option)
        assert age is not None
        return datetime.now(UTC) - age
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} {value!r} is neither ISO 8601 (2024-05-01T12:00) nor an age (30m, 2h)", 2)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


Types = Annotated[list[str] | None, typer.Option("--type", help="Saga type (repeat for several).")]
Statuses = Annotated[
    list[str] | None,
    typer.Option(
        "--status",
        help="running, compensating, completed, compensated, needs_attention (repeatable).",
    ),
]
Steps = Annotated[
    list[str] | None, typer.Option("--step", help="Current step or wait (repeatable).")
]
Key = Annotated[str | None, typer.Option("--key", help="Business key, exactly (an order id).")]
KeyPrefix = Annotated[str | None, typer.Option("--key-prefix", help="Business keys starting so.")]
OlderThan = Annotated[
    str | None, typer.Option("--older-than", help="Started at least this long ago: 30m, 2h, 7d.")
]
YoungerThan = Annotated[
    str | None, typer.Option("--younger-than", help="Started less than this long ago.")
]
ChangedBefore = Annotated[
    str | None,
    typer.Option("--changed-before", help="Last transition before: ISO 8601, or an age (2h)."),
]
ChangedAfter = Annotated[
    str | None,
    typer.Option("--changed-after", help="Last transition at or after: ISO 8601, or an age."),
]
Stuck = Annotated[
    list[str] | None,
    typer.Option(
        "--stuck",
        help=f"Stuck for this reason (repeatable), or `any`: {', '.join(STUCK_REASONS)}.",
    ),
]
Group = Annotated[
    str | None,
    typer.Option("--group", help="With an active dead letter of this failure group (dlq groups)."),
]
Failure = Annotated[
    str | None,
    typer.Option("--failure", help="Recorded error or compensation reason, exactly."),
]

_OPTIONS: dict[str, Any] = {
    "saga_type": Types,
    "status": Statuses,
    "step": Steps,
    "key": Key,
    "key_prefix": KeyPrefix,
    "older_than": OlderThan,
    "younger_than": YoungerThan,
    "changed_before": ChangedBefore,
    "changed_after": ChangedAfter,
    "stuck": Stuck,
    "group": Group,
    "failure": Failure,
}


def _selection(options: dict[str, Any]) -> SagaFilter:
    stuck = tuple(options["stuck"] or ())
    reasons = tuple(r for r in stuck if r != "any")
    try:
        return SagaFilter(
            saga_types=tuple(options["saga_type"] or ()),
            statuses=tuple(options["status"] or ()),
            current_steps=tuple(options["step"] or ()),
            correlation_key=options["key"],
            correlation_key_prefix=options["key_prefix"],
            older_than=parse_age(options["older_than"], "--older-than"),
            younger_than=parse_age(options["younger_than"], "--younger-than"),
            changed_before=parse_when(options["changed_before"], "--changed-before"),
            changed_after=parse_when(options["changed_after"], "--changed-after"),
            stuck_reasons=reasons,
            any_stuck="any" in stuck,
            failure_group=options["group"],
            failure=options["failure"],
        )
    except ValueError as error:
        fail(f"--stuck: {error}", 2)


def with_saga_filter(command: Callable[..., None]) -> Callable[..., None]:
    """Give `command` the filter options; it receives them as `selection: SagaFilter`."""
    own = inspect.signature(command, eval_str=True)
    filters = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=None)
        for name, kind in _OPTIONS.items()
    ]
    rest = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in own.parameters.items()
        if name != "selection"
    ]

    @functools.wraps(command)
    def with_selection(**options: Any) -> None:
        chosen = {name: options.pop(name, None) for name in _OPTIONS}
        command(selection=_selection(chosen), **options)

    with_selection.__signature__ = own.replace(  # type: ignore[attr-defined]
        parameters=[*filters, *rest]
    )
    with_selection.__annotations__ = {}
    return with_selection


def _settings() -> Settings:
    try:
        settings = Settings.load(secrets_dir=DEFAULT_SECRETS_DIR)
    except ValidationError as error:
        fail("invalid settings: " + "; ".join(settings_error_lines(error)), 2)
    configure_logging(settings.log_format, "WARNING")
    return settings


@asynccontextmanager
async def saga_queries() -> AsyncIterator[SagaQueries]:
    """Operators' reads of sagas on the configured database, closed on exit.

    A database that is unreachable or not at the newest revision ends the
    command with one line saying so (exit codes 3 and 4), before any query.
    """
    # Imported here, as in app.py, so that `sagaworks --help` stays quick.
    from sagaworks.bootstrap import bootstrap_tools, preflight

    settings = _settings()
    await preflight(settings)
    tools = await bootstrap_tools(settings, saga_queries=True)
    try:
        assert tools.saga_queries is not None
        yield tools.saga_queries
    finally:
        await tools.aclose()
