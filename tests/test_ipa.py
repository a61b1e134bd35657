"""Standard IPA (model.ipa.dense): exact against a naive Algorithm 22, invariant, padding-proof, gradcheck."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import ATOL_INVARIANCE, ATOL_PADDING, random_ca_trace, randomize_parameters

from model.geometry import Frames, frenet_serret_frames, random_rotation
from model.ipa.dense import InvariantPointAttention

C_S, C_P, C_H, HEADS, PQ, PV = 13, 7, 5, 3, 3, 2
LENGTHS = (22, 15)


def _ipa(seed: int = 0, dtype=torch.float32) -> InvariantPointAttention:
    torch.manual_seed(seed)
    ipa = InvariantPointAttention(c_s=C_S, c_p=C_P, c_hidden=C_H, num_heads=HEADS, num_qk_points=PQ,
                                  num_v_points=PV)
    return randomize_parameters(ipa, seed=seed, scale=0.3).to(dtype)


def _inputs(seed: int = 1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    length = max(LENGTHS)
    mask = (torch.arange(length)[None] < torch.tensor(LENGTHS)[:, None]).to(dtype)  # [B, L]
    ca = random_ca_trace(len(LENGTHS), length, generator=gen).to(dtype)
    frames = frenet_serret_frames(ca, mask)
    s = torch.randn(len(LENGTHS), length, C_S, generator=gen).to(dtype)
    z = torch.randn(len(LENGTHS), length, length, C_P, generator=gen).to(dtype)
    return s, z, frames, mask


def naive_ipa(ipa: InvariantPointAttention, s, z, frames: Frames, mask) -> torch.Tensor:
    """AF2 Algorithm 22 written out per term with explicit point differences (OpenFold's layout)."""
    b, length, _ = s.shape
    h, c, pq, pv = HEADS, C_H, PQ, PV
    q = ipa.linear_q(s).view(b, length, h, c)
    k, v = ipa.linear_kv(s).view(b, length, 2, h, c).unbind(2)
    qp = ipa.linear_q_points(s).view(b, length, h, pq, 3)
    kvp = ipa.linear_kv_points(s).view(b, length, h, pq + pv, 3)
    kp, vp = kvp[..., :pq, :], kvp[..., pq:, :]
    glob = frames[:, :, None, None]
    qp, kp, vp = glob.apply(qp), glob.apply(kp), glob.apply(vp)
    diff = qp[:, :, None] - kp[:, None, :]  # [B, L, L, H, Pq, 3]
    sq = (diff**2).sum(dim=(-1, -2))  # [B, L, L, H]
    gamma = torch.nn.functional.softplus(ipa.head_weights)
    w_c, w_l = math.sqrt(2 / (9 * pq)), math.sqrt(1 / 3)
    logits = w_l * (torch.einsum("bihc,bjhc->bijh", q, k) / math.sqrt(c) + ipa.linear_b(z)
                    - gamma * w_c / 2 * sq)
    logits = logits + (mask[:, None, :, None] - 1) * 1e9
    a = torch.softmax(logits, dim=2)  # [B, L, L, H]
    o = torch.einsum("bijh,bjhc->bihc", a, v).reshape(b, length, h * c)
    o_pt = frames[:, :, None, None].invert_apply(torch.einsum("bijh,bjhpx->bihpx", a, vp))
    o_pt_norm = torch.sqrt((o_pt**2).sum(-1) + ipa.eps)
    o_pair = torch.einsum("bijh,bijc->bihc", a, z).reshape(b, length, h * C_P)
    feats = torch.cat([o, o_pt.reshape(b, length, -1), o_pt_norm.reshape(b, length, -1), o_pair], dim=-1)
    return ipa.linear_out(feats)


def test_ipa_matches_naive_algorithm_22_float64():
    ipa = _ipa(dtype=torch.float64)
    s, z, frames, mask = _inputs(dtype=torch.float64)
    out, ref = ipa(s, z, frames, mask), naive_ipa(ipa, s, z, frames, mask)
    real = mask.bool()
    assert ref[real].abs().max() > 0.1  # the check is not vacuous
    assert (out - ref)[real].abs().max() < 1e-9


def test_ipa_invariant_under_global_rigid_motion():
    ipa = _ipa()
    s, z, frames, mask = _inputs()
    gen = torch.Generator().manual_seed(11)
    rot, shift = random_rotation(gen), torch.randn(3, generator=gen) * 20
    moved = Frames(rot @ frames.rots, frames.trans @ rot.T + shift)
    out, out_moved = ipa(s, z, frames, mask), ipa(s, z, moved, mask)
    real = mask.bool()
    assert out[real].abs().max() > 0.1
    err = (out - out_moved)[real].abs().max().item()
    assert err < ATOL_INVARIANCE, err


def test_ipa_padding_does_not_change_real_residues():
    ipa = _ipa()
    s, z, frames, mask = _inputs()
    n = LENGTHS[1]
    alone = ipa(s[1:, :n], z[1:, :n, :n], frames[1:, :n], mask[1:, :n])
    padded = ipa(s, z, frames, mask)
    assert (alone[0] - padded[1, :n]).abs().max() < ATOL_PADDING
    # garbage in padded single features and in every pair entry that touches padding
    garbage_s = s.clone()
    garbage_s[1, n:] = 1e3
    z2 = z.clone()
    z2[1, :, n:] = 1e3
    z2[1, n:, :] = 1e3
    out2 = ipa(garbage_s, z2, frames, mask)
    assert (out2[1, :n] - padded[1, :n]).abs().max() < ATOL_PADDING


def test_ipa_gradcheck_float64():
    torch.manual_seed(0)
    ipa = InvariantPointAttention(c_s=3, c_p=2, c_hidden=2, num_heads=2, num_qk_points=2, num_v_points=1)
    ipa = randomize_parameters(ipa, scale=0.3).double()
    gen = torch.Generator().manual_seed(2)
    mask = torch.tensor([[1.0, 1, 1, 1, 0]], dtype=torch.float64)
    frames = frenet_serret_frames(random_ca_trace(1, 5, generator=gen).double(), mask)
    s = torch.randn(1, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    z = torch.randn(1, 5, 5, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    trans = frames.trans.clone().requires_grad_(True)

    def fn(s_, z_, t_):
        return ipa(s_, z_, Frames(frames.rots, t_), mask)[:, :4]

    assert torch.autograd.gradcheck(fn, (s, z, trans), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_ipa_autocast_keeps_logits_float32(dtype):
    """Under CPU bf16 autocast the output stays close to fp32 (logits / distances are not rounded)."""
    ipa = _ipa()
    s, z, frames, mask = _inputs()
    ref = ipa(s, z, frames, mask)
    with torch.autocast("cpu", dtype=dtype):
        out = ipa(s, z, frames, mask)
    real = mask.bool()
    rel = ((out.float() - ref)[real].abs().max() / ref[real].abs().max()).item()
    assert rel < 0.05, rel
