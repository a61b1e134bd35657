"""Flash-IPA (model/ipa/flash.py) and its factorizers (model/ipa/factorizer.py).

Fast path vs the dense reference with the same weights (forward and gradients), bf16 error bound,
global rigid-motion invariance, padding, ranks 1..4 x kNeighbors 6..16, the FA-only width error,
the dense factorizer's neighbour gather, and "no L x L tensor" on the pair-free path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL_INVARIANCE, random_ca_trace, tiny_config
from torch.utils._python_dispatch import TorchDispatchMode

import model.ipa.attention as att
import model.ipa.backends as bk
import model.ipa.factorizer as fac_mod
import model.ipa.knn as knn_mod
from model.geometry import frenet_serret_frames, random_rotation
from model.ipa.factorizer import PairFactorizer, PairFreeFactorizer
from model.network.builder import build_factorizer, build_ipa

ATOL_FWD = 2e-5  # fp32 flash vs dense reference, outputs O(1)
ATOL_GRAD = 1e-4  # fp32 gradients, flash vs dense reference
# bf16 hi/lo-split logits vs exact, relative to max |logit| (~3.5e4 here): the split carries ~16-17
# mantissa bits, 2^-17 = 7.6e-6 (measured 2.8e-6 and 3.4e-6 for two random inits; plain bf16: 2.3e-3)
RTOL_LOGIT_BF16 = 8e-6
RTOL_GRAD_BF16 = 0.15  # bf16 autocast input gradients vs fp32 reference, relative Frobenius (H100 sdpa: 0.086)
ATOL_BF16 = 0.15  # bf16 autocast flash vs fp32 reference, relative to max |output| (projections in bf16)
ATOL_PERMUTE = 1e-5  # factors with permuted neighbour slots (summation order only), fp32
ATOL_TIE_FACTORS = 3e-5  # factors (LayerNorm-ed, O(1) x random weights) under a rigid motion, fp32


def setup(config, *, batch=2, length=23, seed=0, pair_free=True, perturb_out=True):
    """Layer + factorizer + inputs with a real padding tail; linear_out made non-zero (else y == 0)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    layer = build_ipa(config)
    if perturb_out:
        torch.nn.init.normal_(layer.linear_out.weight, std=0.2)
    with torch.no_grad():
        layer.head_weights.uniform_(-1.0, 2.0)  # heads of different sharpness
    fac = build_factorizer(config.replace(usePairFree=pair_free))
    x = torch.randn(batch, length, config.singleFeatureDimension, generator=g)
    mask = torch.ones(batch, length)
    mask[-1, length - 6:] = 0
    ca = random_ca_trace(batch, length, generator=g) * mask[..., None]
    pair = torch.randn(batch, length, length, config.pairFeatureDimension, generator=g)
    return layer, fac, x, ca, mask, pair


def run(layer, fac, x, ca, mask, pair, *, reference=False):
    frames = frenet_serret_frames(ca, mask)
    factors = fac(x, pair, frames, mask)
    return layer(x, factors, frames, mask, reference=reference)


