"""`sagaworks dlq`: list, group, show, edit, replay, archive and purge dead letters.

`dlq unstorable` counts the deliveries the store refused, which wait in a
queue of their own, and says how to look at them.

Nouns and verbs in the manner of rabbitmqadmin; every listing takes `--json`.
Operator mistakes (an unknown id, an empty selection, a body the schema
refuses, a failed publish) end with one line saying what to do, exit code 1.
"""

from __future__ import annotations

import functools
import getpass
import inspect
import json
import os
import re
import shlex
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.application.dead_letters import (
    ArchiveDeadLetters,
    DeadLetterError,
    EditDeadLetter,
    PurgeDeadLetters,
    ReplayDeadLetters,
    ReplayReport,
    UndeclaredQueue,
    replay_envelope,
    resolve_selection,
    set_path,
    undeclared_queues,
)
from sagaworks.application.ports import (
    AuditEntry,
    DeadLetterFilter,
    FailureGroup,
    OutboxRow,
    StoredDeadLetter,
    encode_raw_fields,
)
from sagaworks.application.registry import SagaRegistry
from sagaworks.entrypoints.cli.errors import fail, run_async, settings_error_lines
from sagaworks.entrypoints.cli.loading import load_sagas
from sagaworks.settings import DEFAULT_SECRETS_DIR, Settings

if TYPE_CHECKING:
    from sagaworks.application.ports import DeadLetterRepository, Publisher

__all__ = ["dlq_app"]

T = TypeVar("T")

dlq_app = typer.Typer(
    help="Inspect, fix and replay dead letters (the PostgreSQL dead-letter store).",
    no_args_is_help=True,
)

_STATUSES = ("active", "replayed", "archived")

Ids = Annotated[list[int] | None, typer.Argument(help="Dead-letter ids (see `dlq list`).")]
Status = Annotated[str, typer.Option(help="active, replayed, archived, or all.", show_default=True)]
Reason = Annotated[str | None, typer.Option(help="Only this reason, e.g. delivery_limit, no_saga.")]
Group = Annotated[str | None, typer.Option(help="Only this failure fingerprint (`dlq groups`).")]
SagaType = Annotated[str | None, typer.Option(help="Only letters of this saga type.")]
RoutingKey = Annotated[str | None, typer.Option(help="Only this original routing key.")]
Queue = Annotated[str | None, typer.Option(help="Only letters that failed in this queue.")]
Since = Annotated[
    str | None, typer.Option(help="Last failed at or after: ISO 8601, or an age like 30m, 2h, 7d.")
]
Until = Annotated[str | None, typer.Option(help="Last failed before: ISO 8601 or an age.")]
Grep = Annotated[
    str | None, typer.Option("--grep", help="Text in the exception type or message (any case).")
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Operator = Annotated[
    str | None,
    typer.Option(
        help="Who is acting, for the audit trail; default: the OS user. The audit also "
        "records the database role, the client address and this host's name."
    ),
]
Yes = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]
Every = Annotated[bool, typer.Option("--all", help="Select every letter of --status.")]

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def _settings() -> Settings:
    try:
        settings = Settings.load(secrets_dir=DEFAULT_SECRETS_DIR)
    except ValidationError as error:
        fail("invalid settings: " + "; ".join(settings_error_lines(error)), 2)
    configure_logging(settings.log_format, "WARNING")
    return settings


def _when(value: str | None, option: str) -> datetime | None:
    if value is None:
        return None
    age = _AGE.match(value.strip())
    if age:
        amount, unit = age.groups()
        return datetime.now(UTC) - timedelta(**{_UNITS[unit]: float(amount)})
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        fail(f"{option} {value!r} is neither ISO 8601 (2024-05-01T12:00) nor an age (30m, 2h)", 2)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _selection(
    ids: list[int] | None,
    status: str,
    reason: str | None,
    group: str | None,
    saga_type: str | None,
    routing_key: str | None,
    queue: str | None,
    since: str | None,
    until: str | None,
    grep: str | None,
) -> DeadLetterFilter:
    if status != "all" and status not in _STATUSES:
        fail(f"--status {status!r} is not one of {', '.join(_STATUSES)}, all", 2)
    statuses = () if status == "all" or ids else (status,)
    return DeadLetterFilter(
        ids=tuple(ids or ()),
        statuses=statuses,
        reason=reason,
        fingerprint=group,
        saga_type=saga_type,
        routing_key=routing_key,
        queue=queue,
        since=_when(since, "--since"),
        until=_when(until, "--until"),
        text=grep,
    )


