"""OpenTelemetry traces and metrics through the SDK, exported by the processors it is given.

One saga is one trace: a delivery's span (FastStream's middleware) continues
the `traceparent` it came with, and the engine carries the context on from
there in outbox rows, timers and the saga row itself (see
`application/tracing.py`). The providers are this system's own, not the
process-wide globals, so several systems in one process do not mix.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from faststream.rabbit.opentelemetry import RabbitTelemetryMiddleware
from opentelemetry import trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from sagaworks.adapters.observability.telemetry import traceparent_of
from sagaworks.application.ports import (
    BreakerChange,
    DueTimer,
    FinishedSaga,
    InboundMessage,
    OutboxRow,
    StepCall,
    StepCallRecord,
)

__all__ = ["OpenTelemetry"]

_BREAKER_LEVELS = {"closed": 0, "half_open": 1, "open": 2}
_PROPAGATOR = TraceContextTextMapPropagator()
_SHUTDOWN_BUDGET_MS = 5_000
"""How long closing the system waits for the last spans and metrics to be pushed."""


class _StepCallRecord:
    """Records a port call's outcome on its span and in the call metrics."""

    def __init__(self, owner: OpenTelemetry, call: StepCall, span: Span) -> None:
        self._owner = owner
        self._call = call
        self._span = span
        self.outcome = "error"

    def succeeded(self) -> None:
        self.outcome = "succeeded"

    def failed(self, error: str, *, business: bool, retry_scheduled: bool) -> None:
        self.outcome = "business_failure" if business else "transient_failure"
        self._span.set_status(Status(StatusCode.ERROR, error))
        self._span.add_event("step failed", {"sagaworks.error": error})
        self._span.set_attribute("sagaworks.retry_scheduled", retry_scheduled)
        call = self._call
        labels = {"port": call.port, "step": call.step, "kind": call.kind}
        self._owner.port_failures.add(
            1, {**labels, "failure": "business" if business else "transient"}
        )
        if retry_scheduled:
            self._owner.retries.add(1, labels)


