"""`sagaworks bench` end to end with a tiny count: it runs, verifies, and reports every field.

No timing is asserted: performance is measured by the benchmark, not by tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sagaworks.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FIELDS = {
    "sagas_per_s",
    "steps_per_s",
    "step_p50_ms",
    "step_p99_ms",
    "saga_p50_ms",
    "saga_p99_ms",
    "ceiling_steps_per_s",
    "ratio",
    "cpu",
    "worker_rss_mb",
    "verified",
}


def test_bench_runs_both_pipelines_and_verifies(
    migrated_database_url: str, settings_factory: Callable[..., Settings]
) -> None:
    settings = settings_factory()
    env = {
        **os.environ,
        "SAGAWORKS_DATABASE_URL": migrated_database_url,
        "SAGAWORKS_EXCHANGE_PREFIX": settings.exchange_prefix,
    }
    cli = Path(sys.executable).with_name("sagaworks")
    done = subprocess.run(
        [str(cli), "bench", "--sagas", "6", "--in-flight", "3", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True, report
    assert report.keys() >= FIELDS
    assert {"workers", "rabbitmq", "postgres"} <= report["cpu"].keys()
    (worker_cores,) = report["engine"]["cpu_per_worker"]  # one worker process
    assert 0 < worker_cores <= report["cpu"]["workers"] + 0.001
    assert report["engine"]["checks"]["sagas_completed"] == 6
    assert report["engine"]["checks"]["duplicate_effects"] == 0
    assert report["reference"]["checks"]["sagas_completed"] == 6
