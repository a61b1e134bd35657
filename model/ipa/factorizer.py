"""Low-rank pair factors for Flash-IPA: from the dense pair tensor, or pair-free from k-NN geometry.

Flash-IPA (arXiv 2505.11580, Sec. 3) replaces the pair representation z [B, L, L, C] by rank-r
factors, ``z_ij ~ sum_r left[i, r] * right[j, r]`` (elementwise over C channels), so that the pair
bias and the pair-value term of IPA become dot products between a row vector of i and one of j.
:class:`PairFactors` holds the two factors; ``dense()`` materialises the implied z for references.

Two factorizers, one call signature ``factorizer(s, pair, frames, mask) -> PairFactors``:

- :class:`PairFactorizer` (``useFlashMode True``, the reference configuration): residue i's left factor
  pools the pair row p[i, n] over its ``kNeighbors`` nearest neighbours n (by CA distance); its
  right factor pools the column p[n, i]. NOTE: the public flash_ipa ``LinearFactorizer``
  compresses the length axis with ``Linear(max_len, rank)``, tying a model to one padded length;
  here every weight acts per edge or per channel, so any length works. The only maximum
  is the memory of the dense input p itself (B * L^2 * C_p), i.e. the dense pair path's limit.
- :class:`PairFreeFactorizer` (``usePairFree True``, our long-chain path): per-edge features from
  the single representation of both ends, the CA distance (radial basis), the neighbour's direction
  in the residue's local frame and the clipped sequence offset, pooled over the k neighbours. No
  L x L tensor exists anywhere; memory is O(L * k) (the k-NN search is chunked, model/ipa/knn.py).
  No maximum length beyond memory (the offsets are clipped to +-relativePositionK).

Pooling (both) is permutation-invariant over the neighbour set, so exact distance ties (whose order
fp32 rounding decides after a global rotation) cannot change a factor:

    factor_i = LayerNorm( sum_n w_in * proj(e_in) ),   w_in = c_in exp(g(e_in)) / sum_m c_im exp(g(e_im))

a softmax over the valid neighbours n of a learned per-edge, per-rank gate g (a linear map of the
edge's own features, zero-initialised: a plain cutoff-weighted mean at the start), times the smooth
cutoff weight c_in of model/ipa/knn.py ``soft_knn`` (1 at the residue itself, 0 at the distance of the
(k+1)-th neighbour), so the k-th-neighbour boundary is continuous too. Invalid slots (padding,
chains shorter than k) have c = 0 and contribute nothing. NOTE: the first version weighted neighbour
*slots* (ordered by distance) with learned per-slot weights; two tied neighbours swapping slots then
changed the output (factor error up to 0.8 on an ideal helix). The distance now reaches the weights
through the edge features (pair-free) or a radial basis added to the gate input (dense path).
All features are invariant under a global rotation / translation of the CA trace, and the factors
are continuous in the coordinates except where k + 1 CAs coincide (see ``soft_knn``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.geometry import Frames
from model.ipa.knn import Neighbours, soft_knn
from model.network.pair_transform import amp_layer_norm

__all__ = ["PairFactorizer", "PairFactors", "PairFreeFactorizer"]


@dataclass(frozen=True)
class PairFactors:
    """left, right: [B, L, r, C_f]; the implied pair tensor is ``z_ij = sum_r left_ir * right_jr``."""

    left: torch.Tensor
    right: torch.Tensor

    @property
    def rank(self) -> int:
        return self.left.shape[-2]

    @property
    def channels(self) -> int:
        return self.left.shape[-1]

    def dense(self) -> torch.Tensor:
        """The implied pair tensor [B, L, L, C_f] (references and tests only: O(L^2))."""
        return torch.einsum("birc,bjrc->bijc", self.left, self.right)


def _gated_pool(values: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum_n w_n values_n with w_n = weight_n exp(logit_n) / sum_m weight_m exp(logit_m), per rank.

    Symmetric in the neighbour axis: permuting the k slots (with their weights) leaves the result unchanged.
    Stabilised in fp32: the shift is max_n (logit_n + log weight_n) (detached; it cancels), so the
    largest term is 1 and no exp overflows; weight 0 (invalid / at the cutoff) gives exactly 0.

    Args:
        values: [B, L, k, r, C]; logits: [B, L, k, r]; weight: [B, L, k] (>= 0, 0 on invalid slots).
    Returns:
        [B, L, r, C]; zero for a residue without any weighted neighbour (padding).
    """
    w = weight.float()[..., None]  # [B, L, k, 1]
    off = (w == 0).expand_as(logits)  # [B, L, k, r]
    lg = logits.float()  # [B, L, k, r]
    shift = (lg.detach() + w.clamp(min=1e-30).log()).masked_fill(off, float("-inf")).amax(2, keepdim=True)
    shift = shift.nan_to_num(neginf=0.0)  # [B, L, 1, r]; rows with nothing weighted
    e = torch.exp((lg - shift).masked_fill(off, float("-inf"))) * w  # [B, L, k, r]
    p = e / e.sum(2, keepdim=True).clamp(min=1e-30)  # [B, L, k, r]
    return torch.einsum("blkr,blkrc->blrc", p.to(values.dtype), values)


