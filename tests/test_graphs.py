"""CUDA-graph sampling step (`model.sampling_step`): buckets, the step's buffers / copy-in / copy-out /
cache, fallbacks, the input-check skip, and (GPU only) graphed vs eager sampling and a real service request.

On CPU the step gets `eager_capture` (its "replay" reruns the step eagerly into the static output),
so everything but the CUDA capture itself is exercised here: padded rows, stale rows of a previous
larger batch, cache hits, evictions. Tolerances:
- runner vs `eager_step` on the same bucket-padded inputs: bitwise equal (same computation);
- runner vs eager on the unpadded batch: ATOL_PADDING (1e-5; the denoiser is padding-invariant);
- GPU graphed vs eager, 20 steps: GPU_ATOL in fp32 with a padded bucket (3 samples in bucket 4: only
  GEMM-tiling numerics differ), GPU_ATOL_BF16 in bf16 with batch = bucket (the same kernels);
- GPU service request: COORD_ATOL of tests/test_service.py against `model.diffusion.sample`.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch
from conftest import ATOL_PADDING, tiny_config

from model import build_denoiser
from model.cuda_graphs import GraphCaptureError
from model.diffusion import Schedule
from model.geometry import frenet_serret_frames, input_checks_enabled, skip_input_checks
from model.sampler import graphs_enabled
from model.sampling_step import BATCH_BUCKETS, SamplingStep, batch_bucket, eager_capture, eager_step
from service.engine import SamplingEngine

CPU = torch.device("cpu")
LENGTHS = (13, 22, 17, 9, 21)  # odd, distinct; padded to L = 24
PAD_L = 24
GPU_ATOL = 1e-4  # Angstrom after 20 steps, fp32
GPU_ATOL_BF16 = 1e-3  # Angstrom after 20 steps, bf16 autocast, batch = bucket (the same kernels)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_config(useMHCMode=True, useFlashMode=True, numTimesteps=20)
    return build_denoiser(config).eval(), Schedule.from_config(config)


def make_batch(lengths, ts, seed=0, device=CPU, length=PAD_L):
    """Padded prefix-masked batch: x [B, L, 3], t [B], mask [B, L], noise [B, L, 3], scale [B]."""
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = torch.zeros(batch, length)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    x = torch.randn(batch, length, 3, generator=g) * 6.0 * mask[..., None]
    noise = torch.randn(batch, length, 3, generator=g) * mask[..., None]
    scale = torch.linspace(0.3, 1.0, batch)
    t = torch.tensor(ts, dtype=torch.long)
    return [v.to(device) for v in (x, t, mask, noise, scale)]


class CountingCapture:
    """eager_capture that counts captures, records the pool each one was given, and can be told to fail."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.calls, self.fail, self.pools = 0, fail, []

    def __call__(self, fn, device, pool):
        self.calls += 1
        self.pools.append(pool())
        if self.fail is not None:
            raise self.fail
        return eager_capture(fn, device)


@pytest.fixture
def pools(monkeypatch):
    """Stand-in pool handles (no CUDA here): 0, 1, 2, ... as the cache asks for fresh pools."""
    handles = iter(range(100))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: next(handles))


def graphed(denoiser, schedule, **kw) -> SamplingStep:
    return SamplingStep(denoiser, schedule, device=CPU, graphed=True, **kw)


def pad_rows(tensors, bucket):
    """The runner's padding samples: x 0, t 1, mask 0, noise 0, scale 0 in rows [B:bucket]."""
    x, t, mask, noise, scale = tensors
    extra = bucket - x.shape[0]
    return (torch.cat([x, x.new_zeros(extra, *x.shape[1:])]), torch.cat([t, t.new_ones(extra)]),
            torch.cat([mask, mask.new_zeros(extra, mask.shape[1])]), torch.cat([noise, noise.new_zeros(extra, *noise.shape[1:])]),
            torch.cat([scale, scale.new_zeros(extra)]))


# ------------------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("batch,bucket", [(1, 1), (2, 2), (3, 4), (5, 8), (9, 16), (17, 24), (33, 48),
                                         (64, 64), (65, 96), (200, 256), (257, None)])
def test_batch_bucket(batch, bucket):
    assert batch_bucket(batch) == bucket


