"""Schema-driven fuzzing of the service (schemathesis) and a memory soak of the sampling engine.

1. `test_openapi_fuzz`: schemathesis reads `GET /openapi.json` from the real ASGI app (tiny random
   mHC + Flash-IPA weights, T = 20, CPU, its own lifespan: load, warm up, engine thread) and sends
   schema-valid and schema-invalid requests to every operation (its examples, coverage and fuzzing
   phases; at most `FUZZ_EXAMPLES` generated cases per operation). Every response must pass
   schemathesis' checks: no 5xx, status code and content type documented, response body and
   headers conform to the schema, schema-valid bodies accepted, schema-invalid ones rejected,
   undeclared methods answered 405. On top: every 422 names the offending field with a message, and
   no request goes unanswered (read timeout 30 s).
   NOTE: the server is strict on integer fields (`{"length": 7.0}` is a 422 by design, see
   `service/schemas.py`) while JSON Schema counts 7.0 as an integer; positive cases therefore send
   integral floats as JSON integers. `length * count <= max_total_residues` cannot be written in JSON
   Schema, so the fuzzed server sets `max_total_residues = max_length * max_count`.
2. `test_engine_memory_flat_over_soak`: many small batches of variable lengths (20 concurrent
   requests per round, lengths 5-64, T = 8, ~65 batches a round) through the real app and engine.
   After a warm-up round and a settling round, each later round must leave process RSS within
   `SOAK_RSS_SLACK_MB`, the Python heap (tracemalloc) within `SOAK_PY_SLACK_MB` and the number of
   live tensors within `SOAK_TENSOR_SLACK` of their values after the settling round: allocator or
   cache growth from variable shapes, or requests kept alive after they finish, would show here.
"""

from __future__ import annotations

import asyncio
import gc
import random
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

from service.app import create_app
from service.testing import make_tiny_weights, tiny_settings

try:  # dev extra; the soak below does not need it
    import schemathesis
except ImportError:  # pragma: no cover - depends on the environment
    schemathesis = None

FUZZ_EXAMPLES = 80  # generated cases per operation (plus schemathesis' example / coverage cases)
FUZZ_LIMITS = {"max_length": 16, "max_count": 2, "max_total_residues": 32}  # short sampling per accepted case
INTEGER_FIELDS = ("length", "count", "seed", "steps")
TALLY: Counter = Counter()  # (operation, status) -> responses; printed at module teardown (pytest -s)


@pytest.fixture(scope="module")
def api_schema(tiny_weights):
    app = create_app(tiny_settings(tiny_weights, residue_budget=64, **FUZZ_LIMITS))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)  # runs the lifespan: limits published
    body = schema.raw_schema["components"]["schemas"]["SampleRequest"]["properties"]
    assert body["length"]["maximum"] == FUZZ_LIMITS["max_length"]  # the fuzzer sees this server's ranges
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE])
    yield schema
    summary = ", ".join(f"{op} {code}: {n}" for (op, code), n in sorted(TALLY.items()))
    print(f"\nschemathesis: {sum(TALLY.values())} requests; {summary}")


needs_schemathesis = pytest.mark.skipif(schemathesis is None, reason="schemathesis not installed (dev extra)")


def _is_positive(case) -> bool:
    meta = getattr(case, "meta", None)
    return meta is not None and meta.generation.mode.is_positive


def _check_422_names_field(case, response) -> None:
    detail = response.json()["detail"]
    assert isinstance(detail, list) and detail, response.text
    for item in detail:
        loc, msg = item["loc"], item["msg"]
        assert loc and loc[0] in ("body", "query"), item
        assert isinstance(msg, str) and msg.strip(), item
        if loc[0] == "body" and len(loc) > 1 and isinstance(case.body, dict) and isinstance(loc[1], str):
            # A named body field is one the request sent or a required one it left out.
            assert loc[1] in case.body or loc[1] == "length", (item, case.body)


def _parametrize(test):
    if schemathesis is None:
        @needs_schemathesis
        def test_openapi_fuzz():
            pass

        return test_openapi_fuzz
    return schemathesis.pytest.from_fixture("api_schema").parametrize()(test)


