"""FastAPI app of the sampling service: lifespan (load, warm up, ready), routes, guards.

Request path (docs/ARCHITECTURE.md): `POST /sample` -> guards (API key, body size, content type)
-> `schemas.SampleRequest` (422 naming the field and range) -> `engine.submit` (429 + Retry-After
when the queue is full, 503 when shutting down / engine down) -> await the job (client disconnect
or `request_timeout_s` cancels it and frees its slots) -> JSON with one PDB text per sample, or
raw PDB text with `?format=pdb` / `Accept: chemical/x-pdb`.

Errors never carry a stack trace: every unhandled exception becomes `{"detail", "error_id"}` with a
500, and the traceback is logged server-side under that id.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import platform
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import asdict

import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.engine import (
    Cancelled,
    EngineUnavailable,
    QueueFull,
    SampleFailed,
    SamplingEngine,
    auto_residue_budget,
    new_seeds,
)
from service.metrics import ServiceMetrics
from service.request_metrics import ResponseCounter, known_codes
from service.schemas import (
    ErrorResponse,
    Limits,
    Sample,
    SampleRequest,
    SampleResponse,
    Timings,
    publish_limits,
    validate_limits,
)
from service.settings import ServiceSettings
from service.startup import Prepared, explain, prepare
from service.warmup import compile_enabled, warm_up_with_fallback

log = logging.getLogger("mhcflash.service")
PDB_MEDIA_TYPE = "chemical/x-pdb"
ENGINE_DEAD_EXIT_CODE = 70  # EX_SOFTWARE: the orchestrator restarts the container


class ServiceState:
    """Everything the lifespan builds; `app.state.service`."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics()  # from creation on: responses during start-up are counted too
        self.engine: SamplingEngine | None = None
        self.loaded = None  # model.weights_io.LoadedWeights
        self.prepared: Prepared | None = None  # set by service.startup.main; else the lifespan prepares
        self.limits: Limits | None = None
        self.device: torch.device | None = None
        self.attention: dict = {}
        self.compiled = "none"  # what MHCFLASH_COMPILE compiled: "pair_stack,point_rotations", "point_rotations"
        self.precision = "float32"  # what the steps run in: "bf16" (autocast on CUDA) or "float32"
        self.ready = False
        self.started = time.time()


