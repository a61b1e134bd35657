"""The sampling service over real HTTP (uvicorn on 127.0.0.1) with a tiny real mHC + Flash-IPA model.

The weights are a random tiny denoiser from `model.build_denoiser` saved through `model.weights_io`;
T = 20 steps so a request takes well under a second on CPU.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
import torch
from biotite.structure.io.pdb import PDBFile

from model.diffusion import sample as reference_sample
from service.testing import serve_in_thread, tiny_settings

COORD_ATOL = 2e-3  # Angstrom: PDB rounding (5e-4) + batch-composition numerics over 20 steps


@pytest.fixture(scope="module")
def server(tiny_weights):
    with serve_in_thread(tiny_settings(tiny_weights, residue_budget=256)) as srv:
        yield srv


def engine_of(server):
    return server.app.state.service.engine


def parse_ca(pdb_text: str) -> np.ndarray:
    atoms = PDBFile.read(io.StringIO(pdb_text)).get_structure(model=1)
    assert set(atoms.atom_name) == {"CA"} and set(atoms.res_name) == {"ALA"}
    return atoms.coord  # [L, 3]


async def _post_many(url, bodies, **kw):
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return await asyncio.gather(*[client.post("/sample", json=b, **kw) for b in bodies])


def test_concurrent_lengths_give_valid_pdbs_in_shared_batches(server):
    bodies = [{"length": 13}, {"length": 34, "seed": 5}, {"length": 37, "count": 2}, {"length": 40}]
    before = engine_of(server).stats.samples_completed
    responses = asyncio.run(_post_many(server.url, bodies))
    ids = set()
    for body, r in zip(bodies, responses):
        assert r.status_code == 200, r.text
        data = r.json()
        assert data["mode"] == "mhc_flash" and len(data["weights_sha256"]) == 64
        assert len(data["samples"]) == body.get("count", 1)
        for s in data["samples"]:
            ca = parse_ca(s["pdb"])
            assert ca.shape == (body["length"], 3) and s["length"] == body["length"]
            assert np.isfinite(ca).all() and np.abs(ca).max() > 0.1  # real coordinates, not zeros
            ids.add(s["id"])
        t = data["timings"]
        assert 0 <= t["queue_wait_s"] <= t["total_s"] and 0 < t["sampling_s"] <= t["total_s"] + 1e-3
    assert len(ids) == 5
    if "seed" in bodies[1]:
        assert responses[1].json()["samples"][0]["seed"] == 5
    stats = engine_of(server).stats
    assert stats.samples_completed - before == 5
    assert stats.max_distinct_lengths >= 3  # different lengths (34, 37, 40) shared padded, masked batches
    assert stats.max_distinct_requests >= 3
    assert stats.max_length_groups >= 2  # ... and 13 (padded 16) ran in its own group, not padded to 40


@pytest.mark.parametrize(("lengths", "ratio", "groups"), [
    ([256, 64, 200, 100, 128], 0.75, [[0, 2], [4, 3], [1]]),
    ([256, 64, 200, 100, 128], 0.0, [[0, 2, 4, 3, 1]]),  # 0: one batch padded to the longest
    ([40, 40, 16, 24], 0.5, [[0, 1, 3], [2]]),  # 24 >= 0.5 x 40 joins, 16 does not
    ([32, 32, 32], 1.0, [[0, 1, 2]]),  # equal lengths always share a batch
])
def test_length_groups(lengths, ratio, groups):
    from service.batching import length_groups

    assert length_groups(lengths, ratio) == groups


def test_late_request_joins_running_batch(server):
    """Iteration-level batching: a request arriving mid-run enters at the next step, not after."""

    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            eng = engine_of(server)
            eng.stats.max_distinct_timesteps = 0  # measure this test's batches only (the server is shared)
            first = asyncio.create_task(client.post("/sample", json={"length": 30, "count": 2, "seed": 1}))
            start = eng.stats.batches_run
            while eng.stats.batches_run < start + 5:
                await asyncio.sleep(0.005)
            # 27 pads to 32 like 30: the same length group, so it shares the running batch (length_groups)
            second = await client.post("/sample", json={"length": 27, "seed": 2})
            return await first, second

    first, second = asyncio.run(run())
    assert first.status_code == 200 and second.status_code == 200
    assert engine_of(server).stats.max_distinct_timesteps >= 2  # one batch held samples at different t
    step = first.json()["timings"]["sampling_s"] / 20
    assert second.json()["timings"]["queue_wait_s"] < 4 * step  # joined within a few steps


def test_seed_reproducible_whatever_the_batch(server, tiny_weights):
    from model.weights_io import load_weights

    body = {"length": 22, "seed": 123, "noise_scale": 0.6}
    alone = asyncio.run(_post_many(server.url, [body]))[0]
    crowd = asyncio.run(_post_many(server.url, [{"length": 39, "count": 2}, body, {"length": 13, "seed": 9}]))[1]
    a, b = parse_ca(alone.json()["samples"][0]["pdb"]), parse_ca(crowd.json()["samples"][0]["pdb"])
    np.testing.assert_allclose(a, b, atol=COORD_ATOL, rtol=0)
    # ... and equal to the model's own sampler (model.diffusion.sample) for the same seed.
    den = load_weights(tiny_weights).denoiser
    ref = reference_sample(den, [22], [123], 0.6)[0].numpy()
    np.testing.assert_allclose(a, ref, atol=COORD_ATOL, rtol=0)
    other = parse_ca(asyncio.run(_post_many(server.url, [{"length": 22, "seed": 124}]))[0].json()["samples"][0]["pdb"])
    assert np.abs(other - a).max() > 0.5  # a different seed really gives a different backbone


def test_unchanged_batch_reuses_its_output_as_next_input(server, tiny_weights):
    """A group with the same members as in its last step takes that step's output as x_t (no
    per-sample gathering); the first step of the request and nothing else rebuilds the inputs, and
    the backbones still equal the model's own sampler's."""
    from model.weights_io import load_weights

    stats = server.app.state.service.engine.stats
    T = server.app.state.service.engine.num_timesteps
    before_reused, before_run = stats.inputs_reused, stats.batches_run
    r = asyncio.run(_post_many(server.url, [{"length": 27, "count": 2, "seed": 40}]))[0]
    assert r.status_code == 200
    assert stats.batches_run - before_run == T  # one batch of both samples per step
    assert stats.inputs_reused - before_reused == T - 1  # every step after the first
    engine = server.app.state.service.engine
    # idle again: the kept inputs are freed before the response is sent (nothing could reuse them)
    assert engine.inputs.prev == {} and engine.inputs.next == {} and engine.inputs.pending == ((), None)
    from model.mhc import find_mhc_modules

    mhc_modules = find_mhc_modules(server.app.state.service.sampler.denoiser)
    assert mhc_modules and all(m.last_h_res is None and not m.record for m in mhc_modules)  # nothing kept
    den = load_weights(tiny_weights).denoiser
    ref = reference_sample(den, [27, 27], [40, 41], 0.6)
    for sample, expected in zip(r.json()["samples"], ref):
        np.testing.assert_allclose(parse_ca(sample["pdb"]), expected.numpy(), atol=COORD_ATOL, rtol=0)


def test_raw_pdb_output(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/sample?format=pdb", json={"length": 15, "count": 2, "seed": 4})
        assert r.status_code == 200 and r.headers["content-type"].startswith("chemical/x-pdb")
        pdb = PDBFile.read(io.StringIO(r.text))
        assert pdb.get_model_count() == 2
        assert pdb.get_structure(model=2).array_length() == 15
        r2 = client.post("/sample", json={"length": 15, "seed": 4}, headers={"accept": "chemical/x-pdb"})
        np.testing.assert_allclose(parse_ca(r2.text), pdb.get_structure(model=1).coord, atol=COORD_ATOL)


BAD_BODIES = [
    ({}, "length", "Field required"),
    ({"length": "64"}, "length", "valid integer"),
    ({"length": 20.0}, "length", "valid integer"),
    ({"length": True}, "length", "valid integer"),
    ({"length": 4}, "length", "between 5 and 64"),
    ({"length": 65}, "length", "between 5 and 64"),
    ({"length": 10**30}, "length", "between 5 and 64"),
    ({"length": -3}, "length", "between 5 and 64"),
    ({"length": 0}, "length", "length must be between 5 and 64 residues (got 0)"),
    ({"length": 20, "count": 0}, "count", "count must be between 1 and 8 (got 0)"),
    ({"length": 20, "count": 9}, "count", "between 1 and 8"),
    ({"length": 20, "noise_scale": 2.5}, "noise_scale", "noise_scale must be between 0 and 2 (got 2.5)"),
    ({"length": 20, "noise_scale": -0.1}, "noise_scale", "between 0 and 2"),
    ({"length": 20, "noise_scale": "0.5"}, "noise_scale", "valid number"),
    ({"length": 20, "seed": -1}, "seed", "seed must be between 0 and"),
    ({"length": 20, "seed": 2**64}, "seed", "seed must be between 0 and"),
    ({"length": 20, "lenght": 20}, "lenght", "Extra inputs are not permitted"),
    ({"length": [20]}, "length", "valid integer"),
    ({"length": {"$gt": 1}}, "length", "valid integer"),
]


@pytest.mark.parametrize("body,field,msg", BAD_BODIES, ids=[str(b)[:40] for b, _, _ in BAD_BODIES])
def test_validation_errors_name_field_and_range(server, body, field, msg):
    r = httpx.post(server.url + "/sample", json=body, timeout=10)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["loc"][-1] == field and msg in d["msg"] for d in detail), detail
    assert "Traceback" not in r.text


def test_total_residue_limit(tiny_weights):
    with serve_in_thread(tiny_settings(tiny_weights, max_total_residues=100)) as srv:
        r = httpx.post(srv.url + "/sample", json={"length": 40, "count": 3}, timeout=10)
        assert r.status_code == 422
        assert "at most 100 residues per request (got 40 * 3 = 120)" in r.json()["detail"][0]["msg"]


def test_health_ready_info(server, tiny_weights):
    with httpx.Client(base_url=server.url, timeout=10) as client:
        assert client.get("/health").json() == {"status": "ok"}
        assert client.get("/ready").status_code == 200
        info = client.get("/info").json()
    assert info["model"] == "tiny" and info["mode"] == "mhc_flash" and info["num_timesteps"] == 20
    assert info["limits"] == {"min_length": 5, "max_length": 64, "max_count": 8, "max_total_residues": 8192,
                              "max_steps": 20, "default_steps": 20}
    assert info["attention"]["backend"] == "math" and info["device"] == "cpu"
    assert info["compiled"] == "none"  # MHCFLASH_COMPILE=auto compiles on CUDA devices only
    assert info["precision"] == "float32"  # MHCFLASH_PRECISION=auto: bf16 autocast on CUDA only
    assert info["versions"]["torch"] == torch.__version__
    from model.weights_io import sha256_file

    assert info["weights_sha256"] == sha256_file(tiny_weights / "model.safetensors")


def test_compile_setting_picks_devices():
    from model.sampler import compile_enabled

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [compile_enabled(s, cpu) for s in ("auto", "on", "off")] == [False, True, False]
    assert [compile_enabled(s, gpu) for s in ("auto", "on", "off")] == [True, True, False]


METRICS = [
    "mhcflash_request_duration_seconds_bucket", "mhcflash_queue_wait_seconds_bucket",
    "mhcflash_step_duration_seconds_bucket", "mhcflash_samples_generated_total",
    "mhcflash_residues_generated_total", "mhcflash_samples_cancelled_total", "mhcflash_batch_size_bucket",
    "mhcflash_batch_occupancy_ratio_bucket", "mhcflash_batch_real_residues_ratio_bucket",
    "mhcflash_queue_depth", "mhcflash_active_samples", "mhcflash_residue_budget", "mhcflash_errors_total",
    "mhcflash_requests_rejected_total", "mhcflash_requests_total", "mhcflash_engine_up",
    "mhcflash_engine_restarts_total", "mhcflash_attention_backend_info", "mhcflash_model_info",
    "mhcflash_gpu_memory_allocated_bytes", "mhcflash_gpu_memory_reserved_bytes",
    "mhcflash_gpu_memory_peak_bytes", "mhcflash_gpu_memory_total_bytes", "process_resident_memory_bytes",
]


SAMPLE_200 = 'mhcflash_requests_total{code="200",route="/sample"}'


def scrape(url: str) -> dict[str, float]:
    """`name{labels}` -> value from /metrics (exposition format, no comments)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def test_metrics_exposed_and_moving(server):
    before = scrape(server.url)
    for name in METRICS:
        assert any(k.split("{")[0] == name for k in before), name
    assert before['mhcflash_attention_backend_info{backend="math",flash_attn_version="none"}'] == 1.0
    assert before["mhcflash_engine_up"] == 1.0
    asyncio.run(_post_many(server.url, [{"length": 20, "count": 2}, {"length": 31}]))
    httpx.post(server.url + "/sample", json={"length": 1}, timeout=10)
    after = scrape(server.url)
    assert after["mhcflash_samples_generated_total"] - before["mhcflash_samples_generated_total"] == 3
    assert after["mhcflash_residues_generated_total"] - before["mhcflash_residues_generated_total"] == 71
    assert after["mhcflash_request_duration_seconds_count"] - before["mhcflash_request_duration_seconds_count"] == 2
    assert after["mhcflash_step_duration_seconds_count"] - before["mhcflash_step_duration_seconds_count"] >= 20
    assert after[SAMPLE_200] - before[SAMPLE_200] == 2
    assert after['mhcflash_requests_rejected_total{reason="limits"}'] - before[
        'mhcflash_requests_rejected_total{reason="limits"}'] == 1
    assert after["mhcflash_batch_occupancy_ratio_count"] > before["mhcflash_batch_occupancy_ratio_count"]
    assert after["process_resident_memory_bytes"] > 0


