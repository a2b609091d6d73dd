"""What the running service holds: settings, metrics, the served models (each a bundle and its
batcher), and its phase."""

import asyncio
import datetime as dt
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from opentelemetry.sdk.trace import TracerProvider

from service.core.bundle import Bundle
from service.serve.batcher import Batcher
from service.serve.detector import Detector
from service.serve.errors import ServiceError
from service.serve.metrics import Metrics, ModelMetrics
from service.serve.monitor import QueryMonitor
from service.serve.quotas import Quotas
from service.serve.settings import Settings
from service.serve.tracing import Tracing


@dataclass
class Served:
    """One served model: its bundle, its own batcher in front of its engine, its metric series."""

    bundle: Bundle
    batcher: Batcher
    metrics: ModelMetrics
    detector: Detector
    warmed: bool = False
    loaded_at: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def ready(self) -> bool:
        return self.warmed and self.batcher.running and not self.batcher.closing


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    models: dict[str, Served] = field(default_factory=dict)  # by name, in the configured order: the first is the default
    device: str = "cpu"
    draining: bool = False  # SIGTERM seen: finish what was accepted, refuse the rest
    inflight: int = 0  # detect and infer requests being handled
    reload_locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    retiring: set["asyncio.Future[None]"] = field(default_factory=set)  # old versions' batchers finishing after a reload
    tracing: Tracing = field(default_factory=Tracing)  # a no-op unless tracing is on
    tracer_provider: TracerProvider | None = None
    quotas: Quotas | None = None  # per-client quotas, when configured
    monitor: QueryMonitor | None = None  # per-client query patterns

    @property
    def default(self) -> Served | None:
        """The model of the routes that name none (/v1/detect, /v1/model, the page's first)."""
        return next(iter(self.models.values()), None)

    @property
    def bundle(self) -> Bundle | None:
        return self.default.bundle if self.default else None

    @property
    def batcher(self) -> Batcher | None:
        return self.default.batcher if self.default else None

    @property
    def closing(self) -> bool:
        return self.draining or any(m.batcher.closing for m in self.models.values())

    @property
    def ready(self) -> bool:
        return bool(self.models) and all(m.ready for m in self.models.values()) and not self.closing

    def model(self, name: str | None = None) -> Served:
        """The served model named `name` (None: the default): 404 naming the served ones, 503 before any is loaded."""
        if not self.models:
            raise ServiceError(503, "not_ready", "no model is loaded yet", retry_after=1)
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            raise ServiceError(404, "not_found", f"unknown model {name!r}; this server serves {list(self.models)}")
        return self.models[name]

    def check_ready(self) -> None:
        """503 `shutting_down` while draining, `not_ready` before the models serve."""
        if self.closing:
            raise ServiceError(503, "shutting_down", "the service is shutting down; retry on another replica", retry_after=1)
        if not self.ready:
            raise ServiceError(503, "not_ready", "the models are not loaded, warmed up and batching yet", retry_after=1)


def get_state(request: Request) -> State:
    return request.app.state.fg  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]
