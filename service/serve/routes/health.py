"""Liveness and readiness (docs/api.md#health)."""

from fastapi import APIRouter

from service.serve.errors import ServiceError
from service.serve.schemas import ErrorResponse
from service.serve.state import StateDep

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. No model work."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(state: StateDep) -> dict[str, str]:
    """Readiness: model loaded, warmed up, batcher running."""
    if state.closing:
        raise ServiceError(503, "shutting_down", "the service is draining before it stops", retry_after=1)
    if not state.ready:
        raise ServiceError(503, "not_ready", "the model is not loaded, warmed up and batching yet", retry_after=1)
    return {"status": "ready"}
