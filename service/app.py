"""FastAPI app of the sampling service: the lifespan (load, warm up, ready, drain) and the app's assembly.

    create_app(settings)
      routes       service.routes (POST /sample; GET /health, /ready, /info, /metrics), API key and
                   state through FastAPI dependencies; /docs, /redoc from fastapi-offline (no CDN)
      handlers     service.guards: 422 items, HTTP errors, 500 with an error id (no stack trace)
      middleware   outermost first: service.request_metrics.ResponseCounter (every response by route
                   and code), service.guards.GuardMiddleware (body size / content type before parsing)
      lifespan     service.startup.prepare (device, weights, limits) unless already prepared ->
                   Sampler.warm_up (compile with fallback) -> residue budget -> SamplingEngine -> ready;
                   on shutdown: drain accepted requests

The model is reached only through `model.sampler` (the facade) and `model.limits`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline

from service.engine import SamplingEngine
from service.guards import GuardMiddleware, install_error_handlers
from service.request_metrics import ResponseCounter, known_codes
from service.routes import api_routes
from service.schemas import ErrorResponse, publish_limits
from service.settings import ServiceSettings
from service.startup import explain, prepare
from service.state import ServiceState

log = logging.getLogger("mhcflash.service")
ENGINE_DEAD_EXIT_CODE = 70  # EX_SOFTWARE: the orchestrator restarts the container

__all__ = ["ENGINE_DEAD_EXIT_CODE", "create_app", "lifespan"]


@asynccontextmanager
async def lifespan(app: FastAPI):
    from model.sampler import WeightsError, compile_enabled

    state: ServiceState = app.state.service
    settings = state.settings
    try:
        prepared = state.prepared or await asyncio.to_thread(prepare, settings)
        sampler, limits = prepared.sampler, prepared.limits
        compiled = compile_enabled(settings.compile, sampler.device)
        if compiled and not settings.warmup:
            # The compile happens (and can fail) in the first step; without the warm-up that would be a
            # request's step, so a failed compile could not fall back before serving.
            log.warning("MHCFLASH_COMPILE needs the warm-up (MHCFLASH_WARMUP=true); the model runs eagerly")
            compiled = False
        if settings.warmup:
            await asyncio.to_thread(sampler.warm_up, (limits.min_length, limits.max_length), compile=compiled,
                                    off_hint="set MHCFLASH_COMPILE=off")
    except (WeightsError, RuntimeError) as exc:
        log.error("mhcflash service cannot start: %s", explain(exc))
        raise
    state.sampler, state.limits = sampler, limits
    app.openapi_schema = None  # regenerate with this server's ranges (GET /openapi.json)
    publish_limits(app.openapi(), limits)
    metrics = state.metrics
    metrics.set_device(sampler.device)
    budget = settings.residue_budget or await asyncio.to_thread(sampler.residue_budget, limits.max_length)
    budget = max(budget, limits.max_length)
    described = sampler.describe()
    attention = described["attention"]
    metrics.attention_backend.info({k: attention[k] for k in ("backend", "flash_attn_version")})
    metrics.model_info.info({
        "name": sampler.name, "mode": sampler.mode, "weights_sha256": sampler.sha256,
        "torch_version": described["versions"]["torch"], "cuda_version": str(described["versions"]["cuda"] or "none"),
        "device": described["device"], "compiled": described["compiled"],
    })
    step = sampler.step_function(cuda_graphs=settings.cuda_graphs, max_graphs=settings.cuda_graph_cache,
                                 off_hint="Set MHCFLASH_CUDA_GRAPHS=off")
    state.engine = SamplingEngine(
        step, num_timesteps=sampler.num_timesteps, device=sampler.device, to_pdb=sampler.to_pdb,
        residue_budget=budget, queue_max_samples=settings.queue_max_samples,
        max_batch_requests=settings.max_batch_requests, pad_multiple=settings.pad_multiple,
        length_group_ratio=settings.length_group_ratio, max_worker_restarts=settings.max_worker_restarts,
        metrics=metrics, on_dead=(lambda: _exit_soon(ENGINE_DEAD_EXIT_CODE)) if settings.exit_on_engine_death else None,
    )
    state.engine.start()
    state.ready = True
    log.info("ready: %s (%s, sha256 %s) on %s, residue budget %d, attention %s", sampler.name, sampler.mode,
             sampler.sha256[:12], sampler.device, budget, attention["backend"])
    try:
        yield
    finally:
        state.ready = False
        log.info("shutting down: draining accepted requests (up to %.0f s)", settings.shutdown_timeout_s)
        await state.engine.shutdown(settings.shutdown_timeout_s)


def _exit_soon(code: int) -> None:
    """The engine is down for good: exit non-zero so Docker / Kubernetes restart the service."""
    def bye() -> None:
        time.sleep(1.0)  # let the 503s already queued reach their clients
        log.critical("sampling engine is down; exiting with code %d for the orchestrator to restart", code)
        os._exit(code)

    threading.Thread(target=bye, daemon=True).start()


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    logging.getLogger("mhcflash").setLevel(settings.log_level.upper())
    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from files the package ships, no CDN.
    app = FastAPIOffline(
        title="mhcflash sampling service",
        version="0.1.0",
        summary="Sample protein backbones (CA traces) from a Genie-style mHC + Flash-IPA diffusion model.",
        lifespan=lifespan,
        routes=api_routes(),
        responses={500: {"model": ErrorResponse}},
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.service = ServiceState(settings)
    install_error_handlers(app)
    body_routes = {(method, route.path) for route in app.routes
                   if isinstance(route, APIRoute) and route.body_field is not None for method in route.methods}
    paths = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, body_routes=body_routes,
                       paths=paths)
    # Outermost of ours (added last): counts the guard's and the router's answers too.
    metrics = app.state.service.metrics
    app.add_middleware(ResponseCounter, routes=app.router.routes, counter=metrics.requests)
    metrics.expect_responses(known_codes(app.router.routes, app.openapi()))
    app.openapi_schema = None  # the lifespan regenerates it with this server's ranges
    return app
