"""`sagaworks saga`: find sagas, look at one, list the stuck ones.

`list` and `stuck` take the filter options of `saga_filters.py`; `show`
takes a saga id or a business key (`--type` when several saga types share
it). Every command prints plain text that fits 80 columns, or `--json`.
Operator mistakes end with one line saying what to do, exit code 1.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

import typer

from sagaworks.application.operations import (
    AmbiguousSaga,
    SagaFilter,
    SagaNotFound,
    SagaSort,
    SortKey,
    find_one_saga,
)
from sagaworks.application.ports import SagaDetail, SagaPage, StuckSaga
from sagaworks.entrypoints.cli.errors import fail, run_async
from sagaworks.entrypoints.cli.saga_filters import saga_queries, with_saga_filter
from sagaworks.entrypoints.cli.saga_render import (
    detail_lines,
    list_lines,
    page_json,
    stuck_lines,
    to_json,
)

__all__ = ["saga_app"]

saga_app = typer.Typer(
    help="Find sagas, look at one, see which are stuck and why.", no_args_is_help=True
)

AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]
_SORTS: tuple[SortKey, ...] = ("updated", "created", "type", "key", "status", "step")


def _echo(lines: list[str]) -> None:
    typer.echo("\n".join(lines))


@saga_app.command("list")
@with_saga_filter
def list_sagas(
    selection: SagaFilter,
    sort: Annotated[
        str, typer.Option(help=f"Order by one of {', '.join(_SORTS)}.", show_default=True)
    ] = "updated",
    order: Annotated[
        str, typer.Option(help="desc (newest/last first) or asc.", show_default=True)
    ] = "desc",
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Sagas per page.")] = 50,
    page: Annotated[int, typer.Option(min=1, help="Page number, from 1.")] = 1,
    as_json: AsJson = False,
) -> None:
    """List sagas, filtered, sorted and paged (most recently changed first)."""
    if sort not in _SORTS:
        fail(f"--sort {sort!r} is not one of {', '.join(_SORTS)}", 2)
    if order not in ("asc", "desc"):
        fail(f"--order {order!r} is neither asc nor desc", 2)
    by = SagaSort(sort, descending=order == "desc")

    async def go() -> SagaPage:
        async with saga_queries() as queries:
            return await queries.find(selection, by, limit=limit, offset=(page - 1) * limit)

    found = run_async(go())
    if as_json:
        typer.echo(page_json(found, page=page, limit=limit))
        return
    _echo(list_lines(found.items, datetime.now(UTC), page=page, more=found.more))


@saga_app.command("show")
def show_saga(
    ref: Annotated[str, typer.Argument(metavar="ID_OR_KEY", help="Saga id or business key.")],
    saga_type: Annotated[
        str | None, typer.Option("--type", help="Saga type, when several share the key.")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Everything about one saga: where it is, what waits, what failed, and its timeline."""

    async def go() -> SagaDetail | None:
        async with saga_queries() as queries:
            try:
                found = await find_one_saga(queries, ref, saga_type)
            except (SagaNotFound, AmbiguousSaga) as error:
                fail(str(error), 1)
            return await queries.detail(found.id)

    detail = run_async(go())
    if detail is None:
        fail(f"the saga {ref!r} was deleted while it was being read; run the command again", 1)
    if as_json:
        typer.echo(to_json(detail))
        return
    _echo(detail_lines(detail, datetime.now(UTC)))


@saga_app.command("stuck")
@with_saga_filter
def stuck_sagas(
    selection: SagaFilter,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many.")] = 200,
    as_json: AsJson = False,
) -> None:
    """Sagas that need a person or look wrong, longest first: why, since when, what to run."""

    async def go() -> list[StuckSaga]:
        async with saga_queries() as queries:
            return list(await queries.stuck(selection, limit=limit))

    rows = run_async(go())
    if as_json:
        typer.echo(to_json(rows))
        return
    _echo(stuck_lines(rows, datetime.now(UTC)))
