"""`sagaworks`: the worker, its health, migrations, topology, configuration, dead letters, diagrams.

Further commands (the reference saga's `demo` and `bench`) come from the
`sagaworks.commands` entry points of installed packages (`plugins.py`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.entrypoints.cli.contract import contract_app
from sagaworks.entrypoints.cli.dlq import dlq_app
from sagaworks.entrypoints.cli.errors import fail, load_settings, quiet_first_connect, run_async
from sagaworks.entrypoints.cli.plugins import PluginGroup
from sagaworks.entrypoints.cli.prune import db_prune
from sagaworks.entrypoints.cli.publish import publish
from sagaworks.entrypoints.cli.saga import saga_app
from sagaworks.entrypoints.cli.saga_actions import register_saga_actions
from sagaworks.entrypoints.cli.top import top

__all__ = ["app", "main"]

app = typer.Typer(
    name="sagaworks",
    help="Message-driven sagas over RabbitMQ and PostgreSQL.",
    cls=PluginGroup,
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
app.add_typer(saga_app, name="saga")
db_app.command("prune")(db_prune)
app.add_typer(contract_app, name="contract")
app.command("top")(top)
register_saga_actions(saga_app, dlq_app)


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
    """Create the database if missing, migrate it up, then reconcile the roles' grants."""
    from sagaworks.adapters.postgres import migrations_runner as m
    from sagaworks.adapters.postgres.roles import RoleNames, reconcile_grants

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    url = settings.effective_migration_url()

    async def go() -> str | None:
        created = await m.ensure_database_exists(url)
        if created:
            _echo("created the database")
        await m.upgrade(url, revision)
        await reconcile_grants(url, RoleNames.with_prefix(settings.db_role_prefix))
        return await m.current(url)

    _echo(f"database at revision {run_async(go())}")


@db_app.command("roles")
def db_roles() -> None:
    """Create or update the PostgreSQL roles and their grants (as an administrator; idempotent)."""
    from sagaworks.adapters.postgres import migrations_runner as m
    from sagaworks.adapters.postgres.roles import RoleNames, apply_roles

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    url = settings.effective_admin_url()
    names = RoleNames.with_prefix(settings.db_role_prefix)
    secrets = {
        names.migrator: settings.db_migrator_password,
        names.worker: settings.db_worker_password,
        names.operator: settings.db_operator_password,
        names.readonly: settings.db_readonly_password,
    }
    passwords = {role: s.get_secret_value() if s else None for role, s in secrets.items()}

    async def go() -> str:
        if await m.ensure_database_exists(url):
            _echo("created the database")
        return (await apply_roles(url, names, passwords)).summary(names)

    _echo(run_async(go()))


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


@topology_app.command("permissions")
def topology_permissions(
    worker_user: Annotated[
        str, typer.Option(help="The workers' RabbitMQ user.")
    ] = "sagaworks_worker",
    operator_user: Annotated[
        str, typer.Option(help="The operators' RabbitMQ user (dlq replay).")
    ] = "sagaworks_operator",
    vhost: Annotated[str, typer.Option(help="The virtual host.")] = "/",
) -> None:
    """Print the rabbitmqctl lines granting workers and operators exactly their own names."""
    from sagaworks.adapters.rabbitmq.topology import operator_permissions, worker_permissions
    from sagaworks.application.registry import SagaRegistry
    from sagaworks.bootstrap import topology_for
    from sagaworks.entrypoints.cli.loading import SagaModuleError, load_sagas

    settings = load_settings()
    try:
        loaded = load_sagas(settings, with_ports=False)
    except SagaModuleError as error:
        fail(str(error), 2)
    spec = topology_for(settings, SagaRegistry(loaded.definitions))
    _echo(worker_permissions(spec).rabbitmqctl(worker_user, vhost))
    _echo(operator_permissions().rabbitmqctl(operator_user, vhost))


@app.command("worker")
def worker() -> None:
    """Consume and drive sagas until SIGTERM/SIGINT, then stop gracefully (exit 0)."""
    from sagaworks.bootstrap import bootstrap, preflight
    from sagaworks.entrypoints.cli.loading import sagas_to_run
    from sagaworks.entrypoints.gc_tuning import tune_for_throughput
    from sagaworks.entrypoints.worker import Worker

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)

    async def go() -> None:
        loaded = sagas_to_run(settings)
        await preflight(settings)
        with quiet_first_connect():
            system = await bootstrap(settings, loaded.definitions, loaded.ports)
        tune_for_throughput()
        try:
            await Worker(system).run()
        finally:
            await system.aclose()

    run_async(go())


@app.command("health")
def health() -> None:
    """Exit 0 if this host's worker beats and its connections are up; else 1 with why.

    For an exec probe (Kubernetes liveness/readiness): it reads the file the
    worker writes on every heartbeat (SAGAWORKS_HEALTH_FILE) and connects to nothing.
    """
    from sagaworks.entrypoints.health import judge

    verdict = judge(load_settings().health_file)
    if not verdict.healthy:
        fail(verdict.line, 1)
    _echo(verdict.line)


@app.command("graph")
def graph(
    saga: Annotated[str, typer.Argument(help="Name of a saga in SAGAWORKS_SAGAS.")],
) -> None:
    """Print SAGA as a Mermaid flowchart: steps, ports, compensations, deadlines, outcomes."""
    from sagaworks.application.registry import SagaRegistry, UnknownSaga
    from sagaworks.domain.diagram import mermaid
    from sagaworks.domain.errors import DefinitionError
    from sagaworks.entrypoints.cli.loading import NoSagaToRun, SagaModuleError, load_sagas

    settings = load_settings()
    if not settings.sagas:
        fail(str(NoSagaToRun()), 2)
    try:
        definition = SagaRegistry(load_sagas(settings, with_ports=False).definitions).get(saga)
    except (UnknownSaga, SagaModuleError, DefinitionError) as error:
        fail(str(error), 2)
    _echo(mermaid(definition).rstrip("\n"))


app.command("publish")(publish)


def main(argv: list[str] | None = None) -> Any:
    return app(args=argv if argv is not None else sys.argv[1:], prog_name=Path(sys.argv[0]).name)
