"""Tests for model/mhc.py: Sinkhorn-Knopp (Eq. 9), the mappings (Eqs. 7-8), the residual wrapper
(Eq. 3), read-outs and diagnostics. Tiny odd sizes; all tolerances are named below."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from model.mhc import (
    SINKHORN_LOGIT_FLOOR,
    GatedReadout,
    MeanReadout,
    MHCMappings,
    MHCResidual,
    build_readout,
    contract,
    expand,
    find_mhc_modules,
    mhc_diagnostics,
    sinkhorn_knopp,
    sinkhorn_knopp_direct,
    sinkhorn_knopp_log,
)

B, L, C = 2, 11, 13            # odd sizes so broadcasting bugs cannot hide
ITERS = 20                      # the paper's t_max and our default mhcSinkhornIters
TOL_ROW = 1e-6                  # rows: T_r is the last step of each iteration, so exact to fp32 rounding
TOL_COL_RANDOM = 2e-3           # columns after 20 iterations, logits ~ N(0, 1), n in 3..5 (measured <= 1.1e-3)
TOL_COL_INIT = 5e-4             # columns after 20 iterations at our bias init (measured <= 2e-4 for n <= 8)
TOL_COL_100 = 1e-5              # columns after 100 iterations, logits ~ N(0, 1)
TOL_DIRECT = 1e-12              # log-space vs literal Eq. 9, float64, moderate logits
REL_INIT = 0.02                 # ||mHC - plain|| / ||f(s)|| at init (alpha = 0.01)
REL_INIT_TINY_ALPHA = 1e-5      # same with alpha = 1e-6: the deviation is O(alpha)
ATOL_REF = 1e-5                 # vectorised MHCResidual vs per-residue loop reference (fp32)
ATOL_PAD = 1e-6                 # real residues when only padding changes


def _cfg(**kw):
    return tiny_config(**kw)


class Branch(nn.Module):
    """A small residual branch y = f(x, mask) [B, L, C]: per-residue MLP + masked mean over residues.

    The masked mean makes residues interact (like attention) while staying padding invariant.
    """

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        m = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (x * m).sum(-3, keepdim=True) / m.sum(-3, keepdim=True).clamp_min(1.0)  # [B, 1, C]
        return (self.mlp(x) + self.mix(pooled)) * m  # [B, L, C]


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
    m = MHCMappings(C, n, _cfg())
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


def _randomize(block: MHCResidual, seed: int) -> None:
    """Move the mapping parameters away from the init so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m = block.mappings
        for a in (m.alpha_pre, m.alpha_post, m.alpha_res):
            a.fill_(0.7)
        for bias in (m.b_pre, m.b_post, m.b_res):
            bias.copy_(torch.randn(bias.shape, generator=g))


@pytest.mark.parametrize("matmul_mixing", [False, True])
def test_residual_matches_per_residue_reference_forward_and_grad(matmul_mixing):
    """Both stream-mixing paths (broadcast sums: CPU; batched GEMM: the CUDA default) against the
    per-residue loop reference, forward and parameter gradients."""
    torch.manual_seed(5)
    block = MHCResidual(Branch(), C, _cfg(), n=3)
    block.matmul_mixing = matmul_mixing
    _randomize(block, 5)
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


def test_init_close_to_plain_residual():
    torch.manual_seed(6)
    branch = Branch()
    s = torch.randn(B, L, C)
    plain = (s + branch(s)).detach()
    fy = branch(s).norm().detach()
    for alpha, rel in ((0.01, REL_INIT), (1e-6, REL_INIT_TINY_ALPHA)):
        for n in (2, 3, 4):
            block = MHCResidual(branch, C, _cfg(mhcAlphaInit=alpha), n=n)
            with torch.no_grad():
                out = contract(block(expand(s, n)))
            err = float((out - plain).norm() / fy)
            assert err <= rel, (alpha, n, err)
    # two stacked layers stay close too
    torch.manual_seed(7)
    b1, b2 = Branch(), Branch()
    s1 = s + b1(s)
    plain2 = s1 + b2(s1)
    layers = [MHCResidual(b1, C, _cfg(), n=4), MHCResidual(b2, C, _cfg(), n=4)]
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
    block = MHCResidual(branch, C, _cfg(mhcExpansionRate=1), n=None)
    assert block.n == 1 and block.mappings is None and sum(p.numel() for p in block.parameters()) == sum(
        p.numel() for p in branch.parameters())
    out = contract(block(expand(s, 1), mask))
    assert torch.equal(out, s + branch(s, mask))
    gated = GatedReadout(C, 1, _cfg())
    assert torch.equal(gated(block(expand(s, 1), mask)), s + branch(s, mask))


