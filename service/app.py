"""The app factory: a lifespan that loads, warms up and serves one bundle; JSON errors; metrics."""

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.access import AccessControl
from service.api import STATIC, State, router
from service.batcher import Batcher
from service.bundle import Bundle, load_bundle
from service.detector import Detector
from service.errors import ServiceError
from service.fisher import HEATMAPS
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("fisherguard")
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large", 415: "unsupported_media_type"}


def pick_device(name: str) -> str:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but CUDA is not available")
    return "cuda" if name == "auto" and torch.cuda.is_available() else ("cpu" if name == "auto" else name)


def error_response(e: ServiceError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else None
    return JSONResponse({"error": {"code": e.code, "message": e.message}}, status_code=e.status, headers=headers)


def _warm_up(detector: Detector, bundle: Bundle) -> None:
    """Runs every score and heatmap once so the first request pays no one-off cost."""
    x = torch.zeros(2, *bundle.input_shape)
    outcomes = detector.run(x, list(bundle.scores), list(HEATMAPS))
    bad = [o for o in outcomes if isinstance(o, ServiceError)]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


def lifespan_for(settings: Settings, bundle: Bundle | None) -> object:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: State = app.state.fg
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state.device = pick_device(settings.device)
        if bundle is not None:
            bundle.model.to(state.device)
        state.bundle = bundle or load_bundle(settings.model, state.device)
        if state.bundle.calibration is None:
            raise RuntimeError(
                f"bundle {state.bundle.path} has no calibration.json; run `fisherguard calibrate --model {state.bundle.path}`"
            )
        detector = Detector(state.bundle, torch.device(state.device))
        _warm_up(detector, state.bundle)
        state.warmed = True
        state.metrics.model.info({"name": state.bundle.name, "version": str(state.bundle.card["version"]), "device": state.device})
        state.batcher = Batcher(
            detector.run, settings.max_batch_size, settings.max_delay_ms / 1000, settings.max_queue_images, state.metrics
        )
        state.batcher.start()
        state.metrics.ready.set(1)
        log.info("serving %s on %s", state.bundle.name, state.device)
        try:
            yield
        finally:
            state.metrics.ready.set(0)
            await state.batcher.stop(settings.request_timeout_ms / 1000)

    return lifespan


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


def create_app(settings: Settings | None = None, bundle: Bundle | None = None) -> FastAPI:
    """The service app. Pass a loaded bundle to skip loading by name (tests)."""
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="FisherGuard",
        version=__version__,
        description="Fisher-information detection of adversarial images, with conformal false-positive control.",
        lifespan=lifespan_for(settings, bundle),  # type: ignore[arg-type]
    )
    app.state.fg = State(settings, metrics)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if settings.cors_origins.strip():
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
        )
    app.add_middleware(AccessControl, settings=settings)
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 401s too

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        metrics.errors.labels(e.code).inc()
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']} (got {err.get('input')!r})" for err in e.errors())
        return await service_error(request, ServiceError(422, "validation_error", detail))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = HTTP_CODES.get(e.status_code, "bad_request" if e.status_code < 500 else "internal_error")
        return await service_error(request, ServiceError(e.status_code, code, f"{request.method} {request.url.path}: {e.detail}"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return await service_error(request, ServiceError(500, "internal_error", f"{type(e).__name__}: a bug in the service"))

    return app
