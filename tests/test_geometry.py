"""Property tests for model.geometry: frames algebra, Frenet-Serret frames, quaternion updates."""

from __future__ import annotations

import pytest
import torch
from conftest import ATOL_GEOMETRY, pad_batch, random_ca_trace

from model.geometry import (
    Frames,
    frenet_serret_frames,
    quaternion_to_rotation,
    quaternion_update,
    random_rotation,
    safe_normalize,
)

GEN_SEED = 7


def _gen(seed: int = GEN_SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_frames(shape, gen) -> Frames:
    rots = torch.stack([random_rotation(gen) for _ in range(int(torch.tensor(shape).prod()))])
    return Frames(rots.reshape(*shape, 3, 3), torch.randn(*shape, 3, generator=gen) * 5)


def _prefix_mask(lengths, length) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]).float()  # [B, L]


def test_random_rotation_is_proper():
    gen = _gen()
    for _ in range(5):
        r = random_rotation(gen, dtype=torch.float64)
        assert torch.allclose(r @ r.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
        assert torch.det(r).item() == pytest.approx(1.0, abs=1e-12)


def test_frames_algebra():
    gen = _gen()
    a, b = _random_frames((4, 7), gen), _random_frames((4, 7), gen)
    x = torch.randn(4, 7, 3, generator=gen)
    # compose applies right-hand frames first
    assert torch.allclose(a.compose(b).apply(x), a.apply(b.apply(x)), atol=1e-4)
    # invert / invert_apply undo apply
    assert torch.allclose(a.invert_apply(a.apply(x)), x, atol=1e-4)
    assert torch.allclose(a.invert().apply(a.apply(x)), x, atol=1e-4)
    ident = a.compose(a.invert())
    assert torch.allclose(ident.rots, torch.eye(3).expand(4, 7, 3, 3), atol=1e-5)
    assert ident.trans.abs().max() < 1e-4
    # indexing / broadcasting helpers: pairwise local coordinates [B, L, L, 3]
    pair = a[:, :, None].invert_apply(x[:, None, :, :])
    assert pair.shape == (4, 7, 7, 3)
    assert torch.allclose(pair[:, 2, 5], a[:, 2].invert_apply(x[:, 5]), atol=1e-5)
    assert a.unsqueeze(-1).shape == (4, 7, 1)
    assert a.to(torch.float64).dtype == torch.float64
    with pytest.raises(ValueError):
        Frames(torch.zeros(2, 3, 3), torch.zeros(3, 3))


def test_safe_normalize_zero_is_finite():
    v = torch.zeros(2, 3, requires_grad=True)
    out = safe_normalize(v)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(v.grad).all()


def test_frenet_serret_orthonormal_right_handed_and_genie_formula():
    gen = _gen()
    x = random_ca_trace(3, 23, generator=gen)
    mask = _prefix_mask([23, 17, 9], 23)
    f = frenet_serret_frames(x, mask)
    real = mask.bool()
    rtr = f.rots.transpose(-1, -2) @ f.rots
    assert (rtr - torch.eye(3)).abs().max() < 1e-5
    assert (torch.linalg.det(f.rots)[real] - 1.0).abs().max() < 1e-5
    # explicit formula for an interior residue of sample 1
    i = 6
    t = safe_normalize(x[1, i + 1] - x[1, i])
    tp = safe_normalize(x[1, i] - x[1, i - 1])
    b = safe_normalize(torch.cross(tp, t, dim=-1))
    n = torch.cross(b, t, dim=-1)
    assert torch.allclose(f.rots[1, i], torch.stack([t, n, b], dim=-1), atol=1e-6)
    # ends copy their neighbour, per-sample length
    assert torch.equal(f.rots[1, 0], f.rots[1, 1])
    assert torch.equal(f.rots[1, 16], f.rots[1, 15])
    assert not torch.allclose(f.rots[1, 15], f.rots[1, 14])
    # padding: identity rotation, zero translation; real translations are the CA positions
    assert torch.equal(f.rots[2, 9:], torch.eye(3).expand(14, 3, 3))
    assert torch.equal(f.trans[2, 9:], torch.zeros(14, 3))
    assert torch.equal(f.trans[real], x[real])


def test_frenet_serret_rotates_with_input():
    """F(R x + t) == (R, t) o F(x): rotations R F_rot, translations R x + t."""
    gen = _gen(3)
    x = random_ca_trace(2, 31, generator=gen) * 2.0
    mask = _prefix_mask([31, 20], 31)
    rot, shift = random_rotation(gen), torch.randn(3, generator=gen) * 10
    f = frenet_serret_frames(x, mask)
    g = frenet_serret_frames(x @ rot.T + shift, mask)
    real = mask.bool()
    err_rot = ((rot @ f.rots) - g.rots)[real].abs().max().item()
    err_trans = ((f.trans @ rot.T + shift) - g.trans)[real].abs().max().item()
    assert err_rot < ATOL_GEOMETRY, err_rot
    assert err_trans < ATOL_GEOMETRY * 100, err_trans  # coordinates ~ 50 A in fp32


def test_frenet_serret_padding_invariance(real_ca_chains):
    """A chain's frames do not depend on how much padding (with garbage coordinates) follows it."""
    x, mask = pad_batch(real_ca_chains)
    f = frenet_serret_frames(x, mask)
    garbage = x + (1 - mask)[..., None] * torch.randn_like(x) * 100
    g = frenet_serret_frames(garbage, mask)
    assert torch.equal(f.rots, g.rots) and torch.equal(f.trans, g.trans)
    for i, chain in enumerate(real_ca_chains):
        alone = frenet_serret_frames(chain[None], torch.ones(1, chain.shape[0]))
        n = chain.shape[0]
        assert torch.equal(alone.rots[0], f.rots[i, :n])


def test_frenet_serret_rejects_non_prefix_mask_and_handles_short_chains():
    x = random_ca_trace(1, 6, generator=_gen())
    with pytest.raises(ValueError, match="prefix"):
        frenet_serret_frames(x, torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 0.0]]))
    f = frenet_serret_frames(x, _prefix_mask([2], 6))
    assert torch.equal(f.rots[0], torch.eye(3).expand(6, 3, 3))
    f3 = frenet_serret_frames(x, _prefix_mask([3], 6))
    assert torch.equal(f3.rots[0, 0], f3.rots[0, 1]) and torch.equal(f3.rots[0, 2], f3.rots[0, 1])


def test_quaternion_update_identity_and_composition():
    gen = _gen(5)
    frames = _random_frames((2, 5), gen)
    same = quaternion_update(frames, torch.zeros(2, 5, 6))
    assert torch.allclose(same.rots, frames.rots, atol=1e-6)
    assert torch.allclose(same.trans, frames.trans, atol=1e-6)
    upd = torch.randn(2, 5, 6, generator=gen)
    new = quaternion_update(frames, upd)
    # translation update is expressed in the local frame
    assert torch.allclose(new.trans, frames.apply(upd[..., 3:]), atol=1e-5)
    quat = torch.cat([torch.ones(2, 5, 1), upd[..., :3]], dim=-1)
    rot = quaternion_to_rotation(quat / quat.norm(dim=-1, keepdim=True))
    assert torch.allclose(new.rots, frames.rots @ rot, atol=1e-5)
    assert (torch.linalg.det(new.rots) - 1).abs().max() < 1e-5
    # a quaternion with only b set rotates about the x axis by 2 atan(b)
    r = quaternion_to_rotation(torch.tensor([1.0, 1.0, 0.0, 0.0]) / 2**0.5)
    assert torch.allclose(r, torch.tensor([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]), atol=1e-6)
