"""sagaworks: message-driven sagas over RabbitMQ and PostgreSQL.

The public API is what a saga author needs: messages, the definition DSL,
the failures a port raises (a business refusal, a transient outage), and the
policy a port adapter declares (timeouts, retries, breaker).
"""

from sagaworks.application.config import PortPolicy
from sagaworks.domain.definition import (
    CancelOn,
    Deadline,
    SagaDefinition,
    StartOn,
    Step,
    StepInput,
    Wait,
)
from sagaworks.domain.errors import BusinessFailure, DefinitionError, PortUnavailable
from sagaworks.domain.messages import Envelope, Message

__all__ = [
    "BusinessFailure",
    "CancelOn",
    "Deadline",
    "DefinitionError",
    "Envelope",
    "Message",
    "PortPolicy",
    "PortUnavailable",
    "SagaDefinition",
    "StartOn",
    "Step",
    "StepInput",
    "Wait",
]
