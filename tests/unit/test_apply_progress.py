"""When a plan's apply halts: the canary, then the failure rate. No I/O."""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import uuid4

import pytest

from sagaworks.application.operator_plans import MIN_SAMPLE, ApplyProgress, ApplyRequest
from sagaworks.application.ports.operator import Plan

pytestmark = pytest.mark.unit


def plan(outcomes: dict[str, int] | None = None) -> Plan:
    return Plan(
        uuid4(),
        datetime(2030, 1, 1, tzinfo=UTC),
        "ops",
        "retry",
        "why",
        None,
        None,
        {},
        100,
        "planned",
        outcomes=outcomes or {},
    )


def progress(p: Plan, **options: float) -> ApplyProgress:
    return ApplyProgress(p, ApplyRequest(p.id, "ops", **options))  # type: ignore[arg-type]


def test_a_canary_with_one_failure_halts_when_the_canary_is_done() -> None:
    run = progress(plan(), canary=3)
    assert run.settle("applied") is None
    assert run.settle("refused") is None
    halted = run.settle("applied")
    assert halted is not None
    assert halted.startswith("the canary failed: 1 of 3 targets refused or failed")


def test_a_clean_canary_goes_on_and_skips_do_not_count_as_failures() -> None:
    run = progress(plan(), canary=2, halt_on=10.0)
    assert run.settle("applied") is None
    assert run.settle("skipped") is None
    for _ in range(10):
        assert run.settle("skipped") is None
    assert run.outcomes == {"applied": 1, "skipped": 11}


def test_the_failure_rate_halts_only_from_the_minimum_sample() -> None:
    run = progress(plan(), halt_on=50.0)
    for _ in range(MIN_SAMPLE - 1):
        assert run.settle("failed") is None
    halted = run.settle("failed")
    assert halted is not None
    assert f"{MIN_SAMPLE} of {MIN_SAMPLE} targets refused or failed (100% > --halt-on 50%)" in (
        halted
    )


def test_a_rerun_counts_what_earlier_runs_settled() -> None:
    earlier = plan({"applied": 8, "refused": 2})
    run = progress(earlier, canary=5, halt_on=20.0)
    # The canary was done by the earlier run; 3 failures of 11 is 27 % > 20 %.
    halted = run.settle("refused")
    assert halted is not None
    assert "3 of 11 targets" in halted
    assert run.acted == 1


def test_without_bounds_nothing_halts() -> None:
    run = progress(plan())
    assert all(run.settle("failed") is None for _ in range(50))
