"""Order-fulfilment scenarios, declared once and run over two engines.

`tests/unit/test_harness.py` drives each one through the no-I/O harness,
`tests/integration/test_order_fulfilment.py` through real workers on the
real broker and database. A scenario says what happens (its `moves`) and what
must come of it: the saga's status and reason, its history, the effects the
participants applied and the one outcome event. How a move is made (a fake
clock advanced, or a deadline a second away) is each engine's business.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

__all__ = [
    "ACTIONS",
    "ALL_ACTIONS",
    "HAPPY_HISTORY",
    "SCENARIOS",
    "UNDO_OF",
    "Move",
    "Scenario",
    "assert_gapless",
    "assert_undone_in_reverse",
    "compensations",
    "completed_actions",
    "expected_effects",
    "kinds",
]

ACTIONS = {
    "reserve_stock": "reserve",
    "authorise_payment": "authorise",
    "book_shipment": "book",
    "capture_payment": "capture",
}
"""The ledger operation of each step's action."""

UNDO_OF = {"reserve_stock": "release", "authorise_payment": "void", "book_shipment": "cancel"}
"""The ledger operation of each compensation."""

HAPPY_HISTORY = [
    ("started", None),
    ("step_started", "reserve_stock"),
    ("step_completed", "reserve_stock"),
    ("step_started", "authorise_payment"),
    ("step_completed", "authorise_payment"),
    ("step_started", "book_shipment"),
    ("step_completed", "book_shipment"),
    ("waiting", "await_dispatch"),
    ("event_received", "await_dispatch"),
    ("step_started", "capture_payment"),
    ("step_completed", "capture_payment"),
    ("completed", None),
]
"""(kind, step) of every history entry of a saga that went straight through."""

UNDO_ALL = [
    ("compensation_started", None),
    ("step_started", "book_shipment"),
    ("compensation_completed", "book_shipment"),
    ("step_started", "authorise_payment"),
    ("compensation_completed", "authorise_payment"),
    ("step_started", "reserve_stock"),
    ("compensation_completed", "reserve_stock"),
    ("compensated", None),
]
"""What follows the trigger of a compensation while the saga waits for the dispatch."""

ALL_ACTIONS = {"reserve": 1, "authorise": 1, "book": 1, "capture": 1}
ALL_UNDONE = {"reserve": 1, "authorise": 1, "book": 1, "release": 1, "void": 1, "cancel": 1}

Move = Literal["place", "place_declined", "place_again", "dispatch", "cancel", "miss_deadline"]
"""`place_declined`: an order the payment service declines; `place_again`: the same message
again; `cancel`: the customer cancels; `miss_deadline`: the dispatch deadline passes."""


@dataclass(frozen=True)
class Scenario:
    id: str
    moves: tuple[Move, ...]
    status: str
    reason: str | None
    history: list[tuple[str, str | None]]
    effects: dict[str, int]
    """Effects the participants applied for the order, by ledger operation."""
    outcome: str
    """The one outcome event's type; its body is `outcome_for(order_id)`."""
    outcome_body: Mapping[str, str] = field(default_factory=dict)
    """The body besides `order_id`; `{order_id}` in a value is replaced by the order's id."""
    undone: list[str] = field(default_factory=list)
    """Completed actions, in order, that were compensated newest first."""

    def outcome_for(self, order_id: str) -> dict[str, str]:
        body = {key: value.format(order_id=order_id) for key, value in self.outcome_body.items()}
        return {"order_id": order_id, **body}


def _fulfilled(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "status": "completed",
        "reason": None,
        "history": HAPPY_HISTORY,
        "effects": ALL_ACTIONS,
        "outcome": "order.fulfilled",
        "outcome_body": {"shipment_id": "shp-{order_id}", "capture_id": "cap-{order_id}"},
    }
    values.update(overrides)
    return values


def _cancelled(reason: str, undone: list[str], **values: Any) -> dict[str, Any]:
    return {
        "status": "compensated",
        "reason": reason,
        "outcome": "order.cancelled",
        "outcome_body": {"reason": reason},
        "undone": undone,
        **values,
    }


_EVERY_STEP = ["reserve_stock", "authorise_payment", "book_shipment"]

