"""Running the app under uvicorn: one process, one worker (metrics live in the process)."""

import logging

import uvicorn

from service.app import create_app
from service.settings import Settings


def run(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,
        timeout_graceful_shutdown=int(settings.request_timeout_ms / 1000) + 5,
    )
