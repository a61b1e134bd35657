"""`steps` over real HTTP: validated like the other ranges, published in OpenAPI, echoed in the response,
and the backbone of `model.diffusion.sample` with the same steps (tiny model, T = 20, as tests/test_service.py).
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from biotite.structure.io.pdb import PDBFile

from model.diffusion import sample as reference_sample
from service.testing import make_tiny_weights, serve_in_thread, tiny_settings

COORD_ATOL = 2e-3  # Angstrom: PDB rounding + batch-composition numerics (tests/test_service.py)
T = 20


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("steps") / "tiny")


@pytest.fixture(scope="module")
def server(weights):
    with serve_in_thread(tiny_settings(weights, residue_budget=256)) as srv:
        yield srv


def parse_ca(pdb_text: str) -> np.ndarray:
    return PDBFile.read(io.StringIO(pdb_text)).get_structure(model=1).coord  # [L, 3]


@pytest.mark.parametrize("steps,msg", [(0, f"steps must be between 1 and {T} (got 0)"),
                                       (T + 1, f"steps must be between 1 and {T} (got {T + 1})"),
                                       ("10", "valid integer"), (10.0, "valid integer"), (True, "valid integer")])
def test_bad_steps_get_422_naming_the_field(server, steps, msg):
    r = httpx.post(server.url + "/sample", json={"length": 20, "steps": steps}, timeout=10)
    assert r.status_code == 422, r.text
    assert any(d["loc"][-1] == "steps" and msg in d["msg"] for d in r.json()["detail"]), r.json()


def test_steps_range_published_in_openapi_and_info(server):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        schema = client.get("/openapi.json").json()["components"]["schemas"]["SampleRequest"]["properties"]["steps"]
        info = client.get("/info").json()
    [integer] = [o for o in schema["anyOf"] if o.get("type") == "integer"]
    assert (integer["minimum"], integer["maximum"]) == (1, T)
    assert f"between 1 and {T}" in schema["description"]
    assert info["limits"]["max_steps"] == T and info["limits"]["default_steps"] == T


def test_requests_of_different_steps_share_batches_and_report_their_steps(server, weights):
    from model.weights_io import load_weights

    bodies = [{"length": 22, "seed": 3, "steps": 10}, {"length": 22, "seed": 4}, {"length": 22, "seed": 3}]

    async def post_all():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/sample", json=b) for b in bodies])

    few, default, full = asyncio.run(post_all())
    assert [r.status_code for r in (few, default, full)] == [200, 200, 200]
    assert [r.json()["steps"] for r in (few, default, full)] == [10, T, T]
    den = load_weights(weights).denoiser
    got = parse_ca(few.json()["samples"][0]["pdb"])
    np.testing.assert_allclose(got, reference_sample(den, [22], [3], 0.6, steps=10)[0].numpy(), atol=COORD_ATOL)
    same_seed_full = parse_ca(full.json()["samples"][0]["pdb"])
    assert np.abs(same_seed_full - got).max() > 1e-2  # 10 steps is another sampler
    r = httpx.post(server.url + "/sample?format=pdb", json={"length": 15, "steps": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["x-steps"] == "3"


def test_default_steps_setting(weights):
    with serve_in_thread(tiny_settings(weights, default_steps=5)) as srv:
        r = httpx.post(srv.url + "/sample", json={"length": 15, "seed": 1}, timeout=60)
        assert r.status_code == 200 and r.json()["steps"] == 5
        assert httpx.get(srv.url + "/info", timeout=10).json()["limits"]["default_steps"] == 5
