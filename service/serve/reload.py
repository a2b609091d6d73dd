"""Reloading a served model without a gap (docs/api.md#reload): its bundle directory is read again into
a copy of the served network, warmed up on a new engine thread, and swapped in at once; requests
admitted before the swap finish on the old version, whose batcher then retires. A bundle that fails
to load or to warm up leaves the old version serving."""

import asyncio
import copy
import logging
import time

from service.core.bundle import BundleError, reload_bundle
from service.serve.errors import ServiceError
from service.serve.lifespan import bring_up, calibrated
from service.serve.state import Served, State

log = logging.getLogger("fisherguard")


async def reload(state: State, name: str) -> tuple[Served, Served, float]:
    """Swaps in the named model's bundle as it is on disk now: (old, new, seconds taken). 422
    `reload_failed` when it cannot be served; one reload of a model at a time."""
    lock = state.reload_locks.setdefault(name, asyncio.Lock())
    async with lock:
        t0 = time.monotonic()
        old = state.model(name)
        loop = asyncio.get_running_loop()
        network = await loop.run_in_executor(old.batcher.executor, copy.deepcopy, old.bundle.model)  # between its batches
        try:
            bundle = await asyncio.to_thread(lambda: calibrated(reload_bundle(old.bundle, network)))
        except (BundleError, RuntimeError, OSError, ValueError) as e:
            raise _failed(old, e) from None
        try:
            new = await bring_up(state, bundle)
        except Exception as e:  # noqa: BLE001 - whatever the new weights do, the old version keeps serving
            raise _failed(old, e) from None
        new.batcher.start()
        state.models[name] = new  # the swap: admissions from now on reserve on the new batcher
        new.metrics.info.info({"name": name, "version": str(bundle.card["version"]), "device": state.device})
        retiring = asyncio.ensure_future(old.batcher.retire(state.settings.request_timeout_ms / 1000 + 5))
        state.retiring.add(retiring)
        retiring.add_done_callback(state.retiring.discard)
        seconds = time.monotonic() - t0
        log.info("reloaded %s: version %s -> %s in %.2f s", name, old.bundle.card["version"], bundle.card["version"], seconds)
        return old, new, seconds


def _failed(old: Served, e: Exception) -> ServiceError:
    return ServiceError(
        422, "reload_failed", f"model {old.name!r} keeps serving version {old.bundle.card['version']}: {type(e).__name__}: {e}"
    )


async def reload_all(state: State) -> None:
    """SIGHUP: every served model, one after the other; a failure is logged and the others go on."""
    for name in list(state.models):
        try:
            await reload(state, name)
        except ServiceError as e:
            log.error("reload of %s failed: %s", name, e.message)
