"""The engine's ports: every Protocol the use cases need, and the records they pass.

Grouped by role (messages in and out, the saga store, calls and time, dead
letters, breaker changes, operators' reads of sagas, worker heartbeats,
telemetry, the read models' rollup); import them from here. Adapters
implement them, use cases see nothing else of the outside world. Operators'
actions and plans have theirs in `operator.py`.
"""

from sagaworks.application.ports.breakers import BreakerChange, BreakerLog, BreakerState
from sagaworks.application.ports.calls import Clock, PortCaller
from sagaworks.application.ports.dead_letters import (
    AuditEntry,
    AuditRecord,
    DeadLetterFilter,
    DeadLetterRepository,
    FailureGroup,
    StoredDeadLetter,
)
from sagaworks.application.ports.messages import (
    BodyDigest,
    InboundMessage,
    OutboxRow,
    OutboxWakeUp,
    OutboxWakeUps,
    PendingMessage,
    PriorFailure,
    Publisher,
    decode_raw_fields,
    encode_raw_fields,
)
from sagaworks.application.ports.read_models import HistoryRollup, RolledUp, RollUp
from sagaworks.application.ports.retention import Prunable, Retention
from sagaworks.application.ports.saga_queries import (
    BreakerReading,
    OutboxReading,
    ParkedReading,
    SagaDetail,
    SagaLetter,
    SagaPage,
    SagaQueries,
    SagaSummary,
    StuckSaga,
    TimelineEntry,
    TimerReading,
)
from sagaworks.application.ports.store import (
    DeadLetter,
    DueTimer,
    LockedSaga,
    ParkedMessage,
    SagaChange,
    SagaClaim,
    SagaTransaction,
    Store,
    TimerFailure,
)
from sagaworks.application.ports.telemetry import (
    FinishedSaga,
    StepCall,
    StepCallRecord,
    Telemetry,
)
from sagaworks.application.ports.workers import Heartbeat, HeartbeatLog, QueueDepth

__all__ = [
    "AuditEntry",
    "AuditRecord",
    "BodyDigest",
    "BreakerChange",
    "BreakerLog",
    "BreakerReading",
    "BreakerState",
    "Clock",
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterRepository",
    "DueTimer",
    "FailureGroup",
    "FinishedSaga",
    "Heartbeat",
    "HeartbeatLog",
    "HistoryRollup",
    "InboundMessage",
    "LockedSaga",
    "OutboxReading",
    "OutboxRow",
    "OutboxWakeUp",
    "OutboxWakeUps",
    "ParkedMessage",
    "ParkedReading",
    "PendingMessage",
    "PortCaller",
    "PriorFailure",
    "Prunable",
    "Publisher",
    "QueueDepth",
    "Retention",
    "RollUp",
    "RolledUp",
    "SagaChange",
    "SagaClaim",
    "SagaDetail",
    "SagaLetter",
    "SagaPage",
    "SagaQueries",
    "SagaSummary",
    "SagaTransaction",
    "StepCall",
    "StepCallRecord",
    "Store",
    "StoredDeadLetter",
    "StuckSaga",
    "Telemetry",
    "TimelineEntry",
    "TimerFailure",
    "TimerReading",
    "decode_raw_fields",
    "encode_raw_fields",
]
