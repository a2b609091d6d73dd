"""Running the app under uvicorn: one process, one worker (metrics live in the process), and a
drain on SIGTERM/SIGINT: refuse new work with 503 shutting_down, finish everything accepted, exit 0."""

import asyncio
import json
import logging
import os
import signal
import time
from pathlib import Path
from types import FrameType

import uvicorn

from service.serve.access import configure_logging
from service.serve.app import create_app
from service.serve.reload import reload_all
from service.serve.settings import Settings
from service.serve.state import State

log = logging.getLogger("fisherguard")


class DrainingServer(uvicorn.Server):
    """The first signal starts a drain; uvicorn's own shutdown follows once the drain is done (or the
    bound passes). A second signal shuts down at once."""

    def __init__(self, config: uvicorn.Config, state: State, drain_timeout_s: float, address_file: Path) -> None:
        super().__init__(config)
        self.state, self.drain_timeout_s, self.address_file = state, drain_timeout_s, address_file
        self.loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        self.loop = asyncio.get_running_loop()
        self.loop.add_signal_handler(signal.SIGHUP, self.reload)
        await super().serve(sockets)

    def reload(self) -> None:
        """SIGHUP: reload every model from its bundle directory (docs/api.md#reload)."""
        log.info("SIGHUP: reloading %s", ", ".join(self.state.models))
        task = asyncio.ensure_future(reload_all(self.state))
        self.state.retiring.add(task)
        task.add_done_callback(self.state.retiring.discard)

    async def startup(self, sockets: list | None = None) -> None:  # type: ignore[type-arg]
        """Binds, then writes the address actually bound to the health probe's address file."""
        await super().startup(sockets)
        bound = [s.getsockname() for server in getattr(self, "servers", []) for s in server.sockets]
        if bound:
            try:
                self.address_file.write_text(json.dumps({"host": self.config.host, "port": bound[0][1], "pid": os.getpid()}))
            except OSError as e:  # a read-only file system without a writable /tmp: the probe falls back to the settings
                log.warning("cannot write %s: %s", self.address_file, e)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.state.draining or self.loop is None:
            super().handle_exit(sig, frame)
            return
        log.info("signal %s: draining (new requests get 503 shutting_down)", signal.Signals(sig).name)
        self.state.draining = True
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()) if self.loop else None)

    async def _drain(self) -> None:
        end = time.monotonic() + self.drain_timeout_s
        queued = lambda: any(m.batcher.queue for m in self.state.models.values())  # noqa: E731
        while time.monotonic() < end and (self.state.inflight > 0 or queued()):
            await asyncio.sleep(0.02)
        log.info("drained (%d requests still in flight); shutting down", self.state.inflight)
        self.should_exit = True


def run(settings: Settings) -> None:
    """Serves until SIGINT/SIGTERM, drains, and returns (exit status 0).

    uvicorn re-raises the signal it caught once it has shut down; a Python-level handler in place
    beforehand turns that into a no-op instead of killing the process with the signal's status.
    """
    configure_logging(settings)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    app = create_app(settings)
    drain_s = settings.request_timeout_ms / 1000 + 5
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=int(drain_s),
        access_log=False,  # AccessControl logs every request as JSON
    )
    DrainingServer(config, app.state.fg, drain_s, settings.address_file).run()
