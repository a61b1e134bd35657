"""Fewer sampling steps over the same model: respaced timesteps, the jump t -> s of `reverse_step`,
`sample(steps=...)`, the graphed step with per-sample t_prev, and the engine batching requests of
different step counts.

Tolerances: bit-identical where the computation is the same (t_prev = t - 1 vs default; steps = T vs
default); ATOL_STEP for reverse_step arithmetic in float32; ATOL_PADDING (tests/conftest.py) where
only the batch composition differs (the engine, the graph's padded bucket), as tests/test_graphs.py.
"""

from __future__ import annotations

import asyncio
from itertools import pairwise

import pytest
import torch
from conftest import ATOL_PADDING, pad_batch, random_ca_trace, tiny_config

from model import build_denoiser
from model.diffusion import Schedule, q_sample, respaced_timesteps, reverse_step, sample
from model.sampling_step import SamplingStep, eager_capture, eager_step
from service.engine import SamplingEngine

CPU = torch.device("cpu")
T_TINY = 20
ATOL_STEP = 2e-4  # reverse_step vs the float64 posterior mean

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_config(useMHCMode=True, useFlashMode=True, numTimesteps=T_TINY)
    return build_denoiser(config).eval(), Schedule.from_config(config)


# ------------------------------------------------------------------------------ respaced timesteps
@pytest.mark.parametrize("T,steps", [(1000, 1), (1000, 2), (1000, 10), (1000, 50), (1000, 999), (1000, 1000),
                                     (20, 7), (20, 19), (7, 7), (1, 1)])
def test_respaced_timesteps_endpoints_length_and_order(T, steps):
    ts = respaced_timesteps(T, steps)
    assert len(ts) == steps and ts[0] == T and (ts[-1] == 1 or steps == 1)
    assert all(a > b for a, b in pairwise(ts))  # strictly descending
    assert all(1 <= t <= T for t in ts)
    gaps = [a - b for a, b in pairwise(ts)]
    assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding


def test_respaced_timesteps_full_and_known_values():
    assert respaced_timesteps(1000, 1000) == list(range(1000, 0, -1))
    assert respaced_timesteps(20, 20) == list(range(20, 0, -1))
    assert respaced_timesteps(1000, 10) == [1000, 889, 778, 667, 556, 445, 334, 223, 112, 1]
    assert respaced_timesteps(10, 4) == [10, 7, 4, 1]
    for bad in (0, 1001, -3):
        with pytest.raises(ValueError, match="steps must be between 1 and 1000"):
            respaced_timesteps(1000, bad)


# ------------------------------------------------------------------------------------ reverse step
def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    chains = [random_ca_trace(1, n, generator=g)[0] for n in (13, 22, 17)]
    x, mask = pad_batch(chains)  # [3, 22, 3], [3, 22] with real zeros on padding
    eps_hat = torch.randn(x.shape, generator=g) * mask[..., None]
    noise = torch.randn(x.shape, generator=g)
    return x, mask, eps_hat, noise


def test_reverse_step_t_prev_t_minus_1_is_bit_identical():
    s = Schedule.cosine(100)
    x, mask, eps_hat, noise = _batch()
    t = torch.tensor([1, 37, 100])
    scale = torch.tensor([0.6, 1.0, 0.3])
    assert torch.equal(reverse_step(s, x, eps_hat, t, mask, noise, scale, t - 1),
                       reverse_step(s, x, eps_hat, t, mask, noise, scale))


def test_reverse_step_jump_is_the_posterior_between_the_two_timesteps():
    """With the true noise and no sampling noise, the jump t -> s lands on the DDPM posterior mean
    q(x_s | x_t, x_0) of the respaced chain (alpha' = abar_t / abar_s)."""
    s = Schedule.cosine(1000)
    g = torch.Generator().manual_seed(1)
    x0 = random_ca_trace(3, 9, generator=g)  # [3, 9, 3]
    t, t_prev = torch.tensor([5, 400, 700]), torch.tensor([1, 250, 600])
    eps = torch.randn(3, 9, 3, generator=g)
    xt = q_sample(s, x0, t, eps)
    out = reverse_step(s, xt, eps, t, torch.ones(3, 9), torch.randn(3, 9, 3, generator=g), 0.0, t_prev,
                       recenter=False)
    ab = s.alpha_bars.double()
    ab_t, ab_s = ab[t].view(-1, 1, 1), ab[t_prev].view(-1, 1, 1)
    a = ab_t / ab_s
    mu = (ab_s.sqrt() * (1 - a) / (1 - ab_t)) * x0.double() + (a.sqrt() * (1 - ab_s) / (1 - ab_t)) * xt.double()
    assert (out.double() - mu).abs().max().item() < ATOL_STEP


