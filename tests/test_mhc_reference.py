"""Tests for the reference math of model/mhc/ (reference.py, mappings.py, residual.py on its reference
path, readout.py, diagnostics.py): Sinkhorn-Knopp (Eq. 9), the mappings (Eqs. 7-8), the residual wrapper
(Eq. 3), read-outs and diagnostics. Tiny odd sizes; all tolerances are named below."""

from __future__ import annotations

import pytest
import torch
from mhc_cases import ALPHA, ITERS, MAPS, B, Branch, C, L, randomize
from torch import nn

from model.mhc import (
    GatedReadout,
    MeanReadout,
    MHCMappings,
    MHCResidual,
    build_readout,
    contract,
    expand,
    find_mhc_modules,
    mhc_diagnostics,
    mix_in,
    mix_out,
    sinkhorn_knopp,
    sinkhorn_knopp_direct,
    sinkhorn_knopp_log,
)

TOL_ROW = 1e-6                  # rows: T_r is the last step of each iteration, so exact to fp32 rounding
TOL_COL_RANDOM = 2e-3           # columns after 20 iterations, logits ~ N(0, 1), n in 3..5 (measured <= 1.1e-3)
TOL_COL_INIT = 5e-4             # columns after 20 iterations at our bias init (measured <= 2e-4 for n <= 8)
TOL_COL_100 = 1e-5              # columns after 100 iterations, logits ~ N(0, 1)
TOL_DIRECT = 1e-12              # log-space vs literal Eq. 9, float64, moderate logits
REL_INIT = 0.02                 # ||mHC - plain|| / ||f(s)|| at init (alpha = 0.01)
REL_INIT_TINY_ALPHA = 1e-5      # same with alpha = 1e-6: the deviation is O(alpha)
ATOL_REF = 1e-5                 # vectorised MHCResidual vs per-residue loop reference (fp32)
ATOL_PAD = 1e-6                 # real residues when only padding changes


# ----------------------------------------------------------------------------- Sinkhorn


@pytest.mark.parametrize("n", [3, 4, 5])
def test_sinkhorn_doubly_stochastic(n):
    g = torch.Generator().manual_seed(n)
    logits = torch.randn(64, 3, n, n, generator=g)
    h = sinkhorn_knopp(logits, ITERS)
    assert h.dtype == torch.float32 and h.shape == logits.shape
    assert bool((h >= 0).all())
    assert (h.sum(-1) - 1).abs().max() <= TOL_ROW
    assert (h.sum(-2) - 1).abs().max() <= TOL_COL_RANDOM
    assert (sinkhorn_knopp(logits, 100).sum(-2) - 1).abs().max() <= TOL_COL_100
    # the bias init of MHCMappings converges fast: diagonal 0.9
    m = MHCMappings(C, n, **MAPS)
    h0 = sinkhorn_knopp(m.b_res.detach() + 0.05 * torch.randn(64, n, n, generator=g), ITERS)
    assert (h0.sum(-2) - 1).abs().max() <= TOL_COL_INIT
    assert torch.allclose(h0.diagonal(dim1=-2, dim2=-1), torch.full((64, n), 0.9), atol=0.02)


def test_sinkhorn_matches_literal_eq9_float64():
    logits = torch.randn(7, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = sinkhorn_knopp(logits, ITERS)
    b = sinkhorn_knopp_direct(logits, ITERS)
    assert a.dtype == torch.float64
    assert (a - b).abs().max() <= TOL_DIRECT


def test_sinkhorn_matches_log_space_reference_forward_and_grad():
    """The fast exp-space Sinkhorn (float64, max-shifted) against the log-space form, float32 in."""
    g = torch.Generator().manual_seed(5)
    logits = torch.cat([3 * torch.randn(40, 4, 4, generator=g), 30 * torch.randn(8, 4, 4, generator=g)])
    a_in, b_in = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    a, b = sinkhorn_knopp(a_in, ITERS), sinkhorn_knopp_log(b_in, ITERS)
    assert a.dtype == torch.float32
    assert (a - b).abs().max() <= 1e-5
    w = torch.randn(a.shape, generator=g)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert (a_in.grad - b_in.grad).abs().max() <= 1e-4


def test_sinkhorn_gradcheck_float64():
    logits = torch.randn(2, 3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn_knopp(x, 6), (logits,), eps=1e-6, atol=1e-7)


def test_sinkhorn_bf16_autocast_runs_in_float32():
    logits = (3 * torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(3))).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = sinkhorn_knopp(logits, ITERS)
    assert h.dtype == torch.float32 and bool(torch.isfinite(h).all())
    # bit-identical to the float32 computation from the same (bf16-rounded) logits: nothing ran in bf16
    assert torch.equal(h, sinkhorn_knopp(logits.float(), ITERS))
    assert (h.sum(-1) - 1).abs().max() <= TOL_ROW


