"""`sagaworks health`'s judgement of the worker's health file, case by case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sagaworks.entrypoints.health import (
    HealthReport,
    ServiceState,
    judge,
    read_report,
    write_report,
)

pytestmark = pytest.mark.unit

NOW = 1_000_000.0
HOST = "worker-7f9c"
UP = ServiceState(up=True)


def _report(**changes: object) -> HealthReport:
    values: dict[str, object] = {
        "pid": 4242,
        "host": HOST,
        "beat_at": NOW - 2.0,
        "interval_s": 5.0,
        "broker": UP,
        "database": UP,
    }
    values.update(changes)
    return HealthReport(**values)  # type: ignore[arg-type]


def _judge(path: Path, *, alive: bool = True) -> tuple[bool, str]:
    verdict = judge(path, now=lambda: NOW, alive=lambda _pid: alive, host=HOST)
    return verdict.healthy, verdict.line


def test_a_fresh_beat_with_both_connections_up_is_healthy(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write_report(path, _report())

    assert _judge(path) == (
        True,
        "ok: worker pid 4242 beat 2.0 s ago; RabbitMQ and PostgreSQL connected",
    )


def test_the_report_survives_the_round_trip_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run" / "health.json"
    report = _report(database=ServiceState(up=False, down_since=NOW - 9, cause="refused"))

    write_report(path, report)
    write_report(path, report)

    assert read_report(path) == report
    assert os.listdir(path.parent) == ["health.json"]


def test_no_file_says_no_worker_started_here(tmp_path: Path) -> None:
    healthy, line = _judge(tmp_path / "missing.json")

    assert not healthy
    assert "no worker has started here yet" in line
    assert "SAGAWORKS_HEALTH_FILE" in line


def test_a_garbled_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    path.write_text('{"pid": 1}')

    healthy, line = _judge(path)

    assert not healthy
    assert line.startswith(f"cannot read the worker health file {path}: not a worker health")


def test_a_dead_worker_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write_report(path, _report())

    assert _judge(path, alive=False) == (
        False,
        "the worker (pid 4242) is not running; it last beat 2 s ago",
    )


def test_a_beat_older_than_three_intervals_is_stuck(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write_report(path, _report(beat_at=NOW - 16.0))

    healthy, line = _judge(path)

    assert not healthy
    assert line == "the worker (pid 4242) last beat 16 s ago, expected every 5 s: it is stuck"


def test_three_intervals_old_is_still_in_time(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write_report(path, _report(beat_at=NOW - 15.0))

    assert _judge(path)[0]


@pytest.mark.parametrize(("service", "name"), [("broker", "RabbitMQ"), ("database", "PostgreSQL")])
def test_a_connection_down_says_which_since_when_and_why(
    tmp_path: Path, service: str, name: str
) -> None:
    path = tmp_path / "health.json"
    down = ServiceState(up=False, down_since=NOW - 31.0, cause="missed heartbeats")
    write_report(path, _report(**{service: down}))

    assert _judge(path) == (
        False,
        f"the worker (pid 4242) has had no {name} connection for 31 s: missed heartbeats",
    )


def test_a_file_from_another_host_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "health.json"
    write_report(path, _report(host="elsewhere"))

    healthy, line = _judge(path)

    assert not healthy
    assert f"written by a worker on elsewhere, not on {HOST}" in line
