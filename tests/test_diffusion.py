"""Schedule, forward noising, Genie's loss, the per-sample reverse step and seeded sampling."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ATOL_SAMPLE, pad_batch, random_ca_trace, tiny_config

from model.diffusion import BETA_MAX, Schedule, loss, q_sample, reverse_step, sample

ATOL_STEP = 1e-6  # reverse_step: batched vs separate rows (pure elementwise arithmetic, fp32)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("T", [1000, 7])
def test_schedule_endpoints_and_monotone(T):
    s = Schedule.cosine(T)
    assert s.betas.shape == s.alphas.shape == s.alpha_bars.shape == (T + 1,)
    assert s.betas[0] == 0 and s.alphas[0] == 1 and s.alpha_bars[0] == 1
    assert torch.all(s.alpha_bars[1:] < s.alpha_bars[:-1])  # strictly decreasing
    assert torch.all(s.betas[1:] > 0) and torch.all(s.betas <= BETA_MAX)
    # Genie's form: abar_t = cos^2(pi/2 t/(T+1)) / 1 (f(0) = 1); no clipping happens at these T
    t = torch.arange(T + 1, dtype=torch.float64)
    expected = torch.cos(t / (T + 1) * math.pi / 2) ** 2
    assert torch.allclose(s.alpha_bars.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(torch.cumprod(s.alphas.double(), 0), s.alpha_bars.double(), rtol=1e-5, atol=1e-8)
    # documented endpoint: abar_T ~ (pi / (2 (T + 1)))^2
    assert s.alpha_bars[-1].item() == pytest.approx((math.pi / (2 * (T + 1))) ** 2, rel=2e-2)


def test_schedule_clips_betas():
    betas = torch.tensor([0.0, 0.5, 1.0])  # 1.0 would make abar = 0 and 1/sqrt(alpha) infinite
    s = Schedule(betas.clamp(max=BETA_MAX))
    assert s.alpha_bars[-1] > 0
    with pytest.raises(ValueError):
        Schedule(torch.tensor([0.1, 0.2]))  # index 0 must be clean


def test_q_sample_statistics():
    s = Schedule.cosine(1000)
    g = torch.Generator().manual_seed(0)
    x0 = random_ca_trace(1, 11, generator=g)  # [1, 11, 3]
    n, t_val = 4000, 300
    x0s = x0.expand(n, -1, -1)
    t = torch.full((n,), t_val)
    xt = q_sample(s, x0s, t, torch.randn(n, 11, 3, generator=g))
    ab = s.alpha_bars[t_val].item()
    mean_err = (xt.mean(0) - math.sqrt(ab) * x0[0]).abs().max().item()
    assert mean_err < 5 * math.sqrt((1 - ab) / n)  # 5 sigma of the sample mean
    var = xt.var(0)
    assert (var / (1 - ab) - 1).abs().max().item() < 0.12  # 33 variances of 4000 draws: ~3.5 sigma
    # t = 0 is the clean data; the mask zeroes padding
    mask = torch.ones(2, 11)
    mask[1, 7:] = 0
    out = q_sample(s, x0.expand(2, -1, -1), torch.tensor([0, 500]), torch.randn(2, 11, 3), mask)
    assert torch.equal(out[0], x0[0]) and torch.all(out[1, 7:] == 0)


def test_loss_value_and_mask():
    eps = torch.zeros(2, 4, 3)
    eps_hat = torch.zeros(2, 4, 3)
    eps_hat[0, 0] = torch.tensor([3.0, 4.0, 0.0])  # norm 5
    eps_hat[1, 1] = torch.tensor([0.0, 0.0, 2.0])  # norm 2
    eps_hat[1, 3] = 1000.0  # padding: ignored
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    # unsquared norms, mean over the 5 real residues (pooled over the batch, as Genie)
    assert loss(eps_hat, eps, mask).item() == pytest.approx((5 + 2) / 5, abs=1e-5)


def test_reverse_step_posterior_mean():
    """With the true noise and no sampling noise, the step lands on DDPM's posterior mean."""
    s = Schedule.cosine(50)
    g = torch.Generator().manual_seed(1)
    x0 = random_ca_trace(3, 9, generator=g)
    t = torch.tensor([2, 17, 50])
    eps = torch.randn(3, 9, 3, generator=g)
    xt = q_sample(s, x0, t, eps)
    mask = torch.ones(3, 9)
    out = reverse_step(s, xt, eps, t, mask, torch.randn(3, 9, 3, generator=g), 0.0, recenter=False)
    b, a = s.betas.double()[t].view(-1, 1, 1), s.alphas.double()[t].view(-1, 1, 1)
    ab, ab_prev = s.alpha_bars.double()[t].view(-1, 1, 1), s.alpha_bars.double()[t - 1].view(-1, 1, 1)
    mu = (b * ab_prev.sqrt() / (1 - ab)) * x0.double() + ((1 - ab_prev) * a.sqrt() / (1 - ab)) * xt.double()
    assert (out.double() - mu).abs().max().item() < 2e-4


