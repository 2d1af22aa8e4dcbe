"""OpenTelemetry set-up: one tracer provider per process, injected, never global.

Spans export over OTLP/gRPC when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set; when
it is not, no span is made at all (OpenTelemetry's no-op provider), and a
trace context that comes in passes through unchanged. The gRPC aio
instrumentation's interceptors carry the trace context across every hop (W3C
``traceparent`` in the call metadata).

A span's context is attached (``contextvars``) when a call's handler starts
and must be detached in the same asyncio task. grpc.aio drives a streaming
handler written as an async generator with ``async for`` and, when the call
ends early (client cancel, deadline, a failed write), leaves the generator
suspended at its ``yield``; the event loop's asyncgen hook later closes it in
a task of its own, where the detach fails ("Failed to detach context", one
traceback per attach). :class:`StreamClosingInterceptor`, outermost, runs
every such handler as a coroutine that writes each response and closes the
generator in the call's own task, however the call ends.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SimpleSpanProcessor

log = logging.getLogger(__name__)


def make_tracer_provider(service_name: str, instance_id: str = "",
                         exporter: SpanExporter | None = None,
                         env: Mapping[str, str] | None = None) -> trace.TracerProvider:
    """A tracer provider for one service.

    ``exporter`` (tests pass an in-memory one) is used synchronously; otherwise
    an OTLP exporter is attached when the standard endpoint variable is set.
    With neither, nothing would ever read a span, and the provider is
    OpenTelemetry's no-op one: no span is made, while a trace context that
    comes in still goes on to the next hop (a no-op span carries its parent's
    context), so a service that does not export is transparent to a trace
    that others export. Recording spans nobody exports was most of the
    router's own work on its hop: 2026-12-02, ``--scenario router``, the
    router's time over a do-nothing grpcio hop
    (``router_over_proxy_paired_p50_ms``) went from 0.69-1.14 ms to
    0.18-0.32 ms.
    """
    env = os.environ if env is None else env
    otlp = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if exporter is None and not otlp:
        return trace.NoOpTracerProvider()
    resource = Resource.create({"service.name": service_name, "service.instance.id": instance_id or service_name})
    provider = SdkTracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP to %s", otlp)
    return provider


def _written(behavior):
    """An async-generator streaming handler as a coroutine handler (grpc's
    reader/writer form): each response goes out through ``context.write``, and
    the generator is closed in this task when the call ends, early or not."""
    async def handler(request_or_iterator, context):
        async with contextlib.aclosing(behavior(request_or_iterator, context)) as responses:
            async for response in responses:
                try:
                    await context.write(response)
                except Exception as exc:  # noqa: BLE001 - re-raised unless the client is gone
                    if not (context.cancelled() or context.done()):
                        raise
                    log.debug("the call ended before its stream did (%s: %s)", type(exc).__name__, exc)
                    return

    return handler


class StreamClosingInterceptor(grpc.aio.ServerInterceptor):
    """Closes every streaming handler's generator in its call's task (see the
    module docstring). Must come first, before the tracing interceptor, so that
    it drives the generator the tracing interceptor makes."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=_written(handler.unary_stream))
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return handler._replace(stream_stream=_written(handler.stream_stream))
        return handler


def server_interceptors(provider: trace.TracerProvider) -> list:
    """The interceptors every server starts with, outermost first: streams
    closed in their own task, then a span per call (trace context in)."""
    return [StreamClosingInterceptor(), aio_server_interceptor(tracer_provider=provider)]


def client_interceptors(provider: trace.TracerProvider) -> list:
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
