"""The soft cap of the H_res logits (``mhcResLogitCap``, ``model.mhc.reference.cap_logits``): without it,
large logits leave 20 Sinkhorn iterations far from doubly stochastic and the composite gain over depth
grows (what a long training run does to alpha_res * x' phi_res); with it, H_res stays on the Birkhoff
polytope to a few per cent for any logits, including the worst a gradient search finds. The fused
kernel applies the same cap, forward and gradients (Triton's CPU interpreter in a subprocess)."""

from __future__ import annotations

import math

import pytest
import torch
from mhc_cases import ITERS, in_triton_interpreter

from model.config import ConfigError, parse_config
from model.mhc import MHCMappings, MHCResidual
from model.mhc.reference import RES_DIAG_INIT, cap_logits, sinkhorn_knopp, sinkhorn_knopp_log

CAP = 5.0  # the value the long-chain training configuration uses
COLUMN_ERR_CAPPED = 0.08  # worst |column sum - 1| under the cap after 20 iterations (measured <= 0.062)
DEPTH = 5  # structure layers of the shipped models
GAIN_CAPPED = 1.4  # composite Amax gain over DEPTH layers under the cap (measured <= 1.07 adversarially)


def column_error(h: torch.Tensor) -> torch.Tensor:
    """max_j |sum_i h_ij - 1| per matrix: [..., n, n] -> [...]."""
    return (h.sum(dim=-2) - 1).abs().amax(dim=-1)


def composite_gain(mats: list[torch.Tensor]) -> torch.Tensor:
    """The paper's Amax gain of H^(D) ... H^(1): max of the max row and max column sum, per matrix."""
    p = mats[0]
    for h in mats[1:]:
        p = h @ p
    return torch.maximum(p.sum(-1).amax(-1), p.sum(-2).amax(-1))