def test_reverse_step_mixed_t_equals_separate():
    s = Schedule.cosine(100)
    g = torch.Generator().manual_seed(2)
    lengths = [13, 22, 17]
    chains = [random_ca_trace(1, L, generator=g)[0] for L in lengths]
    x, mask = pad_batch(chains)  # [3, 22, 3], [3, 22] with real zeros
    eps_hat = torch.randn(x.shape, generator=g) * mask[..., None]
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([1, 37, 100])
    scale = torch.tensor([0.6, 1.0, 0.3])
    batched = reverse_step(s, x, eps_hat, t, mask, noise, scale)
    for i, L in enumerate(lengths):
        alone = reverse_step(s, x[i:i + 1, :L], eps_hat[i:i + 1, :L], t[i:i + 1], mask[i:i + 1, :L],
                             noise[i:i + 1, :L], scale[i:i + 1])
        assert (batched[i, :L] - alone[0]).abs().max().item() < ATOL_STEP
        assert torch.all(batched[i, L:] == 0)
        assert batched[i, :L].mean(0).abs().max().item() < 1e-4  # re-centred
    # t == 1: no noise is added
    other = reverse_step(s, x, eps_hat, t, mask, noise * 5 + 1, scale)
    assert torch.equal(other[0], batched[0]) and not torch.allclose(other[1], batched[1])


@pytest.fixture(scope="module")
def tiny_denoiser():
    from model import build_denoiser

    torch.manual_seed(0)
    return build_denoiser(tiny_config(numTimesteps=6)).eval()


def test_sample_reproducible_per_seed_whatever_the_batch(tiny_denoiser):
    torch.set_num_threads(1)
    calls = []
    together = sample(tiny_denoiser, [13, 21, 17], [11, 22, 33], 0.6, max_batch_size=3,
                      progress=lambda d, n: calls.append((d, n)))
    assert calls[-1] == (6, 6) and len(calls) == 6  # one batch of T = 6 steps
    alone = sample(tiny_denoiser, [21], [22], 0.6)
    mixed = sample(tiny_denoiser, [9, 21], [99, 22], 0.6, max_batch_size=2)
    split = sample(tiny_denoiser, [13, 21, 17], [11, 22, 33], 0.6, max_batch_size=1)
    assert [c.shape for c in together] == [(13, 3), (21, 3), (17, 3)]
    for got in (alone[0], mixed[1], split[1]):
        assert (got - together[1]).abs().max().item() < ATOL_SAMPLE
    for a, b in zip(together, split):
        assert (a - b).abs().max().item() < ATOL_SAMPLE
    again = sample(tiny_denoiser, [13], [11], 0.6)
    other = sample(tiny_denoiser, [13], [12], 0.6)
    assert torch.equal(again[0], sample(tiny_denoiser, [13], [11], 0.6)[0])
    assert (other[0] - again[0]).abs().max().item() > 0.1  # another seed, another sample
    for c in together:
        assert torch.isfinite(c).all() and c.mean(0).abs().max().item() < 1e-3  # centred


def test_sample_trajectory_and_noise_scale(tiny_denoiser):
    traj = sample(tiny_denoiser, [15], [5], 0.6, return_trajectory=True)[0]
    final = sample(tiny_denoiser, [15], [5], 0.6)[0]
    assert traj.shape == (7, 15, 3)
    assert (traj[-1] - final).abs().max().item() < 1e-6
    assert traj[0].std().item() == pytest.approx(1.0, abs=0.35)  # x_T ~ N(0, I)
    cold = sample(tiny_denoiser, [15], [5], 0.0)[0]
    assert (cold - final).abs().max().item() > 1e-3  # the noise scale is used
    with pytest.raises(ValueError):
        sample(tiny_denoiser, [15, 4], [1], 0.6)
