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
    for m in state.models.values():
        m.metrics.queue_depth.set(len(m.batcher.queue))
        m.metrics.ready.set(1 if m.ready and not state.closing else 0)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
