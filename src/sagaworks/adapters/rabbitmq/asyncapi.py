"""The contract as an AsyncAPI 3.0 document: what travels on the broker, as sagaworks sees it.

Operations are sagaworks' own: `receive` for what it consumes, `send` for
what it publishes. Each message type has one channel: its exchange (in the
AMQP channel binding) and its routing key (the address, with `{parameters}`
where the key names a saga or a port). Each message says what the broker
carries besides the body: the CloudEvents headers, the AMQP message type,
persistent delivery, and, for consumed messages, who may publish them and
which queue takes them. The dead-letter reasons are the `DeadLetterReason`
schema.

FastStream generates AsyncAPI 3.0 too, from a broker's subscribers; it
describes a subscriber by its queue only (not the exchange and routing key a
publisher needs) and has no place for the headers, so the document is built
here from the contract, with the same pydantic JSON Schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic.json_schema import models_json_schema

from sagaworks.adapters.rabbitmq.cloudevents import (
    CE_PREFIX,
    SPEC_VERSION,
    STRUCTURED_CONTENT_TYPE,
)
from sagaworks.adapters.rabbitmq.topology import (
    TopologySpec,
    exchange_name,
    queue_arguments,
    saga_queue_name,
)
from sagaworks.application.contract import REJECTION_REASONS, ContractMessage

__all__ = ["ASYNCAPI_VERSION", "asyncapi_document"]

ASYNCAPI_VERSION = "3.0.0"
_AMQP_BINDING = "0.3.0"
_PERSISTENT = 2
_REF = "#/components/schemas/{model}"
_ACTIONS = {"consumed": ("receive",), "published": ("send",), "internal": ("send", "receive")}
"""sagaworks' own operations on each kind of message: step commands it sends and takes."""

_DESCRIPTION = """\
The messages sagaworks consumes and publishes on RabbitMQ, generated from the saga \
definitions and their message classes (`sagaworks contract asyncapi`).

- Every exchange is a durable topic exchange; a name here carries the deployment's \
`SAGAWORKS_EXCHANGE_PREFIX` in front.
- Bodies are UTF-8 JSON (`content_type: application/json`).
- Publish persistent (delivery mode 2) with publisher confirms, and `mandatory` so \
an unroutable message comes back.
- Set the AMQP `user_id` to your broker user: a consumed type is accepted only from \
its allowed publishers (`x-sagaworks-allowed-publishers`).
- Every message carries the CloudEvents 1.0 attributes. Inbound, sagaworks reads \
them from `cloudEvents_*` headers (the AMQP binding), `ce-*` headers (the RabbitMQ \
binding), or a structured-mode body (`content_type: application/cloudevents+json`), \
and else from the AMQP properties `message_id`, `type`, `app_id`, `timestamp`, \
`correlation_id`; what it publishes carries both the headers and the properties.
- A message sagaworks cannot take is stored in its dead-letter store with a reason \
(`DeadLetterReason`) and acknowledged; see docs/messages.md and docs/dead-letters.md.
"""


def asyncapi_document(
    messages: Sequence[ContractMessage], topology: TopologySpec, *, prefix: str, version: str
) -> dict[str, Any]:
    """The AsyncAPI 3.0 document of `messages`, their exchanges named with `prefix`."""
    payloads, definitions = models_json_schema(
        [
            (m.model, "validation" if m.direction == "consumed" else "serialization")
            for m in messages
        ],
        ref_template=_REF,
    )
    schemas: dict[str, Any] = dict(definitions.get("$defs", {}))
    schemas["CloudEventsHeaders"] = _headers_schema()
    schemas["DeadLetterReason"] = {
        "type": "string",
        "description": "Why sagaworks stored a message in its dead-letter store instead of "
        "applying it; the message is acknowledged and kept with the reason "
        "(`sagaworks dlq list`).",
        "oneOf": [{"const": name, "description": text} for name, text in REJECTION_REASONS.items()],
    }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for message in messages:
        key = message.message_type
        components[key] = _message(message, payloads[(message.model, message.schema_mode)])
        channels[key] = _channel(message, prefix)
        for action in _ACTIONS[message.direction]:
            operations[f"{action}.{key}"] = _operation(message, action, prefix, topology)
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "sagaworks message contract",
            "version": version,
            "description": _DESCRIPTION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "rabbitmq": {
                "host": "{host}:{port}",
                "protocol": "amqp",
                "protocolVersion": "0.9.1",
                "description": "The deployment's RabbitMQ (`SAGAWORKS_AMQP_URL`); TLS on 5671.",
                "variables": {
                    "host": {"default": "localhost"},
                    "port": {"default": "5672", "enum": ["5672", "5671"]},
                },
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": components},
    }


