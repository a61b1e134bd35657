"""Self-conditioning in the service's path: the sampling step, the engine's per-sample estimates, HTTP.

A tiny pair-free mHC + Flash-IPA model with ``selfConditioning True`` (T = 20), every parameter
perturbed so the zero-initialised layers (the final backbone update, the estimate's projections) pass
their inputs on. What must hold:
- the step (eager, and "graphed" with ``eager_capture``: buffers, buckets, stale rows) returns
  (x_s, x0_hat) and equals ``eager_step``; models without it keep no estimate buffer;
- the engine carries each sample's own estimate: requests admitted at different steps, re-packed when
  one joins, finishes, or an out-of-memory split halves the batch, give what ``model.diffusion.sample``
  gives for each alone;
- POST /sample over the real app returns the reference sampler's backbone.
Tolerances: exact where the same computation runs on the same rows; ATOL_PADDING for other batch
compositions (ATOL_SAMPLE over a whole trajectory); COORD_ATOL (tests/test_service.py) through PDB text.
"""

from __future__ import annotations

import asyncio
import threading

import httpx
import numpy as np
import pytest
import torch
from conftest import ATOL_PADDING, ATOL_SAMPLE, randomize_parameters

from model import build_denoiser
from model.config import Config
from model.diffusion import Schedule, sample
from model.sampling_step import SamplingStep, eager_capture, eager_step
from service.batching import StepInputs
from service.engine import SamplingEngine
from service.testing import TINY_SERVICE_CONFIG, serve_in_thread, tiny_settings

CPU = torch.device("cpu")
COORD_ATOL = 2e-3  # Angstrom: PDB rounding + batch-composition numerics (tests/test_service.py)
SC_CONFIG = {**TINY_SERVICE_CONFIG, "usePairFree": True, "selfConditioning": True, "name": "tiny_sc"}


def _denoiser(**overrides):
    torch.manual_seed(0)
    den = build_denoiser(Config().replace(**{**SC_CONFIG, **overrides}))
    return randomize_parameters(den, seed=1, scale=0.05).eval()


@pytest.fixture(scope="module")
def model():
    den = _denoiser()
    return den, Schedule.from_config(den.config)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, model):
    from model.weights_io import save_weights

    return save_weights(tmp_path_factory.mktemp("sc") / "tiny_sc", model[0], extra_card="# tiny test weights\n")