def test_sinkhorn_extreme_logits_finite():
    g = torch.Generator().manual_seed(4)
    sign = torch.randint(0, 2, (16, 4, 4), generator=g).float() * 2 - 1
    logits = torch.cat([50 * sign, torch.full((1, 4, 4), -50.0), torch.full((1, 4, 4), 50.0)])
    logits.requires_grad_(True)
    h = sinkhorn_knopp(logits, ITERS)
    assert bool(torch.isfinite(h).all()) and bool((h >= 0).all())
    assert (h.sum(-1) - 1).abs().max() <= TOL_ROW
    (h * torch.randn_like(h)).sum().backward()
    assert bool(torch.isfinite(logits.grad).all())
    with pytest.raises(ValueError, match="mhcSinkhornIters"):
        sinkhorn_knopp(logits, 0)


# ----------------------------------------------------------------------------- residual wrapper


def _reference_update(block: MHCResidual, streams: torch.Tensor, *args) -> torch.Tensor:
    """Eq. (3) one residue at a time with explicit matrices: the reference for the vectorised path."""
    m = block.mappings
    n = block.n
    out = torch.empty_like(streams)
    xs = torch.empty(streams.shape[:-2] + (C,))
    mats = []
    for b in range(streams.shape[0]):
        row = []
        for i in range(streams.shape[1]):
            s = streams[b, i]  # [n, C]
            v = s.reshape(-1)
            v = v / torch.sqrt(v.pow(2).mean() + 1e-6)
            raw = v @ m.phi  # [2n + n^2]
            h_pre = torch.sigmoid(m.alpha_pre * raw[:n] + m.b_pre)  # [n]
            h_post = 2 * torch.sigmoid(m.alpha_post * raw[n:2 * n] + m.b_post)  # [n]
            h_res = sinkhorn_knopp_direct(m.alpha_res * raw[2 * n:].reshape(n, n) + m.b_res, m.sinkhorn_iters)
            xs[b, i] = h_pre @ s
            row.append((h_post, h_res))
        mats.append(row)
    y = block.branch(xs, *args)  # [B, L, C]
    for b in range(streams.shape[0]):
        for i in range(streams.shape[1]):
            h_post, h_res = mats[b][i]
            out[b, i] = h_res @ streams[b, i] + torch.outer(h_post, y[b, i])
    return out


def test_residual_matches_per_residue_reference_forward_and_grad():
    """The vectorised reference path against the per-residue loop reference, forward and parameter
    gradients."""
    torch.manual_seed(5)
    block = MHCResidual(Branch(), C, n=3, **MAPS, fused=False)
    randomize(block, 5)
    streams = torch.randn(B, L, 3, C)
    mask = torch.ones(B, L)
    mask[1, 7:] = 0
    fast = block(streams, mask)
    ref = _reference_update(block, streams, mask)
    assert (fast - ref).abs().max() <= ATOL_REF
    g_fast = torch.autograd.grad(fast.pow(2).sum(), list(block.parameters()))
    g_ref = torch.autograd.grad(ref.pow(2).sum(), list(block.parameters()))
    for a, b in zip(g_fast, g_ref):
        assert (a - b).abs().max() <= 1e-4 * (1 + b.abs().max())
    # H_res is really applied: replacing it by the identity changes the output
    h = block.last_h_res
    assert h.shape == (B, L, 3, 3) and not h.requires_grad
    assert (h - torch.eye(3)).abs().max() > 0.1


ATOL_MIX_FORMS = 1e-6  # batched GEMM vs broadcast multiply-sum of the stream mixing (float32, K = n)


