"""`sagaworks saga retry|resume|cancel|resolve|pause|unpause|plan|apply|plans`: acting on sagas.

Each action on one saga needs `--reason`, may be tried with `--dry-run`, and
is idempotent per `--request-id`. It goes through the engine's own path (the
saga's lock, its inbox, `decide()`, history, outbox) and is audited. Bulk work
is a plan (`saga plan`), then an apply (`saga apply`). Operator mistakes end
with one line saying what to do, exit code 1; a refused action exits 1 too.
"""

from __future__ import annotations

import getpass
import json
import textwrap
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, get_args
from uuid import UUID, uuid4

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sagaworks.adapters.observability.logging import configure_logging
from sagaworks.application.dead_letters import DeadLetterError
from sagaworks.application.operations import (
    AmbiguousSaga,
    SagaFilter,
    SagaNotFound,
    find_one_saga,
)
from sagaworks.application.operator_actions import ActionRequest, ActionResult, OperatorError
from sagaworks.application.operator_plans import (
    ApplyReport,
    ApplyRequest,
    MadePlan,
    SagaPlanRequest,
)
from sagaworks.application.ports.operator import AuditedAction, Plan, PlanTarget
from sagaworks.domain.operator import ACTIONS, Action
from sagaworks.entrypoints.cli.errors import fail, load_settings, run_async
from sagaworks.entrypoints.cli.saga_filters import with_saga_filter
from sagaworks.entrypoints.cli.saga_render import WIDTH

if TYPE_CHECKING:
    from sagaworks.bootstrap import SagaActions

__all__ = ["apply_plan_command", "plan_lines", "register_saga_actions", "saga_actions"]

T = TypeVar("T")

Ref = Annotated[str, typer.Argument(metavar="ID_OR_KEY", help="Saga id or business key.")]
SagaType = Annotated[
    str | None, typer.Option("--type", help="Saga type, when several share the key.")
]
Reason = Annotated[str, typer.Option("--reason", help="Why (kept in the audit and the timeline).")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Show what it would do; change nothing.")]
RequestId = Annotated[
    str | None,
    typer.Option(
        "--request-id",
        help="Names this request: the same id again acts once. Default: a new one.",
    ),
]
Operator = Annotated[
    str | None,
    typer.Option(
        "--as",
        help="Who is acting, for the audit; default: the OS user. The audit also records "
        "the database role, the client address and this host's name.",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")]


@asynccontextmanager
async def saga_actions() -> AsyncIterator[SagaActions]:
    """The use cases of acting on sagas, on the configured database and broker."""
    # Imported here, as in app.py, so that `sagaworks --help` stays quick.
    from sagaworks.application.registry import SagaRegistry
    from sagaworks.bootstrap import bootstrap_saga_actions
    from sagaworks.entrypoints.cli.loading import load_sagas

    settings = load_settings()
    configure_logging(settings.log_format, "WARNING")
    registry = SagaRegistry(load_sagas(settings, with_ports=False).definitions)
    actions = await bootstrap_saga_actions(settings, registry)
    try:
        yield actions
    finally:
        await actions.aclose()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    try:
        return run_async(coroutine)
    except (OperatorError, DeadLetterError, SagaNotFound, AmbiguousSaga) as error:
        fail(str(error), 1)


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, default=str, ensure_ascii=False))


def _act(
    action: Action,
    ref: str,
    saga_type: str | None,
    reason: str,
    *,
    dry_run: bool,
    request_id: str | None,
    operator: str | None,
    as_json: bool,
    step: str | None = None,
    note: str | None = None,
) -> None:
    if not reason.strip():
        fail("--reason must say why, for the audit and the saga's timeline", 2)
    who = operator or getpass.getuser()
    request_id = request_id or str(uuid4())

    async def go() -> tuple[str, dict[str, Any]]:
        async with saga_actions() as actions:
            found = await find_one_saga(actions.queries, ref, saga_type)
            request = ActionRequest(
                action, found.id, found.saga_type, reason, who, request_id, step, note
            )
            saga = f"{found.correlation_key} ({found.saga_type} {found.id})"
            if dry_run:
                preview = await actions.act.preview(request)
                return saga, {
                    "dry_run": True,
                    "refused": preview.refused,
                    "history": preview.history,
                    "commands": preview.commands,
                    "compensations": [
                        {"step": c.step, "port": c.port, "why": c.why}
                        for c in preview.compensations
                    ],
                }
            result: ActionResult = await actions.act(request)
            return saga, {
                "outcome": result.outcome,
                "message": result.message,
                "audit_id": str(result.audit_id),
                "request_id": request_id,
                "version": result.version,
            }

    saga, report = _run(go())
    if as_json:
        _print_json({"saga": saga, "action": action, **report})
    else:
        typer.echo("\n".join(_action_lines(action, saga, report)))
    if report.get("refused") or report.get("outcome") == "refused":
        raise SystemExit(1)


_WHY = {
    "done": "done",
    "outcome_unknown": "outcome unknown (retry pending)",
    "if_in_flight_succeeds": "in flight; undone if it succeeds",
}


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="  ")


