"""Generated deliveries for the boundary fuzz test, and what the contract says becomes of each.

(Not a test module.) `deliveries()` is a hypothesis strategy for one
delivery a buggy or hostile publisher could send to a worker's saga queue or
port queues: any CloudEvents property missing, empty, valid or garbage (NULs,
bytes that are not UTF-8); any header, of any AMQP type, the CloudEvents and
broker ones included; any body (random bytes, JSON of any shape, nesting far
past the parser's depth, bodies past the size limit, valid bodies of the
wrong type or sent to the wrong exchange); any publisher (ours, none, a
stranger). `drawn()` draws many of them from one seed.

`expected_reason()` is the oracle: it follows docs/messages.md's check order
(size, id, type, exchange and routing key, publisher, body) from what was
generated, and says which reason the dead letter must carry, or None when the
delivery is valid and must be processed. It reads JSON with the standard
library, not with the worker's parser, so the two check each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydantic import ValidationError

from sagas.order_fulfilment import order_fulfilment
from sagaworks import Message
from sagaworks.domain.decide import RunStep

__all__ = [
    "CONSUMED",
    "ID_HEADERS",
    "PARSER_DEPTH",
    "Body",
    "Delivery",
    "Target",
    "deliveries",
    "describe",
    "drawn",
    "expected_reason",
    "is_json",
]

CONSUMED: dict[str, type[Message]] = {e.message_type: e for e in order_fulfilment.consumed_events()}
"""The event types the saga queue takes, by type."""

PARSER_DEPTH = 200
"""About how deep pydantic's JSON parser nests (201 levels pass, 202 do not); generated
bodies stay well clear of it on either side, so the oracle need not know it exactly."""

ID_HEADERS = ("cloudEvents_id", "cloudEvents:id")
"""Where the id is read from before the `message_id` property."""

ORDER = "@order"
"""Stands for the delivery's own order id (`jk-<seq>`) in a generated body."""

_UNDECODABLE = [chr(0xDC80 + i) for i in range(128)]
"""Lone surrogates: on the wire (surrogateescape) each is one byte 0x80..0xff, not UTF-8."""

_SPECIAL_HEADERS = [
    "cloudEvents_id",
    "cloudEvents:id",
    "cloudEvents_type",
    "cloudEvents:type",
    "cloudEvents_time",
    "cloudEvents_source",
    "cloudEvents_correlationid",
    "cloudEvents_causationid",
    "cloudEvents_specversion",
    "x-delivery-count",
    "x-death",
    "x-first-death-reason",
    "x-first-death-queue",
    "x-first-death-exchange",
]
"""Headers sagaworks reads (RabbitMQ's CC and BCC are left out: they route copies)."""


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: an exchange of the saga's domains, the saga queue directly, a port."""

    kind: Literal["event", "direct", "port"]
    domain: str = ""
    routing_key: str = ""
    port: int = 0
    """Which of the port queues' bindings (modulo their number), for `port`."""


@dataclass(frozen=True)
class Body:
    """A body, built when it is published (huge ones are not kept while the others wait)."""

    kind: Literal["raw", "repeat", "nested", "json"]
    raw: bytes = b""
    size: int = 0
    value: Any = None

    def build(self, seq: int) -> bytes:
        if self.kind == "raw":
            return self.raw
        if self.kind == "repeat":
            unit = self.raw or b"x"
            return (unit * (self.size // len(unit) + 1))[: self.size]
        if self.kind == "nested":
            opener, closer = (b"[", b"]") if self.raw == b"[" else (b'{"a":', b"}")
            return opener * self.size + b"1" + closer * self.size
        text = json.dumps(self.value)
        return text.replace(json.dumps(ORDER), json.dumps(f"jk-{seq}")).encode()


@dataclass(frozen=True)
class Delivery:
    target: Target
    body: Body
    message_id: str | None
    """None: no property; "": empty; otherwise made unique as `fz-<seq>-<this>`."""
    message_type: str | None
    user: Literal["own", "none", "stranger"]
    headers: dict[str, Any] = field(default_factory=dict)
    app_id: str | None = None
    correlation_id: str | None = None
    timestamp: datetime | None = None

    def wire_id(self, seq: int) -> str | None:
        if not self.message_id:
            return self.message_id
        return f"fz-{seq}-{self.message_id}"

    def wire_headers(self, seq: int) -> dict[str, Any]:
        """The headers as published: an id header made unique, `x-fz-seq` to find it again.

        Two deliveries with one id are one message to the worker (deduplicated,
        or one dead letter failed twice), so a present id header gets the
        sequence number in front, in a value of its own kind where there is one.
        """
        headers = {**self.headers, "x-fz-seq": seq}
        for name in ID_HEADERS:
            if name in headers and _present(headers[name]):
                headers[name] = _unique(headers[name], seq)
        return headers


def _unique(value: Any, seq: int) -> Any:
    tag = f"fz-{seq}-"
    if isinstance(value, str):
        return tag + value
    if isinstance(value, bytearray):
        return bytearray(tag.encode()) + value
    if isinstance(value, list):
        return [tag, *value]
    if isinstance(value, dict):
        return {tag: True, **value}
    return [tag, value]


# -- strategies ----------------------------------------------------------------------------------

_chars = st.one_of(
    st.characters(codec="utf-8"),
    st.just("\x00"),
    st.sampled_from(_UNDECODABLE),
)
_junk_text = st.text(_chars, max_size=24)
"""Short strings for AMQP short-string fields (at most 255 bytes on the wire)."""

_valid_types = st.sampled_from([*CONSUMED, RunStep.message_type])

_header_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.decimals(min_value=-(10**6), max_value=10**6, places=2, allow_nan=False),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1)),
    st.text(_chars, max_size=60),
    st.binary(max_size=40).map(bytearray),
    _valid_types,
    st.sampled_from([b"order.placed", b""]).map(bytearray),
    st.just(""),
)
_names = st.text(st.one_of(st.characters(codec="utf-8"), st.just("\x00")), max_size=24)
"""Header and table key names: pamqp encodes them as strict UTF-8, so only NULs are odd here."""
# No floats: pamqp sends them as 32-bit ("f"), which RabbitMQ cannot read; it closes the
# publisher's connection, so such a header never reaches a worker.
_header_values = st.recursive(
    _header_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(_names, inner, max_size=4)
    ),
    max_leaves=8,
)
_header_names = st.one_of(
    st.sampled_from(_SPECIAL_HEADERS),
    _names.map(lambda name: f"x-fz-h-{name}"),
)