def test_padding_does_not_affect_real_residues():
    torch.manual_seed(9)
    block = MHCResidual(Branch(), C, _cfg(), n=3)
    _randomize(block, 9)
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
    block = MHCResidual(Branch(), C, _cfg(), n=4)
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
    block = MHCResidual(Branch(), C, _cfg(), n=3)
    s = torch.randn(B, L, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(expand(s, 3))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
    assert block.last_h_res.dtype == torch.float32
    with torch.no_grad():
        ref = block(expand(s, 3))
    assert float((out.detach() - ref).abs().max()) <= 0.1  # only the branch ran in bf16


def test_wrong_stream_shape_is_rejected():
    block = MHCResidual(Branch(), C, _cfg(), n=3)
    with pytest.raises(ValueError, match="expected streams"):
        block(torch.randn(B, L, 4, C))


# ----------------------------------------------------------------------------- read-outs


def test_readouts():
    torch.manual_seed(12)
    streams = torch.randn(B, L, 3, C)
    assert torch.equal(MeanReadout()(streams), streams.mean(-2))
    assert isinstance(build_readout(C, _cfg()), MeanReadout)
    gated = build_readout(C, _cfg(mhcReadout="gated"))
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
        self.layers = nn.ModuleList(MHCResidual(Branch(), C, _cfg(), n=n) for _ in range(depth))

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
        _randomize(layer, 13)
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


# ----------------------------------------------------------------------------- fused Sinkhorn kernel
ATOL_FUSED = 1e-6  # fused Triton kernel vs the PyTorch loop: both float64 inside, fp32 out (measured 0.0)


def fused_matches_loop(device: str) -> None:
    """The fused kernel (model/sinkhorn_triton.py) vs the reference loop, forward and gradients, for
    n = 2 and 4, matrix counts around the kernel's block of 64, moderate and floor-clamped logits,
    fp32 and bf16 inputs. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc.kernels import sinkhorn as sinkhorn_triton

    g = torch.Generator().manual_seed(5)
    for n, count, scale in [(4, 1, 1.0), (4, 130, 3.0), (2, 65, 3.0), (4, 7, 400.0)]:
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(count, n, n, generator=g) * scale).to(device, dtype)
            assert sinkhorn_triton.available(logits)
            a_in = logits.clone().requires_grad_()
            b_in = logits.clone().requires_grad_()
            a, b = sinkhorn_knopp(a_in, ITERS, fused=True), sinkhorn_knopp(b_in, ITERS, fused=False)
            assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=ATOL_FUSED, rtol=0)
            weights = torch.randn(a.shape, generator=g).to(device)
            (a * weights).sum().backward()
            (b * weights).sum().backward()
            torch.testing.assert_close(a_in.grad.float(), b_in.grad.float(), atol=ATOL_FUSED, rtol=0)


def test_fused_sinkhorn_dispatch_rules():
    """The fused path is chosen only where it can run: never on a plain CPU tensor, for n * n not a
    power of two, or for float64 (gradcheck keeps the loop); ``sinkhorn_into`` refuses buffers that are
    not contiguous float32 of one shape."""
    from model.mhc.kernels import sinkhorn as sinkhorn_triton

    assert not sinkhorn_triton.available(torch.zeros(3, 4, 4))  # CPU without the interpreter
    # the buffer-owning entry point checks its buffers before any launch
    z = torch.zeros(3, 4, 4)
    for bad_z, bad_out in ((z.double(), z), (z, torch.zeros(3, 4, 4, dtype=torch.float64)),
                           (z.transpose(1, 2), z), (z, torch.zeros(2, 4, 4))):
        with pytest.raises(ValueError, match="sinkhorn_into: .* must be contiguous float32"):
            sinkhorn_triton.sinkhorn_into(bad_z, bad_out, ITERS, SINKHORN_LOGIT_FLOOR)
    if torch.cuda.is_available():
        assert not sinkhorn_triton.available(torch.zeros(3, 3, 3, device="cuda"))  # n = 3
        assert not sinkhorn_triton.available(torch.zeros(3, 4, 4, device="cuda", dtype=torch.float64))


def _in_triton_interpreter(check: str, module: str = "test_mhc") -> None:
    """Run ``<module>.<check>('cpu')`` (a module of tests/) under Triton's CPU interpreter (a subprocess,
    because TRITON_INTERPRET is read when the kernels are defined). Skips where Triton is not installed."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    code = f"import {module}; {module}.{check}('cpu'); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_fused_sinkhorn_matches_loop_in_the_triton_interpreter():
    """The same kernel source, executed by Triton's CPU interpreter."""
    _in_triton_interpreter("fused_matches_loop")


