"""OpenTelemetry set-up: one tracer provider per process, injected, never global.

Spans export over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set. The
gRPC aio instrumentation's interceptors carry the trace context across every
hop (W3C ``traceparent`` in the call metadata).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping

from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SimpleSpanProcessor

log = logging.getLogger(__name__)


def make_tracer_provider(service_name: str, instance_id: str = "",
                         exporter: SpanExporter | None = None,
                         env: Mapping[str, str] | None = None) -> TracerProvider:
    """A tracer provider for one service.

    ``exporter`` (tests pass an in-memory one) is used synchronously; otherwise
    an OTLP exporter is attached when the standard endpoint variable is set.
    """
    env = os.environ if env is None else env
    resource = Resource.create({"service.name": service_name, "service.instance.id": instance_id or service_name})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    elif env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP to %s", env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
    return provider


def server_interceptors(provider: TracerProvider) -> list:
    return [aio_server_interceptor(tracer_provider=provider)]


def client_interceptors(provider: TracerProvider) -> list:
    return list(aio_client_interceptors(tracer_provider=provider))


def record_phases(tracer, phases: list[tuple[str, float | None, float | None]], attributes: dict | None = None
                  ) -> None:
    """Spans for phases that already happened, as children of the current span.

    ``phases`` holds (name, start, end) in ``time.monotonic()`` seconds, as the
    engine thread recorded them; a phase with a missing end is skipped.
    """
    offset_ns = time.time_ns() - int(time.monotonic() * 1e9)
    for name, start, end in phases:
        if start is None or end is None:
            continue
        span = tracer.start_span(name, start_time=offset_ns + int(start * 1e9), attributes=attributes or {})
        span.end(end_time=offset_ns + int(end * 1e9))