def _randomise(module: torch.nn.Module, seed: int, std: float = 0.5) -> None:
    """Every parameter ~ N(0, std^2): zero-initialised gates / slot weights would hide order effects."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("pair_free", [True, False])
def test_flash_matches_dense_reference_forward_and_gradients(pair_free):
    config = tiny_config(useFlashMode=True)
    layer, fac, x, ca, mask, pair = setup(config, pair_free=pair_free)
    inputs = [x.requires_grad_(), ca.requires_grad_(), pair.requires_grad_()]
    params = list(layer.parameters()) + list(fac.parameters())
    outs, grads = [], []
    for reference in (False, True):
        y = run(layer, fac, x, ca, mask, pair, reference=reference)
        gout = torch.randn(y.shape, generator=torch.Generator().manual_seed(9))
        outs.append(y)
        grads.append(torch.autograd.grad(y, inputs + params, gout, allow_unused=True))
    assert outs[0].abs().max() > 0.1  # a real signal, not the zero-initialised output layer
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL_FWD, rtol=0)
    assert bool((outs[0][-1, -6:] == 0).all())
    checked = 0
    for a, b in zip(*grads):
        if a is None and b is None:
            continue
        assert a is not None and b is not None
        torch.testing.assert_close(a, b, atol=ATOL_GRAD, rtol=1e-4)
        checked += int(b.abs().max() > 0)
    assert checked >= len(params) // 2  # gradients actually flow through most parameters


def _captured_logits(layer, fac, x, ca, mask, pair, monkeypatch):
    """Run the fast path under bf16 autocast and return the logits q~.k~ it handed to attention."""
    seen = {}
    math = att.math_attention

    def spy(q, k, v, key_padding_mask=None, *, scale=None):
        with torch.autocast("cpu", enabled=False):  # fp32 products of the bf16 inputs
            seen["logits"] = torch.einsum("bihd,bjhd->bhij", q.float(), k.float())  # [B, H, L, L]
        return math(q, k, v, key_padding_mask, scale=scale)
    monkeypatch.setattr(att, "math_attention", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = run(layer, fac, x, ca, mask, pair).float()
    monkeypatch.setattr(att, "math_attention", math)
    return y, seen["logits"]


def test_bf16_error_bound_and_hi_lo_split_helps(monkeypatch):
    """bf16 attention (autocast; the CPU math backend sees the same bf16-rounded q~ / k~ / v~ a
    fused kernel would) on a chain of ~60 A radius with sharp heads. Output within ATOL_BF16
    (relative) of the fp32 reference; logits (up to a per-row constant, which softmax ignores) within
    RTOL_LOGIT_BF16 (relative to max |logit|) of the exact ones with the hi/lo point split, and >= 5x worse without it."""
    import model.ipa.flash as fi

    config = tiny_config(useFlashMode=True)
    layer, fac, x, ca, mask, pair = setup(config, length=40, perturb_out=False)
    torch.nn.init.normal_(layer.linear_out.weight, std=0.05)
    ca = (random_ca_trace(2, 40, generator=torch.Generator().manual_seed(4)) * 6.0
          + torch.tensor([30.0, -20.0, 10.0])) * mask[..., None]
    with torch.no_grad():
        layer.head_weights.fill_(2.0)
        ref = run(layer, fac, x, ca, mask, pair, reference=True)
        y, logits = _captured_logits(layer, fac, x, ca, mask, pair, monkeypatch)
        plain = fi._split_dot
        monkeypatch.setattr(fi, "_split_dot", lambda a, b, d, s: plain(a, b, d, False))
        monkeypatch.setattr(layer, "head_dims", lambda dtype: (0, 0))  # math ignores widths
        _, logits_nosplit = _captured_logits(layer, fac, x, ca, mask, pair, monkeypatch)
        # exact logits from the same (bf16-rounded) projections, fp32 geometry
        with torch.autocast("cpu", dtype=torch.bfloat16):
            frames = frenet_serret_frames(ca, mask)
            args = layer._project(x, fac(x, pair, frames, mask), frames, torch.zeros(2, 1, 3))
    q, k, _, qg, kg, _, bl, br, _, _, gamma = (t.float() for t in args)
    exact = (1 / 3) ** 0.5 * (torch.einsum("bihc,bjhc->bhij", q, k) / q.shape[-1] ** 0.5
                              + torch.einsum("birh,bjrh->bhij", bl, br)
                              - 0.5 * gamma[:, None, None]
                              * ((qg[:, :, None] - kg[:, None]) ** 2).sum((-1, -2)).permute(0, 3, 1, 2))
    real = mask.bool()
    pair_mask = (real[:, None, :, None] & real[:, None, None, :]).expand_as(exact)

    def row_err(approx):
        d = (approx - exact).masked_fill(~pair_mask, 0.0)
        d = d - d.sum(-1, keepdim=True) / pair_mask.sum(-1, keepdim=True).clamp(min=1)
        return d.masked_fill(~pair_mask, 0.0).abs().max().item()
    assert (y - ref).abs().max().item() < ATOL_BF16 * ref.abs().max().item()
    err, err_nosplit = row_err(logits), row_err(logits_nosplit)
    assert exact.abs().max() > 1000  # the regime where plain bf16 point columns break down
    assert err < RTOL_LOGIT_BF16 * exact.abs().max().item(), err
    print(f"bf16 logit error: split {err:.3g}, plain {err_nosplit:.3g}, |logit| max {exact.abs().max():.3g}")
    assert err_nosplit > 5 * err, (err, err_nosplit)


def test_invariant_under_global_rigid_motion():
    config = tiny_config(useFlashMode=True)
    layer, fac, x, ca, mask, pair = setup(config, seed=2)
    rot = random_rotation(torch.Generator().manual_seed(5))
    moved = (ca @ rot.T + torch.tensor([7.0, -4.0, 11.0])) * mask[..., None]
    with torch.no_grad():
        y0 = run(layer, fac, x, ca, mask, pair)
        y1 = run(layer, fac, x, moved, mask, pair)
    assert y0.abs().max() > 0.1
    assert (y0 - y1).abs().max().item() < ATOL_INVARIANCE


@pytest.mark.parametrize("pair_free", [True, False])
def test_padding_does_not_change_real_residues(pair_free):
    config = tiny_config(useFlashMode=True)
    layer, fac, x, ca, mask, pair = setup(config, batch=1, length=19, seed=3, pair_free=pair_free)
    _randomise(fac, seed=4)  # gates too: padded slots must carry zero weight, not just equal weight
    with torch.no_grad():
        y = run(layer, fac, x, ca, mask, pair)
        pad = 8
        xp = torch.cat([x, torch.randn(1, pad, x.shape[-1])], 1)
        cap = torch.cat([ca, torch.zeros(1, pad, 3)], 1)
        mp = torch.cat([mask, torch.zeros(1, pad)], 1)
        pp = torch.nn.functional.pad(pair, (0, 0, 0, pad, 0, pad), value=3.0)
        yp = run(layer, fac, xp, cap, mp, pp)
    torch.testing.assert_close(yp[:, :19], y, atol=1e-5, rtol=0)
    assert bool((yp[:, 19:] == 0).all())


@pytest.mark.parametrize("rank,k", [(1, 6), (2, 9), (3, 12), (4, 16)])
def test_ranks_and_neighbours_run_and_match_reference(rank, k):
    config = tiny_config(useFlashMode=True, zFactorRank=rank, kNeighbors=k)
    layer, fac, x, ca, mask, pair = setup(config, length=17, seed=rank)
    with torch.no_grad():
        y = run(layer, fac, x, ca, mask, pair)
        ref = run(layer, fac, x, ca, mask, pair, reference=True)
    assert y.shape == x.shape and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, atol=ATOL_FWD, rtol=0)


def test_impossible_rank_on_fa_only_errors_clearly(monkeypatch):
    def fa_only(device=None):
        return {n: bk.BackendStatus(True, n == "fa2", "simulated") for n in bk.BACKEND_ORDER}
    monkeypatch.setattr(bk, "available_backends", fa_only)
    config = tiny_config(useFlashMode=True)
    # Genie's default widths: v = 16 + 3 * 8 + rank * 32 -> rank 2 fits 256, rank 8 does not
    ok = build_ipa(config.replace(ipaHiddenDimension=16, ipaNumVPoints=8, pairFeatureDimension=128))
    assert ok.backend("cuda", torch.bfloat16).name == "fa2"
    wide = build_ipa(config.replace(ipaHiddenDimension=16, ipaNumVPoints=8,
                                               pairFeatureDimension=128, zFactorRank=8))
    with pytest.raises(bk.AttentionBackendError, match="zFactorRank") as err:
        wide.backend("cuda", torch.bfloat16)
    assert "296" in str(err.value) and "256" in str(err.value)


def test_dense_factorizer_reads_only_neighbour_pairs():
    """d left[i] / d p is non-zero only at p[i, n] for i's k neighbours n (right: p[n, i])."""
    config = tiny_config(useFlashMode=True, kNeighbors=4)
    _, fac, _, ca, mask, pair = setup(config, batch=1, length=13, pair_free=False)
    assert isinstance(fac, PairFactorizer)
    frames = frenet_serret_frames(ca, mask)
    pair.requires_grad_()
    factors = fac(None, pair, frames, mask)
    i = 5
    # a random read-out: a plain .sum() of a LayerNorm output (gain 1) has zero gradient in exact math
    probe = torch.randn(factors.left.shape[2:], generator=torch.Generator().manual_seed(1))  # [r, C_f]
    (g_left,) = torch.autograd.grad((factors.left[0, i] * probe).sum(), pair, retain_graph=True)
    (g_right,) = torch.autograd.grad((factors.right[0, i] * probe).sum(), pair)
    nbrs = knn_mod.knn(ca, mask, 4).index[0, i]
    used_left = g_left[0].abs().sum(-1) > 0  # [L, L]
    expect = torch.zeros(13, 13, dtype=torch.bool)
    expect[i, nbrs] = True
    assert torch.equal(used_left, expect)
    assert torch.equal(g_right[0].abs().sum(-1) > 0, expect.T)


