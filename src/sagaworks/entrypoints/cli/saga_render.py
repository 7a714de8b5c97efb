"""Text for `saga list`, `saga show` and `saga stuck`: plain lines that fit 80 columns.

Long values are cut with an ellipsis in tables and wrapped, indented, in
`show`; `--json` prints everything uncut.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sagaworks.application.ports import (
    SagaDetail,
    SagaPage,
    SagaSummary,
    StuckSaga,
    TimelineEntry,
)

__all__ = [
    "WIDTH",
    "detail_lines",
    "duration",
    "list_lines",
    "page_json",
    "stuck_lines",
    "to_json",
]

WIDTH = 80


def _plain(value: Any) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def to_json(value: Any) -> str:
    """Records (dataclasses, or lists of them) as indented JSON; times in ISO 8601."""
    plain = [asdict(v) for v in value] if isinstance(value, list) else asdict(value)
    return json.dumps(plain, indent=2, default=_plain, ensure_ascii=False)


def page_json(found: SagaPage, *, page: int, limit: int) -> str:
    """One page of `saga list` as JSON, with whether another page follows."""
    items = [asdict(s) for s in found.items]
    body = {"page": page, "limit": limit, "more": found.more, "items": items}
    return json.dumps(body, indent=2, default=_plain, ensure_ascii=False)


def duration(delta: timedelta) -> str:
    """Short and exact enough to compare: 12ms, 3.4s, 5m04s, 2h05m, 3d04h."""
    seconds = delta.total_seconds()
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        return f"{sign}{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{sign}{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{sign}{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{sign}{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{sign}{days}d{hours:02d}h"


def _ago(at: datetime, now: datetime) -> str:
    return f"{duration(now - at)} ago"


def _when(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns as wide as their values, the widest cut first until the line fits."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    while sum(widths) + 2 * (len(widths) - 1) > WIDTH:
        widest = widths.index(max(widths))
        widths[widest] -= 1

    def line(cells: Sequence[str]) -> str:
        return "  ".join(_cut(c, w).ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), *(line(r) for r in rows)]


def list_lines(items: Sequence[SagaSummary], now: datetime, *, page: int, more: bool) -> list[str]:
    if not items:
        return ["no saga matches"]
    rows = [
        (s.correlation_key, s.saga_type, s.status, s.current_step or "-", _ago(s.updated_at, now))
        for s in items
    ]
    lines = _table(("KEY", "TYPE", "STATUS", "STEP", "CHANGED"), rows)
    following = f"; next: --page {page + 1}" if more else ""
    lines.append(f"page {page}: {len(items)} saga(s){following}")
    return lines


def stuck_lines(rows: Sequence[StuckSaga], now: datetime) -> list[str]:
    if not rows:
        return ["no stuck saga"]
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.reason] = counts.get(row.reason, 0) + 1
    summary = ", ".join(f"{reason} {n}" for reason, n in sorted(counts.items()))
    lines = [f"{len(rows)} stuck saga(s): {summary}", ""]
    for row in rows:
        where = f" at {row.current_step}" if row.current_step else ""
        status = row.status or "not started"
        lines.append(
            _cut(f"{row.reason}  {row.correlation_key} ({row.saga_type}), {status}{where}", WIDTH)
        )
        lines.append(f"  since {_when(row.since)} ({_ago(row.since, now)})")
        lines.extend(textwrap.wrap(row.detail, WIDTH, initial_indent="  ", subsequent_indent="  "))
        lines.append(f"  $ {row.command}")
        lines.append("")
    return lines[:-1]


def _field(name: str, value: str) -> list[str]:
    return textwrap.wrap(
        value, WIDTH, initial_indent=f"{name:<11}", subsequent_indent=" " * 11
    ) or [name]


def _detail_text(detail: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in detail.items())


def _flight(progress: Mapping[str, Any]) -> str | None:
    flight = progress.get("in_flight")
    if not isinstance(flight, dict):
        return None
    retry = flight.get("retry_at")
    after = f"; next retry at {_when(datetime.fromisoformat(retry))}" if retry else "; running"
    return f"{flight.get('kind')} of {flight.get('step')}, attempt {flight.get('attempt')}{after}"


def _section(title: str, lines: Iterable[str], count: int | None = None) -> list[str]:
    body = list(lines)
    shown = len(body) if count is None else count
    return ["", f"{title} ({shown})", *body] if body else []


def detail_lines(d: SagaDetail, now: datetime) -> list[str]:
    s = d.summary
    lines = [
        f"saga {s.id}",
        *_field("type", s.saga_type),
        *_field("key", s.correlation_key),
        *_field("status", f"{s.status} since {_when(s.updated_at)} ({_ago(s.updated_at, now)})"),
        *_field("step", s.current_step or "-"),
    ]
    flight = _flight(d.progress)
    if flight:
        lines += _field("in flight", flight)
    for name in ("error", "reason"):
        value = d.progress.get(name)
        if value:
            lines += _field(name, str(value))
    lines += _field("started", f"{_when(s.created_at)}, version {s.version}")
    if d.waiting_on_port:
        states = ", ".join(
            f"{b.state} in {b.worker} ({b.failures} failures, {_ago(b.changed_at, now)})"
            for b in d.breakers
        )
        lines += _field("port", f"{d.waiting_on_port}: breaker {states or 'never opened'}")
    if d.stuck:
        lines += _field("stuck", f"{d.stuck.reason}: {d.stuck.detail}")
        lines += _field("", f"$ {d.stuck.command}")
    lines += _section(
        "timers",
        (
            f"  {t.name}  due {_when(t.fire_at)}"
            + (f", parked after {t.attempts} attempt(s): {t.last_error}" if t.parked_at else "")
            for t in d.timers
        ),
    )
    lines += _section(
        "parked events",
        (
            f"  {p.message_type} {p.message_id} ({p.reason}), expires {_when(p.expires_at)}"
            for p in d.parked
        ),
    )
    lines += _section(
        "unpublished outbox",
        (
            f"  {o.message_id} -> {o.routing_key}, {o.attempts} attempt(s)"
            + (f": {o.last_error}" if o.last_error else "")
            for o in d.outbox
        ),
    )
    lines += _section(
        "dead letters",
        (
            f"  #{x.id} {x.status} {x.reason} {x.message_id}" + (f": {x.error}" if x.error else "")
            for x in d.dead_letters
        ),
    )
    lines += _section("timeline", _timeline(d.timeline), len(d.timeline))
    return [_cut(line, WIDTH) for line in lines]


def _timeline(entries: Sequence[TimelineEntry]) -> list[str]:
    lines: list[str] = []
    previous: datetime | None = None
    for e in entries:
        gap = f"+{duration(e.at - previous)}" if previous else ""
        previous = e.at
        head = f"{e.seq:>4} {e.at.astimezone(UTC):%H:%M:%S.%f}"[:-3]
        lines.append(_cut(f"{head}  {gap:>8}  {e.kind:<22} {e.step or ''}".rstrip(), WIDTH))
        outcome = _detail_text(e.detail)
        more = " ".join(x for x in (f"msg {e.message_id}" if e.message_id else "", outcome) if x)
        if more:
            lines.extend(
                textwrap.wrap(more, WIDTH, initial_indent=" " * 7, subsequent_indent=" " * 9)
            )
    return lines
