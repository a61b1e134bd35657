"""`GET /health` (liveness), `GET /ready` (readiness), `GET /info` (what runs), `GET /metrics` (Prometheus)."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.guards import require_api_key
from service.routes.responses import REJECTIONS, SERVER_ERROR
from service.schemas import ErrorResponse
from service.state import State

router = APIRouter(responses=SERVER_ERROR)


@router.get("/health", summary="Liveness: the process answers")
async def health():
    return {"status": "ok"}


@router.get("/ready", summary="Readiness: weights loaded, warmed up, engine running",
            responses={503: {"description": "not ready (starting, shutting down or engine down)"}})
async def ready(state: State):
    engine = state.engine
    if state.ready and engine is not None and engine.accepting:
        return {"ready": True}
    reason = "starting" if engine is None else ("engine down" if not engine.alive else "shutting down")
    return JSONResponse({"ready": False, "reason": reason}, status_code=503)


@router.get("/info", summary="Model, weights hash, versions, device, attention backend, limits",
            dependencies=[Depends(require_api_key)],
            responses={401: REJECTIONS[401], 503: {"model": ErrorResponse, "description": "not ready yet"}})
async def info(state: State):
    engine = state.engine
    if state.sampler is None or engine is None:
        return JSONResponse({"detail": "the service is not ready"}, status_code=503)
    queued, active = engine.load()
    return {
        **state.sampler.describe(),  # model, mode, weights_sha256, ..., precision, compiled, versions, attention
        "limits": asdict(state.limits),
        "residue_budget": engine.residue_budget,
        "queue": {"queued_samples": queued, "active_samples": active,
                  "max_queued_samples": state.settings.queue_max_samples},
        "engine": {"alive": engine.alive, **asdict(engine.stats)},
        "auth": state.settings.api_key is not None,
    }


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(state: State):
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
