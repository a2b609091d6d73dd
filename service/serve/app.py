"""The app factory (docs/architecture.md#serve): it only assembles the lifespan, routes, static
files, middleware and error handlers."""

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from opentelemetry.sdk.trace import TracerProvider

from service import __version__
from service.core.bundle import Bundle
from service.serve import tracing
from service.serve.access import AccessControl
from service.serve.admission import Admission
from service.serve.errors import install_handlers
from service.serve.gallery import STATIC
from service.serve.lifespan import lifespan_for
from service.serve.metrics import Metrics, RequestMetrics
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
    app.state.fg = State(settings, metrics)
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
    app.add_middleware(RequestMetrics, metrics=metrics)  # outermost: counts 401s too
    install_handlers(app, metrics)
    if tracer_provider is not None or tracing.wanted(settings.tracing):
        state = app.state.fg
        state.tracer_provider = tracer_provider or tracing.provider_from_env()
        state.tracing = tracing.Tracing(tracing.instrument(app, state.tracer_provider))
    return app