def test_factorizers_accept_any_length():
    config = tiny_config(useFlashMode=True)
    for pair_free in (True, False):
        fac = build_factorizer(config.replace(usePairFree=pair_free))
        for length in (3, 13, 41):  # one set of weights, lengths below and above k
            _, _, x, ca, mask, pair = setup(config, batch=1, length=length)
            f = fac(x, pair, frenet_serret_frames(ca, mask), mask)
            assert f.left.shape == (1, length, config.zFactorRank, config.pairFeatureDimension)
            assert torch.isfinite(f.left).all() and torch.isfinite(f.right).all()


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def test_pair_free_path_never_builds_an_l_by_l_tensor(monkeypatch):
    length = 37  # prime, unlike every other dimension in play
    config = tiny_config(useFlashMode=True, usePairFree=True)
    monkeypatch.setattr(knn_mod, "KNN_BLOCK_ELEMENTS", 3 * 2 * length * 8)  # 8 query rows per block
    monkeypatch.setattr(att, "MATH_BLOCK_ELEMENTS", 2 * config.ipaNumHeads * length * 8)
    layer, fac, x, ca, mask, _ = setup(config, length=length)
    assert isinstance(fac, PairFreeFactorizer)
    rec = _ShapeRecorder()
    with rec:
        frames = frenet_serret_frames(ca, mask)
        y = layer(x, fac(x, None, frames, mask), frames, mask)
        y.sum().backward()
    assert rec.shapes
    square = [(f, s) for f, s in rec.shapes if sum(d == length for d in s) >= 2]
    assert not square, square[:5]


