"""The one error type of the service: an HTTP status, a machine-readable code and a message
(docs/api.md#errors), and its JSON rendering."""

import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from service.core.images import ImageError
from service.serve.metrics import Metrics

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "payload_too_large", 415: "unsupported_media_type"}
IMAGE_STATUS = {"bad_image": 400, "payload_too_large": 413, "unsupported_media_type": 415}


@dataclass
class ServiceError(Exception):
    """Rendered as {"error": {"code": code, "message": message}} with the given status."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    close: bool = False  # answer with `Connection: close` (the request's body was not read to its end)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


def bad_request(message: str) -> ServiceError:
    return ServiceError(400, "bad_request", message)


def from_image_error(e: ImageError) -> ServiceError:
    return ServiceError(IMAGE_STATUS[e.code], e.code, e.message)


def error_body(e: ServiceError, path: str) -> dict[str, object]:
    """The JSON error body: the service's {"error": {"code", "message"}}, or on the Open Inference
    Protocol's routes (/v2/...) its {"error": message}, with the code beside it (docs/oip.md#errors)."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": e.message, "code": e.code}
    return {"error": {"code": e.code, "message": e.message}}


def error_response(e: ServiceError, path: str = "") -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after is not None else {}
    if e.close:
        headers["Connection"] = "close"
    return JSONResponse(error_body(e, path), status_code=e.status, headers=headers)


def install_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error, ours or the framework's, as the service's JSON error body, counted by code."""
    log = logging.getLogger("fisherguard")

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, e: ServiceError) -> JSONResponse:
        metrics.errors.labels(e.code).inc()
        return error_response(e, request.url.path)

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