def _inputs(lengths, ts, length=24, seed=0):
    """Padded batch (x, t, mask, noise, scale, t_prev, x0_self), real zeros on padding."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(lengths), length)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1.0
    m = mask[..., None]
    x, noise, x0 = (torch.randn(len(lengths), length, 3, generator=g) * s * m for s in (6.0, 1.0, 8.0))
    t = torch.tensor(ts)
    return x, t, mask, noise, torch.full((len(lengths),), 0.6), t - 1, x0


# ------------------------------------------------------------------------------------------ step
def test_graphed_step_returns_the_estimate_and_equals_the_eager_step(model, monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    den, schedule = model
    runner = SamplingStep(den, schedule, device=CPU, graphed=True, capture=eager_capture)
    assert runner.self_conditioning
    for lengths, ts in (((22, 13, 17), (20, 9, 3)), ((21, 9), (5, 1))):  # bucket 4, then 2 stale rows in it
        inputs = _inputs(lengths, ts, seed=len(lengths))
        x_s, x0_hat = runner(*inputs)
        ref_x, ref_x0 = eager_step(den, schedule, *inputs)
        assert (x_s - ref_x).abs().max() < ATOL_PADDING and (x0_hat - ref_x0).abs().max() < ATOL_PADDING
        assert x0_hat[inputs[2] == 0].abs().max() == 0  # zero on padding
        first_x, first_x0 = runner(*inputs[:-1])  # no estimate: zeros
        zeros_x, zeros_x0 = eager_step(den, schedule, *inputs[:-1], torch.zeros_like(inputs[-1]))
        assert (first_x - zeros_x).abs().max() < ATOL_PADDING and (first_x0 - zeros_x0).abs().max() < ATOL_PADDING
        assert (first_x - x_s).abs().max() > 1e-4  # the estimate mattered
    assert runner.keys() == [(4, 24), (2, 24)] and runner.stats.captures == 2
    assert all(graph.x0 is not None for graph in runner.cache._entries.values())


def test_models_without_it_keep_no_estimate(monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    den = _denoiser(selfConditioning=False)
    schedule = Schedule.from_config(den.config)
    runner = SamplingStep(den, schedule, device=CPU, graphed=True, capture=eager_capture)
    inputs = _inputs((22, 13), (20, 9))
    out = runner(*inputs[:-1])
    assert isinstance(out, torch.Tensor) and not runner.self_conditioning
    assert all(graph.x0 is None and graph.out.shape == (2, 24, 3) for graph in runner.cache._entries.values())
    with pytest.raises(ValueError, match="without selfConditioning"):
        runner(*inputs)
    assert not StepInputs(CPU, 8).self_conditioning


# ---------------------------------------------------------------------------------------- engine
class _OomOnce:
    """The step, but "out of memory" once, for the first batch of 2 samples at iteration ``at``."""

    def __init__(self, step, at: int) -> None:
        self.step, self.at, self.calls, self.raised = step, at, 0, False
        self.self_conditioning = step.self_conditioning

    def __call__(self, *inputs):
        self.calls += 1
        if not self.raised and self.calls >= self.at and inputs[0].shape[0] == 2:
            self.raised = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return self.step(*inputs)


def _staggered(model, *, graphed: bool, oom_at: int | None = None):
    """Request A (22 residues, T steps) starts alone; request B (17 residues, 8 steps) is submitted while
    the worker waits before its 4th iteration, so it joins A's batch (both pad to 24) at step 5 and
    leaves it 8 steps later. Returns (A's sample, B's sample, engine stats)."""
    den, schedule = model
    step = SamplingStep(den, schedule, device=CPU, graphed=graphed, capture=eager_capture)
    if oom_at is not None:
        step = _OomOnce(step, oom_at)
    engine = SamplingEngine(step, num_timesteps=schedule.num_timesteps, device=CPU, residue_budget=256,
                            queue_max_samples=16, to_pdb=lambda ca: "")
    reached, go, iterations = threading.Event(), threading.Event(), [0]

    def before_step():
        iterations[0] += 1
        if iterations[0] == 4:
            reached.set()
            go.wait(30)

    engine.before_step = before_step

    async def main():
        engine.start()
        a = engine.submit(length=22, count=1, seeds=[11], noise_scale=0.6)
        await asyncio.to_thread(reached.wait, 30)
        b = engine.submit(length=17, count=1, seeds=[30], noise_scale=0.6, steps=8)
        go.set()
        done = await asyncio.gather(a.future, b.future)
        await engine.shutdown(10)
        return [job.results[0].ca for job in done]

    got_a, got_b = asyncio.run(main())
    return got_a, got_b, engine.stats


@pytest.mark.parametrize("graphed,oom_at", [(False, None), (True, None), (False, 8)])
def test_engine_carries_each_samples_estimate(model, graphed, oom_at, monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    den, _ = model
    got_a, got_b, stats = _staggered(model, graphed=graphed, oom_at=oom_at)
    assert stats.max_batch_size == 2 and stats.max_distinct_timesteps == 2  # B joined A mid-flight
    assert stats.inputs_reused > 0  # unchanged groups reuse the last outputs (estimates too)
    assert stats.oom_retries == (0 if oom_at is None else 1)
    alone_a = sample(den, [22], [11], 0.6)[0]
    alone_b = sample(den, [17], [30], 0.6, steps=8)[0]
    assert (got_a - alone_a).abs().max() < ATOL_SAMPLE
    assert (got_b - alone_b).abs().max() < ATOL_SAMPLE
    without = sample(den, [17], [30], 0.6, steps=8, self_condition=False)[0]
    assert (got_b - without).abs().max() > 1e-3  # the estimate changed the backbone


# ------------------------------------------------------------------------------------------ HTTP
def test_http_sample_with_a_self_conditioned_model(weights, model):
    from model.sampler import Sampler

    sampler = Sampler.load(weights, device="cpu")
    assert sampler.self_conditioning and sampler.config.selfConditioning
    assert sampler.warm_up((5, 64)) is False  # eager, finite
    with serve_in_thread(tiny_settings(weights, residue_budget=256)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        r = client.post("/sample", json={"length": 22, "count": 2, "seed": 7})
        info = client.get("/info").json()
    assert r.status_code == 200, r.text
    assert info["model"] == "tiny_sc"
    ref = sample(model[0], [22, 22], [7, 8], 0.6)
    for got, want in zip(r.json()["samples"], ref, strict=True):
        rows = [ln for ln in got["pdb"].splitlines() if ln.startswith("ATOM")]
        ca = np.array([[float(ln[30:38]), float(ln[38:46]), float(ln[46:54])] for ln in rows])  # [L, 3]
        np.testing.assert_allclose(ca, want.numpy(), atol=COORD_ATOL, rtol=0)


@pytest.mark.gpu
def test_gpu_graphed_self_conditioned_sampling_matches_eager(model):
    """Real CUDA-graph captures of the self-conditioned step (fp32): 20 steps carrying each sample's estimate
    give the eager steps' backbones (3 samples in bucket 4: a padding row in the graph)."""
    den, schedule = model
    dev = torch.device("cuda")
    den = den.to(dev)
    runner = SamplingStep(den, schedule, device=dev, graphed=True)
    x, t, mask, noise, scale, _, _ = (v.to(dev) for v in _inputs((22, 13, 17), (20, 20, 20)))
    states = {"eager": (x, None), "graphed": (x, None)}
    for step in range(20, 0, -1):
        t = torch.full((3,), step, device=dev)
        for name, (xs, x0) in states.items():
            if name == "eager":
                states[name] = eager_step(den, schedule, xs, t, mask, noise, scale, t - 1, x0)
            else:
                states[name] = runner(xs, t, mask, noise, scale, t - 1, x0)
    assert runner.stats.captures == 1 and runner.stats.replays == 20
    for a, b in zip(states["eager"], states["graphed"], strict=True):
        assert (a - b).abs().max().item() < 1e-3
    den.cpu()
