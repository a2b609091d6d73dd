"""The app factory (docs/architecture.md#serve): it only assembles the lifespan, routes, static
files, middleware and error handlers."""

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from opentelemetry.sdk.trace import TracerProvider

from service import __version__
from service.core.bundle import Bundle
from service.serve import tracing
from service.serve.access import AccessControl
from service.serve.admission import Admission
from service.serve.connections import ClientConcurrency
from service.serve.errors import install_handlers
from service.serve.gallery import STATIC
from service.serve.lifespan import lifespan_for
from service.serve.metrics import Metrics, RequestMetrics
from service.serve.monitor import QueryMonitor
from service.serve.quotas import Quotas
from service.serve.routes import ROUTERS
from service.serve.settings import Settings
from service.serve.state import State


def create_app(
    settings: Settings | None = None, bundle: Bundle | list[Bundle] | None = None, tracer_provider: TracerProvider | None = None
) -> FastAPI:
    """The service app. Pass loaded bundles to skip loading by name (tests); the first is the default.
    A tracer provider turns tracing on with it (tests); else the settings and OTEL_* variables decide."""
    settings = settings or Settings()
    metrics = Metrics()
    app = FastAPI(
        title="FisherGuard",
        version=__version__,
        description="Fisher-information detection of adversarial images, with conformal false-positive control.",
        lifespan=lifespan_for(settings, bundle),
    )
    app.state.fg = State(settings, metrics, quotas=Quotas.configured(settings, metrics), monitor=QueryMonitor(metrics))
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Admission, state=lambda: app.state.fg)  # innermost: after authentication, before the body is read
    if settings.cors_origins.strip():
        origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "x-request-id"],
        )
    app.add_middleware(AccessControl, settings=settings)
    if settings.per_address_concurrency is not None:
        app.add_middleware(ClientConcurrency, settings=settings, metrics=metrics)  # before authentication: floods cost nothing
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 401s too
    install_handlers(app, metrics)
    if settings.keys():
        declare_bearer(app, settings)
    if tracer_provider is not None or tracing.wanted(settings.tracing):
        state = app.state.fg
        state.tracer_provider = tracer_provider or tracing.provider_from_env()
        state.tracing = tracing.Tracing(tracing.instrument(app, state.tracer_provider))
    return app


def declare_bearer(app: FastAPI, settings: Settings) -> None:
    """The OpenAPI document of a server with API keys declares them: an HTTP bearer scheme, required by
    every operation that is not public, so generated clients know to send `Authorization: Bearer`."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "description": "one of the server's API keys"}
            }
            for path, operations in schema["paths"].items():
                if not settings.public(path):
                    for op in operations.values():
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