def _headers_schema() -> dict[str, Any]:
    text = {"type": "string", "minLength": 1}
    return {
        "type": "object",
        "description": "The CloudEvents 1.0 attributes as AMQP binding headers. Inbound, "
        "the same attributes are accepted as `ce-*` headers (the RabbitMQ binding) or in a "
        f"structured-mode body (`content_type: {STRUCTURED_CONTENT_TYPE}`), and `id`, "
        "`type`, `source`, `time`, `correlationid` from the AMQP properties `message_id`, "
        "`type`, `app_id`, `timestamp`, `correlation_id`; a header wins over a property. "
        "`traceparent` and `tracestate` carry the W3C trace context.",
        "properties": {
            f"{CE_PREFIX}specversion": {"type": "string", "const": SPEC_VERSION},
            f"{CE_PREFIX}id": {
                **text,
                "description": "Unique per message and kept on every re-send: the "
                "deduplication key. Also the AMQP `message_id`.",
            },
            f"{CE_PREFIX}type": {**text, "description": "The message type; also the AMQP `type`."},
            f"{CE_PREFIX}source": {**text, "description": "Who published it."},
            f"{CE_PREFIX}time": {
                "description": "When it happened: RFC 3339, or epoch milliseconds inbound.",
                "oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}],
            },
            f"{CE_PREFIX}datacontenttype": {"type": "string", "const": "application/json"},
            f"{CE_PREFIX}correlationid": {
                **text,
                "description": "Ties the messages of one business transaction together.",
            },
            f"{CE_PREFIX}causationid": {
                **text,
                "description": "The id of the message that caused this one.",
            },
            "traceparent": {"type": "string", "description": "W3C trace context."},
            "tracestate": {"type": "string", "description": "W3C trace context."},
        },
    }


def _message(message: ContractMessage, payload: dict[str, Any]) -> dict[str, Any]:
    sent_by_sagaworks = message.direction != "consumed"
    required = [f"{CE_PREFIX}{a}" for a in ("specversion", "id", "type", "source", "time")]
    headers = {
        "allOf": [
            {"$ref": _REF.format(model="CloudEventsHeaders")},
            {
                "type": "object",
                "properties": {f"{CE_PREFIX}type": {"const": message.message_type}},
                **({"required": required} if sent_by_sagaworks else {}),
            },
        ]
    }
    described: dict[str, Any] = {
        "name": message.message_type,
        "title": message.model.__name__,
        "contentType": "application/json",
        "headers": headers,
        "payload": payload,
        "correlationId": {"location": f"$message.header#/{CE_PREFIX}correlationid"},
        "bindings": {
            "amqp": {"messageType": message.message_type, "bindingVersion": _AMQP_BINDING}
        },
    }
    if message.summary:
        described["summary"] = message.summary
    return described


def _channel(message: ContractMessage, prefix: str) -> dict[str, Any]:
    exchange = exchange_name(prefix, message.domain)
    channel: dict[str, Any] = {
        "address": message.routing_key,
        "title": f"{exchange} {message.routing_key}",
        "description": f"Exchange `{exchange}`, routing key `{message.routing_key}`.",
        "messages": {
            message.message_type: {"$ref": f"#/components/messages/{message.message_type}"}
        },
        "bindings": {
            "amqp": {
                "is": "routingKey",
                "exchange": {
                    "name": exchange,
                    "type": "topic",
                    "durable": True,
                    "autoDelete": False,
                },
                "bindingVersion": _AMQP_BINDING,
            }
        },
    }
    if message.parameters:
        channel["parameters"] = {
            name: {"enum": list(values), "description": f"The {name} it concerns."}
            for name, values in message.parameters.items()
        }
    return channel


def _operation(
    message: ContractMessage, action: str, prefix: str, topology: TopologySpec
) -> dict[str, Any]:
    key = message.message_type
    operation: dict[str, Any] = {
        "action": action,
        "channel": {"$ref": f"#/channels/{key}"},
        "messages": [{"$ref": f"#/channels/{key}/messages/{key}"}],
        "title": f"{action} {key}",
    }
    amqp: dict[str, Any] = {"deliveryMode": _PERSISTENT, "bindingVersion": _AMQP_BINDING}
    sagas = ", ".join(message.sagas)
    if message.direction == "consumed":
        queues = [saga_queue_name(prefix, saga) for saga in message.sagas]
        who = ", ".join(message.publishers) or "any broker user that sets it (none declared)"
        operation["description"] = (
            f"Consumed by saga(s) {sagas} from queue(s) {', '.join(queues)}. Publish it "
            f"persistent, with `user_id` one of: {who}. A message that fails the checks is "
            "dead-lettered with a `DeadLetterReason`."
        )
        operation["x-sagaworks-allowed-publishers"] = list(message.publishers)
        operation["x-sagaworks-queues"] = [
            {"name": queue, "arguments": queue_arguments(topology)} for queue in queues
        ]
        amqp["ack"] = True
    elif message.direction == "internal":
        operation["description"] = (
            f"A step command sagaworks sends itself for saga(s) {sagas}, mandatory; it "
            "consumes it from the port's queue (`sagaworks.port.{port}`), and takes it only "
            "from its own broker user."
        )
        if action == "send":
            amqp["mandatory"] = True
        else:
            amqp["ack"] = True
    else:
        operation["description"] = f"Published by sagaworks for saga(s) {sagas}."
        amqp["mandatory"] = False
    operation["bindings"] = {"amqp": amqp}
    return operation
