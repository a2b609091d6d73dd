"""What the running service holds: settings, metrics, the bundle and its batcher, and its phase."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from service.core.bundle import Bundle
from service.serve.batcher import Batcher
from service.serve.errors import ServiceError
from service.serve.metrics import Metrics
from service.serve.settings import Settings


@dataclass
class State:
    settings: Settings
    metrics: Metrics
    bundle: Bundle | None = None
    batcher: Batcher | None = None
    device: str = "cpu"
    warmed: bool = False
    draining: bool = False  # SIGTERM seen: finish what was accepted, refuse the rest
    inflight: int = 0  # detect and infer requests being handled

    @property
    def closing(self) -> bool:
        return self.draining or (self.batcher is not None and self.batcher.closing)

    @property
    def ready(self) -> bool:
        return self.bundle is not None and self.warmed and self.batcher is not None and self.batcher.running and not self.closing

    def check_ready(self) -> None:
        """503 `shutting_down` while draining, `not_ready` before the model serves."""
        if self.closing:
            raise ServiceError(503, "shutting_down", "the service is shutting down; retry on another replica", retry_after=1)
        if not self.ready:
            raise ServiceError(503, "not_ready", "the model is not loaded, warmed up and batching yet", retry_after=1)


def get_state(request: Request) -> State:
    return request.app.state.fg  # type: ignore[no-any-return]


StateDep = Annotated[State, Depends(get_state)]