SCENARIOS = [
    Scenario("happy_path", ("place", "dispatch"), **_fulfilled()),
    Scenario("duplicates", ("place", "place_again", "place_again", "dispatch"), **_fulfilled()),
    Scenario(
        "payment_declined",
        ("place_declined",),
        **_cancelled(
            "payment_declined",
            [],
            history=[
                ("started", None),
                ("step_started", "reserve_stock"),
                ("step_completed", "reserve_stock"),
                ("step_started", "authorise_payment"),
                ("step_failed", "authorise_payment"),
                ("compensation_started", None),
                ("step_started", "reserve_stock"),
                ("compensation_completed", "reserve_stock"),
                ("compensated", None),
            ],
            # The payment service records its decline once; a refused authorisation is not voided.
            effects={"reserve": 1, "authorise": 1, "release": 1},
        ),
    ),
    Scenario(
        "cancelled_before_the_order_arrives",
        ("cancel", "place"),
        **_cancelled(
            "customer_cancelled",
            ["reserve_stock"],
            # The reservation was already commanded with the start; it runs, then is released.
            history=[
                ("started", None),
                ("step_started", "reserve_stock"),
                ("compensation_started", None),
                ("step_completed", "reserve_stock"),
                ("step_started", "reserve_stock"),
                ("compensation_completed", "reserve_stock"),
                ("compensated", None),
            ],
            effects={"reserve": 1, "release": 1},
        ),
    ),
    Scenario(
        "cancelled_while_awaiting_dispatch",
        ("place", "cancel"),
        **_cancelled(
            "customer_cancelled",
            _EVERY_STEP,
            history=[*HAPPY_HISTORY[:8], *UNDO_ALL],
            effects=ALL_UNDONE,
        ),
    ),
    Scenario(
        "dispatch_deadline_missed",
        ("place", "miss_deadline"),
        **_cancelled(
            "dispatch_deadline_missed",
            _EVERY_STEP,
            history=[*HAPPY_HISTORY[:8], ("deadline_missed", "await_dispatch"), *UNDO_ALL],
            effects=ALL_UNDONE,
        ),
    ),
]
"""Every scenario both engines run; ids name the tests."""


class Entry(Protocol):
    """A history entry as either engine reads it back."""

    @property
    def seq(self) -> int: ...
    @property
    def kind(self) -> str: ...
    @property
    def step(self) -> str | None: ...
    @property
    def detail(self) -> Mapping[str, Any]: ...


def kinds(history: Iterable[Entry]) -> list[tuple[str, str | None]]:
    """(kind, step) of each entry, in order."""
    return [(h.kind, h.step) for h in history]


def completed_actions(history: Iterable[Entry]) -> list[str]:
    return [h.step for h in history if h.kind == "step_completed" and h.step is not None]


def compensations(history: Iterable[Entry]) -> tuple[list[str], list[str]]:
    """Steps whose compensation started, and steps whose compensation completed, in order."""
    entries = list(history)
    started = [
        h.step
        for h in entries
        if h.kind == "step_started" and h.detail.get("kind") == "compensation" and h.step
    ]
    done = [h.step for h in entries if h.kind == "compensation_completed" and h.step]
    return started, done


def expected_effects(done: Iterable[str], undone: Iterable[str] = ()) -> dict[str, int]:
    """Ledger effects for actions that happened and compensations that undid them."""
    effects: Counter[str] = Counter(ACTIONS[s] for s in done)
    effects.update(UNDO_OF[s] for s in undone)
    return dict(effects)


def assert_gapless(history: list[Any]) -> None:
    assert [h.seq for h in history] == list(range(1, len(history) + 1))


def assert_undone_in_reverse(history: list[Any], effects: dict[str, int]) -> list[str]:
    """Every completed action was compensated once, newest first; returns the completed ones."""
    done = completed_actions(history)
    started, undone = compensations(history)
    assert started == undone == list(reversed(done)), (done, started, undone)
    (start_of_compensation,) = [h.seq for h in history if h.kind == "compensation_started"]
    assert all(
        h.seq > start_of_compensation
        for h in history
        if h.kind == "step_started" and h.detail.get("kind") == "compensation"
    )
    assert effects == expected_effects(done, undone)
    return done
