"""The generated saga diagram: complete, wired as `decide` behaves, and committed up to date."""

from __future__ import annotations

import re
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks import CancelOn, Message, SagaDefinition, StartOn, Step, Wait
from sagaworks.domain.decide import SagaNeedsAttention
from sagaworks.domain.diagram import mermaid
from sagaworks.entrypoints.cli.app import app

pytestmark = pytest.mark.unit

DOC = Path(__file__).resolve().parents[2] / "docs" / "sagas" / "order_fulfilment.md"
FENCED = re.compile(r"```mermaid\n(.*?)```", re.DOTALL)


def edges(chart: str) -> set[tuple[str, str, str]]:
    """(source, arrow, target) of every edge, labels dropped."""
    found = set()
    for line in chart.splitlines():
        match = re.fullmatch(r"\s*(\w+) (-->|-\.->)(?:\|.*\|)? (\w+)", line)
        if match:
            found.add(match.groups())
    return found


def test_the_committed_diagram_is_current() -> None:
    blocks = FENCED.findall(DOC.read_text())
    assert len(blocks) == 1, f"{DOC} should hold exactly one ```mermaid block"
    assert blocks[0] == mermaid(order_fulfilment), (
        "docs/sagas/order_fulfilment.md is stale: regenerate it with "
        "`SAGAWORKS_SAGAS='[\"sagas.order_fulfilment\"]' sagaworks graph order_fulfilment` "
        "and paste the output into the mermaid block"
    )


def test_the_diagram_names_every_step_port_and_event() -> None:
    chart = mermaid(order_fulfilment)
    d = order_fulfilment
    named = [
        *(item.name for item in d.steps),
        *d.ports(),
        *(e.message_type for e in d.consumed_events()),
        *(e.message_type for e in d.published_events()),
        SagaNeedsAttention.message_type,
        *(c.reason for c in d.cancel),
        "release_stock",
        "void_authorisation",
        "cancel_shipment",
        "dispatch_deadline_missed",
        "state.dispatch_by",
        "completed",
        "compensated",
        "needs_attention",
    ]
    missing = [name for name in named if name not in chart]
    assert missing == []
    assert chart.startswith("flowchart TD\n")


def test_the_diagram_follows_what_decide_does() -> None:
    found = edges(mermaid(order_fulfilment))
    forward = [
        "start",
        "step_reserve_stock",
        "step_authorise_payment",
        "step_book_shipment",
        "wait_await_dispatch",
        "step_capture_payment",
        "completed",
    ]
    assert {(a, "-->", b) for a, b in pairwise(forward)} <= found
    undo = ["undo_book_shipment", "undo_authorise_payment", "undo_reserve_stock", "compensated"]
    assert {(a, "-->", b) for a, b in pairwise(undo)} <= found
    assert {
        # A refusal had no effect: compensation starts before the refused step.
        ("step_reserve_stock", "-.->", "compensated"),
        ("step_authorise_payment", "-.->", "undo_reserve_stock"),
        # Giving up leaves the outcome unknown: the step itself is undone too.
        ("step_authorise_payment", "-.->", "undo_authorise_payment"),
        ("wait_await_dispatch", "-.->", "undo_book_shipment"),
        ("step_capture_payment", "-.->", "needs_attention"),
        ("undo_reserve_stock", "-.->", "needs_attention"),
        ("cancellable", "-.->", "compensation"),
    } <= found
    # Nothing after the pivot is ever compensated.
    assert not any(a == "step_capture_payment" and b.startswith("undo_") for a, _, b in found)


class _State(BaseModel):
    key: str


class _Go(Message, type="diagram.go", domain="tests"):
    key: str


class _Arrived(Message, type="diagram.arrived", domain="tests"):
    key: str


class _Stop(Message, type="diagram.stop", domain="tests"):
    key: str


class _Done(Message, type="diagram.done", domain="tests"):
    key: str


class _Undone(Message, type="diagram.undone", domain="tests"):
    key: str


async def _act(port: Any, call: Any) -> None:
    return None


def _saga(*steps: Step[Any] | Wait[Any, Any], cancel: bool = False) -> SagaDefinition[Any]:
    correlate: dict[type[Message], Any] = {_Arrived: lambda e: e.key}
    if cancel:
        correlate[_Stop] = lambda e: e.key
    return SagaDefinition(
        name="diagrammed",
        state=_State,
        state_version=1,
        start=StartOn(_Go, key=lambda e: e.key, state=lambda e: _State(key=e.key)),
        correlate=correlate,
        steps=steps,
        cancel=(CancelOn(_Stop, reason="stopped"),) if cancel else (),
        completes_with=_Done,
        on_completed=lambda s: _Done(key=s.key),
        compensates_with=_Undone,
        on_compensated=lambda s, reason: _Undone(key=s.key),
    )


def test_a_wait_after_the_pivot_times_out_into_needs_attention() -> None:
    chart = mermaid(
        _saga(
            Step("charge", port="bank", action=_act, pivot=True),
            Wait("confirm", event=_Arrived, deadline=timedelta(hours=2), timeout_reason="late"),
        )
    )
    assert "deadline: 2 h after it starts" in chart
    assert ("wait_confirm", "-.->", "needs_attention") in edges(chart)
    assert "subgraph" not in chart  # nothing to cancel, nothing to compensate


def test_a_saga_without_a_pivot_is_cancellable_until_it_ends() -> None:
    chart = mermaid(_saga(Step("hold", port="desk", action=_act, compensation=_act), cancel=True))
    assert "cancellable until it ends" in chart
    assert "undoes hold" in chart
    assert ("cancellable", "-.->", "compensation") in edges(chart)
    assert ("step_hold", "-->", "completed") in edges(chart)


def test_labels_with_quotes_stay_inside_their_quotes() -> None:
    chart = mermaid(
        _saga(
            Step("hold", port="desk", action=_act, compensation=_act),
            Wait("w", event=_Arrived, deadline=timedelta(minutes=5), timeout_reason='say "no"'),
        )
    )
    assert "say #quot;no#quot;" in chart
    assert 'say "no"' not in chart


runner = CliRunner()
WITH_THE_SAGA = {"SAGAWORKS_SAGAS": '["sagas.order_fulfilment"]'}


def test_the_graph_command_prints_the_diagram() -> None:
    result = runner.invoke(app, ["graph", "order_fulfilment"], env=WITH_THE_SAGA)
    assert result.exit_code == 0, result.output
    assert result.stdout == mermaid(order_fulfilment)


def test_the_graph_command_lists_known_sagas_for_an_unknown_name() -> None:
    result = runner.invoke(app, ["graph", "order_fulfillment"], env=WITH_THE_SAGA)
    assert result.exit_code == 2
    assert 'no saga named "order_fulfillment"' in result.stderr
    assert "known: order_fulfilment" in result.stderr


def test_the_graph_command_with_no_saga_configured_names_the_setting() -> None:
    result = runner.invoke(app, ["graph", "order_fulfilment"], env={"SAGAWORKS_SAGAS": "[]"})
    assert result.exit_code == 2
    assert "set SAGAWORKS_SAGAS" in result.stderr
