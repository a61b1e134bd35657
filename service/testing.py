"""Helpers to run the real service in-process: tiny random weights, uvicorn on loopback, ASGI lifespan.

Used by `tests/test_service*.py` and `benchmarks/load_service.py`. Nothing here is mocked: the
weights are a random denoiser saved and loaded as real weights (`model.sampler`), requests travel over
a real socket (uvicorn) or through the ASGI interface with the app's own lifespan.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httpx
import uvicorn

from service.app import create_app
from service.settings import ServiceSettings

# Small odd sizes (2 CPU cores): ~25k parameters, T = 20 steps.
TINY_SERVICE_CONFIG = {
    "singleFeatureDimension": 24, "pairFeatureDimension": 16, "positionalEmbeddingDimension": 14,
    "timestepEmbeddingDimension": 10, "relativePositionK": 5, "numPairTransformLayers": 1,
    "triangularMultiplicativeHiddenDimension": 12, "triangularAttentionHiddenDimension": 7,
    "triangularAttentionNumHeads": 2, "numStructureLayers": 2, "numStructureBlocks": 1, "ipaHiddenDimension": 6,
    "ipaNumHeads": 3, "ipaNumQkPoints": 3, "ipaNumVPoints": 5, "pairTransitionN": 2,
    "numStructureTransitionLayers": 1, "numTimesteps": 20, "mhcExpansionRate": 3, "zFactorRank": 2,
    "kNeighbors": 5, "maximumNumResidues": 64, "minimumNumResidues": 5, "useMHCMode": True,
    "useFlashMode": True, "name": "tiny",
}


def make_tiny_weights(directory: Path, seed: int = 0, **overrides) -> Path:
    """Random tiny denoiser (combined mHC + Flash-IPA mode by default) saved as a weights directory."""
    from model.sampler import save_random_weights

    return save_random_weights(directory, {**TINY_SERVICE_CONFIG, **overrides}, seed=seed,
                               card="# tiny random test weights\n")


def tiny_settings(weights: Path, **overrides) -> ServiceSettings:
    base = {"weights": weights, "device": "cpu", "residue_budget": 256, "queue_max_samples": 64, "max_count": 8,
            "request_timeout_s": 60.0, "exit_on_engine_death": False, "shutdown_timeout_s": 30.0,
            "log_level": "warning"}
    return ServiceSettings(**{**base, **overrides})


class ServerThread:
    """uvicorn serving `app` on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app, *, graceful_s: int = 30) -> None:
        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=graceful_s,
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 120.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("uvicorn exited during start-up (see the log)")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()


@contextmanager
def serve_in_thread(settings: ServiceSettings, **kw):
    server = ServerThread(create_app(settings), **kw).start()
    try:
        yield server
    finally:
        server.stop()


@asynccontextmanager
async def asgi_client(app):
    """httpx client bound to `app` through ASGI, with the app's lifespan run around it."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            yield client


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(interval)
    return bool(predicate())