class _RadialBasis(nn.Module):
    """Gaussian radial basis of a distance: sq_dist [*] (A^2) -> [*, num_rbf], centres 0 .. max_distance."""

    def __init__(self, *, num_rbf: int = 16, max_distance: float = 20.0):
        super().__init__()
        self.register_buffer("centres", torch.linspace(0.0, max_distance, num_rbf), persistent=False)
        self.width = max_distance / num_rbf

    def forward(self, sq_dist: torch.Tensor) -> torch.Tensor:
        dist = sq_dist.clamp(min=1e-12).sqrt()  # zero gradient at d = 0 (self), no inf
        return torch.exp(-((dist[..., None] - self.centres) / self.width) ** 2)


class _FactorHead(nn.Module):
    """Per-edge projection to r * C_f channels, gated pooling over the neighbour set, LayerNorm, padding zeroed."""

    def __init__(self, *, in_dim: int, gate_dim: int, rank: int, channels: int):
        super().__init__()
        self.rank, self.channels = rank, channels
        self.proj = nn.Linear(in_dim, rank * channels)
        self.gate = nn.Linear(gate_dim, rank)  # one logit per edge and rank
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.norm = nn.LayerNorm(channels)

    def forward(self, edges: torch.Tensor, gate_in: torch.Tensor, weight: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """edges [B, L, k, D_in], gate_in [B, L, k, D_g], weight [B, L, k], mask [B, L] -> [B, L, r, C_f]."""
        values = self.proj(edges).unflatten(-1, (self.rank, self.channels))  # [B, L, k, r, C_f]
        factor = self.norm(_gated_pool(values, self.gate(gate_in), weight))  # [B, L, r, C_f]
        return factor * mask.to(factor.dtype)[:, :, None, None]


class PairFactorizer(nn.Module):
    """Dense pair tensor p [B, L, L, C_p] -> PairFactors, through each residue's k nearest neighbours."""

    def __init__(self, *, pair_dim: int, rank: int, channels: int, k: int, num_rbf: int = 16,
                 max_distance: float = 20.0):
        super().__init__()
        self.k = k
        self.norm = nn.LayerNorm(pair_dim)
        self.rbf = _RadialBasis(num_rbf=num_rbf, max_distance=max_distance)
        head = {"in_dim": pair_dim, "gate_dim": pair_dim + num_rbf, "rank": rank, "channels": channels}
        self.left, self.right = _FactorHead(**head), _FactorHead(**head)

    def forward(self, s: torch.Tensor | None, pair: torch.Tensor, frames: Frames, mask: torch.Tensor) -> PairFactors:
        """s unused; pair [B, L, L, C_p]; frames [B, L] (CA = translations); mask [B, L]."""
        if pair is None:
            raise ValueError("PairFactorizer needs the dense pair tensor; use usePairFree True for the "
                             "pair-free path")
        nb = soft_knn(frames.trans, mask, self.k)  # [B, L, k]
        batch, length, k = nb.index.shape
        idx = nb.index[..., None].expand(batch, length, k, pair.shape[-1])  # [B, L, k, C_p]
        # NOTE: LayerNorm in the autocast dtype (model/network/pair_transform.py ``amp_layer_norm``).
        rows = amp_layer_norm(self.norm, torch.gather(pair, 2, idx))  # [B, L, k, C_p]   p[i, n_i]
        cols = amp_layer_norm(self.norm, torch.gather(pair.transpose(1, 2), 2, idx))  # [B, L, k, C_p]   p[n_i, i]
        rbf = self.rbf(nb.sq_dist).to(rows.dtype)  # [B, L, k, R]
        return PairFactors(self.left(rows, torch.cat([rows, rbf], -1), nb.weight, mask),
                           self.right(cols, torch.cat([cols, rbf], -1), nb.weight, mask))


class PairFreeFactorizer(nn.Module):
    """Single features s [B, L, C_s] + k-NN geometry -> PairFactors; O(L * k) memory, no L x L tensor."""

    def __init__(self, *, single_dim: int, rank: int, channels: int, k: int, max_offset: int,
                 hidden: int | None = None, num_rbf: int = 16, max_distance: float = 20.0):
        super().__init__()
        hidden = hidden or channels
        self.k, self.max_offset = k, max_offset
        self.rbf = _RadialBasis(num_rbf=num_rbf, max_distance=max_distance)
        self.node_i = nn.Linear(single_dim, hidden)
        self.node_j = nn.Linear(single_dim, hidden, bias=False)
        self.offset = nn.Embedding(2 * max_offset + 1, hidden)
        self.geom = nn.Linear(num_rbf + 3, hidden, bias=False)
        self.edge_mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden))
        head = {"in_dim": hidden, "gate_dim": hidden, "rank": rank, "channels": channels}
        self.left, self.right = _FactorHead(**head), _FactorHead(**head)

    def edge_features(self, s: torch.Tensor, frames: Frames, nb: Neighbours) -> torch.Tensor:
        """Invariant per-edge features [B, L, k, hidden] for residue i and its neighbours n."""
        length = s.shape[1]
        rbf = self.rbf(nb.sq_dist)  # [B, L, k, R]
        dist = nb.sq_dist.clamp(min=1e-12).sqrt()  # [B, L, k]
        ca = frames.trans.float()
        local = frames.float()[:, :, None].invert_apply(nb.gather(ca))  # [B, L, k, 3] n in i's frame
        direction = local / (dist[..., None] + 1.0)  # [B, L, k, 3] bounded, 0 for self
        pos = torch.arange(length, device=s.device)
        offset = (nb.index - pos[None, :, None]).clamp(-self.max_offset, self.max_offset)  # [B, L, k]
        h = (self.node_i(s)[:, :, None] + nb.gather(self.node_j(s)) + self.offset(offset + self.max_offset)
             + self.geom(torch.cat([rbf, direction], dim=-1).to(s.dtype)))  # [B, L, k, hidden]
        return h + self.edge_mlp(h)

    def forward(self, s: torch.Tensor, pair: torch.Tensor | None, frames: Frames, mask: torch.Tensor) -> PairFactors:
        """s [B, L, C_s]; pair ignored (None); frames [B, L]; mask [B, L]."""
        nb = soft_knn(frames.trans, mask, self.k)  # [B, L, k]
        edges = self.edge_features(s, frames, nb)  # [B, L, k, hidden]
        return PairFactors(self.left(edges, edges, nb.weight, mask), self.right(edges, edges, nb.weight, mask))

