"""k-NN (model/ipa/knn.py) against a brute-force search: ties, masks, L < k, chunking, self in / out."""

from __future__ import annotations

import pytest
import torch

from model.ipa.knn import knn, soft_knn


def brute_force(ca: torch.Tensor, mask: torch.Tensor, k: int, include_self: bool):
    """Python reference: per query, sort real candidates by (squared distance, index)."""
    batch, length, _ = ca.shape
    index = torch.zeros(batch, length, k, dtype=torch.long)
    valid = torch.zeros(batch, length, k, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            index[b, i] = i
            if not mask[b, i]:
                continue
            cands = [(float(((ca[b, i] - ca[b, j]) ** 2).sum()), j) for j in range(length)
                     if mask[b, j] and (include_self or j != i)]
            for slot, (_, j) in enumerate(sorted(cands)[:k]):
                index[b, i, slot] = j
                valid[b, i, slot] = True
    return index, valid


@pytest.mark.parametrize("include_self", [True, False])
@pytest.mark.parametrize("chunk", [None, 4])
def test_knn_matches_brute_force_with_ties_and_masks(include_self, chunk):
    g = torch.Generator().manual_seed(3)
    # integer grid coordinates: many exactly equal distances, so tie-breaking is exercised
    ca = torch.randint(-3, 4, (3, 19, 3), generator=g).float()
    mask = torch.ones(3, 19)
    mask[1, 13:] = 0
    mask[2, 4:] = 0  # 4 real residues < k
    k = 7
    nb = knn(ca, mask, k, include_self=include_self, chunk=chunk)
    index, valid = brute_force(ca, mask.bool(), k, include_self)
    assert torch.equal(nb.valid, valid)
    assert torch.equal(nb.index, index)
    d2 = ((ca[:, :, None] - torch.gather(ca, 1, nb.index.flatten(1)[..., None].expand(-1, -1, 3))
           .view(3, 19, k, 3)) ** 2).sum(-1)
    assert torch.equal(nb.sq_dist, torch.where(valid, d2, torch.zeros_like(d2)))
    # ties really occurred (otherwise this test checks nothing about tie-breaking)
    assert (nb.sq_dist[..., 1:] == nb.sq_dist[..., :-1])[nb.valid[..., 1:]].any()


def test_knn_short_chains_padding_and_self():
    g = torch.Generator().manual_seed(0)
    ca = torch.randn(2, 11, 3, generator=g) * 5
    mask = torch.zeros(2, 11)
    mask[0, :9] = 1
    mask[1, :3] = 1
    nb = knn(ca, mask, 16)  # k > L
    assert nb.index.shape == (2, 11, 16)
    assert nb.valid.sum(-1).tolist() == [[9] * 9 + [0, 0], [3] * 3 + [0] * 8]
    real = mask.bool()
    picked_real = torch.gather(real, 1, nb.index.flatten(1)).view_as(nb.valid)
    assert bool(picked_real[nb.valid].all())  # padding is never a neighbour
    assert torch.equal(nb.index[..., 0][real], torch.arange(11).expand(2, 11)[real])  # self first
    # invalid slots point at the query itself, distance 0
    own = torch.arange(11).view(1, 11, 1).expand_as(nb.index)
    assert torch.equal(nb.index[~nb.valid], own[~nb.valid])
    assert bool((nb.sq_dist[~nb.valid] == 0).all())


def test_knn_invariant_under_rigid_motion():
    g = torch.Generator().manual_seed(1)
    ca = torch.randn(1, 31, 3, generator=g) * 8
    mask = torch.ones(1, 31)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g))
    moved = ca @ q.T + torch.tensor([5.0, -3.0, 2.0])
    a, b = knn(ca, mask, 9), knn(moved, mask, 9)
    assert torch.equal(a.index, b.index)
    torch.testing.assert_close(a.sq_dist, b.sq_dist, atol=1e-3, rtol=1e-4)


def test_soft_knn_weights_self_padding_and_short_chains():
    g = torch.Generator().manual_seed(2)
    ca = torch.randn(2, 13, 3, generator=g) * 6
    mask = torch.ones(2, 13)
    mask[1, 4:] = 0  # 4 real residues < k + 1: nothing left out, so no cutoff
    nb, hard = soft_knn(ca, mask, 5), knn(ca, mask, 5)
    assert torch.equal(nb.index, hard.index) and torch.equal(nb.valid, hard.valid)
    torch.testing.assert_close(nb.sq_dist, hard.sq_dist, atol=1e-5, rtol=1e-6)
    assert bool((nb.weight[~nb.valid] == 0).all())
    assert bool((nb.weight[nb.valid] > 0).all()) and bool((nb.weight <= 1).all())
    assert bool((nb.weight[..., 0][mask.bool()] == 1).all())  # self: d = 0
    assert bool((nb.weight[1, :4, :4] == 1).all())  # short chain: every residue in, weight 1
    # the cutoff radius is the 6th neighbour's distance: weight = (1 - d^2 / d6^2)^2
    d6 = knn(ca, mask, 6).sq_dist[0, :, 5:]  # [L, 1]
    torch.testing.assert_close(nb.weight[0], (1 - hard.sq_dist[0] / d6) ** 2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("k", [2, 5])
def test_soft_knn_boundary_is_continuous(k):
    """On a line, residue k moves from just outside to just inside residue k - 1 (the k-th
    neighbour of residue 0) by +-delta, swapping k-NN membership: the member that changes has
    weight O(delta^2), the other weights move by O(delta)."""
    delta = 1e-3
    weights = []
    for sign in (1, -1):
        pos = torch.cat([torch.arange(k, dtype=torch.float32), torch.tensor([k - 1 + sign * delta, 9.0])])
        ca = torch.stack([pos, torch.zeros_like(pos), torch.zeros_like(pos)], -1)[None]  # [1, k + 2, 3]
        nb = soft_knn(ca, torch.ones(1, k + 2), k)
        weights.append(dict(zip(nb.index[0, 0].tolist(), nb.weight[0, 0].tolist())))
    a, b = weights
    assert set(a) != set(b)  # the membership really changed
    for j in set(a) | set(b):
        wa, wb = a.get(j, 0.0), b.get(j, 0.0)
        assert abs(wa - wb) < 10 * delta, (j, wa, wb)
        if j not in a or j not in b:
            assert max(wa, wb) < 10 * delta ** 2, (j, wa, wb)


def test_soft_knn_gradients_reach_coordinates():
    g = torch.Generator().manual_seed(4)
    ca = (torch.randn(1, 11, 3, generator=g) * 5).requires_grad_()
    nb = soft_knn(ca, torch.ones(1, 11), 4)
    (grad,) = torch.autograd.grad((nb.weight * nb.sq_dist).sum(), ca)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