def test_batch_bucket_rejects_empty_and_custom_buckets():
    with pytest.raises(ValueError):
        batch_bucket(0)
    assert batch_bucket(3, (2, 6)) == 6 and batch_bucket(7, (2, 6)) is None
    assert list(BATCH_BUCKETS) == sorted(BATCH_BUCKETS)


def test_graphs_enabled_setting(caplog):
    cuda = torch.device("cuda", 0)
    assert graphs_enabled("auto", cuda) and graphs_enabled("on", cuda) and not graphs_enabled("off", cuda)
    assert not graphs_enabled("auto", CPU) and not graphs_enabled("off", CPU)
    with caplog.at_level(logging.WARNING, logger="mhcflash"):
        assert not graphs_enabled("on", CPU)
    assert "need CUDA" in caplog.text
    with pytest.raises(ValueError):
        graphs_enabled("yes", cuda)


# -------------------------------------------------------------------------------------- runner
def test_runner_equals_eager_for_mixed_lengths_timesteps_and_buckets(model, pools):
    denoiser, schedule = model
    capture = CountingCapture()
    runner = graphed(denoiser, schedule, capture=capture)
    # (lengths, timesteps): bucket 4 (3 rows + 1 padding), bucket 8, bucket 4 again with 4 rows, then
    # bucket 4 with 2 rows (rows 2-3 hold the previous batch: they must be reset to padding).
    plan = [(LENGTHS[:3], (20, 11, 1)), (LENGTHS, (1, 2, 19, 20, 7)), (LENGTHS[:4], (5, 6, 1, 20)),
            (LENGTHS[3:], (13, 1)), (LENGTHS[:3], (19, 10, 2))]
    for seed, (lengths, ts) in enumerate(plan):
        inputs = make_batch(lengths, ts, seed=seed)
        out = runner(*inputs)  # [B, L, 3]
        bucket = batch_bucket(len(lengths))
        padded = eager_step(denoiser, schedule, *pad_rows(inputs, bucket))[: len(lengths)]
        assert torch.equal(out, padded), f"step {seed}: runner differs from eager on the same padded batch"
        plain = eager_step(denoiser, schedule, *inputs)
        err = (out - plain).abs().max().item()
        assert err < ATOL_PADDING, f"step {seed}: runner vs unpadded eager differ by {err:.2e}"
        assert torch.equal(out[inputs[2] == 0], torch.zeros_like(out[inputs[2] == 0]))
    assert capture.calls == 3 and runner.keys() == [(8, PAD_L), (2, PAD_L), (4, PAD_L)]
    assert capture.pools == [0, 0, 0]  # one memory pool shared by every graph
    st = runner.stats
    assert (st.captures, st.replays, st.evictions, st.eager, st.cached) == (3, 5, 0, 0, 3)


def test_runner_output_is_a_copy(model):
    denoiser, schedule = model
    runner = graphed(denoiser, schedule, capture=eager_capture)
    first = runner(*make_batch(LENGTHS[:2], (20, 3), seed=1))
    kept = first.clone()
    runner(*make_batch(LENGTHS[:2], (9, 1), seed=2))  # same graph: the static output is rewritten
    assert torch.equal(first, kept)


def test_runner_lru_evicts_least_recently_used(model, pools):
    denoiser, schedule = model
    capture = CountingCapture()
    runner = graphed(denoiser, schedule, capture=capture, max_graphs=2)
    for lengths, length in [((13,), 16), ((13, 9), 16), ((13,), 16), ((21,), 24), ((13, 9), 16)]:
        runner(*make_batch(lengths, (7,) * len(lengths), length=length))
    # (1,16) cap, (2,16) cap, (1,16) hit, (1,24) cap evicts (2,16), (2,16) cap evicts (1,16)
    assert capture.calls == 4 and runner.stats.evictions == 2
    assert runner.keys() == [(1, 24), (2, 16)] and runner.stats.cached == 2


