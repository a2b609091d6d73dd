"""OpenTelemetry tracing (docs/deployment.md#tracing), off unless turned on: `FISHERGUARD_TRACING=1`,
or the standard `OTEL_TRACES_EXPORTER` / `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` variables.

When on, the FastAPI instrumentation makes a server span per request (a W3C `traceparent` header
continues the caller's trace), the routes add a `decode` span, each image's wait in the queue is a
`queue` span under its request's span, and each engine batch is a `batch` span linked to the spans
of the requests whose images it holds. When off, every function here returns at once.
"""

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from typing import Any

from fastapi import FastAPI
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

from service import __version__

NAME = "fisherguard"
UNTRACED = "healthz,readyz,metrics,v2/health"  # probes and scrapes: no spans


def wanted(enabled: bool, env: dict[str, str] | None = None) -> bool:
    """Whether tracing is on: the setting, or an OTEL_* variable that asks for traces."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none":
        return False
    return enabled or bool(exporter) or bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def exporter_from_env() -> SpanExporter:
    """`OTEL_TRACES_EXPORTER`: `console`, or `otlp` (the default: OTLP over HTTP, configured by the
    standard OTEL_EXPORTER_OTLP_* variables)."""
    kind = os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() or "otlp"
    if kind == "console":
        return ConsoleSpanExporter()
    if kind != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER {kind!r} is not supported here: use otlp, console or none")
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()


def provider_from_env() -> TracerProvider:
    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", NAME), "service.version": __version__})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter_from_env()))
    return provider


def instrument(app: FastAPI, provider: TracerProvider) -> trace.Tracer:
    """Server spans for the app's requests (honouring `traceparent`), and the tracer for ours."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, excluded_urls=UNTRACED, exclude_spans=["receive", "send"])
    return provider.get_tracer(NAME, __version__)


class Tracing:
    """The service's own spans; a no-op without a tracer."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self.tracer = tracer

    @contextlib.contextmanager
    def span(self, name: str, **attributes: Any) -> Iterator[None]:
        """A child span of the current one (e.g. `decode` inside a request)."""
        if self.tracer is None:
            yield
            return
        with self.tracer.start_as_current_span(name, attributes=attributes):
            yield

    def current(self) -> otel_context.Context | None:
        """The current context, for work that continues elsewhere (an image queued for a batch)."""
        return otel_context.get_current() if self.tracer is not None else None

    def queued(self, parent: otel_context.Context | None, enqueued: float, started: float, model: str) -> trace.SpanContext | None:
        """A `queue` span under the request's span, from when the image was queued to when its batch
        started (monotonic seconds); returns the request span's context, for the batch's links."""
        if self.tracer is None or parent is None:
            return None
        offset = time.time_ns() - time.monotonic_ns()
        span = self.tracer.start_span("queue", context=parent, start_time=int(enqueued * 1e9) + offset, attributes={"model": model})
        span.end(end_time=int(started * 1e9) + offset)
        return trace.get_current_span(parent).get_span_context()

    @contextlib.contextmanager
    def batch(self, links: Sequence[trace.SpanContext | None], model: str, size: int, scores: Sequence[str]) -> Iterator[None]:
        """An engine batch's span, linked to the span of every request it holds images of."""
        if self.tracer is None:
            yield
            return
        unique = {(c.trace_id, c.span_id): c for c in links if c is not None and c.is_valid}  # a request's images share one link
        ctx = [trace.Link(c) for c in unique.values()]
        attributes: dict[str, Any] = {"model": model, "batch.size": size, "scores": list(scores)}
        with self.tracer.start_as_current_span("batch", context=otel_context.Context(), links=ctx, attributes=attributes):
            yield


def trace_id() -> str | None:
    """The current trace's id (32 hex digits) for the access log, or None outside a recorded trace."""
    c = trace.get_current_span().get_span_context()
    return f"{c.trace_id:032x}" if c.is_valid else None