@pytest.mark.gpu
def test_gpu_fused_sinkhorn_matches_loop():
    fused_matches_loop("cuda")


@pytest.mark.gpu
def test_gpu_sinkhorn_backward_reads_back_its_own_scratch():
    """The backward kernel writes each half step's sums to a scratch buffer and reads them back in the
    same program: 65,536 matrices (4,096 programs), the scratch's memory filled with NaN beforehand (the
    allocator hands the freed block back), three calls: every gradient finite and equal to the loop's.
    Without a barrier between the writes and the reads (threads of another layout read them) this failed
    on the H100 (1,088 non-finite gradient entries), and the fused pre-branch's backward at 32,768 residues
    gave NaN gradients for 188 of them."""
    from model.mhc.kernels import sinkhorn as sinkhorn_triton

    count, n = 65536, 4
    g = torch.Generator().manual_seed(51)
    logits = (torch.randn(count, n, n, generator=g) * 2.0).cuda()
    weights = torch.randn(count, n, n, generator=g).cuda()
    b_in = logits.double().requires_grad_()
    (sinkhorn_knopp(b_in, ITERS, fused=False) * weights.double()).sum().backward()
    for _ in range(3):
        torch.empty(count, 2 * ITERS, n, dtype=torch.float64, device="cuda").fill_(float("nan"))  # freed at once
        grad = sinkhorn_triton.sinkhorn_vjp(logits.contiguous(), weights, ITERS, SINKHORN_LOGIT_FLOOR)
        assert torch.isfinite(grad).all(), int((~torch.isfinite(grad)).sum())
        torch.testing.assert_close(grad.double(), b_in.grad, atol=ATOL_FUSED, rtol=0)


# ----------------------------------------------------------------------------- fused stream mixing
ATOL_MIX = 1e-5  # fused Triton mixing vs the reference (float32 sums in another order)