def test_mixing_forms_agree_forward_and_grad():
    """The two forms of the reference mixing (batched GEMM: the CUDA default; broadcast sums: the CPU's)
    agree, H_pre S and H_res S + H_post^T y, outputs and the gradients of every input."""
    g = torch.Generator().manual_seed(15)
    n = 3
    inputs = [torch.rand(B, L, n, generator=g), 2 * torch.rand(B, L, n, generator=g),
              torch.softmax(torch.randn(B, L, n, n, generator=g), -1), torch.randn(B, L, n, C, generator=g),
              torch.randn(B, L, C, generator=g)]
    runs = []
    for matmul in (False, True):
        h_pre, h_post, h_res, s, y = leaves = [t.clone().requires_grad_() for t in inputs]
        x, out = mix_in(h_pre, s, matmul), mix_out(h_res, h_post, s, y, matmul)  # [B, L, C], [B, L, n, C]
        grads = torch.autograd.grad((x * x.detach()).sum() + (out * out.detach()).sum(), leaves)
        runs.append([x.detach(), out.detach(), *grads])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL_MIX_FORMS, rtol=1e-6,
                                   msg=lambda m, i=i: f"tensor {i}: {m}")


def test_init_close_to_plain_residual():
    torch.manual_seed(6)
    branch = Branch()
    s = torch.randn(B, L, C)
    plain = (s + branch(s)).detach()
    fy = branch(s).norm().detach()
    for alpha, rel in ((0.01, REL_INIT), (1e-6, REL_INIT_TINY_ALPHA)):
        for n in (2, 3, 4):
            block = MHCResidual(branch, C, n=n, alpha_init=alpha, sinkhorn_iters=ITERS)
            with torch.no_grad():
                out = contract(block(expand(s, n)))
            err = float((out - plain).norm() / fy)
            assert err <= rel, (alpha, n, err)
    # two stacked layers stay close too
    torch.manual_seed(7)
    b1, b2 = Branch(), Branch()
    s1 = s + b1(s)
    plain2 = s1 + b2(s1)
    layers = [MHCResidual(b1, C, n=4, **MAPS), MHCResidual(b2, C, n=4, **MAPS)]
    S = expand(s, 4)
    for layer in layers:
        S = layer(S)
    assert float(((contract(S) - plain2).norm() / (plain2 - s).norm()).detach()) <= REL_INIT


def test_one_stream_is_exactly_plain_residual():
    torch.manual_seed(8)
    branch = Branch()
    s = torch.randn(B, L, C)
    mask = torch.ones(B, L)
    mask[0, 9:] = 0
    block = MHCResidual(branch, C, n=1, **MAPS)
    assert block.n == 1 and block.mappings is None and sum(p.numel() for p in block.parameters()) == sum(
        p.numel() for p in branch.parameters())
    out = contract(block(expand(s, 1), mask))
    assert torch.equal(out, s + branch(s, mask))
    gated = GatedReadout(C, 1, alpha_init=ALPHA)
    assert torch.equal(gated(block(expand(s, 1), mask)), s + branch(s, mask))


def test_padding_does_not_affect_real_residues():
    torch.manual_seed(9)
    block = MHCResidual(Branch(), C, n=3, **MAPS)
    randomize(block, 9)
    mask = torch.ones(B, L)
    mask[0, 6:] = 0
    mask[1, 9:] = 0
    streams = torch.randn(B, L, 3, C)
    other = streams.clone()
    other[mask == 0] = 100 * torch.randn(int((mask == 0).sum()), 3, C)
    a = block(streams, mask)
    h_a = block.last_h_res
    diag_a = mhc_diagnostics([h_a], mask)
    b = block(other, mask)
    diag_b = mhc_diagnostics([block.last_h_res], mask)
    real = mask.bool()
    assert (a[real] - b[real]).abs().max() <= ATOL_PAD
    assert diag_a == pytest.approx(diag_b, rel=1e-9, abs=1e-9)


def test_gradients_reach_alpha_phi_and_biases():
    torch.manual_seed(10)
    block = MHCResidual(Branch(), C, n=4, **MAPS)
    s = torch.randn(B, L, C)
    # streams must differ for stream-dependent parameters to get a gradient: use two layers
    out = block(block(expand(s, 4)))
    (out * torch.randn_like(out)).sum().backward()
    m = block.mappings
    for name in ("phi", "alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res"):
        g = getattr(m, name).grad
        assert g is not None and bool(torch.isfinite(g).all()), name
        assert float(g.abs().max()) > 0, name


