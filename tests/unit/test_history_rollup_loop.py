"""RollUpHistory: catch up span by span, stop when caught up or when another process holds it."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sagaworks.application.ports import RolledUp, RollUp
from sagaworks.application.read_rollup import SETTLE, SPAN, RollUpHistory

T0 = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


@dataclass
class ScriptedRollup:
    """Answers each call with the next of `answers` (a span, or None: held elsewhere)."""

    answers: list[RolledUp | None]
    asked: list[RollUp] = field(default_factory=list)

    async def roll_up(self, step: RollUp) -> RolledUp | None:
        self.asked.append(step)
        return self.answers.pop(0)


def span(n: int, *, caught_up: bool) -> RolledUp:
    since = T0 + n * SPAN
    return RolledUp(since, since + SPAN, caught_up=caught_up, skipped=timedelta(0))


async def test_it_takes_span_after_span_until_caught_up() -> None:
    rollup = ScriptedRollup(
        [span(0, caught_up=False), span(1, caught_up=False), span(2, caught_up=True)]
    )

    done = await RollUpHistory(rollup, keep=timedelta(days=1))()

    assert done == [span(0, caught_up=False), span(1, caught_up=False), span(2, caught_up=True)]
    assert rollup.asked == [RollUp(SETTLE, SPAN, timedelta(days=1))] * 3


async def test_another_process_rolling_up_is_nothing_to_do() -> None:
    assert await RollUpHistory(ScriptedRollup([None]), keep=timedelta(days=1))() is None


async def test_taken_over_midway_it_keeps_what_it_did() -> None:
    rollup = ScriptedRollup([span(0, caught_up=False), None])

    assert await RollUpHistory(rollup, keep=timedelta(days=1))() == [span(0, caught_up=False)]
