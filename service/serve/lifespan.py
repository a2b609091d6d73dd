"""Start-up and shut-down of the service: load the bundle onto the device, warm it up, run the batcher."""

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import torch
from fastapi import FastAPI

from service.core.bundle import Bundle, load_bundle
from service.core.device import pick_device
from service.fisher import HEATMAPS
from service.serve import allocator
from service.serve.batcher import Batcher
from service.serve.detector import Detector
from service.serve.errors import ServiceError
from service.serve.settings import Settings
from service.serve.state import State

log = logging.getLogger("fisherguard")


def warm_up(detector: Detector, bundle: Bundle) -> None:
    """Runs every score and heatmap once so the first request pays no one-off cost."""
    x = torch.zeros(2, *bundle.input_shape)
    outcomes = detector.run(x, list(bundle.scores), list(HEATMAPS))
    bad = [o for o in outcomes if isinstance(o, ServiceError)]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


def load(settings: Settings, device: str, bundle: Bundle | None) -> Bundle:
    """The given bundle moved to the device, or the one the settings name; it must be calibrated."""
    if bundle is not None:
        bundle.model.to(device)
    loaded = bundle or load_bundle(settings.model, device)
    if loaded.calibration is None:
        raise RuntimeError(f"bundle {loaded.path} has no calibration.json; run `fisherguard calibrate --model {loaded.path}`")
    return loaded


def lifespan_for(settings: Settings, bundle: Bundle | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: State = app.state.fg
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state.device = pick_device(settings.device)
        state.bundle = load(settings, state.device, bundle)
        detector = Detector(state.bundle)
        state.batcher = Batcher(
            detector.run,
            settings.max_batch_size,
            settings.max_delay_ms / 1000,
            settings.max_queue_images,
            state.metrics,
            settings.engine_nice,
        )
        await asyncio.get_running_loop().run_in_executor(state.batcher.executor, warm_up, detector, state.bundle)  # on the engine's thread
        state.warmed = True
        state.metrics.model.info({"name": state.bundle.name, "version": str(state.bundle.card["version"]), "device": state.device})
        gc.freeze()  # what start-up built lives for the process: keep it out of every later collection (whole-heap pauses of ~100 ms)
        state.batcher.start()
        log.info("serving %s on %s, allocator %s", state.bundle.name, state.device, allocator.in_use())
        try:
            yield
        finally:
            state.metrics.ready.set(0)
            await state.batcher.stop(settings.request_timeout_ms / 1000)

    return lifespan
