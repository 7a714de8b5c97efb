"""The telemetry adapter and the trace rules, with the SDK's in-memory exporter and reader.

No process boundary is involved here: spans and metric points are read back
from memory. `tests/integration/test_telemetry.py` covers OTLP across processes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sagaworks.adapters.observability.environment import (
    TelemetryMisconfigured,
    telemetry_from_environment,
)
from sagaworks.adapters.observability.logging import add_trace_ids
from sagaworks.adapters.observability.otel import OpenTelemetry
from sagaworks.adapters.observability.telemetry import NoTelemetry
from sagaworks.adapters.rabbitmq.cloudevents import trace_context_of
from sagaworks.application.ports import (
    BreakerChange,
    DueTimer,
    FinishedSaga,
    InboundMessage,
    StepCall,
)
from sagaworks.application.tracing import continued_trace, trace_id

pytestmark = pytest.mark.unit


def traceparent() -> str:
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


class Recorded:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        self.telemetry = OpenTelemetry(
            Resource.create({"service.name": "test"}),
            [SimpleSpanProcessor(self.spans)],
            [self.metrics],
        )

    def points(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        data = self.metrics.get_metrics_data()
        assert data is not None
        found = []
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            value = getattr(point, "value", point)
                            found.append((dict(point.attributes or {}), value))
        return found


@pytest.fixture
def recorded() -> Iterator[Recorded]:
    recorded = Recorded()
    yield recorded
    recorded.telemetry.shutdown()


def call(parent: str | None, *, attempt: int = 1) -> StepCall:
    return StepCall("order", uuid4(), "authorise", "payments", "action", attempt, parent)


def test_a_port_call_is_a_child_span_of_the_delivery_that_asked_for_it(recorded: Recorded) -> None:
    parent = traceparent()
    with recorded.telemetry.step_call(call(parent)) as record:
        record.succeeded()
    (span,) = recorded.spans.get_finished_spans()
    assert span.name == "call payments.authorise"
    assert f"{span.context.trace_id:032x}" == trace_id(parent)
    assert span.parent is not None
    assert f"{span.parent.span_id:016x}" == parent.split("-")[2]
    assert span.attributes is not None
    assert span.attributes["sagaworks.outcome"] == "succeeded"
    assert span.attributes["sagaworks.attempt"] == 1
    ((labels, latency),) = recorded.points("sagaworks.port.call.duration")
    assert labels == {
        "saga_type": "order",
        "port": "payments",
        "step": "authorise",
        "kind": "action",
        "outcome": "succeeded",
    }
    assert latency.count == 1


def test_failures_are_recorded_on_the_span_and_counted(recorded: Recorded) -> None:
    telemetry = recorded.telemetry
    with telemetry.step_call(call(None)) as record:
        record.failed("insufficient funds", business=True, retry_scheduled=False)
    with telemetry.step_call(call(None, attempt=2)) as record:
        record.failed("PortUnavailable: 503", business=False, retry_scheduled=True)
    with pytest.raises(RuntimeError), telemetry.step_call(call(None, attempt=3)):
        raise RuntimeError("bug in the adapter")
    business, transient, broken = recorded.spans.get_finished_spans()
    assert business.status.status_code is StatusCode.ERROR
    assert business.status.description == "insufficient funds"
    assert transient.attributes is not None
    assert transient.attributes["sagaworks.retry_scheduled"] is True
    assert broken.attributes is not None
    assert broken.attributes["sagaworks.outcome"] == "error"
    assert [e.name for e in broken.events] == ["exception"]
    failures = {
        labels["failure"]: n for labels, n in recorded.points("sagaworks.port.call.failures")
    }
    assert failures == {"business": 1, "transient": 1}
    ((_, retries),) = recorded.points("sagaworks.step.retries")
    assert retries == 1


def test_a_timer_continues_the_trace_it_was_set_in_and_its_lag_is_measured(
    recorded: Recorded,
) -> None:
    parent = traceparent()
    due = datetime(2026, 1, 1, tzinfo=UTC)
    timer = DueTimer(7, "order", uuid4(), "deadline", 0, due, parent)
    with recorded.telemetry.timer_fired(timer, due + timedelta(seconds=3)) as continued:
        assert continued is not None
    (span,) = recorded.spans.get_finished_spans()
    assert trace_id(continued) == trace_id(parent)
    assert continued.split("-")[2] == f"{span.context.span_id:016x}"
    ((labels, lag),) = recorded.points("sagaworks.timer.lag")
    assert labels == {"saga_type": "order", "timer": "deadline"}
    assert lag.sum == pytest.approx(3.0)


def test_outcomes_breakers_and_rejections_are_metrics(recorded: Recorded) -> None:
    telemetry = recorded.telemetry
    telemetry.sagas_finished([FinishedSaga("order", "completed", 2.5)])
    telemetry.watch_breakers(["payments", "shipping"])
    telemetry.breaker_changed(
        BreakerChange("payments", "w", "closed", "open", 5, datetime.now(UTC))
    )
    telemetry.delivery_settled("sagaworks.order", "dead_lettered", "schema_invalid", None)
    ((labels, finished),) = recorded.points("sagaworks.sagas.finished")
    assert (labels, finished) == ({"saga_type": "order", "status": "completed"}, 1)
    states = {labels["port"]: level for labels, level in recorded.points("sagaworks.breaker.state")}
    assert states == {"payments": 2, "shipping": 0}
    ((labels, rejected),) = recorded.points("sagaworks.deliveries.rejected")
    assert (labels, rejected) == ({"queue": "sagaworks.order", "reason": "schema_invalid"}, 1)


def test_a_delivery_continues_the_span_handling_it_and_log_lines_name_it(
    recorded: Recorded,
) -> None:
    inbound = InboundMessage("m", "t", b"{}", {}, "q", "x", "k", trace_context=traceparent())
    tracer = recorded.telemetry.tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("delivery") as span:
        traced = recorded.telemetry.traced(inbound)
        line = add_trace_ids(None, "info", {"event": "handled"})
    context = span.get_span_context()
    flags = int(context.trace_flags)
    assert traced.trace_context == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
    assert line["trace_id"] == f"{context.trace_id:032x}"
    assert line["span_id"] == f"{context.span_id:016x}"
    assert "trace_id" not in add_trace_ids(None, "info", {"event": "outside any span"})


def test_an_event_from_another_trace_continues_the_sagas_trace() -> None:
    saga, same, other = traceparent(), traceparent(), traceparent()
    same = f"00-{trace_id(saga)}-{same.split('-')[2]}-01"
    assert continued_trace(same, saga) == same  # a child of the delivery in the saga's trace
    assert continued_trace(other, saga) == saga
    assert continued_trace(None, saga) == saga
    assert continued_trace(other, None) == other  # a new saga takes its start event's trace


@pytest.mark.parametrize(
    ("value", "read"),
    [
        ("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", True),
        (" 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ", True),
        ("00-00000000000000000000000000000000-b7ad6b7169203331-01", False),
        ("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01", False),
        ("01-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01", False),
        (b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", False),
    ],
)
def test_only_a_valid_traceparent_is_read(value: object, read: bool) -> None:
    got = trace_context_of({"traceparent": value})
    assert (got is not None) is read


OTEL_VARIABLES = (
    "OTEL_SDK_DISABLED",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
    "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
    "OTEL_TRACES_EXPORTER",
    "OTEL_METRICS_EXPORTER",
    "OTEL_SERVICE_NAME",
)


@pytest.fixture
def otel_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in OTEL_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_telemetry_is_off_without_an_endpoint_or_when_disabled(
    otel_env: pytest.MonkeyPatch,
) -> None:
    assert isinstance(telemetry_from_environment("w"), NoTelemetry)
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    otel_env.setenv("OTEL_SDK_DISABLED", "true")
    assert isinstance(telemetry_from_environment("w"), NoTelemetry)


def test_an_endpoint_turns_it_on_named_sagaworks_unless_told_otherwise(
    otel_env: pytest.MonkeyPatch,
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:4318/v1/traces")
    otel_env.setenv("OTEL_METRICS_EXPORTER", "none")
    telemetry = telemetry_from_environment("host:1")
    assert isinstance(telemetry, OpenTelemetry)
    resource = telemetry.tracer_provider.resource.attributes
    assert (resource["service.name"], resource["service.instance.id"]) == ("sagaworks", "host:1")
    telemetry.shutdown()
    otel_env.setenv("OTEL_SERVICE_NAME", "orders-saga")
    telemetry = telemetry_from_environment("host:1")
    assert isinstance(telemetry, OpenTelemetry)
    assert telemetry.tracer_provider.resource.attributes["service.name"] == "orders-saga"
    telemetry.shutdown()


def test_a_protocol_other_than_http_protobuf_is_refused_with_what_to_set(
    otel_env: pytest.MonkeyPatch,
) -> None:
    otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317")
    otel_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(TelemetryMisconfigured) as refused:
        telemetry_from_environment("w")
    assert "OTEL_EXPORTER_OTLP_PROTOCOL=grpc" in str(refused.value)
    assert "http/protobuf" in str(refused.value)