def test_capture_failure_falls_back_to_eager_once(model, caplog, pools):
    denoiser, schedule = model
    capture = CountingCapture(fail=GraphCaptureError("RuntimeError: operation not permitted when stream is capturing"))
    runner = graphed(denoiser, schedule, capture=capture, off_hint="Set MHCFLASH_CUDA_GRAPHS=off")
    with caplog.at_level(logging.WARNING, logger="mhcflash.graphs"):
        for seed, ts in enumerate([(20, 4, 1), (19, 3, 20)]):
            inputs = make_batch(LENGTHS[:3], ts, seed=seed)
            assert torch.equal(runner(*inputs), eager_step(denoiser, schedule, *inputs))
    assert capture.calls == 1 and not runner.enabled and "not permitted" in runner.stats.disabled_reason
    assert runner.stats.eager == 2 and runner.keys() == []
    assert caplog.text.count("CUDA graphs: capturing the step of batch 4 x length 24 failed") == 1
    assert "Set MHCFLASH_CUDA_GRAPHS=off to skip the attempt" in caplog.text


def test_step_errors_propagate_and_large_batches_run_eagerly(model):
    denoiser, schedule = model
    runner = graphed(denoiser, schedule, capture=eager_capture, buckets=(1, 2))
    x, t, mask, noise, scale = make_batch(LENGTHS[:2], (5, 6))
    holed = mask.clone()
    holed[0, 3] = 0.0  # not a prefix mask: the model's own check fires in the (eager) warm-up run
    with pytest.raises(ValueError, match="prefix masks"):
        runner(x, t, holed, noise, scale)
    assert runner.enabled and runner.keys() == []  # a bad step is not a capture failure
    inputs = make_batch(LENGTHS[:3], (5, 6, 7))  # B = 3 > largest bucket
    assert torch.equal(runner(*inputs), eager_step(denoiser, schedule, *inputs))
    assert runner.stats.eager == 1 and runner.stats.captures == 0


def test_eager_step_function_never_captures(model):
    """graphed False (CPU, or MHCFLASH_CUDA_GRAPHS=off): every call is the eager step."""
    denoiser, schedule = model
    capture = CountingCapture()
    step = SamplingStep(denoiser, schedule, device=CPU, capture=capture)
    inputs = make_batch(LENGTHS[:3], (5, 6, 7))
    assert torch.equal(step(*inputs), eager_step(denoiser, schedule, *inputs))
    assert not step.enabled and capture.calls == 0 and step.stats.eager == 1


# ---------------------------------------------------------------------------------- input checks
def test_skip_input_checks_is_scoped_and_per_thread():
    ca = torch.randn(2, 9, 3)
    holed = torch.ones(2, 9)
    holed[1, 4] = 0.0
    with pytest.raises(ValueError, match="prefix masks"):
        frenet_serret_frames(ca, holed)
    seen = {}

    def other_thread():
        seen["enabled"] = input_checks_enabled()

    with skip_input_checks():
        with skip_input_checks():  # re-entrant
            assert not input_checks_enabled()
        assert not input_checks_enabled()
        frames = frenet_serret_frames(ca, holed)  # no check, no error
        assert torch.isfinite(frames.rots).all()
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen["enabled"] is True  # another thread keeps its checks
    assert input_checks_enabled()
    with pytest.raises(ValueError, match="prefix masks"):
        frenet_serret_frames(ca, holed)


# -------------------------------------------------------------------------------------- engine
def _run_engine(engine: SamplingEngine, requests):
    async def main():
        engine.start()
        jobs = [engine.submit(length=n, count=c, seeds=[s + i for i in range(c)], noise_scale=0.6)
                for n, c, s in requests]
        done = await asyncio.gather(*[j.future for j in jobs])
        await engine.shutdown(10)
        return [r.ca for job in done for r in job.results]

    return asyncio.run(main())