def test_openapi_documents_examples_and_errors(server):
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    post = spec["paths"]["/sample"]["post"]
    assert {"200", "401", "413", "415", "422", "429", "503", "504"} <= set(post["responses"])
    schema = spec["components"]["schemas"]["SampleRequest"]
    assert schema["examples"][0] == {"length": 64} and schema["additionalProperties"] is False
    assert "examples" in spec["components"]["schemas"]["SampleResponse"]


@pytest.mark.slow
def test_compiled_pair_stack_serves_the_same_backbones(tiny_weights):
    """MHCFLASH_COMPILE=on on the CPU (inductor, C++): the warm-up compiles the pair stack before /ready,
    /info says so, and a seeded request gives the backbone of the eager service (float32; inductor
    reorders sums, so within COMPILED_ATOL over the 20 steps)."""
    COMPILED_ATOL = 1e-2  # Angstrom
    bodies = [{"length": 22, "seed": 123}, {"length": 13, "count": 2, "seed": 9}]
    with serve_in_thread(tiny_settings(tiny_weights, compile="on")) as srv:
        info = httpx.get(srv.url + "/info", timeout=10).json()
        compiled = asyncio.run(_post_many(srv.url, bodies))
        layers = srv.app.state.service.sampler.denoiser.pair_transform_net.layers
        assert all(layer._compiled_call_impl is not None for layer in layers)
    assert info["compiled"] == "pair_stack,point_rotations"
    with serve_in_thread(tiny_settings(tiny_weights, compile="off")) as srv:
        eager = asyncio.run(_post_many(srv.url, bodies))
    for c, e in zip(compiled, eager):
        assert c.status_code == e.status_code == 200
        for sc, se in zip(c.json()["samples"], e.json()["samples"]):
            a, b = parse_ca(sc["pdb"]), parse_ca(se["pdb"])
            assert np.abs(a).max() > 0.1
            np.testing.assert_allclose(a, b, atol=COMPILED_ATOL, rtol=0)
