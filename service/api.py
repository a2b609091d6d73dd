"""HTTP routes (design.md §6): thin handlers that parse, call the batcher, and shape the response."""

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from service import heatmaps as heatmap_png
from service import images
from service.baselines import KNOWN
from service.batcher import Batcher, Job
from service.bundle import Bundle
from service.detector import Outcome, decision_p_value, p_values
from service.errors import ServiceError, bad_request
from service.examples import gallery_urls
from service.fisher import HEATMAPS
from service.metrics import Metrics
from service.schemas import DetectResponse, ErrorResponse
from service.settings import Settings

STATIC = Path(__file__).parent / "static"
BASELINES = ("confidence", "entropy", "margin")
ERRORS: dict[int | str, dict[str, Any]] = {c: {"model": ErrorResponse} for c in (400, 401, 403, 413, 415, 422, 503)}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}
            },
        },
    }
}


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    bundle: Bundle | None = None
    batcher: Batcher | None = None
    device: str = "cpu"
    warmed: bool = False
    draining: bool = False  # SIGTERM seen: finish what was accepted, refuse the rest
    inflight: int = 0  # /v1/detect requests being handled

    @property
    def closing(self) -> bool:
        return self.draining or (self.batcher is not None and self.batcher.closing)

    @property
    def ready(self) -> bool:
        return self.bundle is not None and self.warmed and self.batcher is not None and self.batcher.running and not self.closing


router = APIRouter()


def _state(request: Request) -> State:
    return request.app.state.fg  # type: ignore[no-any-return]


