"""The worker's telemetry: what the engine and the worker report, and the stand-in when it is off.

`EngineTelemetry` is the `Telemetry` port plus what the worker needs (a span
per delivery, what became of it, breaker states, a last push at shutdown).
`NoTelemetry` stands in when no `OTEL_*` variable configures an export
(`environment.py`): nothing is recorded and the hot path pays for nothing,
while contexts already on messages pass through unchanged. `otel.py` is the
OpenTelemetry implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Protocol

from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry.trace import Span

from sagaworks.application.ports import (
    BreakerChange,
    DueTimer,
    FinishedSaga,
    InboundMessage,
    OutboxRow,
    StepCall,
    StepCallRecord,
    Telemetry,
)

__all__ = ["EngineTelemetry", "NoTelemetry", "traceparent_of"]


class EngineTelemetry(Telemetry, Protocol):
    """The `Telemetry` port, and what the worker and the system around it need besides."""

    def broker_middlewares(self) -> tuple[RabbitTelemetryMiddleware, ...]:
        """FastStream middlewares that give each delivery its span (none when off)."""
        ...

    def traced(self, inbound: InboundMessage) -> InboundMessage:
        """The delivery with the context of the span now handling it (as it was when off)."""
        ...

    def delivery_settled(
        self, queue: str, outcome: str, reason: str | None, saga: str | None
    ) -> None:
        """What became of the delivery now being handled: on its span, and rejections counted."""
        ...

    def delivery_failed(self, error: BaseException) -> None:
        """The delivery now being handled failed (it is requeued or rejected)."""
        ...

    def watch_breakers(self, ports: Iterable[str]) -> None:
        """Report `ports`' breakers (closed until `breaker_changed` says otherwise)."""
        ...

    def breaker_changed(self, change: BreakerChange) -> None: ...

    def shutdown(self) -> None:
        """Push what is left and stop; blocks up to a few seconds."""
        ...


def traceparent_of(span: Span) -> str | None:
    """The W3C `traceparent` naming `span` as the parent; None for a span that is not valid."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


class _NoRecord:
    def succeeded(self) -> None:
        return None

    def failed(self, error: str, *, business: bool, retry_scheduled: bool) -> None:
        return None


_NO_RECORD = _NoRecord()


class NoTelemetry:
    """Telemetry off: nothing is recorded, contexts already on messages pass through unchanged."""

    @contextmanager
    def step_call(self, call: StepCall) -> Iterator[StepCallRecord]:
        yield _NO_RECORD

    @contextmanager
    def timer_fired(self, timer: DueTimer, now: datetime) -> Iterator[str | None]:
        yield timer.trace_context

    def sagas_finished(self, finished: Sequence[FinishedSaga]) -> None:
        return None

    def outbox_published(self, rows: Sequence[OutboxRow], *, swept: bool) -> None:
        return None

    def broker_middlewares(self) -> tuple[RabbitTelemetryMiddleware, ...]:
        return ()

    def traced(self, inbound: InboundMessage) -> InboundMessage:
        return inbound

    def delivery_settled(
        self, queue: str, outcome: str, reason: str | None, saga: str | None
    ) -> None:
        return None

    def delivery_failed(self, error: BaseException) -> None:
        return None

    def watch_breakers(self, ports: Iterable[str]) -> None:
        return None

    def breaker_changed(self, change: BreakerChange) -> None:
        return None

    def shutdown(self) -> None:
        return None