def fused_mixing_matches_reference(device: str) -> None:
    """model/mhc_mix_triton.py vs model.mhc.mix_in / mix_out (broadcast and GEMM forms), for n = 4 and 2,
    C = 128 and 32, residue counts around the kernel's block of 8, and inside an MHCResidual (no grad).
    Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc import mix_in, mix_out
    from model.mhc.kernels import mix as mhc_mix_triton

    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, c, count in [(4, 128, 1), (4, 128, 9), (4, 32, 130), (2, 32, 7)]:
            s = torch.randn(count, n, c, generator=g).to(device)
            h_pre = torch.rand(count, n, generator=g).to(device)
            h_post = 2 * torch.rand(count, n, generator=g).to(device)
            h_res = torch.softmax(torch.randn(count, n, n, generator=g), -1).to(device)
            y = torch.randn(count, c, generator=g).to(device)
            assert mhc_mix_triton.available(s)
            for matmul in (False, True):
                torch.testing.assert_close(mhc_mix_triton.mix_in(h_pre, s), mix_in(h_pre, s, matmul),
                                           atol=ATOL_MIX, rtol=0)
                torch.testing.assert_close(mhc_mix_triton.mix_out(h_res, h_post, s, y),
                                           mix_out(h_res, h_post, s, y, matmul), atol=ATOL_MIX, rtol=0)
        res = MHCResidual(torch.nn.Linear(32, 32), 32, _cfg(mhcExpansionRate=4)).to(device)
        for p in res.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g).to(device))
        streams = torch.randn(2, 5, 4, 32, generator=g).to(device)
        fused = res(streams)
        res.fused_mixing = False
        torch.testing.assert_close(fused, res(streams), atol=ATOL_MIX, rtol=0)


def test_fused_mixing_dispatch_rules(monkeypatch):
    """The fused mixing runs only where it can: not on a plain CPU tensor, not for float64 (gradcheck
    keeps the reference), not for n or C that are not powers of two; with or without gradients (its
    autograd Functions train). Checked on the CPU with TRITON_INTERPRET=1 set (no kernel is launched)."""
    from model.mhc.kernels import mix as mhc_mix_triton

    s = torch.zeros(3, 4, 8)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert not mhc_mix_triton.available(s)  # CPU without the interpreter
    if torch.cuda.is_available():
        assert mhc_mix_triton.available(s.cuda())  # grad enabled: the training path
        assert not mhc_mix_triton.available(s.cuda().double())
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert mhc_mix_triton.available(s)
            assert mhc_mix_triton.available(s.bfloat16()) and mhc_mix_triton.available(s.half())
            assert mhc_mix_triton.available(s.requires_grad_(grad))
            assert not mhc_mix_triton.available(s.double())  # float64 (gradcheck)
            assert not mhc_mix_triton.available(torch.zeros(3, 3, 8))  # n = 3
            assert not mhc_mix_triton.available(torch.zeros(3, 4, 24))  # C = 24
    # the kernels index every tensor by the streams' residues: no broadcasting (checked before any launch)
    with pytest.raises(ValueError, match="h_pre must be"):
        mhc_mix_triton.mix_in(torch.zeros(4), s)
    with pytest.raises(ValueError, match="y must be"):
        mhc_mix_triton.mix_out(torch.zeros(3, 4, 4), torch.zeros(3, 4), s, torch.zeros(1, 8))


def test_fused_mixing_matches_reference_in_the_triton_interpreter():
    """The kernels' source, executed by Triton's CPU interpreter."""
    _in_triton_interpreter("fused_mixing_matches_reference")


@pytest.mark.gpu
def test_gpu_fused_mixing_matches_reference():
    fused_mixing_matches_reference("cuda")


# training: the autograd Functions MixIn / MixOut (fused backward kernels)
ATOL_MIX_GRAD = 1e-5  # fused vs reference outputs and gradients, float32 (C = 128 sums: measured <= 3.5e-6)
RTOL_MIX_GRAD = 1e-5
# 16-bit outputs: one rounding of a float32 sum, at most 2^-8 (bf16) or 2^-11 (fp16) of the value (twice
# that allowed). NOTE: Triton's CPU interpreter converts float32 to bf16 by truncation (up to 2^-7 of the
# value; measured 0.0077), hence 2^-6 there
RTOL_MIX_16 = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
RTOL_MIX_BF16_INTERPRETER = 2.0**-6
ATOL_RESIDUAL = 1e-5  # whole MHCResidual (two calls) fused vs reference mixing: output and gradients, float32
RTOL_RESIDUAL = 1e-4
# the same under bf16 autocast, |a - b| / |b| per tensor: the branch rounds x to bf16, where mixing-order
# differences can flip a rounding (measured <= 3e-7 on the CPU)
REL_RESIDUAL_BF16 = 1e-3


def _mix_inputs(n: int, c: int, lead: tuple[int, ...], g: torch.Generator) -> list[torch.Tensor]:
    """float64 (h_pre, h_post, h_res, streams, y): h_pre in (0, 1), h_post in (0, 2), h_res a row softmax
    of N(0, 1) logits (far from the identity), streams [*lead, n, c] and y [*lead, c] ~ N(0, 1)."""
    f64 = {"generator": g, "dtype": torch.float64}
    return [torch.rand(*lead, n, **f64), 2 * torch.rand(*lead, n, **f64),
            torch.softmax(torch.randn(*lead, n, n, **f64), -1), torch.randn(*lead, n, c, **f64),
            torch.randn(*lead, c, **f64)]


def _mix_with_grads(fused: bool, inputs, wx: torch.Tensor, wo: torch.Tensor, *, matmul: bool = False,
                    share: bool = True) -> list[torch.Tensor]:
    """x = H_pre S and out = H_res S + H_post^T y (fused, or the reference of model.mhc), loss <x, wx> +
    <out, wo>; returns [x, out, then the gradients of h_pre, h_post, h_res, S, y]. ``share``: one S
    feeds both (its gradient is the sum of two, as in MHCResidual); else mix_out gets its own copy,
    whose gradient comes last."""
    from model.mhc import mix_in, mix_out
    from model.mhc.kernels import mix as mhc_mix_triton

    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    if not share:
        leaves.append(leaves[3].detach().clone().requires_grad_())
    h_pre, h_post, h_res, s, y = leaves[:5]
    s_out = s if share else leaves[5]
    if fused:
        x, out = mhc_mix_triton.mix_in(h_pre, s), mhc_mix_triton.mix_out(h_res, h_post, s_out, y)
        assert type(x.grad_fn).__name__ == "MixInBackward" and type(out.grad_fn).__name__ == "MixOutBackward"
    else:
        x, out = mix_in(h_pre, s, matmul), mix_out(h_res, h_post, s_out, y, matmul)
    grads = torch.autograd.grad((x * wx).sum() + (out * wo).sum(), leaves)
    return [x.detach(), out.detach(), *grads]


def fused_mixing_gradients_match_reference(device: str) -> None:
    """MixIn / MixOut (model/mhc_mix_triton.py with gradients) vs model.mhc.mix_in / mix_out: outputs and
    the gradients of all five inputs, one S feeding both mixings. float32 against the float32 reference
    (broadcast and GEMM forms) and the float64 one (the kernels take no float64: the float64 reference is
    the exact answer), n = 4 and 2, C = 128 and 32, residue counts not multiples of the block of 8,
    2-D leading shapes; bf16 / fp16 against the float32 reference of the same rounded inputs, each mixing
    on its own (a 16-bit sum of the two S gradients would round once more). Runs on CUDA, or on the CPU
    under TRITON_INTERPRET=1."""
    from model.mhc.kernels import mix as mhc_mix_triton

    g = torch.Generator().manual_seed(17)
    cases = [(4, 128, (1,)), (4, 128, (2, 13)), (4, 32, (130,)), (2, 32, (7,))]
    if device == "cuda":  # the profiled training batch: 56 chains x 72 residues
        cases += [(4, 128, (56, 72))]
    for n, c, lead in cases:
        inputs = _mix_inputs(n, c, lead, g)
        weights = [torch.randn(*lead, c, generator=g, dtype=torch.float64),
                   torch.randn(*lead, n, c, generator=g, dtype=torch.float64)]
        exact = _mix_with_grads(False, inputs, *weights)  # float64 on the CPU

        def cast(ts, dtype=torch.float32):
            return [t.to(device=device, dtype=dtype) for t in ts]

        assert mhc_mix_triton.available(cast(inputs)[3])
        fused = _mix_with_grads(True, cast(inputs), *cast(weights))
        for matmul in (False, True):
            ref = _mix_with_grads(False, cast(inputs), *cast(weights), matmul=matmul)
            for i, (a, b) in enumerate(zip(fused, ref, strict=True)):
                assert a.dtype == torch.float32 and a.shape == b.shape
                torch.testing.assert_close(a, b, atol=ATOL_MIX_GRAD, rtol=RTOL_MIX_GRAD,
                                           msg=lambda m, i=i: f"{i}: {m}")
        for i, (a, b) in enumerate(zip(fused, exact, strict=True)):
            torch.testing.assert_close(a.cpu().double(), b, atol=ATOL_MIX_GRAD, rtol=RTOL_MIX_GRAD,
                                       msg=lambda m, i=i: f"{i} vs float64: {m}")
        for dtype in (torch.bfloat16, torch.float16):
            low, w_low = cast(inputs, dtype), cast(weights, dtype)
            fused = _mix_with_grads(True, low, *w_low, share=False)
            ref = _mix_with_grads(False, cast(low), *cast(w_low), share=False)
            interpreted_bf16 = dtype == torch.bfloat16 and device == "cpu"
            rtol = RTOL_MIX_BF16_INTERPRETER if interpreted_bf16 else RTOL_MIX_16[dtype]
            for i, (a, b) in enumerate(zip(fused, ref, strict=True)):
                assert a.dtype == dtype
                torch.testing.assert_close(a.float(), b, atol=ATOL_MIX_GRAD, rtol=rtol,
                                           msg=lambda m, i=i, d=dtype: f"{d} {i}: {m}")


def residual_case(seed: int, device: str) -> tuple[MHCResidual, torch.Tensor, torch.Tensor, torch.Tensor,
                                                   torch.Generator]:
    """One MHCResidual (n = 4, C = 32, ``Branch``, mappings moved off the init) on ``device``, single
    features s [2, 5, 32] that require a gradient (10 residues: not a multiple of the kernels' blocks), a
    mask with padding, output weights w [2, 5, 4, 32], and the generator for further draws."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    block = MHCResidual(Branch(32), 32, _cfg(mhcExpansionRate=4))
    _randomize(block, seed)
    block.to(device)
    s = torch.randn(2, 5, 32, generator=g).to(device).requires_grad_()
    mask = torch.ones(2, 5, device=device)
    mask[1, 3:] = 0
    w = torch.randn(2, 5, 4, 32, generator=g).to(device)
    return block, s, mask, w, g


def fused_residual_matches_reference(device: str) -> None:
    """Two applications of one MHCResidual (n = 4, C = 32; perturbed mappings, padded mask), forward and
    backward, ``fused_mixing`` True vs False: the output, the recorded H_res, the gradient of s (the first call sees
    ``expand``'s stride-0 streams) and of every parameter; float32, then under bf16 autocast (only the
    branch in bf16). The fused run must really be the autograd path (its grad_fn). Runs on CUDA, or on
    the CPU under TRITON_INTERPRET=1."""
    block, s, mask, w, _ = residual_case(19, device)

    def check(fused: bool, out: torch.Tensor) -> None:
        assert (type(out.grad_fn).__name__ == "MixOutBackward") == fused

    for autocast in (False, True):
        runs = residual_ab_runs(block, s, mask, w, "fused_mixing", autocast, check)
        assert len(runs[True]) == 3 + len(list(block.parameters()))
        assert_residual_runs_match(runs[True], runs[False], autocast)


def residual_ab_runs(block: MHCResidual, s: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, flag: str,
                     autocast: bool, check) -> dict[bool, list]:
    """``block.<flag>`` True, then False: two applications of ``block`` (the first on ``expand``'s
    stride-0 streams), under bf16 autocast if ``autocast``, and the backward of sum(out * w). Per flag
    value, [(name, tensor)]: the output, the recorded H_res, the gradient of s and of every parameter.
    ``check(flag value, out)`` runs after each forward (that the path under test really ran, or not)."""
    runs = {}
    for on in (True, False):
        setattr(block, flag, on)
        block.zero_grad(set_to_none=True)
        s.grad = None
        with torch.autocast(device_type=s.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = block(block(expand(s, 4), mask), mask)  # [2, 5, 4, 32]
        assert out.dtype == torch.float32
        check(on, out)
        h_res = block.last_h_res
        (out * w).sum().backward()
        grads = [(k, p.grad) for k, p in block.named_parameters()]
        runs[on] = [("out", out.detach()), ("h_res", h_res), ("s", s.grad), *grads]
    return runs


def assert_residual_runs_match(fast: list, ref: list, autocast: bool) -> None:
    """Two runs of (name, tensor) pairs of a residual (output, gradients) agree: float32 within
    ATOL_RESIDUAL / RTOL_RESIDUAL, under bf16 autocast within REL_RESIDUAL_BF16 per tensor."""
    for (name, a), (_, b) in zip(fast, ref, strict=True):
        assert a is not None and b is not None and a.dtype == b.dtype == torch.float32, name
        if autocast:
            rel = float((a - b).norm() / b.norm())
            assert rel <= REL_RESIDUAL_BF16, (name, rel)
        else:
            torch.testing.assert_close(a, b, atol=ATOL_RESIDUAL, rtol=RTOL_RESIDUAL,
                                       msg=lambda m, k=name: f"{k}: {m}")


def fused_mixing_training(device: str) -> None:
    fused_mixing_gradients_match_reference(device)
    fused_residual_matches_reference(device)


def test_fused_mixing_gradients_match_reference_in_the_triton_interpreter():
    """The backward kernels' source, executed by Triton's CPU interpreter (forward too)."""
    _in_triton_interpreter("fused_mixing_training")


def fused_mixing_in_cuda_graph() -> None:
    """MixIn / MixOut forward + backward captured in one CUDA graph (training size, float32), replayed on
    new inputs copied into the static ones: the same outputs and gradients as eager calls."""
    g = torch.Generator().manual_seed(23)
    n, c, lead = 4, 128, (56, 72)

    def fresh():
        return [t.float().cuda() for t in _mix_inputs(n, c, lead, g)], [
            torch.randn(*lead, c, generator=g).cuda(), torch.randn(*lead, n, c, generator=g).cuda()]

    static, static_w = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        for _ in range(2):
            _mix_with_grads(True, static, *static_w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _mix_with_grads(True, static, *static_w)
    for _ in range(2):
        inputs, weights = fresh()
        for dst, src in zip(static + static_w, inputs + weights, strict=True):
            dst.copy_(src)
        graph.replay()
        eager = _mix_with_grads(True, inputs, *weights)
        ref = _mix_with_grads(False, inputs, *weights)
        for a, b, r in zip(captured, eager, ref, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(a, r, atol=ATOL_MIX_GRAD, rtol=RTOL_MIX_GRAD)


@pytest.mark.gpu
def test_gpu_fused_mixing_gradients_match_reference(monkeypatch):
    # the GEMM form of the reference must be a true float32 bmm (no TF32) for the tolerances
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_mixing_training("cuda")
    fused_mixing_in_cuda_graph()


# ----------------------------------------------------------------------------- fused mapping logits
REL_MAP = 1e-5  # fused logits vs the reference, relative to |b| + |alpha| |x'| |phi| (float32 sums)
ATOL_MAP_H = 1e-5  # h_pre, h_post, h_res of MHCMappings fused vs reference (logits to ~1e-6)


def _map_case(n: int, c: int, lead: tuple[int, ...], dtype: torch.dtype, g: torch.Generator, device: str):
    """Streams [*lead, n, c] with a different scale per residue (one residue all zero: rms = 0, eps
    decides), phi ~ N(0, 1 / nC) [nC, 2n + n^2], alpha in [0.5, 2) and bias ~ N(0, 1) per column."""
    k, m = n * c, 2 * n + n * n
    s = torch.randn(*lead, n, c, generator=g) * torch.exp(torch.randn(*lead, 1, 1, generator=g))
    s.view(-1, n, c)[0] = 0.0
    phi = torch.randn(k, m, generator=g) / k**0.5
    alpha = 0.5 + 1.5 * torch.rand(m, generator=g)
    bias = torch.randn(m, generator=g)
    return s.to(device=device, dtype=dtype), phi.to(device), alpha.to(device), bias.to(device)


def fused_mapping_matches_reference(device: str) -> None:
    """model/mhc_map_triton.py vs model.mhc.mapping_logits for float32 / bf16 / fp16 streams, n = 4 with
    C = 128 (the shipped nC = 512) and n = 2 with C = 32, residue counts not multiples of the block,
    and a whole MHCMappings (h_pre, h_post, h_res) with perturbed parameters against ``fused = False``
    (no grad). Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc import mapping_logits
    from model.mhc.kernels import map as mhc_map_triton

    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        cases = [(4, 128, (1,), torch.float32), (4, 128, (3, 37), torch.float32), (4, 128, (2, 45), torch.bfloat16),
                 (4, 128, (33,), torch.float16), (2, 32, (7,), torch.float32)]
        if device == "cuda":  # the profiled size: 256 x 128 residues (many programs), too slow to interpret
            cases += [(4, 128, (256, 128), torch.float32), (4, 128, (256, 127), torch.bfloat16)]
        for n, c, lead, dtype in cases:
            s, phi, alpha, bias = _map_case(n, c, lead, dtype, g, device)
            assert mhc_map_triton.available(s, phi)
            ref = mapping_logits(s, phi, alpha, bias)  # [*lead, 2n + n^2] float32
            # what the rounding of the sums scales with (rms(|x|) = rms(x)): |b| + |alpha| |x'| |phi|
            scale = mapping_logits(s.abs(), phi.abs(), alpha.abs(), bias.abs())
            # the default tiling (by residue count) and the large-batch one forced on a small batch
            for kw in ({}, {"block_m": mhc_map_triton.BLOCK_M_LARGE}):
                out = mhc_map_triton.mapping_logits(s, phi, alpha, bias, **kw)
                assert out.shape == ref.shape and out.dtype == ref.dtype == torch.float32
                err = float(((out - ref).abs() / scale).max())
                assert err <= REL_MAP, (n, c, lead, dtype, kw, err)
                torch.testing.assert_close(out.reshape(-1, out.shape[-1])[0], bias)  # the zero residue: b
        maps = MHCMappings(128, 4, _cfg()).to(device)
        for p in maps.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g).to(device))
        maps.alpha_pre.fill_(0.7)  # well above the 0.01 init, so phi matters in every map
        maps.alpha_post.fill_(1.3)
        maps.alpha_res.fill_(2.0)
        for dtype in (torch.float32, torch.bfloat16):
            streams = torch.randn(2, 21, 4, 128, generator=g).to(device=device, dtype=dtype)
            assert mhc_map_triton.available(streams, maps.phi)
            maps.fused = True
            fused = maps(streams)
            maps.fused = False
            ref = maps(streams)
            for a, b in zip(fused, ref, strict=True):
                assert a.dtype == b.dtype == torch.float32
                torch.testing.assert_close(a, b, atol=ATOL_MAP_H, rtol=0)


def test_fused_mapping_dispatch_rules(monkeypatch):
    """The fused logits run only where they can and should: not on a plain CPU tensor, not when a
    gradient is needed (training keeps the reference), not for float64, nor for shapes the kernel does
    not handle. Checked on the CPU with TRITON_INTERPRET=1 set (no kernel is launched here)."""
    from model.mhc.kernels import map as mhc_map_triton

    s, phi = torch.zeros(3, 4, 128), torch.zeros(512, 24)
    with torch.no_grad():
        assert not mhc_map_triton.available(s, phi)  # CPU without the interpreter
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with torch.no_grad():
        assert mhc_map_triton.available(s, phi)
        assert mhc_map_triton.available(s.bfloat16(), phi)
        assert not mhc_map_triton.available(s.double(), phi)  # float64 streams (gradcheck)
        assert not mhc_map_triton.available(s, phi.double())  # float64 phi
        assert not mhc_map_triton.available(torch.zeros(3, 3, 24), torch.zeros(72, 15))  # nC = 72: no chunk
        assert not mhc_map_triton.available(s, torch.zeros(256, 24))  # phi does not match nC
        assert not mhc_map_triton.available(s, torch.zeros(512, 143))  # n = 11: too many columns
        assert not mhc_map_triton.available(s.long(), phi)
    assert not mhc_map_triton.available(s, phi)  # grad enabled


def test_fused_mapping_matches_reference_in_the_triton_interpreter():
    """The kernel's source, executed by Triton's CPU interpreter."""
    _in_triton_interpreter("fused_mapping_matches_reference")


@pytest.mark.gpu
def test_gpu_fused_mapping_matches_reference(monkeypatch):
    # the reference must be a true float32 GEMM for REL_MAP to test tf32x3 (PyTorch's default)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_mapping_matches_reference("cuda")
