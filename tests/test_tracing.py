"""OpenTelemetry tracing (docs/deployment.md#tracing) with the SDK's in-memory exporter: off by
default, a caller's `traceparent` continued, decode/queue/batch spans, batch spans linked to their
requests, the trace id in the access log."""

import asyncio
import logging

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.serve import tracing
from service.serve.app import create_app
from service.serve.settings import Settings
from tests.conftest import png, serving
from tests.test_batching import PNG

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _named(finished: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in finished if s.name == name]


def test_a_traced_request_continues_the_callers_trace(mnist, digits, spans, caplog) -> None:  # type: ignore[no-untyped-def]
    provider, exporter = spans
    x, _ = digits
    app = create_app(Settings(device="cpu", max_delay_ms=50), bundle=mnist, tracer_provider=provider)
    with serving(app) as base, caplog.at_level(logging.INFO, logger="fisherguard"):

        async def two() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=30) as c:
                first = c.post(base + "/v1/detect", content=png(x[0]), headers=PNG | {"traceparent": PARENT})
                second = c.post(base + "/v1/detect", content=png(x[1]), headers=PNG)
                return list(await asyncio.gather(first, second))

        answers = asyncio.run(two())
        assert all(r.status_code == 200 for r in answers)
        httpx.get(base + "/healthz")
    finished = exporter.get_finished_spans()
    server = [s for s in finished if s.kind.name == "SERVER"]
    assert len(server) == 2 and {s.attributes.get("http.route") for s in server} == {"/v1/detect"}  # type: ignore[union-attr]
    continued = [s for s in server if f"{s.context.trace_id:032x}" == TRACE]
    assert len(continued) == 1 and continued[0].parent is not None and f"{continued[0].parent.span_id:016x}" == "00f067aa0ba902b7"
    for name in ("decode", "queue"):
        got = _named(finished, name)
        assert len(got) == 2, name
        assert {s.context.trace_id for s in got} == {s.context.trace_id for s in server}  # under their requests
    batches = _named(finished, "batch")
    linked = {link.context.span_id for b in batches for link in b.links}
    assert linked == {s.context.span_id for s in server}  # each request's span is linked from the batch that ran it
    assert all(b.attributes["model"] == "mnist" for b in batches)  # type: ignore[index]
    logged = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "request"]
    assert {f.get("trace_id") for f in logged if f["path"] == "/v1/detect"} >= {TRACE}  # the access log names the trace


def test_oip_infer_is_traced_too(mnist, digits, spans) -> None:  # type: ignore[no-untyped-def]
    provider, exporter = spans
    x, _ = digits
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": x[0].reshape(-1).tolist()}]}
    with serving(create_app(Settings(device="cpu"), bundle=mnist, tracer_provider=provider)) as base:
        assert httpx.post(base + "/v2/models/mnist/infer", json=body, headers={"traceparent": PARENT}, timeout=30).status_code == 200
    finished = exporter.get_finished_spans()
    assert {s.name for s in finished if f"{s.context.trace_id:032x}" == TRACE} >= {"decode", "queue"}


def test_tracing_is_off_unless_asked() -> None:
    assert not tracing.wanted(False, {})
    assert tracing.wanted(True, {})
    assert tracing.wanted(False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing.wanted(False, {"OTEL_TRACES_EXPORTER": "console"})
    assert not tracing.wanted(True, {"OTEL_TRACES_EXPORTER": "none"})
    assert not tracing.wanted(True, {"OTEL_SDK_DISABLED": "true"})
    app = create_app(Settings(device="cpu"))
    assert app.state.fg.tracer_provider is None and app.state.fg.tracing.tracer is None


def test_an_unknown_exporter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="'zipkin' is not supported"):
        tracing.exporter_from_env()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    assert type(tracing.exporter_from_env()).__name__ == "OTLPSpanExporter"