@pytest.mark.gpu
def test_gpu_bf16_flash_matches_fp32_reference():
    """On the GPU's chosen fused backend under bf16 autocast: forward and input gradients vs the
    fp32 dense reference: forward max error relative to max |ref| (ATOL_BF16), gradient relative
    Frobenius error (RTOL_GRAD_BF16)."""
    config = tiny_config(useFlashMode=True, ipaHiddenDimension=16, ipaNumHeads=4)
    layer, fac, x, ca, mask, pair = setup(config, length=61)
    layer, fac = layer.cuda(), fac.cuda()
    x, ca, mask, pair = (t.cuda() for t in (x, ca, mask, pair))
    x.requires_grad_()
    ref = run(layer, fac, x, ca, mask, pair, reference=True)
    gout = torch.randn_like(ref)
    (g_ref,) = torch.autograd.grad(ref, x, gout)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = run(layer, fac, x, ca, mask, pair)
    (g,) = torch.autograd.grad(y.float(), x, gout)
    assert layer.last_backend.name != "math", layer.last_backend
    assert (y.float() - ref).abs().max() < ATOL_BF16 * ref.abs().max()
    assert (g - g_ref).norm() < RTOL_GRAD_BF16 * g_ref.norm(), ((g - g_ref).norm() / g_ref.norm()).item()


# ------------------------------------------------------------------ exact ties in the k-NN ordering
CA_STEP = 3.8  # every CA-CA step exactly this long: residues i - m and i + m tie for every m


def ideal_helix(length: int, *, twist_deg: float = 100.0, rise: float = 1.5) -> torch.Tensor:
    """A perfect alpha-like helix with CA-CA steps of exactly CA_STEP A (radius solved in float64).

    By symmetry |x_i - x_{i-m}| == |x_i - x_{i+m}| for every interior i and every m, so each residue's
    neighbour list is full of exact ties, at every slot including the k-th. Returns [L, 3] float32.
    """
    twist = torch.tensor(twist_deg, dtype=torch.float64).deg2rad()
    radius = (CA_STEP ** 2 - rise ** 2) ** 0.5 / (2 * torch.sin(twist / 2))
    t = torch.arange(length, dtype=torch.float64)
    ca = torch.stack([radius * torch.cos(t * twist), radius * torch.sin(t * twist), rise * t], dim=-1)
    return (ca - ca.mean(0)).float()  # [L, 3]


def _tie_setup(config, pair_free, *, length=29):
    layer, fac, x, _, mask, pair = setup(config, length=length, seed=11, pair_free=pair_free)
    _randomise(fac, seed=12)
    ca = ideal_helix(length).expand(2, length, 3) * mask[..., None]  # [B, L, 3]; sample 1 padded
    return layer, fac, x, ca, mask, pair


