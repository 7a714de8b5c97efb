"""The outbox form of outgoing messages: the envelope in neutral form, the body as JSON.

An outbox row's `headers` hold the envelope under CloudEvents attribute names
(`id`, `type`, `source`, `time`, `datacontenttype`, `correlationid`,
`causationid`), which say nothing of a transport; the publisher maps them
onto its own (AMQP properties and headers, for RabbitMQ). A stored message
sent again as it came (a dead letter's replay) has `id`, `type` and its own
`headers` instead, which the publisher sends on, less what its broker wrote.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from sagaworks.application.ports import PendingMessage, SagaChange
from sagaworks.domain.decide import Decision, Outgoing
from sagaworks.domain.definition import SagaDefinition

__all__ = ["Wire", "resend_envelope"]

CONTENT_TYPE = "application/json"


class Wire:
    """Encodes decisions' outgoing messages for the outbox; `exchange_for` maps a domain."""

    def __init__(self, exchange_for: Callable[[str], str]) -> None:
        self._exchange_for = exchange_for

    def change(
        self,
        definition: SagaDefinition[Any],
        decision: Decision,
        trace_context: str | None = None,
    ) -> SagaChange:
        """An applied decision with its outgoing messages encoded, as a store takes it.

        `trace_context` (a W3C `traceparent`) goes with every outgoing message and timer.
        """
        outbox = tuple(self.encode(o, trace_context) for o in decision.outgoing)
        return SagaChange(definition, decision, outbox, trace_context)

    def encode(self, outgoing: Outgoing, trace_context: str | None = None) -> PendingMessage:
        env = outgoing.envelope
        return PendingMessage(
            message_id=env.id,
            exchange=self._exchange_for(outgoing.domain),
            routing_key=outgoing.routing_key,
            headers={
                "id": env.id,
                "type": env.type,
                "source": env.source,
                "time": env.time.isoformat(),
                "datacontenttype": CONTENT_TYPE,
                "correlationid": env.correlation_id,
                "causationid": env.causation_id,
            },
            body=outgoing.body.model_dump_json().encode(),
            trace_context=trace_context,
        )


def resend_envelope(
    message_id: str, message_type: str | None, headers: Mapping[str, Any]
) -> dict[str, Any]:
    """The outbox envelope of a stored message sent again with the headers it came with."""
    return {"id": message_id, "type": message_type, "headers": dict(headers)}
