"""GET /v1/models, each model's card and the clean calibration distributions, and reload (docs/api.md#model)."""

from typing import Any

from fastapi import APIRouter, Request

from service.core.scores import DEFAULT, SCORES
from service.fisher import HEATMAPS
from service.serve import handler
from service.serve.errors import ServiceError
from service.serve.gallery import gallery_urls
from service.serve.reload import reload
from service.serve.schemas import ErrorResponse
from service.serve.state import State, StateDep

router = APIRouter()


@router.get("/v1/models", responses={503: {"model": ErrorResponse}})
async def models(state: StateDep) -> dict[str, Any]:
    """The served models, the default first."""
    state.model()  # 503 before any is loaded
    return {
        "default": state.model().name,
        "models": [
            {"name": m.name, "version": str(m.bundle.card["version"]), "ready": m.ready, "url": f"/v1/models/{m.name}"}
            for m in state.models.values()
        ],
    }


@router.get("/v1/model", responses={503: {"model": ErrorResponse}})
async def default_model_info(request: Request, state: StateDep) -> dict[str, Any]:
    """The default model's card, calibration, scores, heatmaps, gallery and the service's limits."""
    return model_info(state, None, handler.shows_details(request, state))


@router.get("/v1/models/{model_name}", responses={404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}})
async def named_model_info(request: Request, state: StateDep, model_name: str) -> dict[str, Any]:
    """The named model's card, calibration, scores, heatmaps, gallery and the service's limits."""
    return model_info(state, model_name, handler.shows_details(request, state))


def model_info(state: State, model_name: str | None, full: bool) -> dict[str, Any]:
    served = state.model(model_name)
    bundle = served.bundle
    s = state.settings
    cal = bundle.calibration
    return {
        "card": bundle.card,
        "weights_sha256": bundle.weights_sha256,
        "loaded_at": served.loaded_at,
        "device": state.device,
        "disclosure": "full" if full else "verdict",
        "calibration": cal.summary() if cal and full else None,
        "scores": {k: {"direction": v.direction, "log10": v.log} for k, v in bundle.scores.items()},
        "default_scores": list(dict.fromkeys((*DEFAULT, *cal.decision_scores))) if cal else list(DEFAULT),
        "heatmaps": list(HEATMAPS),
        "examples": gallery_urls(bundle.name),
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


@router.get(
    "/v1/model/calibration/{score}", responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}}
)
async def default_calibration_values(request: Request, state: StateDep, score: str) -> dict[str, Any]:
    """The default model's clean calibration distribution of one score (thresholded form), for plots."""
    return calibration_values(state, None, score, handler.shows_details(request, state))


@router.get(
    "/v1/models/{model_name}/calibration/{score}",
    responses={403: {"model": ErrorResponse}, 404: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def named_calibration_values(request: Request, state: StateDep, model_name: str, score: str) -> dict[str, Any]:
    """The named model's clean calibration distribution of one score."""
    return calibration_values(state, model_name, score, handler.shows_details(request, state))


def calibration_values(state: State, model_name: str | None, score: str, full: bool) -> dict[str, Any]:
    if not full:
        raise ServiceError(403, "forbidden", "this client gets the verdict only: no calibration values (disclosure level verdict)")
    cal = state.model(model_name).bundle.calibration
    if cal is None or score not in cal.values:
        raise ServiceError(404, "not_found", f"no calibration values for score {score!r}")
    spec = SCORES[score]
    return {"score": score, "direction": spec.direction, "log10": spec.log, "values": cal.values[score].tolist()}


@router.post(
    "/v1/models/{model_name}/reload",
    responses={c: {"model": ErrorResponse} for c in (401, 403, 404, 422, 503)},
)
async def reload_model(request: Request, state: StateDep, model_name: str) -> dict[str, Any]:
    """Loads the model's bundle directory again (weights, calibration, fits; never new architecture
    code), warms it up and swaps it in without a gap. Only on a server with API keys, by a full key."""
    if not state.settings.keys():
        raise ServiceError(
            403, "forbidden", "reload is an admin call: it needs API keys (FISHERGUARD_API_KEYS or FISHERGUARD_API_KEYS_FILE)"
        )
    if getattr(request.state, "disclosure", "full") != "full":
        raise ServiceError(403, "forbidden", "reload is an admin call: a verdict-only key may not make it")
    old, new, seconds = await reload(state, model_name)
    return {
        "model": model_name,
        "version": str(new.bundle.card["version"]),
        "weights_sha256": new.bundle.weights_sha256,
        "previous": {"version": str(old.bundle.card["version"]), "weights_sha256": old.bundle.weights_sha256},
        "seconds": seconds,
    }