def worst_logits(cap: float, *, count: int = 512, steps: int = 150, seed: int = 0) -> torch.Tensor:
    """Logits [count, 4, 4] found by gradient ascent on the column error of the capped Sinkhorn."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(count, 4, 4, generator=g, dtype=torch.float64) * 3).requires_grad_()
    opt = torch.optim.Adam([w], lr=0.1)
    for _ in range(steps):
        err = column_error(sinkhorn_knopp(cap * torch.tanh(w), ITERS, cap=0.0))
        opt.zero_grad()
        (-err.sum()).backward()
        opt.step()
    return (cap * torch.tanh(w)).detach() * 10  # scaled far past the cap: the cap must bring them back


def test_uncapped_sinkhorn_leaves_the_polytope_for_large_logits():
    """The failure the cap exists for: logits of std 30 leave columns summing to ~0 or ~2
    after 20 iterations, and the composite gain over five such layers is far above 1."""
    g = torch.Generator().manual_seed(1)
    mats = [sinkhorn_knopp(torch.randn(4000, 4, 4, generator=g, dtype=torch.float64) * 30, ITERS)
            for _ in range(DEPTH)]
    assert float(column_error(mats[0]).max()) > 0.5
    assert float(composite_gain(mats).max()) > 2.0


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0, 1e4])
def test_capped_sinkhorn_stays_doubly_stochastic_for_any_logits(scale):
    g = torch.Generator().manual_seed(2)
    mats = [sinkhorn_knopp(torch.randn(4000, 4, 4, generator=g, dtype=torch.float64) * scale, ITERS, cap=CAP)
            for _ in range(DEPTH)]
    for h in mats:
        assert torch.isfinite(h).all() and (h >= 0).all()
        torch.testing.assert_close(h.sum(-1), torch.ones_like(h.sum(-1)), atol=1e-12, rtol=0)  # rows: exact
        assert float(column_error(h).max()) < COLUMN_ERR_CAPPED
    assert float(composite_gain(mats).max()) < GAIN_CAPPED


def test_capped_sinkhorn_worst_case_found_by_search():
    """Gradient ascent on the column error cannot push it past the bound under the cap, while the same
    search without the cap (logits free) reaches errors near 1."""
    z = worst_logits(CAP)
    h = sinkhorn_knopp(z, ITERS, cap=CAP)
    assert float(column_error(h).max()) < COLUMN_ERR_CAPPED
    assert float(composite_gain([h] * DEPTH).max()) < GAIN_CAPPED
    free = sinkhorn_knopp(z, ITERS)  # the same logits, uncapped (spread up to 100)
    assert float(column_error(free).max()) > 0.5


def test_cap_is_identity_at_zero_and_bounded_otherwise():
    z = torch.linspace(-50, 50, 101, dtype=torch.float64)
    assert torch.equal(cap_logits(z, 0.0), z)
    c = cap_logits(z, CAP)
    assert float(c.abs().max()) < CAP and torch.all(c[1:] > c[:-1])  # bounded, strictly increasing
    torch.testing.assert_close(cap_logits(z * 1e-4, CAP), z * 1e-4, atol=1e-12, rtol=1e-6)  # ~identity near 0


def test_capped_sinkhorn_matches_log_space_reference_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 4, 4, generator=g, dtype=torch.float64) * 8
    torch.testing.assert_close(sinkhorn_knopp(z, ITERS, cap=CAP), sinkhorn_knopp_log(z, ITERS, cap=CAP),
                               atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, 6, cap=CAP), (z[:2].clone().requires_grad_(),))


def test_capped_mappings_start_where_uncapped_ones_do():
    """The initial b_res is chosen so that the capped diagonal logit equals the uncapped one: both start
    with H_res diagonal RES_DIAG_INIT, and the first forward is the same."""
    torch.manual_seed(0)
    plain = MHCMappings(16, 4, alpha_init=0.01, sinkhorn_iters=ITERS)
    capped = MHCMappings(16, 4, alpha_init=0.01, sinkhorn_iters=ITERS, res_logit_cap=CAP)
    with torch.no_grad():
        capped.phi.copy_(plain.phi)
    s = torch.randn(2, 5, 4, 16)
    h_plain, h_capped = plain(s)[2], capped(s)[2]
    torch.testing.assert_close(h_capped, h_plain, atol=2e-3, rtol=0)
    diag = torch.diagonal(sinkhorn_knopp(capped.b_res.detach(), ITERS, cap=CAP))
    torch.testing.assert_close(diag, torch.full_like(diag, RES_DIAG_INIT), atol=1e-6, rtol=0)


def test_cap_below_the_initial_diagonal_logit_is_refused():
    floor = math.log(RES_DIAG_INIT * 3 / (1 - RES_DIAG_INIT))  # n = 4
    with pytest.raises(ValueError, match="mhcResLogitCap 3 must be 0 .* above 3.30"):
        MHCMappings(16, 4, alpha_init=0.01, sinkhorn_iters=ITERS, res_logit_cap=3.0)
    MHCMappings(16, 4, alpha_init=0.01, sinkhorn_iters=ITERS, res_logit_cap=floor + 0.1)  # accepted


def test_config_key_reaches_every_mhc_layer():
    from model import build_denoiser

    cfg = parse_config("useMHCMode True\nmhcResLogitCap 5\nnumStructureLayers 2\n", "test")
    layers = [m for m in build_denoiser(cfg).modules() if isinstance(m, MHCResidual)]
    assert layers and all(m.mappings.res_logit_cap == CAP for m in layers)
    assert parse_config("", "test").mhcResLogitCap == 0.0  # older weights: the paper's form
    with pytest.raises(ConfigError, match="mhcResLogitCap"):
        parse_config("mhcResLogitCap -1\n", "test")


def fused_capped_matches_reference(device: str) -> None:
    """The fused kernel with the cap vs the reference loop: forward and gradients, logits far past the
    cap, fp32 and bf16."""
    from model.mhc.kernels import sinkhorn

    g = torch.Generator().manual_seed(7)
    for count, scale in [(1, 1.0), (37, 10.0), (130, 300.0)]:
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(count, 4, 4, generator=g) * scale).to(device, dtype)
            a_in, b_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
            a = sinkhorn.sinkhorn_fused(a_in, ITERS, cap=CAP)
            b = sinkhorn_knopp(b_in, ITERS, cap=CAP)
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
            w = torch.randn(a.shape, generator=g).to(device)
            (a * w).sum().backward()
            (b * w).sum().backward()
            torch.testing.assert_close(a_in.grad.float(), b_in.grad.float(), atol=1e-6, rtol=0)
            z = logits.float().contiguous()
            torch.testing.assert_close(sinkhorn.sinkhorn_into(z, torch.empty_like(z), ITERS, cap=CAP), a.detach(),
                                       atol=0, rtol=0)


def test_fused_capped_sinkhorn_in_the_triton_interpreter():
    in_triton_interpreter("fused_capped_matches_reference", module="test_mhc_sinkhorn_cap")


@pytest.mark.gpu
def test_gpu_fused_capped_sinkhorn():
    fused_capped_matches_reference("cuda")