def _valid_value(message_type: str) -> dict[str, Any]:
    """A body of `message_type` that its schema accepts."""
    if message_type == "order.placed":
        return {
            "order_id": ORDER,
            "customer_id": "c-1",
            "lines": [{"sku": "sku-1", "quantity": 2}],
            "amount_cents": 1250,
            "currency": "EUR",
            "dispatch_by": "2100-01-01T00:00:00+00:00",
        }
    if message_type == "shipment.dispatched":
        return {"order_id": ORDER, "shipment_id": "shp-1"}
    return {"order_id": ORDER}


_json_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
_json_values = st.recursive(
    _json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)


@st.composite
def _schema_bodies(draw: st.DrawFn) -> Body:
    """A valid body of some type, changed or not: a field dropped, of a wrong type, or added."""
    value = _valid_value(draw(st.sampled_from(list(CONSUMED))))
    change = draw(st.sampled_from(["none", "drop", "retype", "add"]))
    name = draw(st.sampled_from(sorted(value)))
    if change == "drop":
        del value[name]
    elif change == "retype":
        value[name] = draw(_json_values)
    elif change == "add":
        value[draw(st.text(max_size=10))] = draw(_json_values)
    return Body("json", value=value)


@st.composite
def _step_bodies(draw: st.DrawFn) -> Body:
    """Shaped like a step command: of a saga this worker runs or not, of a saga that is none."""
    return Body(
        "json",
        value={
            "saga_type": draw(st.sampled_from([order_fulfilment.name, "no-such-saga"])),
            "saga_id": str(draw(st.uuids())),
            "step": draw(st.sampled_from(["reserve_stock", "capture", "nope"])),
            "kind": draw(st.sampled_from(["action", "compensation", "other"])),
            "attempt": draw(st.integers(-1, 5)),
            "port": draw(st.sampled_from(["inventory", "payments", "x"])),
        },
    )


