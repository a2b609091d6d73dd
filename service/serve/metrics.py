"""Prometheus metrics (docs/deployment.md#metrics): prefix fisherguard_, base units, low-cardinality labels.

Each app gets its own registry, so tests can build many apps in one process.
"""

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
P_VALUE = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fisherguard_requests", "HTTP requests by route and status code", ["route", "status"], registry=r)
        self.request_seconds = Histogram(
            "fisherguard_request_duration_seconds", "HTTP request duration", ["route"], buckets=LATENCY, registry=r
        )
        self.rate_limited = Counter(
            "fisherguard_rate_limited",
            "Requests refused for a quota, by client (key digest or anonymous) and quota",
            ["client", "quota"],
            registry=r,
        )
        self.near_duplicates = Counter(
            "fisherguard_client_near_duplicates",
            "Scored images that were near-duplicates of the same client's recent ones (docs/security.md#query-patterns)",
            ["client"],
            registry=r,
        )
        self.client_flagged = Counter("fisherguard_client_flagged", "Flagged images by client", ["client"], registry=r)
        self.errors = Counter("fisherguard_errors", "Error responses and failed image slots by machine code", ["code"], registry=r)
        # per served model: a `model` label, bounded by the configured set (ModelMetrics binds it)
        self.images = Counter(
            "fisherguard_images_scored", "Images that went through the Fisher engine, by outcome", ["model", "outcome"], registry=r
        )
        self.flagged = Counter("fisherguard_images_flagged", "Images flagged as likely adversarial", ["model"], registry=r)
        self.batches = Counter("fisherguard_batches", "Batches run by the engine", ["model"], registry=r)
        self.batch_size = Histogram("fisherguard_batch_size_images", "Images per engine batch", ["model"], buckets=BATCH, registry=r)
        self.queue_depth = Gauge("fisherguard_queue_depth_images", "Images waiting in the batching queue", ["model"], registry=r)
        self.queue_wait = Histogram(
            "fisherguard_queue_wait_seconds", "Time an image waited before its batch started", ["model"], buckets=LATENCY, registry=r
        )
        self.compute_seconds = Histogram("fisherguard_compute_seconds", "Engine time per batch", ["model"], buckets=LATENCY, registry=r)
        self.dropped = Counter(
            "fisherguard_images_dropped", "Queued images dropped before compute, by reason", ["model", "reason"], registry=r
        )
        self.p_value = Histogram(
            "fisherguard_decision_p_value",
            "Conformal p-value of the decision statistic (flat under clean traffic)",
            ["model"],
            buckets=P_VALUE,
            registry=r,
        )
        self.model = Info("fisherguard_model", "The served models", ["model"], registry=r)
        self.ready = Gauge("fisherguard_model_ready", "1 when the model is loaded, warmed up and its batcher runs", ["model"], registry=r)
        self.gpu_memory = Gauge("fisherguard_gpu_memory_allocated_bytes", "GPU memory allocated by torch", registry=r)


class _Bound:
    """A labelled metric with its leading `model` label already given."""

    def __init__(self, metric: Counter, model: str) -> None:
        self.metric, self.model = metric, model

    def labels(self, *values: str) -> Counter:
        return self.metric.labels(self.model, *values)


class ModelMetrics:
    """One served model's series of `Metrics` (what its batcher and its verdicts count)."""

    def __init__(self, m: Metrics, model: str) -> None:
        self.name = model
        self.images, self.dropped = _Bound(m.images, model), _Bound(m.dropped, model)
        self.flagged, self.batches = m.flagged.labels(model), m.batches.labels(model)
        self.batch_size, self.queue_depth = m.batch_size.labels(model), m.queue_depth.labels(model)
        self.queue_wait, self.compute_seconds = m.queue_wait.labels(model), m.compute_seconds.labels(model)
        self.p_value, self.info, self.ready = m.p_value.labels(model), m.model.labels(model), m.ready.labels(model)


class RequestMetrics:
    """Pure ASGI middleware: request counts by route template and status, and durations."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.request_seconds.labels(route).observe(time.perf_counter() - t0)
