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
from service.serve.metrics import ModelMetrics
from service.serve.settings import Settings
from service.serve.state import Served, State

log = logging.getLogger("fisherguard")


def warm_up(detector: Detector, bundle: Bundle) -> None:
    """Runs every score and heatmap once so the first request pays no one-off cost."""
    x = torch.zeros(2, *bundle.input_shape)
    outcomes = detector.run(x, list(bundle.scores), list(HEATMAPS))
    bad = [o for o in outcomes if isinstance(o, ServiceError)]
    if bad:
        raise RuntimeError(f"warm-up failed: {bad[0]}")


def load(spec: str, device: str) -> Bundle:
    """The bundle a `model` setting names, on the device; it must be calibrated."""
    return calibrated(load_bundle(spec, device))


def calibrated(bundle: Bundle) -> Bundle:
    if bundle.calibration is None:
        raise RuntimeError(f"bundle {bundle.path} has no calibration.json; run `fisherguard calibrate --model {bundle.path}`")
    return bundle


def bundles(settings: Settings, device: str, given: Bundle | list[Bundle] | None) -> list[Bundle]:
    """The bundles to serve: the given ones moved to the device, or those `settings.model` names
    (comma-separated); names must differ, since routes and metrics address models by name."""
    if given is not None:
        out = [calibrated(b) for b in (given if isinstance(given, list) else [given])]
        for b in out:
            b.model.to(device)
    else:
        out = [load(spec, device) for spec in settings.models()]
    names = [b.name for b in out]
    if len(set(names)) != len(names):
        raise RuntimeError(f"two served bundles share a name: {names}; each model needs its own")
    return out


def serve_one(state: State, bundle: Bundle) -> Served:
    s = state.settings
    metrics = ModelMetrics(state.metrics, bundle.name)
    detector = Detector(bundle)
    batcher = Batcher(detector.run, s.max_batch_size, s.max_delay_ms / 1000, s.max_queue_images, metrics, s.engine_nice, state.tracing)
    return Served(bundle, batcher, metrics, detector)


async def bring_up(state: State, bundle: Bundle) -> Served:
    """A served model for the bundle, warmed up on its own engine thread; its batcher not started yet.
    A warm-up that fails shuts the engine thread down and raises."""
    served = serve_one(state, bundle)
    try:
        await asyncio.get_running_loop().run_in_executor(served.batcher.executor, warm_up, served.detector, bundle)
    except BaseException:
        served.batcher.executor.shutdown(wait=False)
        raise
    served.warmed = True
    return served


def lifespan_for(settings: Settings, bundle: Bundle | list[Bundle] | None) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state: State = app.state.fg
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        state.device = pick_device(settings.device)
        for b in bundles(settings, state.device, bundle):
            served = state.models[b.name] = await bring_up(state, b)
            served.metrics.info.info({"name": b.name, "version": str(b.card["version"]), "device": state.device})
        gc.freeze()  # what start-up built lives for the process: keep it out of every later collection (whole-heap pauses of ~100 ms)
        for served in state.models.values():
            served.batcher.start()
        log.info("serving %s on %s, allocator %s", ", ".join(state.models), state.device, allocator.in_use())
        try:
            yield
        finally:
            for served in state.models.values():
                served.metrics.ready.set(0)
            await asyncio.gather(*(m.batcher.stop(settings.request_timeout_ms / 1000) for m in state.models.values()), *state.retiring)
            if state.tracer_provider is not None:
                state.tracer_provider.shutdown()  # exports the spans still batched

    return lifespan
