"""GET /v1/model and the clean calibration distributions (docs/api.md#model)."""

from typing import Any

from fastapi import APIRouter

from service.core.scores import DEFAULT, SCORES
from service.fisher import HEATMAPS
from service.serve.errors import ServiceError
from service.serve.gallery import gallery_urls
from service.serve.schemas import ErrorResponse
from service.serve.state import StateDep

router = APIRouter()


@router.get("/v1/model", responses={503: {"model": ErrorResponse}})
async def model_info(state: StateDep) -> dict[str, Any]:
    if state.bundle is None:
        raise ServiceError(503, "not_ready", "no model is loaded yet", retry_after=1)
    s = state.settings
    cal = state.bundle.calibration
    return {
        "card": state.bundle.card,
        "device": state.device,
        "calibration": cal.summary() if cal else None,
        "scores": {k: {"direction": v.direction, "log10": v.log} for k, v in state.bundle.scores.items()},
        "default_scores": list(dict.fromkeys((*DEFAULT, *cal.decision_scores))) if cal else list(DEFAULT),
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
async def calibration_values(state: StateDep, score: str) -> dict[str, Any]:
    """The clean calibration distribution of one score (thresholded form), for plots."""
    cal = state.bundle.calibration if state.bundle else None
    if cal is None or score not in cal.values:
        raise ServiceError(404, "not_found", f"no calibration values for score {score!r}")
    spec = SCORES[score]
    return {"score": score, "direction": spec.direction, "log10": spec.log, "values": cal.values[score].tolist()}