def test_reverse_step_jump_noise_rule_and_padding():
    s = Schedule.cosine(100)
    x, mask, eps_hat, noise = _batch()
    t, t_prev = torch.tensor([40, 37, 100]), torch.tensor([0, 20, 1])
    scale = torch.tensor([0.6, 1.0, 0.3])
    out = reverse_step(s, x, eps_hat, t, mask, noise, scale, t_prev)
    other = reverse_step(s, x, eps_hat, t, mask, noise * 5 + 1, scale, t_prev)
    assert torch.equal(out[0], other[0])  # s == 0: no noise, whatever t
    assert not torch.allclose(out[1], other[1]) and not torch.allclose(out[2], other[2])
    assert torch.isfinite(out).all() and torch.all(out[mask == 0] == 0)
    for i in range(3):  # each row on its own
        n = int(mask[i].sum())
        alone = reverse_step(s, x[i:i + 1, :n], eps_hat[i:i + 1, :n], t[i:i + 1], mask[i:i + 1, :n],
                             noise[i:i + 1, :n], scale[i:i + 1], t_prev[i:i + 1])
        assert (out[i, :n] - alone[0]).abs().max().item() < 1e-6


# ------------------------------------------------------------------------------------------ sample
def test_sample_with_fewer_steps(model):
    denoiser, _ = model
    lengths, seeds = [13, 21], [5, 6]
    full = sample(denoiser, lengths, seeds, 0.6)
    assert all(torch.equal(a, b) for a, b in zip(full, sample(denoiser, lengths, seeds, 0.6, steps=T_TINY)))
    calls = []
    few = sample(denoiser, lengths, seeds, 0.6, steps=5, progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (5, 5) and len(calls) == 5  # one batch of 5 steps
    for a, b, n in zip(few, full, lengths):
        assert a.shape == (n, 3) and torch.isfinite(a).all()
        assert (a - b).abs().max().item() > 1e-3  # another sampler, another backbone
    traj = sample(denoiser, [15], [5], 0.6, steps=4, return_trajectory=True)[0]
    assert traj.shape == (5, 15, 3)
    assert torch.equal(traj[-1], sample(denoiser, [15], [5], 0.6, steps=4)[0])
    one = sample(denoiser, [15], [5], 0.6, steps=1)[0]
    assert one.shape == (15, 3) and torch.isfinite(one).all()
    with pytest.raises(ValueError, match="steps must be between 1 and 20"):
        sample(denoiser, [15], [5], 0.6, steps=T_TINY + 1)


# ------------------------------------------------------------------------------- graphed step
def test_graphed_step_takes_t_prev_per_sample_in_one_graph(model, monkeypatch):
    denoiser, schedule = model
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    runner = SamplingStep(denoiser, schedule, device=CPU, graphed=True, capture=eager_capture)
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(3, 24)
    for b, n in enumerate((13, 22, 17)):
        mask[b, :n] = 1.0
    x = torch.randn(3, 24, 3, generator=g) * 6.0 * mask[..., None]
    noise = torch.randn(3, 24, 3, generator=g) * mask[..., None]
    scale = torch.tensor([0.6, 0.6, 1.0])
    t = torch.tensor([20, 15, 7])
    for t_prev in (torch.tensor([19, 10, 0]), t - 1, torch.tensor([1, 14, 3])):
        out = runner(x, t, mask, noise, scale, t_prev)
        ref = eager_step(denoiser, schedule, x, t, mask, noise, scale, t_prev)
        assert (out - ref).abs().max().item() < ATOL_PADDING  # bucket 4 holds one padding row
    assert torch.equal(runner(x, t, mask, noise, scale), runner(x, t, mask, noise, scale, t - 1))
    assert runner.keys() == [(4, 24)] and runner.stats.captures == 1  # one graph for every t_prev


# ------------------------------------------------------------------------------------------ engine
def _engine_run(model, requests, *, graphed=False):
    """Submit (length, count, seed, steps) requests at once; each request's sample coordinates."""
    denoiser, schedule = model
    step = SamplingStep(denoiser, schedule, device=CPU, graphed=graphed, capture=eager_capture)
    engine = SamplingEngine(step, num_timesteps=schedule.num_timesteps, device=CPU, residue_budget=256,
                            queue_max_samples=16, to_pdb=lambda ca: "")

    async def main():
        engine.start()
        jobs = [engine.submit(length=n, count=c, seeds=[s + i for i in range(c)], noise_scale=0.6, steps=k)
                for n, c, s, k in requests]
        done = await asyncio.gather(*[j.future for j in jobs])
        await engine.shutdown(10)
        return [[r.ca for r in job.results] for job in done], [job.steps for job in done]

    result = asyncio.run(main())
    return (*result, engine.stats)


@pytest.mark.parametrize("graphed", [False, True])
def test_engine_batches_requests_of_different_steps_without_changing_them(model, graphed, monkeypatch):
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
    a, b = (22, 2, 11, 7), (22, 1, 30, None)  # same length: one length group; 7 steps and T
    (together_a, together_b), steps, stats = _engine_run(model, [a, b], graphed=graphed)
    assert steps == [7, T_TINY]
    assert stats.max_batch_size == 3 and stats.max_distinct_timesteps >= 2  # the two shared steps
    assert stats.batches_run == T_TINY  # the 7-step request ran inside the other's 20 steps
    [alone_a], _, _ = _engine_run(model, [a], graphed=graphed)
    [alone_b], _, _ = _engine_run(model, [b], graphed=graphed)
    denoiser, _ = model
    ref_a = sample(denoiser, [22, 22], [11, 12], 0.6, steps=7)
    for got, alone, ref in zip(together_a, alone_a, ref_a):
        assert (got - alone).abs().max().item() < ATOL_PADDING
        assert (got - ref).abs().max().item() < ATOL_PADDING
    assert (together_b[0] - alone_b[0]).abs().max().item() < ATOL_PADDING
    assert (together_b[0] - sample(denoiser, [22], [30], 0.6)[0]).abs().max().item() < ATOL_PADDING
    assert (together_a[0] - together_b[0]).abs().max().item() > 1e-3


def test_engine_rejects_steps_outside_the_schedule(model):
    _, schedule = model
    engine = SamplingEngine(lambda *a: None, num_timesteps=schedule.num_timesteps, device=CPU,
                            residue_budget=256, queue_max_samples=16, to_pdb=lambda ca: "")

    async def main():
        for bad in (0, T_TINY + 1):
            with pytest.raises(ValueError, match="steps must be between 1 and 20"):
                engine.submit(length=20, count=1, seeds=[0], noise_scale=0.6, steps=bad)

    asyncio.run(main())
    assert len(engine.admission) == 0


def test_reverse_step_posterior_variance_option():
    """sigma^2 = noise_scale^2 * beta_tilde = noise_scale^2 (1 - abar_s) / (1 - abar_t) * beta' (off by default)."""
    s = Schedule.cosine(100)
    x, mask, eps_hat, noise = _batch()
    t, t_prev = torch.tensor([40, 37, 100]), torch.tensor([39, 20, 0])
    kw = {"recenter": False}
    base = reverse_step(s, x, eps_hat, t, mask, torch.zeros_like(noise), 1.0, t_prev, **kw)
    plain = reverse_step(s, x, eps_hat, t, mask, noise, 1.0, t_prev, **kw) - base
    tilde = reverse_step(s, x, eps_hat, t, mask, noise, 1.0, t_prev, posterior_variance=True, **kw) - base
    ab = s.alpha_bars.double()
    ratio = ((1 - ab[t_prev]) / (1 - ab[t])).sqrt()  # sigma_tilde / sigma
    for i in range(2):
        n = int(mask[i].sum())
        assert torch.allclose(tilde[i, :n].double(), plain[i, :n].double() * ratio[i], atol=1e-5)
    assert torch.equal(tilde[2], torch.zeros_like(tilde[2]))  # s == 0: no noise either way
