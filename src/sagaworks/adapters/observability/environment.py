"""Telemetry from the standard `OTEL_*` variables: OTLP/HTTP push when an endpoint is set, else off.

On when an OTLP endpoint is configured (`OTEL_EXPORTER_OTLP_ENDPOINT`, or the
per-signal `..._TRACES_ENDPOINT` / `..._METRICS_ENDPOINT`) and
`OTEL_SDK_DISABLED` is not true; then traces and metrics are pushed over
OTLP/HTTP (protobuf) by the SDK's batching exporters. The worker opens no port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from sagaworks.adapters.observability.otel import OpenTelemetry
from sagaworks.adapters.observability.telemetry import EngineTelemetry, NoTelemetry

__all__ = ["TelemetryMisconfigured", "telemetry_from_environment"]

_HTTP_PROTOBUF = "http/protobuf"


class TelemetryMisconfigured(ValueError):
    """An `OTEL_*` variable asks for something sagaworks does not do."""


def _enabled(environ: Mapping[str, str], signal: str) -> bool:
    """Whether `signal` (traces, metrics) is exported: an endpoint set, its exporter not `none`."""
    if environ.get(f"OTEL_{signal.upper()}_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT")
    )


def _check_protocol(environ: Mapping[str, str], signal: str) -> None:
    name = f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL"
    for variable in (name, "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = environ.get(variable, "").strip()
        if value:
            if value != _HTTP_PROTOBUF:
                raise TelemetryMisconfigured(
                    f"{variable}={value}: sagaworks pushes OTLP over HTTP only; set it to "
                    f"{_HTTP_PROTOBUF} (or unset it) and point the endpoint at the collector's "
                    "OTLP/HTTP port (4318 by default)"
                )
            return


def telemetry_from_environment(instance: str) -> EngineTelemetry:
    """`OpenTelemetry` exporting by OTLP/HTTP when `OTEL_*` configures an endpoint, else off.

    `instance` names this process (`service.instance.id`); the SDK reads the
    rest of `OTEL_*` itself (`OTEL_SERVICE_NAME`, defaulting here to
    `sagaworks`; `OTEL_RESOURCE_ATTRIBUTES`; the exporters' endpoints, headers
    and timeouts; `OTEL_TRACES_SAMPLER`; `OTEL_BSP_*`;
    `OTEL_METRIC_EXPORT_INTERVAL`). Raises `TelemetryMisconfigured` for a
    protocol other than http/protobuf.
    """
    env = os.environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return NoTelemetry()
    traces, metrics = _enabled(env, "traces"), _enabled(env, "metrics")
    if not (traces or metrics):
        return NoTelemetry()
    processors: list[SpanProcessor] = []
    readers: list[MetricReader] = []
    if traces:
        _check_protocol(env, "traces")
        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    if metrics:
        _check_protocol(env, "metrics")
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    resource = Resource.create({SERVICE_INSTANCE_ID: instance})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "sagaworks"}))
    return OpenTelemetry(resource, processors, readers)