def _action_lines(action: str, saga: str, report: dict[str, Any]) -> list[str]:
    if not report.get("dry_run"):
        return [
            f"{action} {saga}: {report['outcome']}",
            *_wrapped(report["message"]),
            f"  request {report['request_id']}",
            f"  audit {report['audit_id']}",
        ]
    lines = [f"dry run of {action} {saga}", "  nothing was changed"]
    if report["compensations"]:
        lines.append("compensation plan, in order:")
        lines += [
            f"  {n}. {c['step']} -> port {c['port']} ({_WHY[c['why']]})"
            for n, c in enumerate(report["compensations"], start=1)
        ]
    elif action == "cancel" and not report["refused"]:
        lines.append("compensation plan: nothing to compensate")
    if report["refused"]:
        lines.append("would be refused:")
        lines += _wrapped(report["refused"])
        return lines
    lines.append("would record: " + ", ".join(report["history"]))
    lines += [f"would send: {c}" for c in report["commands"]]
    return lines


def _single(action: Action, summary: str) -> Callable[..., None]:
    def command(
        ref: Ref,
        reason: Reason,
        saga_type: SagaType = None,
        dry_run: DryRun = False,
        request_id: RequestId = None,
        operator: Operator = None,
        as_json: AsJson = False,
    ) -> None:
        _act(
            action,
            ref,
            saga_type,
            reason,
            dry_run=dry_run,
            request_id=request_id,
            operator=operator,
            as_json=as_json,
        )

    command.__doc__ = summary
    return command


_SUMMARIES: dict[str, str] = {
    "retry": "Run the step (or compensation) in flight now, dropping its wait for a delayed retry.",
    "resume": "Take a saga that needs attention back into the flow at the step that failed.",
    "cancel": "Compensate now; --dry-run prints the compensation plan. Refused past the pivot.",
    "pause": "Pause: no step runs, no timer fires; events for it are kept for the unpause.",
    "unpause": "Unpause: kept events are applied in order, due timers fire, the step runs again.",
}


