"""`sagaworks top`: the read models on one screen, refreshed about once a second.

On a terminal it redraws in place until Ctrl-C; `--once` prints one screen and
`--json` one JSON object, for scripts; output that is not a terminal gets one
screen, as with `--once`. It reads only the views of `sagaworks_read`, so the
read-only role is enough.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from sqlalchemy.exc import DBAPIError

from sagaworks.adapters.postgres.engine import probe_database, sqlstate
from sagaworks.adapters.postgres.read_models import PostgresReadModels, ReadModelSnapshot
from sagaworks.bootstrap import bootstrap_tools
from sagaworks.entrypoints.cli.errors import fail, load_settings, run_async
from sagaworks.entrypoints.cli.top_render import render

__all__ = ["top"]

_UNDEFINED_TABLE = "42P01"
_UNDEFINED_SCHEMA = "3F000"


async def _snapshot(read_models: PostgresReadModels) -> ReadModelSnapshot:
    try:
        return await read_models.snapshot()
    except DBAPIError as error:
        if sqlstate(error) in {_UNDEFINED_TABLE, _UNDEFINED_SCHEMA}:
            fail(
                "the read models (schema sagaworks_read) are missing or incomplete: "
                'run "sagaworks db upgrade"',
                4,
            )
        raise


async def _watch(read_models: PostgresReadModels, interval_s: float, console: Console) -> None:
    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:
            live.update(render(await _snapshot(read_models)), refresh=True)
            await asyncio.sleep(interval_s)


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one screen and exit.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one snapshot as JSON and exit.")
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.2, max=60.0, help="Seconds between refreshes.")
    ] = 1.0,
) -> None:
    """Live view of sagas, steps, ports, backlog, dead letters, stuck sagas and workers."""
    settings = load_settings()
    console = Console()

    async def go() -> ReadModelSnapshot | None:
        url = settings.database_url.get_secret_value()
        await probe_database(url, settings.db_connect_timeout_s)
        tools = await bootstrap_tools(settings, read_models=True)
        try:
            assert tools.read_models is not None
            if as_json or once or not console.is_terminal:
                return await _snapshot(tools.read_models)
            await _watch(tools.read_models, interval, console)
            return None
        finally:
            await tools.aclose()

    try:
        snapshot = run_async(go())
    except KeyboardInterrupt:
        return
    if snapshot is None:
        return
    if as_json:
        typer.echo(json.dumps(snapshot.as_json(), indent=2))
        return
    console.print(render(snapshot))
