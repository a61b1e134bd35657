"""`python -m service`: run the sampling service with uvicorn (settings from MHCFLASH_* variables)."""

from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.settings import ServiceSettings


def serve(settings: ServiceSettings | None = None) -> None:
    """Start uvicorn on settings.host:port; SIGTERM / Ctrl-C drain accepted requests, then exit.

    A start-up failure (bad weights, bad settings) exits non-zero (uvicorn's code 3) after one
    clear log line naming the file and the problem.
    """
    settings = settings or ServiceSettings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_timeout_s) or None,
        access_log=False,
    )


if __name__ == "__main__":
    serve()
