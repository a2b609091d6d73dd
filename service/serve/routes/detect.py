"""POST /v1/detect (docs/api.md#detect): parse the query and the images, delegate, shape the JSON."""

import time
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from service.fisher import HEATMAPS
from service.serve import handler
from service.serve import heatmaps as heatmap_png
from service.serve.detector import Outcome
from service.serve.errors import ServiceError
from service.serve.schemas import ERRORS, ERRORS_404, IMAGE_BODY, DetectResponse
from service.serve.state import Served, State, StateDep
from service.serve.uploads import decode_all, uploads

router = APIRouter()


@dataclass
class DetectQuery:
    heatmaps: str | None = Query(None, description=f"comma list of {', '.join(HEATMAPS)}")
    scores: str | None = Query(None, description="`all` or a comma list; the decision statistic is always included")
    alpha: float | None = Query(None, description="false-positive rate to flag at (overrides the calibration's)")
    timeout_ms: float | None = Query(None, gt=0, description="shorter deadline for this request")


@router.post("/v1/detect", response_model=DetectResponse, responses=ERRORS, openapi_extra=IMAGE_BODY)
async def detect(request: Request, state: StateDep, q: Annotated[DetectQuery, Depends()]) -> JSONResponse:
    """Scores and judges the images with the default model."""
    return await _detect(request, state, None, q)


@router.post("/v1/models/{model_name}/detect", response_model=DetectResponse, responses=ERRORS_404, openapi_extra=IMAGE_BODY)
async def detect_with(request: Request, state: StateDep, model_name: str, q: Annotated[DetectQuery, Depends()]) -> JSONResponse:
    """Scores and judges the images with the named model."""
    return await _detect(request, state, model_name, q)


async def _detect(request: Request, state: State, model_name: str | None, q: DetectQuery) -> JSONResponse:
    heatmaps, scores, alpha, timeout_ms = q.heatmaps, q.scores, q.alpha, q.timeout_ms
    t0 = time.monotonic()
    served, held = handler.admitted(request, state, model_name)  # with room for its first image
    state.check_ready()
    spec = handler.ask(state, served, scores, heatmaps, alpha, timeout_ms, t0, full=handler.shows_details(request, state))
    files = await uploads(request, state.settings)
    handler.charge_images(request, state, len(files))
    held.extend(len(files) - held.images)  # before decoding: a request the queue cannot take is refused now
    with state.tracing.span("decode", images=len(files)):
        images = await decode_all(files, served.bundle, state.settings)
    if len(images) == 1 and isinstance(images[0], ServiceError):
        raise images[0]
    outcomes, jobs = await handler.run(served, request, images, spec, held)
    if len(outcomes) == 1 and isinstance(outcomes[0], ServiceError):
        raise outcomes[0]
    results = [_result(state, served, i, name, o, spec) for i, ((name, _), o) in enumerate(zip(files, outcomes, strict=True))]
    for x, r in zip(images, results, strict=True):
        if isinstance(x, torch.Tensor) and r["status"] == "ok":
            handler.watch(request, state, x, r["decision"]["flagged"])
    timing = {
        "queue": 1000 * max((j.started - j.enqueued for j in jobs), default=0.0),
        "compute": 1000 * max((j.compute_s for j in jobs), default=0.0),
        "total": 1000 * (time.monotonic() - t0),
    }
    model = {"name": served.name, "version": served.bundle.card["version"], "device": state.device}
    return JSONResponse({"model": model, "results": results} | ({"timing_ms": timing} if spec.full else {}))


def _result(state: State, served: Served, index: int, filename: str | None, outcome: Outcome, spec: handler.Ask) -> dict[str, Any]:
    if isinstance(outcome, ServiceError):
        state.metrics.errors.labels(outcome.code).inc()
        return {"index": index, "filename": filename, "status": "error", "error": {"code": outcome.code, "message": outcome.message}}
    j = handler.judge(state, served, outcome, spec)
    cal = served.bundle.calibration
    assert cal is not None
    label = served.bundle.classes[outcome.predicted]
    verdict = {"index": index, "filename": filename, "status": "ok", "predicted_class": outcome.predicted, "label": label}
    decided = {"statistic": cal.statistic, "tail": cal.tail}
    if not spec.full:  # the verdict only: nothing continuous (docs/security.md#disclosure)
        return verdict | {"decision": decided | {"alpha": spec.alpha, "flagged": j.flagged}}
    return verdict | {
        "confidence": outcome.confidence,
        "scores": j.scores,
        "p_values": j.p_values,
        "decision": decided
        | ({"components": cal.components} if cal.combination else {})
        | {"p_value": j.p_value, "alpha": spec.alpha, "flagged": j.flagged},
        "heatmaps": {k: heatmap_png.encode(v) for k, v in outcome.heatmaps.items()},
    }
