"""The `sagaworks bench` command: the engine's CLI loads it from a `sagaworks.commands` entry.

Only typer is imported here, so that listing the commands stays fast; the
benchmark itself is imported when the command runs.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.entrypoints.cli.errors import load_settings, run_async

__all__ = ["bench"]


def bench(
    workers: Annotated[int, typer.Option(min=1, max=64, help="Worker processes.")] = 1,
    latency_ms: Annotated[
        float, typer.Option(min=0.0, max=10_000.0, help="Latency of every simulated port call.")
    ] = 0.0,
    sagas: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Sagas to start at most.")
    ] = 2000,
    duration_s: Annotated[
        float, typer.Option("--duration", min=0.1, help="Seconds to keep starting sagas at most.")
    ] = 20.0,
    rate: Annotated[
        float | None,
        typer.Option(min=0.1, help="Sagas started per second (open loop); default: full speed."),
    ] = None,
    in_flight: Annotated[
        int, typer.Option(min=1, max=1_000_000, help="Sagas running at once at most.")
    ] = 100,
    reference: Annotated[
        bool, typer.Option(help="Also run the hand-written reference pipeline.")
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Benchmark the engine against a hand-written pipeline on this machine.

    See docs/performance.md for what is measured and how to read it.

    Exits 1 when a run did not verify: a saga did not end or something happened twice.
    """
    from sagas.order_fulfilment.bench.driver import BenchConfig, format_report, run_bench

    settings = load_settings()
    configure_logging(settings.log_format, "WARNING")
    config = BenchConfig(
        workers=workers,
        latency_s=latency_ms / 1000,
        sagas=sagas,
        duration_s=duration_s,
        rate=rate,
        in_flight=in_flight,
        reference=reference,
    )
    say = None if as_json else (lambda text: typer.echo(text, err=True))
    report = run_async(run_bench(settings, config, progress=say))
    typer.echo(json.dumps(report.as_dict()) if as_json else format_report(report))
    if not report.verified:
        raise typer.Exit(1)