@_parametrize
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
def test_openapi_fuzz(case):
    if _is_positive(case) and isinstance(case.body, dict):
        for key in INTEGER_FIELDS:
            value = case.body.get(key)
            if isinstance(value, float) and value.is_integer():
                case.body[key] = int(value)
    response = case.call_and_validate(timeout=30)  # a hang is a ReadTimeout: a failure, not a lost request
    TALLY[(case.operation.label, response.status_code)] += 1
    assert response.status_code < 500, response.text
    if response.status_code == 422:
        _check_422_names_field(case, response)
    if response.status_code >= 400:
        assert "Traceback" not in response.text and 'File "' not in response.text  # no stack or path leaks


# --- memory soak -------------------------------------------------------------------------------------

SOAK_T = 8  # diffusion steps per sample: many short-lived samples, hence many distinct batches
SOAK_ROUNDS = 5  # rounds after the warm-up; memory after rounds 2..5 is compared with round 1
SOAK_REQUESTS_PER_ROUND = 20  # concurrent, lengths 5-64, 1-2 samples each
SOAK_RSS_SLACK_MB = 40.0  # RSS growth allowed over the settling round (measured: -12 .. +7 MB)
SOAK_PY_SLACK_MB = 1.0  # Python heap growth (tracemalloc; measured: +0.004 .. +0.084 MB)
SOAK_TENSOR_SLACK = 8  # live torch tensors above the settling count (measured: -4 .. +3; +10 once, before the
# engine freed its input-reuse cache when idle and stopped keeping mHC H_res while serving)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _live_tensors() -> int:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated torch.distributed aliases warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_engine_memory_flat_over_soak(tmp_path):
    """Many small batches of variable lengths through the real app + engine: memory after the soak
    stays within fixed bounds of memory after one warm-up round (RSS, Python heap, live tensors)."""
    import tracemalloc
    from pathlib import Path

    from service.testing import asgi_client

    if not Path("/proc/self/status").exists():
        pytest.skip("RSS is read from /proc/self/status (Linux)")

    weights = make_tiny_weights(tmp_path / "tiny_t8", numTimesteps=SOAK_T)
    rng = random.Random(0)

    async def one_round(client, r: int) -> list[int]:
        bodies = [{"length": rng.randint(5, 64), "count": rng.randint(1, 2), "seed": 1000 * r + i}
                  for i in range(SOAK_REQUESTS_PER_ROUND)]
        responses = await asyncio.gather(*(client.post("/sample", json=b) for b in bodies))
        return [resp.status_code for resp in responses]

    async def run():
        app = create_app(tiny_settings(weights, residue_budget=256))
        async with asgi_client(app) as client:
            engine = app.state.service.engine
            codes = await one_round(client, 0)  # warm-up: most padded shapes seen once
            tracemalloc.start()
            try:
                codes += await one_round(client, 1)  # settles the Python-side caches under tracing
                gc.collect()
                rss0, py0, tensors0 = _rss_mb(), tracemalloc.get_traced_memory()[0], _live_tensors()
                rss, py = [], []
                for r in range(2, SOAK_ROUNDS + 1):
                    codes += await one_round(client, r)
                    gc.collect()
                    rss.append(_rss_mb())
                    py.append((tracemalloc.get_traced_memory()[0] - py0) / 2**20)
            finally:
                tracemalloc.stop()
            return codes, engine.load(), engine.stats.batches_run, rss0, rss, py, _live_tensors() - tensors0

    codes, load, batches, rss0, rss, py, extra_tensors = asyncio.run(run())
    print(f"\nsoak: {len(codes)} requests, {batches} batches; RSS after 2 rounds {rss0:.1f} MB, then "
          f"{' / '.join(f'{x:.1f}' for x in rss)} MB; Python heap growth "
          f"{' / '.join(f'{x:+.3f}' for x in py)} MB; live tensors {extra_tensors:+d}")
    assert codes == [200] * (SOAK_REQUESTS_PER_ROUND * (SOAK_ROUNDS + 1))  # none lost, none failed
    assert load == (0, 0)  # nothing left queued or active
    assert batches >= 40 * (SOAK_ROUNDS + 1)  # really many batches (measured ~65 per round)
    assert max(rss) - rss0 <= SOAK_RSS_SLACK_MB, (rss0, rss)
    assert max(py) <= SOAK_PY_SLACK_MB, py
    assert extra_tensors <= SOAK_TENSOR_SLACK