class OpenTelemetry:
    """Spans and metrics through the OpenTelemetry SDK, exported by the processors given."""

    def __init__(
        self,
        resource: Resource,
        span_processors: Sequence[SpanProcessor],
        metric_readers: Sequence[MetricReader],
    ) -> None:
        self.tracer_provider = TracerProvider(resource=resource)
        for processor in span_processors:
            self.tracer_provider.add_span_processor(processor)
        self.meter_provider = MeterProvider(resource=resource, metric_readers=list(metric_readers))
        self._tracer = self.tracer_provider.get_tracer("sagaworks")
        meter = self.meter_provider.get_meter("sagaworks")
        self._breakers: dict[str, int] = {}
        self.port_latency = meter.create_histogram(
            "sagaworks.port.call.duration",
            "s",
            "Each step's port call (its count: the steps run) and its latency, retries included",
        )
        self.port_failures = meter.create_counter(
            "sagaworks.port.call.failures",
            "{call}",
            "Port calls that failed: business or transient",
        )
        self.retries = meter.create_counter(
            "sagaworks.step.retries",
            "{retry}",
            "Delayed retries scheduled after transient failures",
        )
        self.finished = meter.create_counter(
            "sagaworks.sagas.finished", "{saga}", "Sagas that ended, by status"
        )
        self.saga_duration = meter.create_histogram(
            "sagaworks.saga.duration", "s", "From a saga's start to its end, by status"
        )
        self.timer_lag = meter.create_histogram(
            "sagaworks.timer.lag", "s", "How late timers fired after they were due"
        )
        self.outbox_lag = meter.create_histogram(
            "sagaworks.outbox.lag", "s", "From an outbox row's commit to the broker's confirm"
        )
        self.rejected = meter.create_counter(
            "sagaworks.deliveries.rejected", "{delivery}", "Deliveries dead-lettered, by reason"
        )
        meter.create_observable_gauge(
            "sagaworks.breaker.state",
            [self._observe_breakers],
            "1",
            "Each port's circuit breaker in this worker: 0 closed, 1 half-open, 2 open",
        )

    # -- the Telemetry port -------------------------------------------------------------------

    @contextmanager
    def step_call(self, call: StepCall) -> Iterator[StepCallRecord]:
        verb = "compensate" if call.kind == "compensation" else "call"
        started = datetime.now(UTC)
        with self._tracer.start_as_current_span(
            f"{verb} {call.port}.{call.step}",
            context=_context_of(call.trace_context),
            kind=SpanKind.CLIENT,
            attributes={
                "sagaworks.saga.type": call.saga_type,
                "sagaworks.saga.id": str(call.saga_id),
                "sagaworks.step": call.step,
                "sagaworks.step.kind": call.kind,
                "sagaworks.port": call.port,
                "sagaworks.attempt": call.attempt,
            },
        ) as span:
            record = _StepCallRecord(self, call, span)
            try:
                yield record
            finally:
                span.set_attribute("sagaworks.outcome", record.outcome)
                seconds = (datetime.now(UTC) - started).total_seconds()
                labels = {
                    "saga_type": call.saga_type,
                    "port": call.port,
                    "step": call.step,
                    "kind": call.kind,
                    "outcome": record.outcome,
                }
                self.port_latency.record(seconds, labels)

    @contextmanager
    def timer_fired(self, timer: DueTimer, now: datetime) -> Iterator[str | None]:
        if timer.fire_at is not None:
            lag = max((now - timer.fire_at).total_seconds(), 0.0)
            self.timer_lag.record(lag, {"saga_type": timer.saga_type, "timer": timer.name})
        with self._tracer.start_as_current_span(
            f"timer {timer.name}",
            context=_context_of(timer.trace_context),
            kind=SpanKind.INTERNAL,
            attributes={
                "sagaworks.saga.type": timer.saga_type,
                "sagaworks.saga.id": str(timer.saga_id),
                "sagaworks.timer": timer.name,
                "sagaworks.attempt": timer.attempts + 1,
            },
        ) as span:
            yield traceparent_of(span)

    def sagas_finished(self, finished: Sequence[FinishedSaga]) -> None:
        for end in finished:
            labels = {"saga_type": end.saga_type, "status": end.status}
            self.finished.add(1, labels)
            if end.duration_s is not None:
                self.saga_duration.record(end.duration_s, labels)

    def outbox_published(self, rows: Sequence[OutboxRow], *, swept: bool) -> None:
        now = datetime.now(UTC)
        labels = {"path": "swept" if swept else "published"}
        for row in rows:
            if row.created_at is not None:
                self.outbox_lag.record(max((now - row.created_at).total_seconds(), 0.0), labels)

    # -- the worker ---------------------------------------------------------------------------

    def broker_middlewares(self) -> tuple[RabbitTelemetryMiddleware, ...]:
        return (
            RabbitTelemetryMiddleware(
                tracer_provider=self.tracer_provider, meter_provider=self.meter_provider
            ),
        )

    def traced(self, inbound: InboundMessage) -> InboundMessage:
        current = traceparent_of(trace.get_current_span())
        if current is None or current == inbound.trace_context:
            return inbound
        return replace(inbound, trace_context=current)

    def delivery_settled(
        self, queue: str, outcome: str, reason: str | None, saga: str | None
    ) -> None:
        span = trace.get_current_span()
        span.set_attribute("sagaworks.outcome", outcome)
        if saga is not None:
            span.set_attribute("sagaworks.saga.id", saga)
        if reason is not None:
            span.set_attribute("sagaworks.reason", reason)
        if outcome == "dead_lettered":
            span.set_status(Status(StatusCode.ERROR, f"dead-lettered: {reason}"))
            self.rejected.add(1, {"queue": queue, "reason": reason or "unknown"})

    def delivery_failed(self, error: BaseException) -> None:
        span = trace.get_current_span()
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))

    def watch_breakers(self, ports: Iterable[str]) -> None:
        for port in ports:
            self._breakers.setdefault(port, 0)

    def breaker_changed(self, change: BreakerChange) -> None:
        self._breakers[change.port] = _BREAKER_LEVELS[change.state]

    def _observe_breakers(self, options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(level, {"port": port}) for port, level in self._breakers.items()]

    def shutdown(self) -> None:
        self.tracer_provider.force_flush(_SHUTDOWN_BUDGET_MS)
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(_SHUTDOWN_BUDGET_MS)


def _context_of(traceparent: str | None) -> Any:
    """The OpenTelemetry context a `traceparent` names; None (a new trace) without one."""
    if traceparent is None:
        return None
    return _PROPAGATOR.extract({"traceparent": traceparent})
