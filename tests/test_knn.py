"""k-NN (model/knn.py) against a brute-force search: ties, masks, L < k, chunking, self in / out."""

from __future__ import annotations

import pytest
import torch

from model.knn import knn


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
