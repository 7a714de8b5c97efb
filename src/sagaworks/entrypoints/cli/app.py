"""`sagaworks`: worker, db, topology, config, dlq, demo, bench and graph commands."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.entrypoints.cli.dlq import dlq_app
from sagaworks.entrypoints.cli.errors import (
    fail,
    quiet_first_connect,
    run_async,
    settings_error_lines,
)
from sagaworks.entrypoints.demo_ports import DemoPorts
from sagaworks.settings import DEFAULT_SECRETS_DIR, Settings

__all__ = ["app", "main"]

app = typer.Typer(
    name="sagaworks",
    help="Message-driven sagas over RabbitMQ and PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Create and migrate the PostgreSQL schema.", no_args_is_help=True)
topology_app = typer.Typer(help="Declare the RabbitMQ topology.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(topology_app, name="topology")
app.add_typer(dlq_app, name="dlq")


def load_settings() -> Settings:
    try:
        return Settings.load(secrets_dir=DEFAULT_SECRETS_DIR)
    except ValidationError as error:
        fail("invalid settings: " + "; ".join(settings_error_lines(error)), 2)


def _echo(text: str) -> None:
    typer.echo(text)


@config_app.command("show")
def config_show(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
) -> None:
    """Print every setting as in effect now, passwords masked."""
    public = load_settings().as_public_dict()
    if as_json:
        _echo(json.dumps(public, indent=2, default=str))
        return
    width = max(len(k) for k in public)
    for key, value in public.items():
        shown = ",".join(value) if isinstance(value, tuple) else value
        _echo(f"SAGAWORKS_{key.upper():<{width}}  {shown}")


@db_app.command("upgrade")
def db_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Create the database if missing, then migrate it up (as the migrations role)."""
    from sagaworks.adapters.postgres import migrations_runner as m

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    url = settings.effective_migration_url()

    async def go() -> str | None:
        created = await m.ensure_database_exists(url)
        if created:
            _echo("created the database")
        await m.upgrade(url, revision)
        return await m.current(url)

    _echo(f"database at revision {run_async(go())}")


@db_app.command("current")
def db_current() -> None:
    """Print the revision the database is at, and whether it is the newest."""
    from sagaworks.adapters.postgres import migrations_runner as m

    settings = load_settings()
    revision = run_async(m.current(settings.effective_migration_url()))
    head = m.head()
    state = "up to date" if revision == head else f"behind; newest is {head}"
    _echo(f"{revision or 'not migrated'} ({state})")


@db_app.command("downgrade")
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision; `base` removes everything.")],
) -> None:
    """Migrate the database down to REVISION."""
    from sagaworks.adapters.postgres import migrations_runner as m

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    url = settings.effective_migration_url()
    run_async(m.downgrade(url, revision))
    _echo(f"database at revision {run_async(m.current(url)) or 'base'}")


@topology_app.command("apply")
def topology_apply() -> None:
    """Declare exchanges, queues and bindings for the configured sagas (idempotent)."""
    from sagaworks.adapters.rabbitmq.topology import apply_topology
    from sagaworks.application.registry import SagaRegistry
    from sagaworks.bootstrap import bootstrap_tools, topology_for
    from sagaworks.entrypoints.cli.loading import load_sagas

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)

    async def go() -> str:
        loaded = load_sagas(settings, with_ports=False)
        spec = topology_for(settings, SagaRegistry(loaded.definitions))
        with quiet_first_connect():
            tools = await bootstrap_tools(settings, broker=True)
        try:
            assert tools.connection is not None
            return (await apply_topology(tools.connection, spec)).summary()
        finally:
            await tools.aclose()

    _echo(run_async(go()))


@app.command("worker")
def worker() -> None:
    """Consume and drive sagas until SIGTERM/SIGINT, then stop gracefully (exit 0)."""
    from sagaworks.bootstrap import bootstrap, preflight
    from sagaworks.entrypoints.cli.loading import load_sagas
    from sagaworks.entrypoints.gc_tuning import tune_for_throughput
    from sagaworks.entrypoints.worker import Worker

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)

    async def go() -> None:
        loaded = load_sagas(settings)
        await preflight(settings)
        with quiet_first_connect():
            system = await bootstrap(settings, loaded.definitions, loaded.ports)
        tune_for_throughput()
        try:
            await Worker(system).run()
        finally:
            await system.aclose()

    run_async(go())


@app.command("demo")
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
    from sagaworks.entrypoints.cli.render import DemoProgress, print_demo_report
    from sagaworks.entrypoints.demo import run_demo

    settings = load_settings()
    configure_logging(
        settings.log_format, "WARNING" if settings.log_level == "INFO" else settings.log_level
    )
    if as_json:
        report = run_async(run_demo(settings, orders, timeout_s=timeout_s, seed=seed, ports=ports))
        _echo(json.dumps(report.as_dict()))
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


@app.command("bench")
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
    from sagaworks.entrypoints.bench import BenchConfig, format_report, run_bench

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
    _echo(json.dumps(report.as_dict()) if as_json else format_report(report))
    if not report.verified:
        raise typer.Exit(1)


@app.command("graph")
def graph(
    saga: Annotated[str, typer.Argument(help="Name of a saga in SAGAWORKS_SAGAS.")],
) -> None:
    """Print SAGA as a Mermaid flowchart: steps, ports, compensations, deadlines, outcomes."""
    from sagaworks.application.registry import SagaRegistry, UnknownSaga
    from sagaworks.domain.diagram import mermaid
    from sagaworks.domain.errors import DefinitionError
    from sagaworks.entrypoints.cli.loading import SagaModuleError, load_sagas

    settings = load_settings()
    try:
        definition = SagaRegistry(load_sagas(settings, with_ports=False).definitions).get(saga)
    except (UnknownSaga, SagaModuleError, DefinitionError) as error:
        fail(str(error), 2)
    _echo(mermaid(definition).rstrip("\n"))


def main(argv: list[str] | None = None) -> Any:
    return app(args=argv if argv is not None else sys.argv[1:], prog_name=Path(sys.argv[0]).name)
