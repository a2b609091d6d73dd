"""Running the app under uvicorn: one process, one worker (metrics live in the process)."""

import logging
import signal

import uvicorn

from service.app import create_app
from service.settings import Settings


def run(settings: Settings) -> None:
    """Serves until SIGINT/SIGTERM, drains in-flight requests, and returns (exit status 0).

    uvicorn re-raises the signal it caught once it has shut down; a Python-level handler in place
    beforehand turns that into a no-op instead of killing the process with the signal's status.
    """
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=int(settings.request_timeout_ms / 1000) + 5,
    )
