"""The message contract of the sagas a worker runs: what it consumes, what it publishes, from whom.

The AsyncAPI document, the JSON Schema of each message and `sagaworks
publish` all read the contract from here, built from the saga definitions and
their message classes, so none of them keeps a list that could drift from
the code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from sagaworks.application.boundary import allow_list
from sagaworks.application.circuit import BreakerClosed, BreakerHalfOpen, BreakerOpened
from sagaworks.domain.decide import RunStep, SagaNeedsAttention
from sagaworks.domain.definition import SagaDefinition
from sagaworks.domain.messages import Message

__all__ = [
    "JSON_SCHEMA_DIALECT",
    "REJECTION_REASONS",
    "ContractMessage",
    "Direction",
    "contract_messages",
    "message_schema",
]

Direction = Literal["consumed", "published", "internal"]
"""`consumed`: other services publish it, sagaworks takes it; `published`: sagaworks sends it
for others; `internal`: sagaworks sends it to itself (step commands)."""

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

REJECTION_REASONS: Mapping[str, str] = {
    "oversized": "the body is larger than SAGAWORKS_MAX_MESSAGE_BYTES; send less",
    "missing_id": "neither a message_id property nor a CloudEvents id attribute; give every "
    "message an id",
    "unknown_type": "the queue received a type it does not consume; fix the type",
    "type_mismatch": "the type did not come on its own exchange and routing key; publish it "
    "to its domain's exchange with its routing key",
    "unauthorised_publisher": "no user_id, or a broker user not allowed to publish the type; "
    "set user_id, or allow the user (SAGAWORKS_PUBLISHERS)",
    "malformed_json": "the body is not UTF-8 JSON; fix the publisher",
    "schema_invalid": "the body does not match the message's JSON Schema; fix the publisher",
    "id_conflict": "an id already processed came again with another body; give every distinct "
    "message its own id",
    "no_saga": "kept for SAGAWORKS_PARK_FOR_S, its saga never started; see docs/dead-letters.md",
    "unexpected_event": "kept for SAGAWORKS_PARK_FOR_S for a saga that no longer exists; see "
    "docs/dead-letters.md",
    "saga_ended": "kept while its saga lived; the saga ended without taking it; see "
    "docs/dead-letters.md",
    "unknown_saga": "a step command names a saga this worker does not run",
    "delivery_limit": "handling failed SAGAWORKS_DELIVERY_LIMIT times; the broker dead-lettered "
    "it (see the letter's exception)",
}
"""Why a message ends in the dead-letter store instead of being applied, in the order the
checks run (size, id, type, exchange and routing key, publisher, body), then the later ones."""


@dataclass(frozen=True, slots=True)
class ContractMessage:
    """One message type of the contract: where it travels and who sends it.

    `routing_key` may hold `{name}` parameters (`breaker.open.{port}`), whose
    possible values are `parameters[name]`. `publishers` are the broker users
    allowed to publish a consumed type (empty: any user that names itself).
    """

    model: type[Message]
    direction: Direction
    routing_key: str
    sagas: tuple[str, ...]
    publishers: tuple[str, ...] = ()
    parameters: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def message_type(self) -> str:
        return self.model.message_type

    @property
    def domain(self) -> str:
        return self.model.domain

    @property
    def schema_mode(self) -> Literal["validation", "serialization"]:
        """How its body is described: as sagaworks validates it (consumed) or sends it."""
        return "validation" if self.direction == "consumed" else "serialization"

    @property
    def summary(self) -> str:
        """The first line of the message class's docstring, if it has its own."""
        doc = self.model.__dict__.get("__doc__") or ""
        return doc.strip().splitlines()[0] if doc.strip() else ""


def contract_messages(
    definitions: Iterable[SagaDefinition[Any]], publishers: Mapping[str, Sequence[str]]
) -> tuple[ContractMessage, ...]:
    """Every message of the sagas' contract, consumed first, then published, then internal.

    `publishers` are the settings' overrides (`SAGAWORKS_PUBLISHERS`) of what the
    message classes declare.
    """
    sagas = tuple(definitions)
    names = tuple(d.name for d in sagas)
    ports = tuple(dict.fromkeys(p for d in sagas for p in d.ports()))
    allowed = allow_list(sagas, publishers)
    consumed: dict[str, ContractMessage] = {}
    published: dict[str, ContractMessage] = {}
    for definition in sagas:
        for event in definition.consumed_events():
            _add(consumed, event, "consumed", definition.name, allowed.get(event.message_type))
        for event in definition.published_events():
            _add(published, event, "published", definition.name, None)
    engine = (
        ContractMessage(
            SagaNeedsAttention,
            "published",
            "saga.needs_attention.{saga}",
            names,
            parameters={"saga": names},
        ),
        *(
            ContractMessage(
                event, "published", f"breaker.{state}.{{port}}", names, parameters={"port": ports}
            )
            for event, state in (
                (BreakerOpened, "open"),
                (BreakerHalfOpen, "half_open"),
                (BreakerClosed, "closed"),
            )
        ),
        ContractMessage(
            RunStep,
            "internal",
            "port.{port}.{saga}",
            names,
            parameters={"port": ports, "saga": names},
        ),
    )
    return (*consumed.values(), *published.values(), *engine)


def _add(
    into: dict[str, ContractMessage],
    event: type[Message],
    direction: Direction,
    saga: str,
    users: frozenset[str] | None,
) -> None:
    known = into.get(event.message_type)
    if known is not None and known.model is not event:
        raise ValueError(
            f'two message classes have type "{event.message_type}": {known.model.__name__} and '
            f"{event.__name__}; give each type one class"
        )
    sagas = (*known.sagas, saga) if known is not None else (saga,)
    into[event.message_type] = ContractMessage(
        event, direction, event.routing_key, sagas, tuple(sorted(users or ()))
    )


def message_schema(message: ContractMessage) -> dict[str, Any]:
    """The JSON Schema (2020-12) of one message's body, standalone, for any language.

    Consumed messages are described as sagaworks validates them, published
    ones as it serialises them.
    """
    model: type[BaseModel] = message.model
    body = model.model_json_schema(mode=message.schema_mode)
    body.setdefault("description", f"The body of `{message.message_type}` messages.")
    return {"$schema": JSON_SCHEMA_DIALECT, "$id": f"{message.message_type}.json", **body}