def attention_info(denoiser: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> dict:
    """The attention backend the denoiser uses: its own report if it has one, else `resolve_backend`."""
    choice = getattr(denoiser, "attention_backend", None)
    source = "denoiser"
    if callable(choice):
        choice = choice()
    if choice is None:
        from model.ipa.backends import resolve_backend

        source = "resolve_backend (default head widths)"
        try:
            choice = resolve_backend(device=device, dtype=dtype, use_flash_attn3=denoiser.config.useFlashAttn3)
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: the denoiser already ran
            return {"backend": "unknown", "flash_attn_version": "none", "reason": str(exc), "source": source}
    return {
        "backend": str(choice.name),
        "flash_attn_version": str(choice.flash_attn_version or "none"),
        "reason": str(choice.reason),
        "source": source,
    }


@asynccontextmanager
async def lifespan(app: FastAPI):
    from model.diffusion import Schedule
    from model.weights_io import WeightsError

    state: ServiceState = app.state.service
    settings = state.settings
    try:
        prepared = state.prepared or await asyncio.to_thread(prepare, settings)
        device, loaded, limits = prepared.device, prepared.loaded, prepared.limits
        autocast = torch.bfloat16 if settings.precision in ("auto", "bf16") and device.type == "cuda" else None
        schedule = Schedule.from_config(loaded.config)
        compiled = compile_enabled(settings.compile, device)
        if compiled and not settings.warmup:
            # The compile happens (and can fail) in the first step; without the warm-up that would be a
            # request's step, so a failed compile could not fall back before serving.
            log.warning("MHCFLASH_COMPILE needs the warm-up (MHCFLASH_WARMUP=true); the model runs eagerly")
            compiled = False
        if compiled:
            from model.network.compile import compile_denoiser

            compile_denoiser(loaded.denoiser)
        if settings.warmup:
            t0 = time.perf_counter()
            compiled = await asyncio.to_thread(warm_up_with_fallback, loaded.denoiser, schedule, device, limits,
                                               autocast, compiled)
            log.info("warm-up done in %.1f s (%s)", time.perf_counter() - t0,
                     "compiled" if compiled else "eager")
    except (WeightsError, RuntimeError) as exc:
        log.error("mhcflash service cannot start: %s", explain(exc))
        raise
    state.device, state.loaded, state.limits = device, loaded, limits
    from model.network.compile import compiled_parts

    state.compiled = ",".join(compiled_parts(loaded.denoiser)) or "none"
    state.precision = "bf16" if autocast is not None else "float32"
    app.openapi_schema = None  # regenerate with this server's ranges (GET /openapi.json)
    publish_limits(app.openapi(), limits)
    metrics = state.metrics
    metrics.set_device(device)
    budget = settings.residue_budget or await asyncio.to_thread(
        auto_residue_budget, loaded.denoiser, device, limits.max_length)
    budget = max(budget, limits.max_length)
    state.attention = attention_info(loaded.denoiser, device, autocast or torch.float32)
    metrics.attention_backend.info({k: state.attention[k] for k in ("backend", "flash_attn_version")})
    metrics.model_info.info({
        "name": loaded.name, "mode": loaded.config.mode, "weights_sha256": loaded.sha256,
        "torch_version": torch.__version__, "cuda_version": str(torch.version.cuda or "none"),
        "device": str(device), "compiled": state.compiled,
    })
    state.engine = SamplingEngine(
        loaded.denoiser, schedule, device=device, residue_budget=budget,
        queue_max_samples=settings.queue_max_samples, max_batch_requests=settings.max_batch_requests,
        pad_multiple=settings.pad_multiple, length_group_ratio=settings.length_group_ratio, autocast_dtype=autocast,
        cuda_graphs=settings.cuda_graphs, cuda_graph_cache=settings.cuda_graph_cache,
        max_worker_restarts=settings.max_worker_restarts, metrics=metrics,
        on_dead=(lambda: _exit_soon(ENGINE_DEAD_EXIT_CODE)) if settings.exit_on_engine_death else None,
    )
    state.engine.start()
    state.ready = True
    log.info("ready: %s (%s, sha256 %s) on %s, residue budget %d, attention %s", loaded.name,
             loaded.config.mode, loaded.sha256[:12], device, budget, state.attention["backend"])
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


class GuardMiddleware:
    """Pure ASGI: body size (413) and content type (415) for POST / PUT / PATCH bodies, before any parsing.

    Fail-safe: every such request is guarded except a method that a known path does not take a body
    on (`PUT /health`, `PUT /sample`): the router answers those 405 without reading the body.
    `body_routes` holds the (method, path) pairs that take a body, `paths` every route path.
    """

    def __init__(self, app, max_body_bytes: int, body_routes: set[tuple[str, str]], paths: set[str]) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_routes = body_routes
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        if scope["path"] in self.paths and (scope["method"], scope["path"]) not in self.body_routes:
            return await self.app(scope, receive, send)  # 405 from the router, body never read
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return await _send_json(send, 415, {"detail": "Content-Type must be application/json"})
        try:
            declared = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"detail": "invalid Content-Length"})
        if declared > self.max_body_bytes:
            return await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
        # Buffer the body (at most max_body_bytes), then replay it: chunked bodies are limited too.
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # client left before sending its body
            seen += len(message.get("body", b""))
            if seen > self.max_body_bytes:
                return await _send_json(send, 413, {"detail": f"request body larger than {self.max_body_bytes} bytes"})
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_json(send, status: int, body: dict) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    logging.getLogger("mhcflash").setLevel(settings.log_level.upper())
    # FastAPIOffline: /docs and /redoc load Swagger UI / ReDoc from files the package ships, no CDN.
    app = FastAPIOffline(
        title="mhcflash sampling service",
        version="0.1.0",
        summary="Sample protein backbones (CA traces) from a Genie-style mHC + Flash-IPA diffusion model.",
        lifespan=lifespan,
        responses={500: {"model": ErrorResponse}},
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from validator.swagger.io
    )
    app.state.service = ServiceState(settings)
    _install_handlers(app)
    _install_routes(app)
    body_routes = {(method, route.path) for route in app.routes
                   if isinstance(route, APIRoute) and route.body_field is not None for method in route.methods}
    paths = {route.path for route in app.routes if hasattr(route, "path")}
    app.add_middleware(GuardMiddleware, max_body_bytes=settings.max_body_bytes, body_routes=body_routes,
                       paths=paths)
    # Outermost of ours: counts the guard's and the router's answers too.
    metrics = app.state.service.metrics
    app.add_middleware(ResponseCounter, routes=app.router.routes, counter=metrics.requests)
    metrics.expect_responses(known_codes(app.router.routes, app.openapi()))
    app.openapi_schema = None  # the lifespan regenerates it with this server's ranges
    return app


