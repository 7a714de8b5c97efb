"""The worker's health file: written on every heartbeat, read by `sagaworks health`.

A worker serves nothing, so an orchestrator's probe cannot ask it over the
network; it runs a command in the worker's container instead. The worker
writes a small JSON file on each heartbeat (atomically: a probe never reads
half a file) saying when it beat and whether its broker connection and its
database are up; the probe reads it without opening a connection of its
own, so a probe every few seconds costs the services nothing.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "STALE_AFTER_BEATS",
    "HealthReport",
    "ServiceState",
    "Verdict",
    "judge",
    "read_report",
    "write_report",
]

STALE_AFTER_BEATS = 3
"""A beat older than this many intervals means the worker is stuck or gone."""


@dataclass(frozen=True)
class ServiceState:
    """One connection as the worker sees it; `down_since` is a Unix time."""

    up: bool
    down_since: float | None = None
    cause: str = ""


@dataclass(frozen=True)
class HealthReport:
    pid: int
    host: str
    beat_at: float
    interval_s: float
    broker: ServiceState
    database: ServiceState


@dataclass(frozen=True)
class Verdict:
    healthy: bool
    line: str


def write_report(path: Path, report: HealthReport) -> None:
    """Replace the file at `path` with `report` in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump(asdict(report), out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def read_report(path: Path) -> HealthReport:
    """The report at `path`; `OSError` when missing, `ValueError` when not a report."""
    data = json.loads(path.read_text())
    try:
        return HealthReport(
            pid=int(data["pid"]),
            host=str(data["host"]),
            beat_at=float(data["beat_at"]),
            interval_s=float(data["interval_s"]),
            broker=ServiceState(**data["broker"]),
            database=ServiceState(**data["database"]),
        )
    except (KeyError, TypeError) as error:
        raise ValueError(f"not a worker health report ({error})") from error


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def judge(
    path: Path,
    *,
    now: Callable[[], float] = time.time,
    alive: Callable[[int], bool] = _alive,
    host: str | None = None,
) -> Verdict:
    """Whether this host's worker beats and its connections are up, in one line."""
    try:
        report = read_report(path)
    except FileNotFoundError:
        return Verdict(
            False,
            f"no worker health file at {path}: no worker has started here yet, or the "
            "worker and this probe see different SAGAWORKS_HEALTH_FILE values",
        )
    except (OSError, ValueError) as error:
        return Verdict(False, f"cannot read the worker health file {path}: {error}")
    this_host = host if host is not None else socket.gethostname()
    if report.host != this_host:
        return Verdict(
            False,
            f"{path} was written by a worker on {report.host}, not on {this_host}: give each "
            "host its own SAGAWORKS_HEALTH_FILE",
        )
    age_s = max(0.0, now() - report.beat_at)
    if not alive(report.pid):
        return Verdict(
            False, f"the worker (pid {report.pid}) is not running; it last beat {age_s:.0f} s ago"
        )
    if age_s > STALE_AFTER_BEATS * report.interval_s:
        return Verdict(
            False,
            f"the worker (pid {report.pid}) last beat {age_s:.0f} s ago, expected every "
            f"{report.interval_s:g} s: it is stuck",
        )
    for name, state in (("RabbitMQ", report.broker), ("PostgreSQL", report.database)):
        if not state.up:
            down_s = max(0.0, now() - (state.down_since or report.beat_at))
            cause = f": {state.cause}" if state.cause else ""
            return Verdict(
                False,
                f"the worker (pid {report.pid}) has had no {name} connection for "
                f"{down_s:.0f} s{cause}",
            )
    return Verdict(
        True,
        f"ok: worker pid {report.pid} beat {age_s:.1f} s ago; RabbitMQ and PostgreSQL connected",
    )