def _bodies(max_bytes: int) -> st.SearchStrategy[Body]:
    return st.one_of(
        st.binary(max_size=300).map(lambda raw: Body("raw", raw=raw)),
        st.text(_chars, max_size=100).map(
            lambda text: Body("raw", raw=text.encode("utf-8", "surrogateescape"))
        ),
        _json_values.map(lambda value: Body("json", value=value)),
        st.builds(
            lambda opener, depth: Body("nested", raw=opener, size=depth),
            st.sampled_from([b"[", b"{"]),
            st.one_of(st.integers(1, PARSER_DEPTH // 2), st.integers(PARSER_DEPTH + 100, 20_000)),
        ),
        st.builds(
            lambda unit, size: Body("repeat", raw=unit, size=size),
            st.sampled_from([b"x", b'["a",', b"\x00\xff", b'{"order_id": "']),
            st.one_of(
                st.integers(max_bytes - 1024, max_bytes),
                st.integers(max_bytes + 1, max_bytes + 300_000),
            ),
        ),
        _schema_bodies(),
        _step_bodies(),
    )


def _targets() -> st.SearchStrategy[Target]:
    events = [Target("event", e.domain, e.routing_key) for e in CONSUMED.values()]
    return _mostly(
        st.sampled_from(events),
        st.just(Target("direct")),
        st.integers(0, 50).map(lambda port: Target("port", port=port)),
    )


def _mostly(usual: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly `usual`, sometimes one of `rare` (`one_of` would weigh them all alike)."""
    choices: list[st.SearchStrategy[Any]] = [usual] * 7 + list(rare)
    return st.sampled_from(choices).flatmap(lambda chosen: chosen)


def deliveries(max_bytes: int) -> st.SearchStrategy[Delivery]:
    """One delivery anyone who may publish to the broker could send."""
    return st.builds(
        Delivery,
        target=_targets(),
        body=_bodies(max_bytes),
        message_id=st.one_of(st.text(_chars, min_size=1, max_size=24), st.none(), st.just("")),
        message_type=st.one_of(
            _valid_types,
            _junk_text,
            _valid_types.map(lambda kind: f"{kind}\x00"),
            st.none(),
            st.just(""),
        ),
        user=_mostly(st.just("own"), st.just("none"), st.just("stranger")),
        headers=st.dictionaries(_header_names, _header_values, max_size=5),
        app_id=st.one_of(st.none(), _junk_text),
        correlation_id=st.one_of(st.none(), _junk_text),
        timestamp=st.one_of(
            st.none(),
            st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1)).map(
                lambda at: at.replace(tzinfo=UTC)
            ),
        ),
    )


def drawn(count: int, seed: int, max_bytes: int) -> list[Delivery]:
    """`count` deliveries hypothesis generates from `seed` (one example each, never shrunk)."""
    found: list[Delivery] = []

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(deliveries(max_bytes))
    def collect(delivery: Delivery) -> None:
        found.append(delivery)

    collect()
    return found[:count]


# -- the oracle ----------------------------------------------------------------------------------


def expected_reason(delivery: Delivery, body: bytes, seq: int, max_bytes: int) -> str | None:
    """The reason the contract gives this delivery, in its check order; None: processed."""
    if len(body) > max_bytes:
        return "oversized"
    if not _has_id(delivery, seq):
        return "missing_id"
    if delivery.target.kind == "port":
        if delivery.user != "own":
            return "unauthorised_publisher"
        return _step_reason(body)
    message_type = _type_of(delivery)
    event = CONSUMED.get(message_type)
    if event is None:
        return "unknown_type"
    target = delivery.target
    if target.kind == "event" and (target.domain, target.routing_key) != (
        event.domain,
        event.routing_key,
    ):
        return "type_mismatch"
    if delivery.user != "own":
        return "unauthorised_publisher"
    if not is_json(body):
        return "malformed_json"
    return None if _valid(event.model_validate_json, body) else "schema_invalid"


def _step_reason(body: bytes) -> str | None:
    try:
        command = RunStep.model_validate_json(body)
    except ValidationError:
        return "schema_invalid"
    return None if command.saga_type == order_fulfilment.name else "unknown_saga"


def _valid(validate: Callable[[bytes], object], body: bytes) -> bool:
    try:
        validate(body)
    except ValidationError:
        return False
    return True


def _has_id(delivery: Delivery, seq: int) -> bool:
    if delivery.wire_id(seq):
        return True
    return any(_present(delivery.headers.get(name)) for name in ID_HEADERS)


def _type_of(delivery: Delivery) -> str:
    """The type as the worker reads it: the first non-empty header, else the property."""
    for name in ("cloudEvents_type", "cloudEvents:type"):
        value = delivery.headers.get(name)
        if _present(value):
            return _as_text(value)
    return delivery.message_type or ""


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, str | bytearray) and len(value) == 0)


def _as_text(value: Any) -> str:
    """A header value as text, enough to tell whether it names a type (a list never does)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytearray):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return "<undecodable>"
    return f"<{type(value).__name__}>"


def is_json(body: bytes) -> bool:
    """Whether `body` is JSON (RFC 8259, UTF-8) nested no deeper than the parser takes."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return _depth_and_text_ok(value)


def _depth_and_text_ok(value: Any) -> bool:
    """No deeper than `PARSER_DEPTH`, and no lone surrogate escaped into a string."""
    pending: list[tuple[Any, int]] = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str) and any(0xD800 <= ord(c) <= 0xDFFF for c in item):
            return False
        if isinstance(item, list | dict):
            if depth + 1 > PARSER_DEPTH:
                return False
            children: list[Any] = (
                list(item) if isinstance(item, list) else [*item.keys(), *item.values()]
            )
            pending.extend((child, depth + 1) for child in children)
    return True


def describe(delivery: Delivery, body: bytes, seq: int) -> str:
    """One line for a failure message: enough to see which case it was."""
    headers: Mapping[str, Any] = delivery.headers
    return (
        f"#{seq} target={delivery.target} id={delivery.wire_id(seq)!r} "
        f"type={delivery.message_type!r} user={delivery.user} headers={dict(headers)!r:.300} "
        f"body({len(body)} bytes)={body[:120]!r}"
    )
