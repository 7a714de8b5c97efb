"""What `sagaworks top` draws: one read-model snapshot as rich tables, nothing fetched here.

Kept apart from the command so it can be tested on a real snapshot without a
terminal. Empty sections say so in words rather than vanish, so a person can
tell "nothing waiting" from "not shown".
"""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from sagaworks.adapters.postgres.read_models import ReadModelSnapshot

__all__ = ["duration", "render"]

Row = dict[str, Any]

_KINDS = {"action": "do", "compensation": "undo", "wait": "wait"}


def duration(seconds: float | None) -> str:
    """A short human duration: `850ms`, `4.2s`, `3m05s`, `2h10m`, `3d4h`; `-` for none."""
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h"


def _table(title: str, *columns: str) -> Table:
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False
    )
    for column in columns:
        text_column = column[:1].islower()
        table.add_column(column, justify="left" if text_column else "right", no_wrap=text_column)
    return table


def _rate(value: Any) -> str:
    return f"{float(value or 0):.1f}"


def _headline(snapshot: ReadModelSnapshot) -> Text:
    activity, outcomes, backlog = snapshot.activity, snapshot.outcomes, snapshot.backlog
    stuck = sum(snapshot.stuck_by_reason.values())
    live = sum(1 for w in snapshot.workers if w["alive"])
    gone = len(snapshot.workers) - live
    text = Text()
    text.append(f"sagaworks top  {snapshot.taken_at:%Y-%m-%d %H:%M:%S %Z}\n", style="bold")
    text.append(
        f"now: {_rate(activity['sagas_started_per_s'])} sagas/s started, "
        f"{_rate(activity['sagas_ended_per_s'])} sagas/s ended, "
        f"{_rate(activity['steps_per_s'])} steps/s\n"
    )
    text.append(
        f"last hour: {outcomes['completed']} completed, {outcomes['compensated']} compensated, "
        f"{outcomes['needs_attention']} need attention\n"
    )
    text.append(f"stuck: {stuck}", style="bold red" if stuck else "")
    if stuck:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(snapshot.stuck_by_reason.items()))
        text.append(f" ({reasons}; sagaworks saga stuck)")
    text.append(f"   workers: {live} live", style="" if live else "bold red")
    text.append(f", {gone} gone\n" if gone else "\n")
    text.append(
        f"outbox: {backlog['outbox_unpublished']} unpublished, oldest "
        f"{duration(backlog['outbox_oldest_age_s'] or None)}   timers: "
        f"{backlog['timers_overdue']} overdue, late "
        f"{duration(backlog['timer_oldest_lateness_s'] or None)}, {backlog['timers_parked']} "
        f"parked\nevents parked: {backlog['parked_messages']}"
    )
    return text


def _in_flight(rows: list[Row]) -> RenderableType:
    if not rows:
        return Text("in flight: no saga in progress")
    table = _table("in flight by step", "saga type", "status", "step", "Sagas", "Oldest")
    for row in rows:
        table.add_row(
            row["saga_type"],
            row["status"],
            row["current_step"] or "-",
            str(row["sagas"]),
            duration(row["oldest_age_s"]),
        )
    return table


def _latency(rows: list[Row]) -> RenderableType:
    if not rows:
        return Text("step latency: no step ran in the last 15 minutes")
    table = _table(
        "step latency, last 15 min (p50-p99 per attempt; step p95 with retries)",
        "step",
        "port",
        "kind",
        "Runs",
        "p50",
        "p95",
        "p99",
        "Step p95",
    )
    for row in rows:
        table.add_row(
            row["step"],
            row["port"] or "-",
            _KINDS.get(row["kind"], row["kind"] or "-"),
            str(row["attempts"] or row["stays"]),
            duration(row["attempt_p50_s"]),
            duration(row["attempt_p95_s"]),
            duration(row["attempt_p99_s"]),
            duration(row["in_step_p95_s"]),
        )
    return table


def _ports(snapshot: ReadModelSnapshot) -> RenderableType:
    breakers: dict[str, list[str]] = {}
    for row in snapshot.breakers:
        if row["worker_alive"] and row["state"] != "closed":
            breakers.setdefault(row["port"], []).append(
                f"{row['state']} {duration(row['in_state_s'])}"
            )
    if not snapshot.ports and not breakers:
        return Text("ports: no call in the last 15 minutes, every breaker closed")
    table = _table(
        "ports, last 15 min", "port", "Calls", "Transient", "Business", "Retries", "breakers"
    )
    names = sorted({row["port"] for row in snapshot.ports} | set(breakers))
    by_port = {row["port"]: row for row in snapshot.ports}
    for port in names:
        row = by_port.get(port, {})
        table.add_row(
            port,
            str(row.get("calls", 0)),
            str(row.get("transient_failures", 0)),
            str(row.get("business_failures", 0)),
            str(row.get("retries_scheduled", 0)),
            ", ".join(breakers.get(port, [])) or "closed",
        )
    return table


def _queues(rows: list[Row]) -> RenderableType:
    if not rows:
        return Text("queues: no depth reported by a live worker")
    table = _table("queues (as last seen by a worker)", "queue", "Messages", "Consumers")
    for row in rows:
        table.add_row(row["queue"], str(row["messages"]), str(row["consumers"]))
    return table


def _dead_letters(rows: list[Row]) -> RenderableType:
    if not rows:
        return Text("dead letters: none active")
    table = _table(
        "dead letters by failure group (sagaworks dlq groups)",
        "reason",
        "saga type",
        "Letters",
        "New 1h",
        "New 1d",
    )
    for row in rows[:8]:
        table.add_row(
            row["reason"],
            row["saga_type"] or "-",
            str(row["letters"]),
            str(row["new_last_hour"]),
            str(row["new_last_day"]),
        )
    return table


def _workers(snapshot: ReadModelSnapshot) -> RenderableType:
    rows = snapshot.workers
    if not rows:
        return Text("workers: none has sent a heartbeat", style="bold red")
    table = _table("workers", "worker", "state", "version", "In flight", "Beat", "Up")
    for row in rows:
        table.add_row(
            row["worker"],
            "live" if row["alive"] else "gone",
            row["version"],
            str(row["in_flight"]),
            f"{duration(row['beat_age_s'])} ago",
            duration((snapshot.taken_at - row["started_at"]).total_seconds()),
        )
    return table


def render(snapshot: ReadModelSnapshot) -> Group:
    """The whole screen for one snapshot."""
    sections = [
        _in_flight(snapshot.in_progress),
        _ports(snapshot),
        _dead_letters(snapshot.dead_letter_groups),
        _workers(snapshot),
        _latency(snapshot.latency),
        _queues(snapshot.queues),
    ]
    spaced: list[RenderableType] = [_headline(snapshot)]
    for section in sections:
        spaced += [Text(""), section]
    return Group(*spaced)