def test_engine_with_runner_gives_the_eager_samples(model):
    """The engine's graphed path (fake capture) vs its eager path: same samples for the same seeds."""
    denoiser, schedule = model
    requests = [(13, 2, 5), (22, 1, 9), (17, 1, 1)]

    def engine(graphs: bool) -> SamplingEngine:
        step = SamplingStep(denoiser, schedule, device=CPU, graphed=graphs, capture=eager_capture)
        return SamplingEngine(step, num_timesteps=schedule.num_timesteps, device=CPU, residue_budget=72,
                              queue_max_samples=16, to_pdb=lambda ca: "")

    eager_eng, graph_eng = engine(False), engine(True)
    eager, graphed = _run_engine(eager_eng, requests), _run_engine(graph_eng, requests)
    for a, b in zip(eager, graphed):
        assert a.shape == b.shape and (a - b).abs().max().item() < ATOL_PADDING
    st = graph_eng.stats
    assert st.cuda_graph_replays == st.batches_run and st.cuda_graph_captures >= 1
    assert st.batches_run > schedule.num_timesteps  # batches changed shape as samples joined / left
    assert eager_eng.stats.cuda_graph_replays == 0 and eager_eng.stats.cuda_graph_captures == 0


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("autocast,batch,atol", [(None, 3, GPU_ATOL), (torch.bfloat16, 4, GPU_ATOL_BF16)])
def test_gpu_graphed_sampling_matches_eager(model, autocast, batch, atol):
    denoiser, schedule = model
    dev = torch.device("cuda")
    denoiser = denoiser.to(dev)
    try:
        runner = SamplingStep(denoiser, schedule, device=dev, autocast_dtype=autocast, graphed=True)
        lengths = LENGTHS[:batch]  # 3: one padding row in bucket 4; 4: the bucket exactly
        x0, _, mask, _, scale = make_batch(lengths, (20,) * batch, device=dev)
        gens = {"eager": torch.Generator(dev).manual_seed(3), "graph": torch.Generator(dev).manual_seed(3)}
        xs = {"eager": x0.clone(), "graph": x0.clone()}
        for step in range(schedule.num_timesteps, 0, -1):
            t = torch.full((batch,), step, dtype=torch.long, device=dev)
            for name, x in xs.items():
                noise = torch.randn(x.shape, generator=gens[name], device=dev) * mask[..., None]
                if name == "eager":
                    xs[name] = eager_step(denoiser, schedule, x, t, mask, noise, scale, autocast_dtype=autocast)
                else:
                    xs[name] = runner(x, t, mask, noise, scale)
        assert runner.enabled, runner.stats.disabled_reason
        assert runner.stats.captures == 1 and runner.stats.replays == schedule.num_timesteps
        err = (xs["eager"] - xs["graph"]).abs().max().item()
        assert err < atol, f"graphed vs eager after 20 steps: {err:.2e}"
        assert torch.isfinite(xs["graph"]).all()
    finally:
        denoiser.to(CPU)


@pytest.mark.gpu
def test_gpu_capture_of_a_host_sync_fails_cleanly():
    from model.cuda_graphs import GraphCache, capture_graph

    dev = torch.device("cuda")
    a = torch.ones(4, device=dev)

    def bad():
        return a * float(a.sum().item())  # a host sync inside the captured region

    with pytest.raises(GraphCaptureError):
        capture_graph(bad, dev)
    assert torch.equal(a * 2, torch.full((4,), 2.0, device=dev))  # the device still works
    torch.randn(8, device=dev)  # the generator left its capture state ("Offset increment ..." before)
    cache = GraphCache(max_graphs=1, owner="test", eager_text="eager", off_hint="-")
    for key, factor in ((1, 3.0), (2, 5.0), (1, 3.0)):  # each capture drops the only other graph: a fresh pool
        entry = cache.capture(key, lambda f=factor: capture_graph(lambda: a * f, dev, cache.pool()), device=dev,
                              describe=f"x {factor}")
        replay, out = entry
        replay()
        assert torch.equal(out, torch.full((4,), factor, device=dev))
        del replay, out, entry
    assert cache.stats.captures == 3 and cache.stats.evictions == 2 and cache.enabled


@pytest.mark.gpu
def test_gpu_service_request_with_graphs(tiny_weights):
    import httpx
    from test_service import COORD_ATOL, parse_ca

    from model.diffusion import sample as reference_sample
    from model.weights_io import load_weights
    from service.testing import serve_in_thread, tiny_settings

    with serve_in_thread(tiny_settings(tiny_weights, device="cuda", cuda_graphs="on")) as server:
        r = httpx.post(f"{server.url}/sample", json={"length": 22, "count": 2, "seed": 11}, timeout=120)
        assert r.status_code == 200, r.text
        stats = server.app.state.service.engine.stats
        assert stats.cuda_graph_replays >= 20 and stats.cuda_graph_captures >= 1
    loaded = load_weights(tiny_weights, torch.device("cuda"))
    ref = reference_sample(loaded.denoiser, [22, 22], [11, 12], 0.6)
    for s, expected in zip(r.json()["samples"], ref):
        err = abs(parse_ca(s["pdb"]) - expected.cpu().numpy()).max()
        assert err < COORD_ATOL, f"sample {s['index']}: {err:.2e} A from model.diffusion.sample"