_FILTERS = {
    "ids": Ids,
    "status": Status,
    "reason": Reason,
    "group": Group,
    "saga_type": SagaType,
    "routing_key": RoutingKey,
    "queue": Queue,
    "since": Since,
    "until": Until,
    "grep": Grep,
}
"""The filter options every selecting command takes, in the order `--help` lists them."""


def _filtered(
    *, ids: bool = True, group: bool = True, status: str = "active"
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the filter options; it receives them as `selection: DeadLetterFilter`.

    `ids` and `group` say whether the command takes dead-letter ids and
    `--group`; `status` is the default `--status`.
    """
    left_out = {name for name, kept in (("ids", ids), ("group", group)) if not kept}

    def decorate(command: Callable[..., None]) -> Callable[..., None]:
        own = inspect.signature(command, eval_str=True)
        filters = [
            inspect.Parameter(
                name,
                inspect.Parameter.KEYWORD_ONLY,
                annotation=annotation,
                default=status if name == "status" else None,
            )
            for name, annotation in _FILTERS.items()
            if name not in left_out
        ]
        rest = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for name, p in own.parameters.items()
            if name != "selection"
        ]

        @functools.wraps(command)
        def with_selection(**options: Any) -> None:
            chosen = {name: options.pop(name, None) for name in _FILTERS}
            command(selection=_selection(**chosen), **options)

        with_selection.__signature__ = own.replace(  # type: ignore[attr-defined]
            parameters=[*filters, *rest]
        )
        with_selection.__annotations__ = {}
        return with_selection

    return decorate


def _shown_status(selection: DeadLetterFilter) -> str:
    return selection.statuses[0] if selection.statuses else "all"


def _operator(operator: str | None) -> str:
    return operator or getpass.getuser()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return run_async(coroutine)
    except DeadLetterError as error:
        fail(str(error), 1)


@dataclass
class _Context:
    settings: Settings
    repo: DeadLetterRepository
    publisher: Publisher | None


@asynccontextmanager
async def _context(*, publisher: bool = False) -> AsyncIterator[_Context]:
    # Imported here, as in app.py, so that `sagaworks --help` stays quick.
    from sagaworks.bootstrap import bootstrap_tools, preflight

    settings = _settings()
    await preflight(settings)
    tools = await bootstrap_tools(settings, dead_letters=True, replay_publisher=publisher)
    try:
        assert tools.dead_letters is not None
        yield _Context(settings, tools.dead_letters, tools.replay_publisher)
    finally:
        await tools.aclose()


def _text(body: bytes) -> str:
    return body.decode("utf-8", errors="replace")


def _pretty(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return _text(body)


def _error(letter: StoredDeadLetter | FailureGroup) -> str:
    if letter.exception_type and letter.exception_message:
        return f"{letter.exception_type}: {letter.exception_message}"
    return letter.exception_type or letter.exception_message or ""


def _summary(letter: StoredDeadLetter) -> dict[str, Any]:
    return {
        "id": letter.id,
        "message_id": letter.message_id,
        "status": letter.status,
        "reason": letter.reason,
        "queue": letter.queue,
        "exchange": letter.exchange,
        "routing_key": letter.routing_key,
        "message_type": letter.message_type,
        "saga_type": letter.saga_type,
        "handler": letter.handler,
        "exception_type": letter.exception_type,
        "exception_message": letter.exception_message,
        "fingerprint": letter.fingerprint,
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat(),
        "times_failed": letter.times_failed,
        "times_replayed": letter.times_replayed,
    }


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


@dlq_app.command("list")
@_filtered(ids=False)
def list_letters(
    selection: DeadLetterFilter,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per page.")] = 50,
    page: Annotated[int, typer.Option(min=1, help="Page number, from 1.")] = 1,
    as_json: AsJson = False,
) -> None:
    """List dead letters, newest failure first, filtered and paged."""
    offset = (page - 1) * limit

    async def go() -> tuple[int, list[StoredDeadLetter]]:
        async with _context() as ctx:
            total = await ctx.repo.count(selection)
            return total, await ctx.repo.find(selection, limit=limit, offset=offset)

    total, letters = _run(go())
    if as_json:
        _print_json(
            {
                "total": total,
                "page": page,
                "limit": limit,
                "items": [_summary(x) for x in letters],
            }
        )
        return
    table = Table(title=f"dead letters ({_shown_status(selection)})")
    for column in ("id", "last failed", "reason", "queue", "routing key", "error", "fail", "repl"):
        table.add_column(column, justify="right" if column in {"id", "fail", "repl"} else "left")
    for x in letters:
        table.add_row(
            str(x.id),
            x.last_failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            x.reason,
            x.queue,
            x.routing_key,
            _short(_error(x)),
            str(x.times_failed),
            str(x.times_replayed),
        )
    console = Console()
    console.print(table)
    shown = f"{offset + 1}–{offset + len(letters)}" if letters else "none"
    more = f"; next: --page {page + 1}" if offset + len(letters) < total else ""
    console.print(f"{shown} of {total}{more}")


@dlq_app.command("groups")
@_filtered(ids=False, group=False)
def groups(
    selection: DeadLetterFilter,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Groups to show.")] = 50,
    as_json: AsJson = False,
) -> None:
    """Count dead letters per failure fingerprint (exception, normalised message, handler)."""

    async def go() -> list[FailureGroup]:
        async with _context() as ctx:
            return await ctx.repo.groups(selection, limit=limit)

    found = _run(go())
    if as_json:
        _print_json(
            [
                {
                    **asdict(g),
                    "first_failed_at": g.first_failed_at.isoformat(),
                    "last_failed_at": g.last_failed_at.isoformat(),
                }
                for g in found
            ]
        )
        return
    table = Table(title=f"failure groups ({_shown_status(selection)})")
    for column in ("group", "count", "first seen", "last seen", "reason", "handler", "example"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for g in found:
        table.add_row(
            g.fingerprint,
            str(g.count),
            g.first_failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            g.last_failed_at.strftime("%Y-%m-%d %H:%M:%S"),
            g.reason,
            g.handler or "",
            _short(_error(g)),
        )
    Console().print(table)


def _audit_dict(entry: AuditEntry) -> dict[str, Any]:
    return {
        "at": entry.at.isoformat(),
        "operator": entry.operator,
        "db_role": entry.db_role,
        "client_addr": entry.client_addr,
        "client_hostname": entry.client_hostname,
        "action": entry.action,
        "batch_id": str(entry.batch_id) if entry.batch_id else None,
        "outcome": entry.outcome,
        "detail": dict(entry.detail),
    }


@dlq_app.command("show")
def show(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id.")],
    as_json: AsJson = False,
) -> None:
    """Show one dead letter: headers, body, error, and the history of what was done to it."""

    async def go() -> tuple[StoredDeadLetter, list[AuditEntry]]:
        async with _context() as ctx:
            letter = await ctx.repo.get(letter_id)
            if letter is None:
                raise DeadLetterError(
                    f"no dead letter with id {letter_id}; `sagaworks dlq list --status all` "
                    "shows the ids"
                )
            return letter, await ctx.repo.history(letter_id)

    letter, history = _run(go())
    if as_json:
        _print_json(
            {
                **_summary(letter),
                "headers": dict(letter.headers),
                "body": _text(letter.body),
                "original_body": None
                if letter.original_body is None
                else _text(letter.original_body),
                "raw_fields": encode_raw_fields(letter.raw_fields),
                "whole_body": None if letter.whole_body is None else asdict(letter.whole_body),
                "first_body": None if letter.first_body is None else _text(letter.first_body),
                "history": [_audit_dict(e) for e in history],
            }
        )
        return
    console = Console()
    facts = Table(show_header=False, box=None)
    for key, value in _summary(letter).items():
        facts.add_row(key, "" if value is None else str(value))
    console.print(facts)
    console.print("[bold]error[/]")
    console.print(_error(letter) or "(none recorded)", markup=False)
    console.print("[bold]headers[/]")
    console.print(Syntax(json.dumps(dict(letter.headers), indent=2, default=str), "json"))
    console.print("[bold]body[/]")
    console.print(Syntax(_pretty(letter.body), "json"))
    if letter.whole_body is not None:
        console.print(
            f"[bold]only the first {len(letter.body)} bytes are kept[/] of "
            f"{letter.whole_body.length} (SHA-256 {letter.whole_body.sha256})"
        )
    if letter.first_body is not None:
        console.print("[bold]first body[/] (processed under this message id before; not replayed)")
        console.print(Syntax(_pretty(letter.first_body), "json"))
    if letter.original_body is not None:
        console.print("[bold]original body[/] (before edits)")
        console.print(Syntax(_pretty(letter.original_body), "json"))
    if letter.raw_fields:
        console.print("[bold]fields escaped to be stored[/], as they came (base64)")
        for name, value in encode_raw_fields(letter.raw_fields).items():
            console.print(f"{name}: {value}", markup=False)
    console.print("[bold]history[/]")
    if not history:
        console.print("(no operator action yet)")
    for e in history:
        console.print(
            f"{e.at:%Y-%m-%d %H:%M:%S} {e.operator} ({_origin(e)}) {e.action} → {e.outcome} "
            f"batch={e.batch_id} {json.dumps(dict(e.detail), default=str)}",
            markup=False,
        )


def _origin(entry: AuditEntry) -> str:
    """Where an audited action came from: database role, client address and host."""
    where = entry.client_addr or "local socket"
    host = f" on {entry.client_hostname}" if entry.client_hostname else ""
    return f"as {entry.db_role or '?'} from {where}{host}"


def _require_selection(selection: DeadLetterFilter, every: bool, verb: str) -> None:
    if selection.is_empty() and not every:
        fail(
            f"name what to {verb}: ids, or filters such as --group or --reason "
            f"(or --all for every {selection.statuses[0] if selection.statuses else ''} letter)",
            2,
        )


@dlq_app.command("replay")
@_filtered()
def replay(
    selection: DeadLetterFilter,
    every: Every = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Show what would be sent where; send nothing.")
    ] = False,
    rate: Annotated[
        float | None, typer.Option(min=0.01, help="Messages per second at most.")
    ] = None,
    operator: Operator = None,
    allow_queue: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-queue",
            help="Also replay to this queue although the topology does not declare it "
            "(a queue of another service you mean to send to). Repeatable.",
        ),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Send dead letters back to the queue that failed, keeping their message ids.

    Each goes through the outbox to the default exchange with the failed queue
    as routing key, so no other queue bound to its routing key receives it.
    Only queues the topology of SAGAWORKS_SAGAS declares are replayed to: a
    letter naming another queue stops the run before anything is sent. A
    letter is marked replayed only after the broker confirmed it; the run stops
    at the first publish that fails.
    """
    _require_selection(selection, every, "replay")
    targets = _replay_targets(allow_queue or [])
    if dry_run:
        _dry_run(selection, targets, as_json)
        return
    who = _operator(operator)

    async def go(progress: Progress | None) -> ReplayReport:
        async with _context(publisher=True) as ctx:
            chosen = await resolve_selection(ctx.repo, selection)
            assert ctx.publisher is not None
            use_case = ReplayDeadLetters(ctx.repo, ctx.publisher, targets)
            task = progress.add_task("replayed", total=len(chosen)) if progress else None

            def advance(done: int, total: int) -> None:
                if progress is not None and task is not None:
                    progress.update(task, completed=done, total=total)

            return await use_case(chosen, operator=who, rate=rate, progress=advance)

    if as_json:
        report = _run(go(None))
        _print_json(report.as_dict())
    else:
        with Progress(
            TextColumn("replayed"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            report = _run(go(bar))
        typer.echo(
            f"replayed {report.replayed} of {report.selected} dead letters "
            f"(batch {report.batch_id})"
        )
    if report.error is not None:
        fail(
            f"publishing dead letter {report.failed_id} failed ({report.error}); stopped after "
            f"{report.replayed} of {report.selected}. Fix the broker or the queue and run the "
            "same command again: replayed letters are not sent twice to a saga",
            1,
        )


def _replay_properties(letter: StoredDeadLetter) -> dict[str, Any]:
    """The AMQP properties a replay of `letter` would be published with."""
    from sagaworks.adapters.rabbitmq.publisher import amqp_properties

    envelope = replay_envelope(letter, letter.times_replayed + 1)
    props = amqp_properties(OutboxRow(0, letter.message_id, "", letter.queue, envelope, b""))
    return {
        "message_id": props.message_id,
        "type": props.message_type,
        "app_id": props.app_id,
        "correlation_id": props.correlation_id,
        "content_type": props.content_type,
        "timestamp": props.timestamp.isoformat() if props.timestamp else None,
        "headers": props.headers,
    }


def _replay_targets(allowed: list[str]) -> frozenset[str]:
    """The queues a replay may send to: every saga's and port's queue, and those `allowed`."""
    from sagaworks.bootstrap import topology_for

    settings = _settings()
    registry = SagaRegistry(load_sagas(settings, with_ports=False).definitions)
    return frozenset(q.name for q in topology_for(settings, registry).queues) | set(allowed)


def _dry_run(selection: DeadLetterFilter, targets: frozenset[str], as_json: bool) -> None:
    async def go() -> list[StoredDeadLetter]:
        async with _context() as ctx:
            chosen = await resolve_selection(ctx.repo, selection)
            letters = [await ctx.repo.get(i) for i in chosen]
            found = [x for x in letters if x is not None]
            strays = undeclared_queues(found, targets)
            if strays:
                raise UndeclaredQueue(strays)
            return found

    letters = _run(go())
    plan: list[dict[str, Any]] = [
        {
            "id": x.id,
            "message_id": x.message_id,
            "exchange": "",
            "routing_key": x.queue,
            "original_exchange": x.exchange,
            "original_routing_key": x.routing_key,
            "replay": x.times_replayed + 1,
            "bytes": len(x.body),
            "properties": _replay_properties(x),
        }
        for x in letters
    ]
    if as_json:
        _print_json({"dry_run": True, "would_send": plan})
        return
    table = Table(title=f"dry run: {len(plan)} messages would be sent (nothing was)")
    for column in ("id", "message id", "to queue (default exchange)", "was", "replay #", "bytes"):
        table.add_column(column)
    for p in plan:
        table.add_row(
            str(p["id"]),
            p["message_id"],
            p["routing_key"],
            f"{p['original_exchange']} / {p['original_routing_key']}",
            str(p["replay"]),
            str(p["bytes"]),
        )
    Console().print(table)


def _edited_in_editor(body: bytes) -> bytes:
    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "dead-letter.json"
        path.write_text(_pretty(body) + "\n")
        finished = subprocess.run([*shlex.split(editor), str(path)], check=False)  # noqa: S603
        if finished.returncode != 0:
            fail(f"the editor {editor!r} exited with {finished.returncode}; nothing was saved", 1)
        return path.read_bytes()


def _assigned(body: bytes, assignments: list[str]) -> bytes:
    try:
        document = json.loads(body)
    except ValueError:
        fail("the body is not JSON, so --set cannot change it; edit it in $EDITOR instead", 1)
    for assignment in assignments:
        path, sep, raw = assignment.partition("=")
        if not sep:
            fail(f"--set {assignment!r} needs the form path=value, e.g. lines.0.quantity=2", 2)
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        try:
            document = set_path(document, path.strip(), value)
        except DeadLetterError as error:
            fail(str(error), 1)
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


@dlq_app.command("plan")
@_filtered()
def plan(
    selection: DeadLetterFilter,
    why: Annotated[str, typer.Option("--why", help="Why they are replayed (for the audit).")],
    every: Every = False,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Freeze the selected letters into a replay plan; `dlq apply PLAN_ID` sends them.

    The apply is the same as `saga apply`: canary, rate, halt on failures,
    resumable; a letter replayed or archived since the plan was made is skipped.
    """
    from sagaworks.application.operator_plans import MadePlan, ReplayPlanRequest
    from sagaworks.entrypoints.cli.saga_actions import plan_lines, saga_actions

    _require_selection(selection, every, "replay")
    shown = {
        k: v
        for k, v in asdict(selection).items()
        if v not in (None, (), "") and not isinstance(v, datetime)
    }
    request = ReplayPlanRequest(selection, why, _operator(operator), shown)

    async def go() -> MadePlan:
        async with saga_actions() as actions:
            return await actions.make_replay_plan(request)

    made = _run(go())
    if as_json:
        _print_json({"id": str(made.plan.id), "total": made.plan.total, "counts": made.counts})
        return
    typer.echo("\n".join(plan_lines(made)))


@dlq_app.command("edit")
def edit(
    letter_id: Annotated[int, typer.Argument(metavar="ID", help="Dead-letter id.")],
    assignments: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="path=value (value as JSON, else text), e.g. --set lines.0.quantity=2. "
            "Repeatable. Without --set, the body opens in $EDITOR.",
        ),
    ] = None,
    operator: Operator = None,
) -> None:
    """Change a dead letter's body, checked against its message schema; the original is kept."""
    settings = _settings()
    registry = SagaRegistry(load_sagas(settings, with_ports=False).definitions)
    who = _operator(operator)

    async def load() -> StoredDeadLetter:
        async with _context() as ctx:
            return await EditDeadLetter(ctx.repo, registry).load(letter_id)

    letter = _run(load())
    if assignments:
        body = _assigned(letter.body, assignments)
        how: dict[str, Any] = {"set": assignments}
    else:
        body = _edited_in_editor(letter.body)
        how = {"editor": True}
    if body.strip() == letter.body.strip():
        typer.echo(f"dead letter {letter_id} unchanged")
        return
    how["previous_body"] = _text(letter.body)

    async def save() -> None:
        async with _context() as ctx:
            await EditDeadLetter(ctx.repo, registry)(letter, body, operator=who, how=how)

    _run(save())
    typer.echo(f"dead letter {letter_id} saved; replay it with `sagaworks dlq replay {letter_id}`")


def _confirmed_ids(selection: DeadLetterFilter, verb: str, yes: bool) -> list[int]:
    async def go() -> list[int]:
        async with _context() as ctx:
            return await resolve_selection(ctx.repo, selection)

    chosen = _run(go())
    if not yes and not typer.confirm(f"{verb} {len(chosen)} dead letter(s)?", default=False):
        fail(f"nothing was {verb}d", 1)
    return chosen


def _act_on(
    selection: DeadLetterFilter,
    verb: str,
    action: Callable[[DeadLetterRepository], ArchiveDeadLetters | PurgeDeadLetters],
    *,
    every: bool,
    yes: bool,
    operator: str | None,
) -> None:
    """Archive or purge a confirmed selection; the action writes the audit rows."""
    _require_selection(selection, every, verb)
    chosen = _confirmed_ids(selection, verb, yes)
    who = _operator(operator)

    async def go() -> int:
        async with _context() as ctx:
            return await action(ctx.repo)(chosen, who)

    typer.echo(f"{verb}d {_run(go())} dead letter(s)")


@dlq_app.command("archive")
@_filtered()
def archive(
    selection: DeadLetterFilter,
    every: Every = False,
    yes: Yes = False,
    operator: Operator = None,
) -> None:
    """Set dead letters aside (status archived): kept and auditable, out of the default list."""
    _act_on(selection, "archive", ArchiveDeadLetters, every=every, yes=yes, operator=operator)


@dlq_app.command("purge")
@_filtered(status="archived")
def purge(
    selection: DeadLetterFilter,
    every: Every = False,
    yes: Yes = False,
    operator: Operator = None,
) -> None:
    """Delete dead letters for good (by default archived ones); their audit rows remain."""
    _act_on(selection, "purge", PurgeDeadLetters, every=every, yes=yes, operator=operator)


@dlq_app.command("unstorable")
def unstorable(as_json: AsJson = False) -> None:
    """Count the deliveries the dead-letter store refused, and say how to look at them."""
    # Imported here, as in app.py, so that `sagaworks --help` stays quick.
    from sagaworks.adapters.rabbitmq.topology import queue_depth, unstorable_queue_name
    from sagaworks.bootstrap import bootstrap_tools

    settings = _settings()
    queue = unstorable_queue_name(settings.exchange_prefix)

    async def go() -> int | None:
        tools = await bootstrap_tools(settings, broker=True)
        try:
            assert tools.connection is not None
            return await queue_depth(tools.connection, queue)
        finally:
            await tools.aclose()

    count = _run(go())
    if as_json:
        _print_json({"queue": queue, "messages": count})
        return
    if count is None:
        typer.echo(f'queue "{queue}" does not exist yet: a worker declares it at start')
        return
    typer.echo(f'{count} deliveries the dead-letter store could not take wait in "{queue}"')
    if count:
        typer.echo(
            "look without removing them: rabbitmqadmin get queue="
            f"{shlex.quote(queue)} ackmode=ack_requeue_true count=10 (or the management UI, "
            "Get messages with Nack requeue); why and how to move them back: "
            "docs/dead-letters.md, 'Unstorable deliveries'"
        )
