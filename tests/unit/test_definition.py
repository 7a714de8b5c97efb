"""The saga DSL refuses inconsistent definitions when they are built, with a message that says
which saga, which step, and what to do."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import BaseModel

from sagas.order_fulfilment.messages import (
    OrderCancellationRequested,
    OrderCancelled,
    OrderFulfilled,
    OrderPlaced,
    ShipmentDispatched,
)
from sagas.order_fulfilment.saga import order_fulfilment
from sagaworks import CancelOn, DefinitionError, Message, SagaDefinition, StartOn, Step, Wait
from sagaworks.domain.decide import EventReceived, StepFinished, decide
from sagaworks.domain.messages import Envelope

pytestmark = pytest.mark.unit


class Began(Message, type="demo.began", domain="demo"):
    key: str


class Arrived(Message, type="demo.arrived", domain="demo"):
    key: str


class Stopped(Message, type="demo.stopped", domain="demo"):
    key: str


class Finished(Message, type="demo.finished", domain="demo"):
    key: str


class ArrivedElsewhere(Message, type="demo.arrived", domain="elsewhere"):
    """Another class with the same message type as `Arrived`."""

    key: str


class Undeclared(Message):
    """A Message subclass without type=/domain=: it cannot travel."""

    key: str


class NotAMessage(BaseModel):
    key: str


class DemoState(BaseModel):
    key: str


async def _noop(port: object, call: object) -> None:
    return None


def _step(name: str, **overrides: Any) -> Step[DemoState]:
    options: dict[str, Any] = {"port": "things", "action": _noop, "compensation": _noop}
    options.update(overrides)
    return Step(name, **options)


def _wait(name: str, event: type[Message] = Arrived, **overrides: Any) -> Wait[DemoState, Any]:
    options: dict[str, Any] = {"deadline": timedelta(hours=1), "timeout_reason": "too_slow"}
    options.update(overrides)
    return Wait(name, event=event, **options)


def _key(message: Any) -> str:
    return str(message.key)


def build(
    *,
    name: str = "demo_saga",
    steps: tuple[Step[DemoState] | Wait[DemoState, Any], ...] | None = None,
    start: type[Message] = Began,
    correlate: Mapping[type[Message], Callable[[Any], str]] | None = None,
    cancel: tuple[CancelOn[Any], ...] = (),
    state: Any = DemoState,
    state_version: int = 1,
    completes_with: type[Message] = Finished,
    compensates_with: type[Message] = Finished,
) -> SagaDefinition[DemoState]:
    return SagaDefinition(
        name=name,
        state=state,
        state_version=state_version,
        start=StartOn(start, key=_key, state=lambda e: DemoState(key=e.key)),
        steps=(_step("first"),) if steps is None else steps,
        correlate={Arrived: _key, Stopped: _key} if correlate is None else correlate,
        cancel=cancel,
        completes_with=completes_with,
        on_completed=lambda s: Finished(key=s.key),
        compensates_with=compensates_with,
        on_compensated=lambda s, reason: Finished(key=s.key),
    )


def test_a_consistent_definition_builds() -> None:
    definition = build(
        steps=(_step("first"), _wait("arrival"), _step("last", pivot=True, compensation=None)),
        cancel=(CancelOn(Stopped, reason="stopped"),),
    )

    assert [s.name for s in definition.steps] == ["first", "arrival", "last"]
    assert definition.pivot_index() == 2
    assert definition.index_of("arrival") == 1
    assert definition.step("last").pivot


def test_step_lookup_refuses_a_wait_and_an_unknown_name() -> None:
    definition = build(steps=(_step("first"), _wait("arrival")))

    with pytest.raises(KeyError):
        definition.step("arrival")
    with pytest.raises(KeyError):
        definition.index_of("nowhere")


@pytest.mark.parametrize(
    "name",
    ["", "Demo", "9lives", "with-dash", "has space", "x" * 64, "demo\n", "demo_saga\n", "\ndemo"],
)
def test_a_saga_name_must_be_snake_case(name: str) -> None:
    with pytest.raises(DefinitionError, match="name must be snake_case") as caught:
        build(name=name)

    assert caught.value.saga == name
    assert str(caught.value).startswith(f'saga "{name}"')


def test_a_saga_name_of_63_characters_is_accepted() -> None:
    assert build(name="a" * 63).name == "a" * 63


def test_state_must_be_a_pydantic_model_class() -> None:
    with pytest.raises(DefinitionError, match='saga "demo_saga": state must be a pydantic model'):
        build(state=dict)


def test_state_version_starts_at_one() -> None:
    with pytest.raises(DefinitionError, match='saga "demo_saga": state_version must be 1 or more'):
        build(state_version=0)


def test_a_saga_needs_at_least_one_step() -> None:
    with pytest.raises(DefinitionError, match='saga "demo_saga": a saga needs at least one step'):
        build(steps=())


@pytest.mark.parametrize(
    ("where", "event"),
    [
        ("start", Undeclared),
        ("start", NotAMessage),
        ("correlate", Undeclared),
        ("correlate", NotAMessage),
        ("cancel", Undeclared),
        ("completes_with", Undeclared),
        ("completes_with", NotAMessage),
        ("compensates_with", Undeclared),
        ("wait", Undeclared),
        ("wait", NotAMessage),
    ],
)
def test_every_event_must_be_a_declared_message(where: str, event: type[Any]) -> None:
    kwargs: dict[str, Any] = {}
    if where == "start":
        kwargs["start"] = event
    elif where == "correlate":
        kwargs["correlate"] = {Arrived: _key, event: _key}
    elif where == "cancel":
        kwargs["cancel"] = (CancelOn(event, reason="stopped"),)
    elif where == "wait":
        kwargs["steps"] = (_step("first"), _wait("arrival", event=event))
    else:
        kwargs[where] = event

    with pytest.raises(DefinitionError) as caught:
        build(**kwargs)

    text = str(caught.value)
    assert text.startswith('saga "demo_saga": ')
    assert repr(event.__name__) in text
    assert "is not a declared Message" in text
    assert "type=... and domain=..." in text


@pytest.mark.parametrize("name", ["Upper", "with-dash", "1st", "", "first\n"])
def test_step_names_must_be_snake_case(name: str) -> None:
    with pytest.raises(DefinitionError, match="step names must be snake_case") as caught:
        build(steps=(_step(name),))

    assert caught.value.step == name


@pytest.mark.parametrize("name", ["Arrival", "arrival\n"])
def test_wait_names_must_be_snake_case(name: str) -> None:
    with pytest.raises(DefinitionError, match="step names must be snake_case") as caught:
        build(steps=(_step("first"), _wait(name)))

    assert caught.value.step == name


@pytest.mark.parametrize("port", ["Things!", "things\n", "things.v2"])
def test_port_names_must_be_snake_case(port: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("first", port=port),))

    assert str(caught.value) == (
        f'saga "demo_saga", step "first": port name "{port}" must be snake_case'
    )


def test_a_trailing_newline_is_not_part_of_a_valid_name() -> None:
    """`$` would match before a final newline; the whole name must match."""
    with pytest.raises(DefinitionError, match="name must be snake_case"):
        build(name="demo\n")
    with pytest.raises(DefinitionError, match="step names must be snake_case"):
        build(steps=(_step("first\n"),))
    with pytest.raises(DefinitionError, match='port name "things\n" must be snake_case'):
        build(steps=(_step("first", port="things\n"),))
    assert build(name="demo", steps=(_step("first", port="things"),)).name == "demo"


@pytest.mark.parametrize(
    "steps",
    [
        (_step("twice"), _step("twice")),
        (_step("twice"), _wait("twice")),
        (_wait("twice"), _step("other"), _wait("twice")),
    ],
    ids=["step-step", "step-wait", "wait-wait"],
)
def test_step_names_are_unique(steps: tuple[Step[DemoState] | Wait[DemoState, Any], ...]) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=steps)

    assert str(caught.value) == 'saga "demo_saga", step "twice": duplicate step name'
    assert (caught.value.saga, caught.value.step) == ("demo_saga", "twice")


def test_a_step_without_compensation_says_what_to_do() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("first"), _step("charge", compensation=None)))

    text = str(caught.value)
    assert text.startswith('saga "demo_saga", step "charge": ')
    assert "missing compensation" in text
    assert "compensation=..." in text
    assert "pivot=True" in text
    assert (caught.value.saga, caught.value.step) == ("demo_saga", "charge")


def test_steps_after_the_pivot_need_no_compensation() -> None:
    definition = build(
        steps=(
            _step("first"),
            _step("charge", pivot=True, compensation=None),
            _step("notify", compensation=None),
        )
    )

    assert definition.pivot_index() == 1


@pytest.mark.parametrize(
    "steps",
    [
        (
            _step("first"),
            _step("charge", pivot=True, compensation=None),
            _step("notify"),
        ),
        (
            _step("first"),
            _step("charge", pivot=True, compensation=None),
            _wait("arrival"),
            _step("notify"),
        ),
    ],
    ids=["right-after", "after-a-wait"],
)
def test_a_step_after_the_pivot_cannot_declare_a_compensation(
    steps: tuple[Step[DemoState] | Wait[DemoState, Any], ...],
) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=steps)

    assert str(caught.value) == (
        'saga "demo_saga", step "notify": comes after the pivot "charge", '
        "so it is never compensated: drop its compensation"
    )
    assert (caught.value.saga, caught.value.step) == ("demo_saga", "notify")


def test_a_saga_has_one_pivot() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(
            steps=(
                _step("charge", pivot=True, compensation=None),
                _step("ship", pivot=True, compensation=None),
            )
        )

    assert str(caught.value) == (
        'saga "demo_saga", step "ship": a saga has one pivot step; "charge" is already one'
    )


def test_a_pivot_has_no_compensation() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("charge", pivot=True),))

    assert str(caught.value) == (
        'saga "demo_saga", step "charge": '
        "a pivot step is the point of no return and has no compensation"
    )


def test_a_wait_on_the_start_event_is_unreachable() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(
            steps=(_step("first"), _wait("again", event=Began)),
            correlate={Began: _key, Arrived: _key},
        )

    text = str(caught.value)
    assert text.startswith('saga "demo_saga", step "again": ')
    assert 'waits for the start event "demo.began"' in text
    assert "unreachable" in text


def test_a_wait_on_an_event_without_correlation_is_refused() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("first"), _wait("arrival")), correlate={Stopped: _key})

    assert str(caught.value) == (
        'saga "demo_saga", step "arrival": '
        'waits for unknown message type "demo.arrived": add it to correlate='
    )


@pytest.mark.parametrize(
    ("second", "correlate"),
    [
        (Arrived, {Arrived: _key, Stopped: _key}),
        (ArrivedElsewhere, {Arrived: _key, ArrivedElsewhere: _key}),
    ],
    ids=["same-class", "same-message-type"],
)
def test_two_waits_for_the_same_event_type_are_refused(
    second: type[Message], correlate: Mapping[type[Message], Callable[[Any], str]]
) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(
            steps=(
                _step("first"),
                _wait("arrival"),
                _step("middle"),
                _wait("arrival_again", event=second),
            ),
            correlate=correlate,
        )

    assert str(caught.value) == (
        'saga "demo_saga", step "arrival_again": a second wait for "demo.arrived": '
        "the saga cannot tell which wait an event is for; wait once"
    )
    assert caught.value.step == "arrival_again"


def test_waits_for_different_events_are_fine() -> None:
    definition = build(
        steps=(_step("first"), _wait("arrival"), _step("middle"), _wait("stop", event=Stopped))
    )

    assert [s.name for s in definition.steps] == ["first", "arrival", "middle", "stop"]


@pytest.mark.parametrize("deadline", [timedelta(0), timedelta(seconds=-1)])
def test_a_fixed_deadline_must_be_positive(deadline: timedelta) -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("first"), _wait("arrival", deadline=deadline)))

    assert str(caught.value) == (
        'saga "demo_saga", step "arrival": a wait\'s deadline must be positive'
    )


def test_a_wait_needs_a_timeout_reason() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(steps=(_step("first"), _wait("arrival", timeout_reason="")))

    assert str(caught.value) == 'saga "demo_saga", step "arrival": a wait needs a timeout_reason'


def test_a_cancel_event_needs_a_correlation() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(correlate={Arrived: _key}, cancel=(CancelOn(Stopped, reason="stopped"),))

    assert str(caught.value) == (
        'saga "demo_saga": cancelling event "demo.stopped" has no correlation: add it to correlate='
    )


def test_the_start_event_cannot_cancel() -> None:
    with pytest.raises(DefinitionError, match="the start event cannot also cancel the saga"):
        build(correlate={Began: _key}, cancel=(CancelOn(Began, reason="again"),))


def test_a_cancel_event_cannot_also_be_awaited() -> None:
    with pytest.raises(DefinitionError) as caught:
        build(
            steps=(_step("first"), _wait("stop_signal", event=Stopped)),
            cancel=(CancelOn(Stopped, reason="stopped"),),
        )

    text = str(caught.value)
    assert text.startswith('saga "demo_saga", step "stop_signal": ')
    assert 'waits for "demo.stopped", which cancels the saga' in text
    assert "could never be satisfied" in text


def test_an_announcement_of_an_undeclared_type_is_refused_when_built() -> None:
    definition = build(completes_with=Stopped)
    now = datetime(2030, 1, 1, tzinfo=UTC)
    start = EventReceived(Envelope("m-1", "demo.began", "tests", now), Began(key="k"))
    running = decide(definition, None, start, now).instance

    with pytest.raises(TypeError, match='saga "demo_saga" declares it announces Stopped'):
        decide(definition, running, StepFinished("first", "action", 1), now)


def test_definition_error_is_a_value_error_that_names_where() -> None:
    error = DefinitionError("demo_saga", "broken", step="first")

    assert isinstance(error, ValueError)
    assert str(error) == 'saga "demo_saga", step "first": broken'
    assert str(DefinitionError("demo_saga", "broken")) == 'saga "demo_saga": broken'


# --- the flagship definition ------------------------------------------------------------------


def test_order_fulfilment_builds_with_its_steps_in_business_order() -> None:
    assert order_fulfilment.name == "order_fulfilment"
    assert [s.name for s in order_fulfilment.steps] == [
        "reserve_stock",
        "authorise_payment",
        "book_shipment",
        "await_dispatch",
        "capture_payment",
    ]
    assert order_fulfilment.pivot_index() == 4
    assert order_fulfilment.step("capture_payment").compensation is None


def test_order_fulfilment_ports_in_first_use_order() -> None:
    assert order_fulfilment.ports() == ("inventory", "payments", "shipping")


def test_order_fulfilment_consumes_order_placed_first() -> None:
    events = order_fulfilment.consumed_events()

    assert events[0] is OrderPlaced
    assert set(events) == {OrderPlaced, OrderCancellationRequested, ShipmentDispatched}
    assert len(events) == 3


def test_order_fulfilment_announces_fulfilled_or_cancelled() -> None:
    assert order_fulfilment.published_events() == (OrderFulfilled, OrderCancelled)


def test_order_fulfilment_resolves_event_types_and_correlation_keys() -> None:
    assert order_fulfilment.event_type("shipment.dispatched") is ShipmentDispatched
    assert order_fulfilment.event_type("order.placed") is OrderPlaced
    assert order_fulfilment.event_type("order.fulfilled") is None
    assert (
        order_fulfilment.correlation_key(ShipmentDispatched(order_id="o-1", shipment_id="s-9"))
        == "o-1"
    )
    assert order_fulfilment.correlation_key(OrderCancellationRequested(order_id="o-2")) == "o-2"