def test_bf16_autocast_keeps_streams_float32():
    torch.manual_seed(11)
    block = MHCResidual(Branch(), C, n=3, **MAPS)
    s = torch.randn(B, L, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(expand(s, 3))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert block.last_h_res.dtype == torch.float32
    with torch.no_grad():
        ref = block(expand(s, 3))
    assert float((out.detach() - ref).abs().max()) <= 0.1  # only the branch ran in bf16


def test_wrong_stream_shape_is_rejected():
    block = MHCResidual(Branch(), C, n=3, **MAPS)
    with pytest.raises(ValueError, match="expected streams"):
        block(torch.randn(B, L, 4, C))


# ----------------------------------------------------------------------------- read-outs


def test_readouts():
    torch.manual_seed(12)
    streams = torch.randn(B, L, 3, C)
    assert torch.equal(MeanReadout()(streams), streams.mean(-2))
    assert isinstance(build_readout("mean", C, n=3, alpha_init=ALPHA), MeanReadout)
    gated = build_readout("gated", C, n=3, alpha_init=ALPHA)
    assert isinstance(gated, GatedReadout)
    out = gated(streams)
    mean = streams.mean(-2)
    assert float((out.detach() - mean).norm() / mean.norm()) <= REL_INIT  # starts as the mean read-out
    out.pow(2).sum().backward()
    assert all(p.grad is not None and float(p.grad.abs().max()) > 0 for p in gated.parameters())


# ----------------------------------------------------------------------------- diagnostics


class _Stack(nn.Module):
    def __init__(self, depth: int, n: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MHCResidual(Branch(), C, n=n, **MAPS) for _ in range(depth))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        S = expand(s, self.layers[0].n)
        for layer in self.layers:
            S = layer(S)
        return contract(S)


def test_diagnostics_on_a_model():
    torch.manual_seed(13)
    model = _Stack(depth=3, n=4)
    assert mhc_diagnostics(model) == {}  # nothing recorded yet
    for layer in model.layers:
        randomize(layer, 13)
    model(torch.randn(B, L, C))
    mods = find_mhc_modules(model)
    assert mods == list(model.layers)
    d = mhc_diagnostics(model)
    assert d["num_layers"] == 3 and d["num_streams"] == 4
    assert d["row_sum_err_max"] <= TOL_ROW
    assert d["col_sum_err_max"] <= TOL_COL_RANDOM
    # doubly stochastic, non-negative: every gain is 1 up to the Sinkhorn error
    assert abs(d["amax_gain"] - 1) <= 3 * TOL_COL_RANDOM and abs(d["amax_gain_worst"] - 1) <= 3 * TOL_COL_RANDOM
    assert d == mhc_diagnostics(mods)


def test_diagnostics_unconstrained_gain_and_mask():
    depth, n = 5, 3
    # unconstrained "HC" matrices with every row summing to 1.5: forward gain 1.5^depth exactly
    g = torch.Generator().manual_seed(14)
    mats = []
    for _ in range(depth):
        m = torch.rand(B, L, n, n, generator=g) + 0.1
        mats.append(1.5 * m / m.sum(-1, keepdim=True))
    mask = torch.ones(B, L)
    mask[1, 4:] = 0
    d = mhc_diagnostics(mats, mask)
    assert d["amax_gain_fwd"] == pytest.approx(1.5 ** depth, rel=1e-6)  # fp32 inputs
    assert d["row_sum_err_max"] == pytest.approx(0.5, rel=1e-6)
    # padding residues with exploding matrices do not count
    bad = [m.clone() for m in mats]
    bad[2][1, 4:] *= 1000
    assert mhc_diagnostics(bad, mask) == pytest.approx(d, rel=1e-9)
    assert mhc_diagnostics(bad)["amax_gain_worst"] > 1e3
    # identity matrices: every gain exactly 1
    eye = [torch.eye(n).expand(B, L, n, n)] * depth
    assert mhc_diagnostics(eye)["amax_gain"] == 1.0
