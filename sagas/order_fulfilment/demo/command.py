"""The `sagaworks demo` command: the engine's CLI loads it from a `sagaworks.commands` entry.

Only what its options need is imported here, so that listing the commands
stays fast; the demo itself is imported when the command runs.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from sagas.order_fulfilment.demo.participants import DemoPorts
from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.entrypoints.cli.errors import load_settings, run_async

__all__ = ["demo"]


def demo(
    orders: Annotated[int, typer.Option(min=1, max=100_000, help="Orders to place.")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object, no progress.")] = False,
    timeout_s: Annotated[
        float, typer.Option("--timeout", min=1.0, help="Seconds to wait for every saga to end.")
    ] = 180.0,
    seed: Annotated[int, typer.Option(help="Seed of the order mix.")] = 7,
    ports: Annotated[
        DemoPorts,
        typer.Option(help="Participants: in process, or fake HTTP services on loopback."),
    ] = DemoPorts.SIMULATED,
) -> None:
    """Drive ORDERS orders through the order-fulfilment saga over RabbitMQ and PostgreSQL.

    Exits 1 when a saga did not end or a participant saw an effect twice.
    """
    from sagas.order_fulfilment.demo.render import DemoProgress, print_demo_report
    from sagas.order_fulfilment.demo.run import run_demo

    settings = load_settings()
    configure_logging(
        settings.log_format, "WARNING" if settings.log_level == "INFO" else settings.log_level
    )
    if as_json:
        report = run_async(run_demo(settings, orders, timeout_s=timeout_s, seed=seed, ports=ports))
        typer.echo(json.dumps(report.as_dict()))
    else:
        with DemoProgress(orders) as progress:
            report = run_async(
                run_demo(
                    settings,
                    orders,
                    timeout_s=timeout_s,
                    seed=seed,
                    progress=progress.update,
                    ports=ports,
                )
            )
        print_demo_report(report)
    if not report.ok:
        raise typer.Exit(1)
