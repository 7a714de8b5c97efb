"""`sagaworks db prune`: delete what retention allows, in short batches, with progress.

Cut-offs come from `SAGAWORKS_RETAIN_*` (0: kept for ever); see
docs/retention.md. Safe while workers run: every batch is its own short
transaction and skips rows the workers hold. Progress goes to stderr, the
summary to stdout (`--json` for one object).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.application.ports import Prunable
from sagaworks.application.retention import Prune, Pruned
from sagaworks.entrypoints.cli.errors import fail, load_settings, quiet_first_connect, run_async

__all__ = ["db_prune"]


def db_prune(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; delete nothing.")
    ] = False,
    only: Annotated[
        list[Prunable] | None,
        typer.Option(help="Only this kind of row (repeat for several); default: all of them."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="The summary as one JSON object.")
    ] = False,
) -> None:
    """Delete rows older than their retention, in short batches.

    Inbox rows, published outbox rows, finished sagas with their history, settled dead
    letters and the breaker rows of workers long gone (docs/retention.md).
    """
    from sagaworks.bootstrap import bootstrap_tools, preflight, retention_policy

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    policy = retention_policy(settings)
    kept_for_ever = [w for w in (only or list(Prunable)) if policy.keep.get(w) is None]
    if only and kept_for_ever == list(only):
        fail(
            "nothing to prune: retention of "
            + ", ".join(w.value for w in kept_for_ever)
            + " is 0 (kept for ever); set SAGAWORKS_RETAIN_* (see docs/retention.md)",
            2,
        )

    def report(pruned: Pruned) -> None:
        if not pruned.done:
            typer.echo(f"{pruned.what.value}: {pruned.rows} deleted so far", err=True)

    async def go() -> list[Pruned]:
        await preflight(settings)
        with quiet_first_connect():
            tools = await bootstrap_tools(settings, prune=True)
        try:
            assert tools.prune is not None
            request = Prune(dry_run=dry_run, only=frozenset(only) if only else None)
            return await tools.prune(request, report)
        finally:
            await tools.aclose()

    results = run_async(go())
    if as_json:
        typer.echo(json.dumps(_as_json(results, dry_run, kept_for_ever), indent=2))
        return
    verb = "would delete" if dry_run else "deleted"
    for pruned in results:
        batches = "" if dry_run else f" in {pruned.batches} batch(es)"
        typer.echo(
            f"{pruned.what.value:<13} {verb} {pruned.rows:>9}{batches}"
            f" (older than {pruned.before.isoformat(timespec='seconds')})"
        )
    for what in kept_for_ever:
        typer.echo(f"{what.value:<13} kept for ever (retention 0)")
    total = sum(p.rows for p in results)
    typer.echo(f"{verb} {total} row(s)" + (" (dry run)" if dry_run else ""))


def _as_json(results: list[Pruned], dry_run: bool, kept: list[Prunable]) -> dict[str, object]:
    return {
        "dry_run": dry_run,
        "pruned": {
            p.what.value: {"rows": p.rows, "batches": p.batches, "before": p.before.isoformat()}
            for p in results
        },
        "kept_for_ever": [w.value for w in kept],
    }