def _state(request: Request) -> ServiceState:
    return request.app.state.service


def require_api_key(request: Request) -> None:
    """Constant-time check of `X-API-Key` when MHCFLASH_API_KEY is set; 401 without details."""
    state = _state(request)
    expected = state.settings.api_key
    if expected is None:
        return
    given = request.headers.get("x-api-key", "")
    if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
        if state.metrics is not None:
            state.metrics.rejected.labels(reason="unauthorized").inc()
        raise StarletteHTTPException(401, "unauthorized")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = []
        for e in exc.errors():
            item = {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            if e.get("ctx"):
                item["ctx"] = {k: str(v) for k, v in e["ctx"].items()}
            errors.append(item)
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(Exception)
    async def _unhandled(request: Request, exc: Exception):
        error_id = uuid.uuid4().hex[:12]
        log.error("unhandled error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
        state = _state(request)
        if state.metrics is not None:
            state.metrics.errors.labels(kind="internal").inc()
        return JSONResponse({"detail": "internal server error", "error_id": error_id}, status_code=500)


def _pdb_models(samples: list[Sample]) -> str:
    """One PDB text with a MODEL / ENDMDL block per sample."""
    out = []
    for n, s in enumerate(samples, start=1):
        out.append(f"MODEL     {n:>4}")
        out.extend(ln for ln in s.pdb.splitlines() if ln.startswith(("ATOM", "HETATM", "TER")))
        out.append("ENDMDL")
    out.append("END")
    return "\n".join(out) + "\n"


def _install_routes(app: FastAPI) -> None:
    reject_doc = {
        400: {"model": ErrorResponse, "description": "malformed body (invalid UTF-8) or Content-Length"},
        401: {"model": ErrorResponse, "description": "missing or wrong X-API-Key (when auth is on)"},
        413: {"model": ErrorResponse}, 415: {"model": ErrorResponse},
        429: {"model": ErrorResponse, "description": "queue full; retry after the Retry-After header"},
        503: {"model": ErrorResponse, "description": "shutting down or engine down (Retry-After)"},
        504: {"model": ErrorResponse, "description": "not finished within the request timeout"},
    }

    @app.post(
        "/sample",
        response_model=SampleResponse,
        responses={**reject_doc, 200: {"content": {PDB_MEDIA_TYPE: {"example": "MODEL        1\nATOM ...\nENDMDL\nEND\n"}}}},
        dependencies=[Depends(require_api_key)],
        summary="Sample backbones of one length",
    )
    async def sample(
        req: SampleRequest,
        request: Request,
        format: str = Query("json", pattern="^(json|pdb)$", description="pdb: raw PDB text, one MODEL per sample"),
    ):
        state = _state(request)
        metrics, limits = state.metrics, state.limits
        t0 = time.monotonic()
        if state.engine is None or not state.ready:
            return _reject(state, 503, "engine_down", "the service is not ready", 5)
        errors = validate_limits(req, limits)
        if errors:
            metrics.rejected.labels(reason="limits").inc()
            return JSONResponse({"detail": errors}, status_code=422)
        seeds = new_seeds(req.count, req.seed)
        try:
            job = state.engine.submit(length=req.length, count=req.count, seeds=seeds, noise_scale=req.noise_scale)
        except QueueFull as exc:
            return _reject(state, 429, "queue_full", "the sampling queue is full; retry later", exc.retry_after)
        except EngineUnavailable as exc:
            return _reject(state, 503, exc.reason, str(exc), exc.retry_after)
        watcher = asyncio.create_task(_watch_disconnect(request, state.engine, job))
        try:
            await asyncio.wait_for(asyncio.shield(job.future), state.settings.request_timeout_s)
        except TimeoutError:
            state.engine.cancel(job)
            metrics.errors.labels(kind="timeout").inc()
            return JSONResponse({"detail": f"not finished within {state.settings.request_timeout_s:g} s; "
                                 "its samples were dropped"}, status_code=504)
        except asyncio.CancelledError:
            state.engine.cancel(job)
            raise
        except Cancelled:
            return Response(status_code=499)  # client closed the connection; nobody reads this
        except EngineUnavailable as exc:
            return _reject(state, 503, exc.reason, str(exc), exc.retry_after, count_reject=False)
        except SampleFailed as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
        finally:
            watcher.cancel()
        samples = [Sample(id=f"{job.id}-{r.index}", index=r.index, length=r.length, seed=r.seed, pdb=r.pdb)
                   for r in job.results]
        total = time.monotonic() - t0
        metrics.request_duration.observe(total)
        if format == "pdb" or PDB_MEDIA_TYPE in request.headers.get("accept", ""):
            return PlainTextResponse(_pdb_models(samples), media_type=PDB_MEDIA_TYPE,
                                     headers={"X-Request-Id": job.id, "X-Weights-Sha256": state.loaded.sha256})
        return SampleResponse(
            request_id=job.id, model=state.loaded.name, mode=state.loaded.config.mode,
            weights_sha256=state.loaded.sha256, noise_scale=req.noise_scale, samples=samples,
            timings=Timings(queue_wait_s=job.queue_wait_s, sampling_s=job.sampling_s, total_s=total),
        )

    @app.get("/health", summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: weights loaded, warmed up, engine running",
             responses={503: {"description": "not ready (starting, shutting down or engine down)"}})
    async def ready(request: Request):
        state = _state(request)
        engine = state.engine
        if state.ready and engine is not None and engine.accepting:
            return {"ready": True}
        reason = "starting" if engine is None else ("engine down" if not engine.alive else "shutting down")
        return JSONResponse({"ready": False, "reason": reason}, status_code=503)

    @app.get("/info", summary="Model, weights hash, versions, device, attention backend, limits",
             dependencies=[Depends(require_api_key)],
             responses={401: reject_doc[401], 503: {"model": ErrorResponse, "description": "not ready yet"}})
    async def info(request: Request):
        state = _state(request)
        if state.loaded is None:
            return JSONResponse({"detail": "the service is not ready"}, status_code=503)
        cfg, dev = state.loaded.config, state.device
        queued, active = state.engine.load()
        return {
            "model": state.loaded.name,
            "mode": cfg.mode,
            "weights_sha256": state.loaded.sha256,
            "num_timesteps": cfg.numTimesteps,
            "parameters": sum(p.numel() for p in state.loaded.denoiser.parameters()),
            "device": str(dev),
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "precision": state.precision,
            "compiled": state.compiled,
            "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
            "attention": state.attention,
            "limits": asdict(state.limits),
            "residue_budget": state.engine.residue_budget,
            "queue": {"queued_samples": queued, "active_samples": active,
                      "max_queued_samples": state.settings.queue_max_samples},
            "engine": {"alive": state.engine.alive, **asdict(state.engine.stats)},
            "auth": state.settings.api_key is not None,
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics(request: Request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _reject(state: ServiceState, status: int, reason: str, detail: str, retry_after: int,
            *, count_reject: bool = True) -> JSONResponse:
    if count_reject:
        state.metrics.rejected.labels(reason=reason).inc()
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": str(int(retry_after))})


async def _watch_disconnect(request: Request, engine: SamplingEngine, job) -> None:
    """Cancel `job` when the client goes away (uvicorn reports http.disconnect)."""
    while not job.future.done():
        if await request.is_disconnected():
            log.info("client left; cancelling request %s", job.id)
            engine.cancel(job)
            return
        await asyncio.sleep(0.1)
