"""k nearest neighbours by CA distance, chunked over query rows: O(L * k) memory.

Flash-IPA (arXiv 2505.11580) feeds each residue's ``kNeighbors`` nearest residues into its pair
factorizer. NOTE: the public flash_ipa code builds the full [B, L, L] distance matrix for this; here
the search runs over blocks of query rows, so the largest temporary is [B, chunk, L] (the chunk is
sized from a fixed element budget) and the result is [B, L, k].

Conventions (all deliberate, all tested against a brute-force search):
- Distances are exact squared Euclidean distances ``sum (x_i - x_j)^2`` in fp32 (no
  ``|x|^2 + |y|^2 - 2 x.y`` expansion, so equal distances compare equal).
- Ties are broken by the lower residue index (an exact int64 key: distance bits, then index),
  so the result is deterministic; a top-k per row, not a full sort.
- The residue itself is included (distance 0, normally slot 0) unless ``include_self=False``.
- Padding (mask 0) is never a neighbour, and a padded query has no valid neighbours.
- When a chain has fewer than k valid candidates, the extra slots have ``valid = False``, index =
  the query itself (always in range, safe to gather) and distance 0.

Ties and continuity. The tie-break is deterministic for given coordinates, but which of two equally
distant candidates wins is NOT stable under a global rotation: fp32 rounding of the rotated
coordinates decides it (an ideal trace with all CA-CA steps 3.8 A ties i - 1 with i + 1, i - 2 with
i + 2, ...). So consumers must not depend on the slot order, and the hard k-th-neighbour boundary
must not matter either. :func:`soft_knn` provides that: the k nearest neighbours plus a smooth
cutoff weight ``(1 - d^2 / R^2)^2`` per slot, R = the distance of the (k+1)-th nearest residue
(the first one left out), so a neighbour that crosses the boundary (d = R, exactly where it can swap
with the one outside) enters and leaves with weight 0. NOTE (our addition; Flash-IPA uses the hard
top-k). Consumers pool the slots with permutation-invariant weights (model/ipa/factorizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["CUTOFF_EPS", "KNN_BLOCK_ELEMENTS", "Neighbours", "knn", "soft_knn"]

# Elements of one [B, chunk, L] distance block (x3 for the coordinate differences): 16 Mi.
KNN_BLOCK_ELEMENTS = 1 << 24
# Floor on R^2 (A^2) in the soft cutoff: only k + 1 (numerically) coincident CAs reach it.
CUTOFF_EPS = 1e-6


@dataclass(frozen=True)
class Neighbours:
    """index [B, L, k] long, valid [B, L, k] bool, sq_dist [B, L, k] fp32 (0 where invalid).

    ``weight`` [B, L, k] fp32: the smooth cutoff weight from :func:`soft_knn` (0 where invalid), or
    None from :func:`knn`.
    """

    index: torch.Tensor
    valid: torch.Tensor
    sq_dist: torch.Tensor
    weight: torch.Tensor | None = None

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        """Per-residue values at the neighbours: values [B, L, *] -> [B, L, k, *]."""
        batch, length, k = self.index.shape
        flat = self.index.reshape(batch, length * k)  # [B, L*k]
        tail = values.shape[2:]
        idx = flat.view(batch, length * k, *([1] * len(tail))).expand(batch, length * k, *tail)
        return torch.gather(values, 1, idx).view(batch, length, k, *tail)  # [B, L, k, *]


@torch.no_grad()
def knn(ca: torch.Tensor, mask: torch.Tensor, k: int, *, include_self: bool = True,
        chunk: int | None = None) -> Neighbours:
    """The k nearest real residues of each residue (see the module docstring for conventions).

    Args:
        ca: [B, L, 3] CA coordinates.
        mask: [B, L] 1 / True for real residues.
        k: neighbours per residue (any k >= 1; k > L gives invalid slots).
        include_self: whether a residue is its own (first) neighbour.
        chunk: query rows per block (default: from KNN_BLOCK_ELEMENTS).
    Returns:
        Neighbours with index / valid / sq_dist of shape [B, L, k].
    """
    if ca.ndim != 3 or ca.shape[-1] != 3 or mask.shape != ca.shape[:2]:
        raise ValueError(f"knn needs ca [B, L, 3] and mask [B, L], got {tuple(ca.shape)}, {tuple(mask.shape)}")
    if k < 1:
        raise ValueError(f"knn needs k >= 1, got {k}")
    batch, length, _ = ca.shape
    x = ca.float()
    real = mask.bool()  # [B, L]
    if chunk is None and torch.compiler.is_compiling():
        # NOTE: one block under torch.compile (a loop over a dynamic length would specialise the
        # graph to each length); the compiled graph frees the [B, L, L] temporaries early anyway.
        chunk = length
    if chunk is None:
        chunk = max(1, KNN_BLOCK_ELEMENTS // max(1, 3 * batch * length))
    take = min(k, length)
    cols = torch.arange(length, device=ca.device)  # [L]
    idx_out, dist_out = [], []
    for start in range(0, length, chunk):
        rows = cols[start:start + chunk]  # [c]
        diff = x[:, rows, None, :] - x[:, None, :, :]  # [B, c, L, 3]
        d2 = (diff * diff).sum(dim=-1)  # [B, c, L]
        bad = ~real[:, None, :]  # [B, 1, L] padded keys
        if not include_self:
            bad = bad | (rows[:, None] == cols[None, :])[None]  # [B, c, L]
        d2 = d2.masked_fill(bad, float("inf"))
        # One exact int64 sort key: the bits of a non-negative fp32 order like the value; the low
        # 32 bits hold the column, so equal distances order by the lower index (deterministic).
        key = (d2.view(torch.int32).to(torch.int64) << 32) | cols  # [B, c, L]
        best = torch.topk(key, take, dim=-1, largest=False, sorted=True).values  # [B, c, take]
        order = best & 0xFFFFFFFF  # [B, c, take]
        idx_out.append(order)
        dist_out.append(torch.gather(d2, -1, order))
    index = torch.cat(idx_out, dim=1)  # [B, L, take]
    sq_dist = torch.cat(dist_out, dim=1)  # [B, L, take]
    if take < k:  # fewer residues than k: pad slots (filled below as invalid)
        pad = k - take
        index = torch.cat([index, index.new_zeros(batch, length, pad)], dim=-1)
        sq_dist = torch.cat([sq_dist, sq_dist.new_full((batch, length, pad), float("inf"))], dim=-1)
    valid = torch.isfinite(sq_dist) & real[:, :, None]  # [B, L, k]
    self_index = cols.view(1, length, 1).expand(batch, length, k)
    index = torch.where(valid, index, self_index)
    sq_dist = torch.where(valid, sq_dist, torch.zeros_like(sq_dist))
    return Neighbours(index=index, valid=valid, sq_dist=sq_dist)


def soft_knn(ca: torch.Tensor, mask: torch.Tensor, k: int, *, chunk: int | None = None) -> Neighbours:
    """The k nearest residues (self included) with a smooth cutoff weight per slot.

    weight = (1 - d^2 / R^2)^2 for d^2 <= R^2, where R is the distance of the (k+1)-th nearest real
    residue; weight = 1 when there is none (a chain of <= k residues: nothing is left out, so
    nothing crosses a boundary); 0 on invalid slots. It is C^1 in the coordinates and 0 exactly when
    a neighbour reaches the boundary (d = R), the only place the k-NN membership can change, so a
    pooling that multiplies by it is continuous there. Self has weight 1 (d = 0).
    ``sq_dist`` and ``weight`` are recomputed from the gathered coordinates, so they carry gradients
    to ``ca`` (the search itself does not).

    Remaining discontinuity (inherent, documented): R^2 is floored at CUTOFF_EPS, so if the k + 1
    nearest CAs coincide to within 1e-3 A, neighbours near R are not faded out.

    Args:
        ca: [B, L, 3]; mask: [B, L]; k: neighbours (>= 1); chunk: passed to :func:`knn`.
    Returns:
        Neighbours [B, L, k] with ``weight`` set.
    """
    if k < 1:
        raise ValueError(f"soft_knn needs k >= 1, got {k}")
    wide = knn(ca, mask, k + 1, chunk=chunk)  # [B, L, k + 1]: the last slot is the first one left out
    near = Neighbours(index=wide.index[..., :k], valid=wide.valid[..., :k], sq_dist=wide.sq_dist[..., :k])
    outside = Neighbours(index=wide.index[..., k:], valid=wide.valid[..., k:], sq_dist=wide.sq_dist[..., k:])
    x = ca.float()  # [B, L, 3]
    sq_dist = ((near.gather(x) - x[:, :, None]) ** 2).sum(-1) * near.valid  # [B, L, k]
    sq_cut = ((outside.gather(x) - x[:, :, None]) ** 2).sum(-1)  # [B, L, 1]
    sq_cut = torch.where(outside.valid, sq_cut, torch.ones_like(sq_cut)).clamp(min=CUTOFF_EPS)  # [B, L, 1]
    ratio = torch.where(outside.valid, sq_dist / sq_cut, torch.zeros_like(sq_dist)).clamp(max=1.0)  # [B, L, k]
    weight = (1.0 - ratio) ** 2 * near.valid  # [B, L, k]
    return Neighbours(index=near.index, valid=near.valid, sq_dist=sq_dist, weight=weight)
