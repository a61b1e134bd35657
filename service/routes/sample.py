"""`POST /sample`: validate against the server's limits, submit to the engine, await, answer JSON or PDB.

Request path (docs/ARCHITECTURE.md): guards (API key, body size, content type) -> `SampleRequest`
(422 naming the field and range) -> `engine.submit` (429 + Retry-After when the queue is full, 503
when shutting down / engine down) -> await the job (client disconnect or `request_timeout_s` cancels
it and frees its slots) -> JSON with one PDB text per sample, or raw PDB text with `?format=pdb` /
`Accept: chemical/x-pdb`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from service.engine import SamplingEngine
from service.guards import require_api_key
from service.jobs import Cancelled, EngineUnavailable, Job, QueueFull, SampleFailed, new_seeds
from service.routes.responses import PDB_MEDIA_TYPE, REJECTIONS, SERVER_ERROR
from service.schemas import Sample, SampleRequest, SampleResponse, Timings, validate_limits
from service.state import ServiceState, State

log = logging.getLogger("mhcflash.service")
router = APIRouter(responses=SERVER_ERROR)


@router.post(
    "/sample",
    response_model=SampleResponse,
    responses={**REJECTIONS, 200: {"content": {PDB_MEDIA_TYPE: {"example": "MODEL        1\nATOM ...\nENDMDL\nEND\n"}}}},
    dependencies=[Depends(require_api_key)],
    summary="Sample backbones of one length",
)
async def sample(
    req: SampleRequest,
    request: Request,
    state: State,
    format: str = Query("json", pattern="^(json|pdb)$", description="pdb: raw PDB text, one MODEL per sample"),
):
    metrics, limits, engine = state.metrics, state.limits, state.engine
    t0 = time.monotonic()
    if engine is None or not state.ready:
        return reject(state, 503, "engine_down", "the service is not ready", 5)
    errors = validate_limits(req, limits)
    if errors:
        metrics.rejected.labels(reason="limits").inc()
        return JSONResponse({"detail": errors}, status_code=422)
    seeds = new_seeds(req.count, req.seed)
    steps = req.steps if req.steps is not None else limits.default_steps
    try:
        job = engine.submit(length=req.length, count=req.count, seeds=seeds, noise_scale=req.noise_scale,
                            steps=steps)
    except QueueFull as exc:
        return reject(state, 429, "queue_full", "the sampling queue is full; retry later", exc.retry_after)
    except EngineUnavailable as exc:
        return reject(state, 503, exc.reason, str(exc), exc.retry_after)
    watcher = asyncio.create_task(watch_disconnect(request, engine, job))
    try:
        await asyncio.wait_for(asyncio.shield(job.future), state.settings.request_timeout_s)
    except TimeoutError:
        engine.cancel(job)
        metrics.errors.labels(kind="timeout").inc()
        return JSONResponse({"detail": f"not finished within {state.settings.request_timeout_s:g} s; "
                             "its samples were dropped"}, status_code=504)
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    except Cancelled:
        return Response(status_code=499)  # client closed the connection; nobody reads this
    except EngineUnavailable as exc:
        return reject(state, 503, exc.reason, str(exc), exc.retry_after, count_reject=False)
    except SampleFailed as exc:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "5"})
    finally:
        watcher.cancel()
    samples = [Sample(id=f"{job.id}-{r.index}", index=r.index, length=r.length, seed=r.seed, pdb=r.pdb)
               for r in job.results]
    total = time.monotonic() - t0
    metrics.request_duration.observe(total)
    sampler = state.sampler
    if format == "pdb" or PDB_MEDIA_TYPE in request.headers.get("accept", ""):
        return PlainTextResponse(pdb_models(samples), media_type=PDB_MEDIA_TYPE,
                                 headers={"X-Request-Id": job.id, "X-Weights-Sha256": sampler.sha256,
                                          "X-Steps": str(job.steps)})
    return SampleResponse(
        request_id=job.id, model=sampler.name, mode=sampler.mode, weights_sha256=sampler.sha256,
        noise_scale=req.noise_scale, steps=job.steps, samples=samples,
        timings=Timings(queue_wait_s=job.queue_wait_s, sampling_s=job.sampling_s, total_s=total),
    )


def pdb_models(samples: list[Sample]) -> str:
    """One PDB text with a MODEL / ENDMDL block per sample."""
    out = []
    for n, s in enumerate(samples, start=1):
        out.append(f"MODEL     {n:>4}")
        out.extend(ln for ln in s.pdb.splitlines() if ln.startswith(("ATOM", "HETATM", "TER")))
        out.append("ENDMDL")
    out.append("END")
    return "\n".join(out) + "\n"


def reject(state: ServiceState, status: int, reason: str, detail: str, retry_after: int,
           *, count_reject: bool = True) -> JSONResponse:
    if count_reject:
        state.metrics.rejected.labels(reason=reason).inc()
    return JSONResponse({"detail": detail}, status_code=status, headers={"Retry-After": str(int(retry_after))})


async def watch_disconnect(request: Request, engine: SamplingEngine, job: Job) -> None:
    """Cancel `job` when the client goes away (uvicorn reports http.disconnect)."""
    while not job.future.done():
        if await request.is_disconnected():
            log.info("client left; cancelling request %s", job.id)
            engine.cancel(job)
            return
        await asyncio.sleep(0.1)
