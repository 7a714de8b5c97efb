"""Finding and looking: the saga filter, ID_OR_KEY lookup, and text that fits 80 columns."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest

from sagaworks.application.operations import (
    STUCK_REASONS,
    AmbiguousSaga,
    SagaFilter,
    SagaNotFound,
    SagaSort,
    find_one_saga,
)
from sagaworks.application.ports import (
    BreakerReading,
    SagaDetail,
    SagaPage,
    SagaSummary,
    StuckSaga,
    TimelineEntry,
    TimerReading,
)
from sagaworks.entrypoints.cli.saga_render import (
    WIDTH,
    detail_lines,
    duration,
    list_lines,
    stuck_lines,
    to_json,
)

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 2, 8, 0, tzinfo=UTC)


def summary(
    key: str, saga_type: str = "order_fulfilment", saga_id: UUID | None = None
) -> SagaSummary:
    return SagaSummary(
        id=saga_id or uuid4(),
        saga_type=saga_type,
        correlation_key=key,
        status="running",
        current_step="authorise_payment",
        version=3,
        created_at=NOW - timedelta(hours=2),
        updated_at=NOW - timedelta(minutes=7),
    )


class Sagas:
    """`SagaQueries.matching` over a list, for the lookup rules."""

    def __init__(self, *sagas: SagaSummary) -> None:
        self.sagas = sagas

    async def matching(self, ref: str, saga_type: str | None) -> Sequence[SagaSummary]:
        return [
            s
            for s in self.sagas
            if str(s.id) == ref or (s.correlation_key == ref and saga_type in (None, s.saga_type))
        ]

    async def find(
        self, selection: SagaFilter, sort: SagaSort, *, limit: int, offset: int
    ) -> SagaPage:
        raise NotImplementedError

    async def detail(self, saga_id: UUID) -> SagaDetail | None:
        raise NotImplementedError

    async def stuck(self, selection: SagaFilter, *, limit: int) -> Sequence[StuckSaga]:
        raise NotImplementedError


def test_an_unknown_stuck_reason_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="unknown stuck reason") as raised:
        SagaFilter(stuck_reasons=("needs_attention", "sleepy"))
    assert "sleepy" in str(raised.value)
    assert all(reason in str(raised.value) for reason in STUCK_REASONS)


def test_an_empty_filter_is_empty_and_any_field_makes_it_not() -> None:
    assert SagaFilter().is_empty()
    assert not SagaFilter(statuses=("running",)).is_empty()
    assert not SagaFilter(any_stuck=True).is_empty()


async def test_a_saga_is_found_by_its_id_or_its_business_key() -> None:
    one, other = summary("o-1"), summary("o-2")
    sagas = Sagas(one, other)
    assert await find_one_saga(sagas, "o-2", None) == other
    assert await find_one_saga(sagas, str(one.id), None) == one


async def test_an_id_wins_over_a_business_key_that_equals_it() -> None:
    target = summary("o-1")
    impostor = summary(str(target.id), saga_type="refund")
    assert await find_one_saga(Sagas(impostor, target), str(target.id), None) == target


async def test_a_key_shared_by_two_saga_types_asks_for_the_type() -> None:
    order, refund = summary("o-1"), summary("o-1", saga_type="refund")
    sagas = Sagas(order, refund)
    with pytest.raises(AmbiguousSaga, match="--type") as raised:
        await find_one_saga(sagas, "o-1", None)
    assert "order_fulfilment, refund" in str(raised.value)
    assert await find_one_saga(sagas, "o-1", "refund") == refund


async def test_an_unknown_saga_says_how_to_find_it() -> None:
    with pytest.raises(SagaNotFound, match="saga list"):
        await find_one_saga(Sagas(summary("o-1")), "o-9", "order_fulfilment")


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [
        (0.012, "12ms"),
        (3.44, "3.4s"),
        (304, "5m04s"),
        (7500, "2h05m"),
        (273_600, "3d04h"),
        (-2, "-2.0s"),
    ],
)
def test_durations_are_short_and_exact_enough_to_compare(seconds: float, shown: str) -> None:
    assert duration(timedelta(seconds=seconds)) == shown


def test_a_listing_fits_80_columns_even_with_long_keys() -> None:
    items = [summary("k" * 200), summary("o-2", saga_type="t" * 90)]
    lines = list_lines(items, NOW, page=2, more=True)
    assert all(len(line) <= WIDTH for line in lines)
    assert lines[0].split() == ["KEY", "TYPE", "STATUS", "STEP", "CHANGED"]
    assert "7m00s ago" in lines[1]
    assert lines[-1] == "page 2: 2 saga(s); next: --page 3"


def test_stuck_rows_name_the_reason_the_detail_and_the_command_within_80_columns() -> None:
    saga_id = uuid4()
    row = StuckSaga(
        saga_id=saga_id,
        saga_type="order_fulfilment",
        correlation_key="o-1",
        status="compensating",
        current_step="authorise_payment",
        reason="compensation_failing",
        detail="compensation of authorise_payment failed 4 time(s) (" + "x" * 150 + ")",
        since=NOW - timedelta(minutes=3),
        command=f'sagaworks saga retry {saga_id} --reason "..."',
    )
    lines = stuck_lines([row], NOW)
    assert lines[0] == "1 stuck saga(s): compensation_failing 1"
    assert all(len(line) <= WIDTH for line in lines if not line.startswith("  $ "))
    assert f"  $ sagaworks saga retry {saga_id}" in "\n".join(lines)
    assert "3m00s ago" in "\n".join(lines)


def test_show_prints_every_part_and_the_gaps_between_history_rows() -> None:
    base = summary("o-1")
    timeline = [
        TimelineEntry(1, NOW - timedelta(seconds=10), "started", None, "o-1/placed", {}),
        TimelineEntry(
            2,
            NOW - timedelta(seconds=9.5),
            "step_started",
            "authorise_payment",
            "o-1/placed",
            {"kind": "action", "attempt": 1, "port": "payments"},
        ),
        TimelineEntry(
            3,
            NOW - timedelta(seconds=2),
            "operator_retried",
            "authorise_payment",
            None,
            {"operator": "alice", "reason": "the payments outage is over " * 5},
        ),
    ]
    detail = SagaDetail(
        summary=base,
        state={"order_id": "o-1"},
        progress={
            "in_flight": {
                "step": "authorise_payment",
                "kind": "action",
                "attempt": 2,
                "retry_at": (NOW + timedelta(seconds=30)).isoformat(),
            }
        },
        waiting_on_port="payments",
        breakers=[BreakerReading("payments", "host-1/42", "open", 5, NOW - timedelta(seconds=40))],
        timers=[TimerReading("retry:authorise_payment:action:2", NOW, 0, None, None)],
        parked=[],
        outbox=[],
        dead_letters=[],
        stuck=None,
        timeline=timeline,
    )
    lines = detail_lines(detail, NOW)
    text = " ".join(" ".join(lines).split())
    assert all(len(line) <= WIDTH for line in lines)
    assert "action of authorise_payment, attempt 2; next retry at 2026-12-02 08:00:30Z" in text
    assert "payments: breaker open in host-1/42 (5 failures, 40.0s ago)" in text
    assert "timers (1)" in text
    assert "timeline (3)" in text
    assert "+500ms" in text
    assert "+7.5s" in text
    assert "operator_retried" in text
    assert "operator=alice" in text
    assert "parked events" not in text, "empty parts are left out"


def test_json_keeps_every_value_uncut_with_times_in_iso_8601() -> None:
    row = summary("k" * 300)
    (item,) = json.loads(to_json([row]))
    assert item["correlation_key"] == "k" * 300
    assert item["updated_at"] == "2026-12-02T07:53:00+00:00"
    assert item["id"] == str(row.id)