def resolve(
    ref: Ref,
    step: Annotated[str, typer.Argument(metavar="STEP", help="The failed step or wait.")],
    reason: Reason,
    note: Annotated[str, typer.Option("--note", help="What was done by hand.")],
    saga_type: SagaType = None,
    dry_run: DryRun = False,
    request_id: RequestId = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Declare a failed step (or compensation) done by hand, so the saga moves on."""
    _act(
        "resolve",
        ref,
        saga_type,
        reason,
        dry_run=dry_run,
        request_id=request_id,
        operator=operator,
        as_json=as_json,
        step=step,
        note=note,
    )


# --- bulk -------------------------------------------------------------------------------------


def plan_lines(made: MadePlan) -> list[str]:
    plan = made.plan
    lines = [
        f"plan {plan.id}: {plan.action} {plan.total} "
        f"{'dead letters' if plan.action == 'replay' else 'sagas'} (nothing acted on yet)",
        f"  reason: {plan.reason}",
    ]
    titles = {"status": "by status", "step": "by step", "stuck_reason": "by stuck reason"}
    if plan.action == "replay":
        titles = {"status": "by status", "step": "by queue", "stuck_reason": "by reason"}
    for key, title in titles.items():
        counts = made.counts.get(key, {})
        lines.append(f"  {title}: " + ", ".join(f"{v} {n}" for v, n in counts.items()))
    group = "dlq" if plan.action == "replay" else "saga"
    lines.append(f"apply it: sagaworks {group} apply {plan.id} --canary 10 --rate 50 --halt-on 5")
    return lines


def _plan_json(plan: Plan) -> dict[str, Any]:
    return {
        "id": str(plan.id),
        "created_at": plan.created_at.isoformat(),
        "operator": plan.operator,
        "action": plan.action,
        "reason": plan.reason,
        "step": plan.step,
        "note": plan.note,
        "filters": dict(plan.filters),
        "total": plan.total,
        "settled": plan.settled,
        "outcomes": dict(plan.outcomes),
        "status": plan.status,
        "halted_reason": plan.halted_reason,
    }


@with_saga_filter
def plan(
    selection: SagaFilter,
    action: Annotated[str, typer.Argument(metavar="ACTION", help=", ".join(ACTIONS))],
    reason: Reason,
    resolve_step: Annotated[
        str | None, typer.Option("--resolve-step", help="For resolve: the step.")
    ] = None,
    note: Annotated[str | None, typer.Option("--note", help="For resolve: what was done.")] = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Freeze the sagas the filters select now into a plan of ACTION; nothing acts yet."""
    if action not in get_args(Action):
        fail(f"ACTION {action!r} is not one of {', '.join(ACTIONS)}", 2)
    if selection.is_empty():
        fail(
            "name which sagas with filters (--type, --status, --stuck, ...): a plan of every "
            "saga is refused",
            2,
        )
    filters = {k: v for k, v in _filter_dict(selection).items() if v not in (None, (), False)}
    request = SagaPlanRequest(
        action,  # type: ignore[arg-type]
        selection,
        reason,
        operator or getpass.getuser(),
        filters,
        resolve_step,
        note,
    )

    async def go() -> MadePlan:
        async with saga_actions() as actions:
            return await actions.make_plan(request)

    made = _run(go())
    if as_json:
        _print_json({**_plan_json(made.plan), "counts": made.counts})
        return
    typer.echo("\n".join(plan_lines(made)))


def _filter_dict(selection: SagaFilter) -> dict[str, Any]:
    return {name: getattr(selection, name) for name in SagaFilter.__dataclass_fields__}


def apply_plan_command(
    plan_id: Annotated[UUID, typer.Argument(metavar="PLAN_ID", help="From `saga plans`.")],
    canary: Annotated[
        int, typer.Option(min=0, help="Act on this many first; halt if any of them fails.")
    ] = 0,
    rate: Annotated[
        float | None, typer.Option(min=0.01, help="Targets per second at most.")
    ] = None,
    halt_on: Annotated[
        float | None,
        typer.Option(
            "--halt-on",
            min=0.0,
            max=100.0,
            help="Halt when more than this percentage of the targets so far refused or failed.",
        ),
    ] = None,
    operator: Operator = None,
    as_json: AsJson = False,
) -> None:
    """Act on a plan's frozen targets: canary first, rate-limited, halting on failures.

    Run it again after an interruption or a halt: it goes on where it stopped and
    acts on no target twice. A saga that moved since the plan was made is skipped.
    """
    request = ApplyRequest(plan_id, operator or getpass.getuser(), canary, rate, halt_on)

    async def go(bar: Progress | None) -> ApplyReport:
        async with saga_actions() as actions:
            task = bar.add_task("applying", total=None) if bar else None

            def advance(done: int, total: int) -> None:
                if bar is not None and task is not None:
                    bar.update(task, completed=done, total=total)

            return await actions.apply_plan(request, advance)

    if as_json:
        report = _run(go(None))
        _print_json(
            {
                **_plan_json(report.plan),
                "acted_now": report.acted_now,
                "outcomes_now": report.outcomes_now,
                "halted": report.halted,
            }
        )
    else:
        with Progress(
            TextColumn("applying"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        ) as bar:
            report = _run(go(bar))
        p = report.plan
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(p.outcomes.items())) or "none"
        typer.echo(f"plan {p.id}: {p.status}")
        typer.echo(
            f"  {p.settled} of {p.total} settled ({outcomes}); {report.acted_now} in this run"
        )
        if report.halted:
            typer.echo("\n".join(textwrap.wrap(f"halted: {report.halted}", WIDTH)))
    if report.halted:
        raise SystemExit(1)


def plans(
    plan_id: Annotated[
        UUID | None, typer.Argument(metavar="[PLAN_ID]", help="Only this plan.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest plans to show.")] = 20,
    as_json: AsJson = False,
) -> None:
    """Every plan (newest first), or one: action, progress by outcome, status."""

    async def go() -> tuple[list[Plan], list[PlanTarget]]:
        async with saga_actions() as actions:
            if plan_id is None:
                return await actions.store.plans(limit), []
            found = await actions.store.plan(plan_id)
            if found is None:
                raise OperatorError(f"no plan {plan_id}; `sagaworks saga plans` lists them")
            return [found], await actions.store.targets(plan_id, _NOT_APPLIED, limit)

    found, unsettled = _run(go())
    if as_json:
        listed = [_plan_json(p) for p in found]
        if plan_id is not None:
            listed[0]["not_applied"] = [_target_json(t) for t in unsettled]
        _print_json(listed)
        return
    if not found:
        typer.echo("no plans yet; make one with `sagaworks saga plan ACTION <filters> --reason`")
        return
    for p in found:
        outcomes = ", ".join(f"{n} {o}" for o, n in sorted(p.outcomes.items())) or "-"
        typer.echo(
            f"{p.id}  {p.created_at:%Y-%m-%d %H:%M}  {p.action:<8} {p.status:<8} "
            f"{p.settled}/{p.total}  {outcomes}"
        )
        typer.echo(f"    by {p.operator}: {p.reason}")
        if p.halted_reason:
            typer.echo(
                "\n".join(
                    textwrap.wrap(
                        f"halted: {p.halted_reason}",
                        WIDTH,
                        initial_indent=" " * 4,
                        subsequent_indent=" " * 6,
                    )
                )
            )
    for t in unsettled:
        what = t.saga_id if t.saga_id is not None else f"dead letter {t.dead_letter_id}"
        typer.echo(f"  {t.seq:>5} {t.outcome:<9} {what}")
        typer.echo(
            "\n".join(
                textwrap.wrap(
                    t.detail or "", WIDTH, initial_indent=" " * 8, subsequent_indent=" " * 8
                )
            )
        )


_NOT_APPLIED = ("refused", "failed", "skipped", "duplicate")


def _target_json(t: PlanTarget) -> dict[str, Any]:
    return {
        "seq": t.seq,
        "saga_id": t.saga_id,
        "dead_letter_id": t.dead_letter_id,
        "outcome": t.outcome,
        "detail": t.detail,
    }


def audit(
    ref: Annotated[
        str | None, typer.Argument(metavar="[ID_OR_KEY]", help="Only this saga's actions.")
    ] = None,
    saga_type: SagaType = None,
    plan_id: Annotated[UUID | None, typer.Option("--plan", help="Only this plan's.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Newest rows to show.")] = 50,
    as_json: AsJson = False,
) -> None:
    """The operator audit: who did what to which saga or plan, from where, why, and the result."""

    async def go() -> list[AuditedAction]:
        async with saga_actions() as actions:
            saga_id = None
            if ref is not None:
                saga_id = (await find_one_saga(actions.queries, ref, saga_type)).id
            return await actions.store.audit(saga_id=saga_id, plan_id=plan_id, limit=limit)

    rows = _run(go())
    if as_json:
        _print_json([_audit_json(r) for r in rows])
        return
    if not rows:
        typer.echo("no operator action recorded yet")
    for r in rows:
        a = r.audit
        where = r.client_addr or "local socket"
        target = a.saga_id or (f"dead letter {a.dead_letter_id}" if a.dead_letter_id else "")
        typer.echo(f"{r.at:%Y-%m-%d %H:%M:%S} {a.action} -> {a.result} {target}".rstrip())
        typer.echo(
            f"    by {a.operator} (role {r.db_role}, from {where}"
            f"{' on ' + r.client_hostname if r.client_hostname else ''})"
        )
        typer.echo(
            "\n".join(
                textwrap.wrap(
                    f"why: {a.reason}", WIDTH, initial_indent=" " * 4, subsequent_indent=" " * 4
                )
            )
        )
        if a.plan_id:
            typer.echo(f"    plan {a.plan_id}")
        elif a.request_id:
            typer.echo(f"    request {a.request_id}")


def _audit_json(r: AuditedAction) -> dict[str, Any]:
    a = r.audit
    return {
        "id": a.id,
        "at": r.at.isoformat(),
        "operator": a.operator,
        "db_role": r.db_role,
        "client_addr": r.client_addr,
        "client_hostname": r.client_hostname,
        "action": a.action,
        "result": a.result,
        "saga_id": a.saga_id,
        "saga_type": a.saga_type,
        "dead_letter_id": a.dead_letter_id,
        "step": a.step,
        "reason": a.reason,
        "note": a.note,
        "request_id": a.request_id,
        "plan_id": a.plan_id,
        "detail": dict(a.detail),
    }


def register_saga_actions(group: typer.Typer, dlq_group: typer.Typer) -> None:
    """Attach the acting commands to the `saga` group, and `apply` to `dlq` too."""
    for action, summary in _SUMMARIES.items():
        group.command(action)(_single(action, summary))  # type: ignore[arg-type]
    group.command("resolve")(resolve)
    group.command("plan")(plan)
    group.command("apply")(apply_plan_command)
    group.command("plans")(plans)
    group.command("audit")(audit)
    dlq_group.command("apply")(apply_plan_command)