@pytest.mark.parametrize("pair_free", [True, False])
@pytest.mark.parametrize("k", [6, 7])  # even k splits a tied pair at the boundary, odd k does not
def test_factors_and_layer_invariant_on_exactly_tied_trace(pair_free, k):
    """Ideal helix (all CA-CA steps exactly 3.8 A), random factorizer weights, 6 random rotations +
    translations: factors (ATOL_TIE_FACTORS) and the FlashIPA output (ATOL_INVARIANCE) unchanged.
    Slot-ordered pooling fails this (measured before the fix: factor error 0.1 - 1.1)."""
    config = tiny_config(useFlashMode=True, kNeighbors=k)
    layer, fac, x, ca, mask, pair = _tie_setup(config, pair_free)
    d = (ca[0, 1:] - ca[0, :-1]).norm(dim=-1)
    assert (d - CA_STEP).abs().max() < 1e-5  # the premise: an exactly tied trace
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        f0 = fac(x, pair, frenet_serret_frames(ca, mask), mask)
        y0 = layer(x, f0, frenet_serret_frames(ca, mask), mask)
        assert f0.left.abs().max() > 0.1 and y0.abs().max() > 0.1
        err_f = err_y = 0.0
        for _ in range(6):
            moved = (ca @ random_rotation(g).T + torch.randn(3, generator=g) * 10) * mask[..., None]
            frames = frenet_serret_frames(moved, mask)
            f1 = fac(x, pair, frames, mask)
            y1 = layer(x, f1, frames, mask)
            err_f = max(err_f, (f1.left - f0.left).abs().max().item(), (f1.right - f0.right).abs().max().item())
            err_y = max(err_y, (y1 - y0).abs().max().item())
    print(f"tied helix k={k} pair_free={pair_free}: factor err {err_f:.3g}, layer err {err_y:.3g}")
    assert err_f < ATOL_TIE_FACTORS, err_f
    assert err_y < ATOL_INVARIANCE, err_y


@pytest.mark.parametrize("pair_free", [True, False])
def test_permuting_neighbour_slots_does_not_change_factors(pair_free, monkeypatch):
    """A random per-residue permutation of the k slots (index, valid, distance, cutoff weight together)
    leaves the factors unchanged up to summation order (ATOL_PERMUTE); random weights, padded batch,
    k > the shortest chain's length so invalid slots are permuted in among the valid ones."""
    config = tiny_config(useFlashMode=True, kNeighbors=9)
    _, fac, x, ca, mask, pair = setup(config, length=17, seed=6, pair_free=pair_free)
    mask[0, 8:] = 0  # 8 real residues < k = 9: invalid slots
    ca = ca * mask[..., None]
    _randomise(fac, seed=7)
    frames = frenet_serret_frames(ca, mask)
    with torch.no_grad():
        f0 = fac(x, pair, frames, mask)
        soft_knn = fac_mod.soft_knn
        perm = torch.rand(2, 17, 9, generator=torch.Generator().manual_seed(8)).argsort(-1)  # [B, L, k]

        def permuted(*args, **kwargs):
            nb = soft_knn(*args, **kwargs)
            return knn_mod.Neighbours(*(t.gather(-1, perm) for t in (nb.index, nb.valid, nb.sq_dist, nb.weight)))
        monkeypatch.setattr(fac_mod, "soft_knn", permuted)
        f1 = fac(x, pair, frames, mask)
    assert f0.left.abs().max() > 0.1
    assert (f1.left - f0.left).abs().max() < ATOL_PERMUTE
    assert (f1.right - f0.right).abs().max() < ATOL_PERMUTE


def test_legacy_separate_projections_load_into_the_fused_layer():
    """States saved before the fused projections (weights/mhc_flash_v1) load through load_state_dict
    and upgrade_legacy_state and give exactly the same layer; a fused state is left alone."""
    from model.ipa.flash import has_legacy_layout, upgrade_legacy_state

    config = tiny_config(useFlashMode=True)
    layer, fac, x, ca, mask, pair = setup(config, seed=7)
    h, cpv = layer.heads, layer.pair_value_dim
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    w, b = state.pop("linear_in.weight"), state.pop("linear_in.bias")
    rows = (h * layer.hidden, 2 * h * layer.hidden) + layer.in_splits[1:]
    for name, wi, bi in zip(("linear_q", "linear_kv", "linear_q_points", "linear_kv_points"),
                            w.split(rows), b.split(rows)):
        state[f"{name}.weight"], state[f"{name}.bias"] = wi, bi
    for side in ("left", "right"):
        bias_w, value_w = state.pop(f"factor_{side}.weight").split([h, cpv])
        state[f"bias_{side}.weight"], state[f"value_{side}.weight"] = bias_w, value_w
    assert set(upgrade_legacy_state({f"ipa.{k}": v for k, v in state.items()})) == {
        f"ipa.{k}" for k in layer.state_dict()}
    assert has_legacy_layout(state) and not has_legacy_layout(layer.state_dict())
    fresh = build_ipa(config)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        expected = run(layer, fac, x, ca, mask, pair)
        torch.testing.assert_close(run(fresh, fac, x, ca, mask, pair), expected, atol=0, rtol=0)
    fused = layer.state_dict()
    assert upgrade_legacy_state(fused) is fused
