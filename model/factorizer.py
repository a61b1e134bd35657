"""Low-rank pair factors for Flash-IPA: from the dense pair tensor, or pair-free from k-NN geometry.

Flash-IPA (arXiv 2505.11580, Sec. 3) replaces the pair representation z [B, L, L, C] by rank-r
factors, ``z_ij ~ sum_r left[i, r] * right[j, r]`` (elementwise over C channels), so that the pair
bias and the pair-value term of IPA become dot products between a row vector of i and one of j.
:class:`PairFactors` holds the two factors; ``dense()`` materialises the implied z for references.

Two factorizers, one call signature ``factorizer(s, pair, frames, mask) -> PairFactors``:

- :class:`PairFactorizer` (``useFlashMode True``, the user's document): residue i's left factor
  pools the pair row p[i, n] over its ``kNeighbors`` nearest neighbours n (by CA distance); its
  right factor pools the column p[n, i]. NOTE: the public flash_ipa ``LinearFactorizer``
  compresses the length axis with ``Linear(max_len, rank)``, tying a model to one padded length;
  here every weight acts per neighbour slot or per channel, so any length works. The only maximum
  is the memory of the dense input p itself (B * L^2 * C_p), i.e. the dense pair path's limit.
- :class:`PairFreeFactorizer` (``usePairFree True``, our long-chain path): per-edge features from
  the single representation of both ends, the CA distance (radial basis), the neighbour's direction
  in the residue's local frame and the clipped sequence offset, pooled over the k neighbours. No
  L x L tensor exists anywhere; memory is O(L * k) (the k-NN search is chunked, model/knn.py).
  No maximum length beyond memory (the offsets are clipped to +-relativePositionK).

Pooling (both): a learned softmax weight per neighbour slot (slots are ordered by distance), masked
to the valid neighbours, so chains shorter than k and padding are handled exactly.
All features are invariant under a global rotation / translation of the CA trace.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.geometry import Frames
from model.knn import Neighbours, knn

__all__ = ["PairFactorizer", "PairFactors", "PairFreeFactorizer", "build_factorizer"]


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


def _slot_pool(values: torch.Tensor, slot_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax-weighted sum over the valid neighbour slots; zero when a residue has none.

    Args:
        values: [B, L, k, D]; slot_logits: [k]; valid: [B, L, k] bool.
    Returns:
        [B, L, D]
    """
    logits = slot_logits.to(values.dtype).expand(valid.shape).masked_fill(~valid, -1e4)  # [B, L, k]
    weights = torch.softmax(logits.float(), dim=-1).to(values.dtype) * valid  # [B, L, k]
    return torch.einsum("blk,blkd->bld", weights, values)


class _FactorHead(nn.Module):
    """Per-slot projection to r * C_f channels, slot pooling, LayerNorm, padding zeroed."""

    def __init__(self, *, in_dim: int, rank: int, channels: int, k: int):
        super().__init__()
        self.rank, self.channels = rank, channels
        self.proj = nn.Linear(in_dim, rank * channels)
        self.slot_logits = nn.Parameter(torch.zeros(k))
        self.norm = nn.LayerNorm(channels)

    def forward(self, edges: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """edges [B, L, k, D_in], valid [B, L, k], mask [B, L] -> factor [B, L, r, C_f]."""
        pooled = _slot_pool(self.proj(edges), self.slot_logits, valid)  # [B, L, r * C_f]
        factor = self.norm(pooled.unflatten(-1, (self.rank, self.channels)))  # [B, L, r, C_f]
        return factor * mask.to(factor.dtype)[:, :, None, None]


class PairFactorizer(nn.Module):
    """Dense pair tensor p [B, L, L, C_p] -> PairFactors, through each residue's k nearest neighbours."""

    def __init__(self, *, pair_dim: int, rank: int, channels: int, k: int):
        super().__init__()
        self.k = k
        self.norm = nn.LayerNorm(pair_dim)
        self.left = _FactorHead(in_dim=pair_dim, rank=rank, channels=channels, k=k)
        self.right = _FactorHead(in_dim=pair_dim, rank=rank, channels=channels, k=k)

    def forward(self, s: torch.Tensor | None, pair: torch.Tensor, frames: Frames, mask: torch.Tensor) -> PairFactors:
        """s unused; pair [B, L, L, C_p]; frames [B, L] (CA = translations); mask [B, L]."""
        if pair is None:
            raise ValueError("PairFactorizer needs the dense pair tensor; use usePairFree True for the "
                             "pair-free path")
        nb = knn(frames.trans, mask, self.k)  # [B, L, k]
        batch, length, k = nb.index.shape
        idx = nb.index[..., None].expand(batch, length, k, pair.shape[-1])  # [B, L, k, C_p]
        rows = torch.gather(pair, 2, idx)  # [B, L, k, C_p]   p[i, n_i]
        cols = torch.gather(pair.transpose(1, 2), 2, idx)  # [B, L, k, C_p]   p[n_i, i]
        return PairFactors(self.left(self.norm(rows), nb.valid, mask),
                           self.right(self.norm(cols), nb.valid, mask))


class PairFreeFactorizer(nn.Module):
    """Single features s [B, L, C_s] + k-NN geometry -> PairFactors; O(L * k) memory, no L x L tensor."""

    def __init__(self, *, single_dim: int, rank: int, channels: int, k: int, max_offset: int,
                 hidden: int | None = None, num_rbf: int = 16, max_distance: float = 20.0):
        super().__init__()
        hidden = hidden or channels
        self.k, self.max_offset, self.max_distance = k, max_offset, max_distance
        self.register_buffer("rbf_centres", torch.linspace(0.0, max_distance, num_rbf), persistent=False)
        self.rbf_width = max_distance / num_rbf
        self.node_i = nn.Linear(single_dim, hidden)
        self.node_j = nn.Linear(single_dim, hidden, bias=False)
        self.offset = nn.Embedding(2 * max_offset + 1, hidden)
        self.geom = nn.Linear(num_rbf + 3, hidden, bias=False)
        self.edge_mlp = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, hidden))
        self.left = _FactorHead(in_dim=hidden, rank=rank, channels=channels, k=k)
        self.right = _FactorHead(in_dim=hidden, rank=rank, channels=channels, k=k)

    def edge_features(self, s: torch.Tensor, frames: Frames, nb: Neighbours) -> torch.Tensor:
        """Invariant per-edge features [B, L, k, hidden] for residue i and its neighbours n."""
        length = s.shape[1]
        dist = nb.sq_dist.clamp(min=0).sqrt()  # [B, L, k]
        rbf = torch.exp(-((dist[..., None] - self.rbf_centres) / self.rbf_width) ** 2)  # [B, L, k, R]
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
        nb = knn(frames.trans, mask, self.k)  # [B, L, k]
        edges = self.edge_features(s, frames, nb)  # [B, L, k, hidden]
        return PairFactors(self.left(edges, nb.valid, mask), self.right(edges, nb.valid, mask))


def build_factorizer(config) -> nn.Module:
    """The factorizer a flash-mode config asks for (``usePairFree`` picks the pair-free one).

    Factor channels C_f = ``pairFeatureDimension``; rank = ``zFactorRank``; k = ``kNeighbors``.
    """
    common = dict(rank=config.zFactorRank, channels=config.pairFeatureDimension, k=config.kNeighbors)
    if config.usePairFree:
        return PairFreeFactorizer(single_dim=config.singleFeatureDimension,
                                  max_offset=config.relativePositionK, **common)
    return PairFactorizer(pair_dim=config.pairFeatureDimension, **common)