def _names(raw: str | None, known: dict[str, Any] | tuple[str, ...], what: str, default: tuple[str, ...]) -> tuple[str, ...]:
    if raw is None or raw == "":
        return default
    if raw == "all":
        return tuple(known)
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    bad = [n for n in names if n not in known]
    if bad:
        raise bad_request(f"unknown {what} {bad}; known: {sorted(known)}")
    return names


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused as soon as it passes the limit (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(413, "payload_too_large", f"body is {declared} bytes, the limit is {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServiceError(413, "payload_too_large", f"body passed {limit} bytes, the limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploads(request: Request, settings: Settings) -> list[tuple[str | None, bytes]]:
    """(filename, bytes) for each image: a raw image body or multipart fields named `file`."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype.startswith("image/") or ctype in ("application/octet-stream", "multipart/form-data")):
        raise ServiceError(
            415, "unsupported_media_type", f"content-type {ctype or '(none)'!r}: send an image/* body or multipart/form-data"
        )
    body = await _read_body(request, settings.max_body_bytes)
    if ctype != "multipart/form-data":
        return [(None, body)]
    request._body = body  # the form parser reads the body we already hold
    try:
        form = await request.form(max_files=settings.max_images_per_request + 1, max_fields=settings.max_images_per_request + 16)
    except Exception as e:  # noqa: BLE001 - python-multipart raises several types on malformed input
        raise bad_request(f"malformed multipart body: {e}") from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise bad_request("multipart body has no file fields named 'file'")
    return [(f.filename, await f.read()) for f in files]


async def _decode_all(uploads: list[tuple[str | None, bytes]], state: State) -> list[torch.Tensor | ServiceError]:
    assert state.bundle is not None
    c, h, w = state.bundle.input_shape
    spec = state.bundle.card["input"]

    def one(data: bytes) -> torch.Tensor | ServiceError:
        if len(data) > state.settings.max_image_bytes:
            return ServiceError(413, "payload_too_large", f"image is {len(data)} bytes, the limit is {state.settings.max_image_bytes}")
        try:
            return images.decode(
                data, c, h, w, spec.get("resize", "bilinear"), int(spec.get("background", 0)), state.settings.max_image_pixels
            )
        except ServiceError as e:
            return e

    return await run_in_threadpool(lambda: [one(d) for _, d in uploads])


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _await_jobs(request: Request, jobs: list[Job], deadline: float) -> None:
    """Waits for the images; a disconnect or the deadline cancels them (queued work is then dropped)."""
    pending: set[asyncio.Future[Any]] = {j.future for j in jobs}
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        while pending:
            finished, _ = await asyncio.wait(
                pending | {gone}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
            if not finished or gone in finished:
                for j in jobs:
                    j.future.cancel()
                if gone in finished:
                    raise ServiceError(499, "client_closed_request", "the client disconnected")
                raise ServiceError(503, "queue_timeout", "the request's deadline passed before its images were scored", retry_after=1)
            pending -= finished
    finally:
        gone.cancel()


def _verdict(
    state: State, index: int, filename: str | None, outcome: Outcome | ServiceError, alpha: float, scores: tuple[str, ...]
) -> dict[str, Any]:
    if isinstance(outcome, ServiceError):
        state.metrics.errors.labels(outcome.code).inc()
        return {"index": index, "filename": filename, "status": "error", "error": {"code": outcome.code, "message": outcome.message}}
    assert state.bundle is not None and state.bundle.calibration is not None
    stat = state.bundle.calibration.statistic
    shown = {k: outcome.scores[k] for k in scores}
    pv = p_values(state.bundle, shown)
    p = decision_p_value(state.bundle, outcome.scores)
    flagged = p <= alpha
    state.metrics.p_value.observe(p)
    if flagged:
        state.metrics.flagged.inc()
    if not state.settings.expose_details:  # gradient information helps an adaptive attacker
        shown, pv = {}, {}
    return {
        "index": index,
        "filename": filename,
        "status": "ok",
        "predicted_class": outcome.predicted,
        "label": state.bundle.classes[outcome.predicted],
        "confidence": outcome.confidence,
        "scores": shown,
        "p_values": pv,
        "decision": {"statistic": stat, "tail": state.bundle.calibration.tail}
        | ({"components": state.bundle.calibration.components} if state.bundle.calibration.combination else {})
        | {"p_value": p, "alpha": alpha, "flagged": flagged},
        "heatmaps": {k: heatmap_png.encode(v) for k, v in outcome.heatmaps.items()},
    }


def _alpha(state: State, alpha: float | None) -> float:
    s = state.settings
    assert state.bundle is not None and state.bundle.calibration is not None
    value = alpha if alpha is not None else (s.alpha or state.bundle.calibration.alpha)
    if not s.min_alpha <= value <= s.max_alpha:
        raise ServiceError(422, "validation_error", f"alpha {value} is outside [{s.min_alpha}, {s.max_alpha}]")
    return value


@router.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def detect(
    request: Request,
    heatmaps: str | None = Query(None, description=f"comma list of {', '.join(HEATMAPS)}"),
    scores: str | None = Query(None, description="`all` or a comma list; the decision statistic is always included"),
    alpha: float | None = Query(None, description="false-positive rate to flag at (overrides the calibration's)"),
    timeout_ms: float | None = Query(None, gt=0, description="shorter deadline for this request"),
) -> JSONResponse:
    t0 = time.monotonic()
    state = _state(request)
    if state.closing:
        raise ServiceError(503, "shutting_down", "the service is shutting down; retry on another replica", retry_after=1)
    if not state.ready or state.bundle is None or state.batcher is None or state.bundle.calibration is None:
        raise ServiceError(503, "not_ready", "the model is not loaded, warmed up and batching yet", retry_after=1)
    state.inflight += 1
    try:
        return await _detect(request, state, t0, heatmaps, scores, alpha, timeout_ms)
    finally:
        state.inflight -= 1


async def _detect(
    request: Request, state: State, t0: float, heatmaps: str | None, scores: str | None, alpha: float | None, timeout_ms: float | None
) -> JSONResponse:
    assert state.bundle is not None and state.batcher is not None and state.bundle.calibration is not None
    needed = state.bundle.calibration.decision_scores
    score_names = tuple(dict.fromkeys((*_names(scores, state.bundle.scores, "scores", BASELINES), *needed)))
    map_names = _names(heatmaps, HEATMAPS, "heatmaps", ())
    if map_names and not state.settings.expose_details:
        raise ServiceError(403, "forbidden", "this server does not return heatmaps (expose_details is off)")
    a = _alpha(state, alpha)
    uploads = await _uploads(request, state.settings)
    if len(uploads) > state.settings.max_images_per_request:
        raise ServiceError(
            413, "payload_too_large", f"{len(uploads)} images, the limit is {state.settings.max_images_per_request} per request"
        )
    decoded = await _decode_all(uploads, state)
    if len(decoded) == 1 and isinstance(decoded[0], ServiceError):
        raise decoded[0]
    deadline = t0 + min(timeout_ms or float("inf"), state.settings.request_timeout_ms) / 1000
    good = [x for x in decoded if isinstance(x, torch.Tensor)]
    jobs = state.batcher.submit(good, frozenset(score_names), frozenset(map_names), deadline)
    await _await_jobs(request, jobs, deadline)
    outcomes = iter(j.future.result() for j in jobs)
    slots: list[Outcome | ServiceError] = [next(outcomes) if isinstance(x, torch.Tensor) else x for x in decoded]
    if len(slots) == 1 and isinstance(slots[0], ServiceError):
        raise slots[0]
    results = [_verdict(state, i, name, o, a, score_names) for i, ((name, _), o) in enumerate(zip(uploads, slots, strict=True))]
    body = {
        "model": {"name": state.bundle.name, "version": state.bundle.card["version"], "device": state.device},
        "results": results,
        "timing_ms": {
            "queue": 1000 * max((j.started - j.enqueued for j in jobs), default=0.0),
            "compute": 1000 * max((j.compute_s for j in jobs), default=0.0),
            "total": 1000 * (time.monotonic() - t0),
        },
    }
    return JSONResponse(body)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. No model work."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request) -> dict[str, str]:
    """Readiness: model loaded, warmed up, batcher running."""
    state = _state(request)
    if state.closing:
        raise ServiceError(503, "shutting_down", "the service is draining before it stops", retry_after=1)
    if not state.ready:
        raise ServiceError(503, "not_ready", "the model is not loaded, warmed up and batching yet", retry_after=1)
    return {"status": "ready"}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    state = _state(request)
    if torch.cuda.is_available() and state.device.startswith("cuda"):
        state.metrics.gpu_memory.set(torch.cuda.memory_allocated())
    state.metrics.queue_depth.set(len(state.batcher.queue) if state.batcher else 0)
    state.metrics.ready.set(1 if state.ready else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/model", responses={503: {"model": ErrorResponse}})
async def model_info(request: Request) -> dict[str, Any]:
    state = _state(request)
    if state.bundle is None:
        raise ServiceError(503, "not_ready", "no model is loaded yet", retry_after=1)
    s = state.settings
    cal = state.bundle.calibration
    return {
        "card": state.bundle.card,
        "device": state.device,
        "calibration": cal.summary() if cal else None,
        "scores": {k: {"direction": v.direction, "log10": v.log} for k, v in state.bundle.scores.items()},
        "default_scores": list(dict.fromkeys((*BASELINES, *cal.decision_scores))) if cal else list(BASELINES),
        "heatmaps": list(HEATMAPS),
        "examples": gallery_urls(state.bundle.name),
        "batching": {
            "max_batch_size": s.max_batch_size,
            "max_delay_ms": s.max_delay_ms,
            "max_queue_images": s.max_queue_images,
            "request_timeout_ms": s.request_timeout_ms,
        },
        "limits": {
            "max_body_bytes": s.max_body_bytes,
            "max_images_per_request": s.max_images_per_request,
            "max_image_pixels": s.max_image_pixels,
        },
    }


@router.get("/v1/model/calibration/{score}", responses={404: {"model": ErrorResponse}})
async def calibration_values(request: Request, score: str) -> dict[str, Any]:
    """The clean calibration distribution of one score (thresholded form), for plots."""
    state = _state(request)
    cal = state.bundle.calibration if state.bundle else None
    if cal is None or score not in cal.values:
        raise ServiceError(404, "not_found", f"no calibration values for score {score!r}")
    spec = KNOWN[score]
    return {"score": score, "direction": spec.direction, "log10": spec.log, "values": cal.values[score].tolist()}


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})
