"""GET /metrics: Prometheus text format (docs/deployment.md#metrics)."""

import torch
from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.serve.state import StateDep

router = APIRouter()


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    if torch.cuda.is_available() and state.device.startswith("cuda"):
        state.metrics.gpu_memory.set(torch.cuda.memory_allocated())
    state.metrics.queue_depth.set(len(state.batcher.queue) if state.batcher else 0)
    state.metrics.ready.set(1 if state.ready else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
