"""Self-conditioning: the denoiser's previous estimate of the clean CA trace as an extra input (``selfConditioning``).

Sources: Chen, Zhang & Hinton 2022 ("Analog Bits", arXiv 2208.04202, sec. 3.2): the network also takes
its own previous estimate of x0; in training, half of the time it first predicts x0 without one and
then trains on that (detached) estimate. For protein backbones: FrameDiff (Yim et al. 2023, sec. 4.3),
RFdiffusion (Watson et al. 2023) and Genie 2 (Lin et al. 2024), which add the estimate's CA-CA
distances to the pair features.

Symbols: B batch, L residues, k neighbours, r factor rank, C_s single, C_p pair, C_f factor channels.

    x0_self  [B, L, 3]  the previous estimate of the clean CA trace (centred like x_t); all zeros: none yet
    present  [B]        1 where a sample's estimate is not all zeros, else 0

One form per pair representation; each returns an additive term, exactly zero at initialisation:

- :class:`DistogramSelfCondition` (the dense pair modes: ``usePairFree False``): one-hot CA-CA distance
  bins of x0_self (the template's bins, ``model.network.features.TEMPLATE_BINS``) through a
  zero-initialised Linear to C_p, added to the pair features before the pair transform (Genie 2).
  O(L^2), as the dense pair features already are.
- :class:`PairFreeSelfCondition` (``usePairFree True``): a second pair-free factorizer, with its own
  weights, over the k-NN graph of x0_self (its k nearest neighbours in the estimate, their distances,
  directions in the estimate's Frenet-Serret frames and sequence offsets). Those neighbour sets hold
  the long-range contacts of the estimate, such as strand pairs, that the k-NN graph of a noisy x_t
  does not show yet. Its factors go through zero-initialised Linear maps (C_f -> C_f, per rank) and
  are added to x_t's factors. O(L * k) memory: no L x L tensor.

NOTE: a sample whose estimate is all zeros gets exactly zero from these modules (the term is
multiplied by ``present``), whatever the weights, so "zeros" always means "no estimate" and costs the
same as no self-conditioning. Genie 2 and FrameDiff feed the zeros through the features instead (one
constant distance bin).
NOTE: the estimate's features use distances and its own frames only, so they are invariant under a
global rotation / translation of x0_self (with or without x_t), like the rest of the pair features.
"""

from __future__ import annotations

import torch
from torch import nn

from model.geometry import frenet_serret_frames, skip_input_checks
from model.ipa.factorizer import PairFactors, PairFreeFactorizer
from model.network.features import TEMPLATE_BINS, distance_bins

__all__ = ["DistogramSelfCondition", "PairFreeSelfCondition", "estimate_present"]


def estimate_present(x0_self: torch.Tensor) -> torch.Tensor:
    """[B, L, 3] -> [B] float32: 1 where the sample's estimate has a non-zero coordinate, else 0."""
    return (x0_self != 0).flatten(1).any(dim=1).float()


def _masked_estimate(x0_self: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x0_self [B, L, 3] in fp32, zero on padding (whatever the caller left there)."""
    return x0_self.float() * mask.float()[..., None]


class DistogramSelfCondition(nn.Module):
    """Dense pair modes: ``term_ij = present * W onehot(bin(|x0_i - x0_j|))`` [B, L, L, C_p], W zero-initialised."""

    def __init__(self, *, c_p: int) -> None:
        super().__init__()
        self.linear = nn.Linear(TEMPLATE_BINS["num_bins"], c_p, bias=False)
        nn.init.zeros_(self.linear.weight)

    def forward(self, s: torch.Tensor | None, x0_self: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            s: unused (one signature with :class:`PairFreeSelfCondition`).
            x0_self: [B, L, 3] estimate (zeros: none); mask: [B, L].
        Returns:
            [B, L, L, C_p] to add to the pair features; zero on padded pairs and for samples without an estimate.
        """
        x0 = _masked_estimate(x0_self, mask)  # [B, L, 3]
        dtype = self.linear.weight.dtype
        term = self.linear(distance_bins(x0, **TEMPLATE_BINS).to(dtype))  # [B, L, L, C_p]
        m = mask.float()
        gate = (m[:, :, None] * m[:, None, :]) * estimate_present(x0_self)[:, None, None]  # [B, L, L]
        return term * gate[..., None].to(term.dtype)


class PairFreeSelfCondition(nn.Module):
    """Pair-free: factors of x0_self's own k-NN graph, through zero-initialised Linear maps (``PairFactors``).

    Args:
        single_dim, rank, channels, k, max_offset: as the model's ``PairFreeFactorizer`` (C_s, r, C_f,
            k, relative offset clip).
    """

    def __init__(self, *, single_dim: int, rank: int, channels: int, k: int, max_offset: int) -> None:
        super().__init__()
        self.factorizer = PairFreeFactorizer(single_dim=single_dim, rank=rank, channels=channels, k=k,
                                             max_offset=max_offset)
        self.out_left = nn.Linear(channels, channels, bias=False)
        self.out_right = nn.Linear(channels, channels, bias=False)
        nn.init.zeros_(self.out_left.weight)
        nn.init.zeros_(self.out_right.weight)

    def forward(self, s: torch.Tensor, x0_self: torch.Tensor, mask: torch.Tensor) -> PairFactors:
        """
        Args:
            s: [B, L, C_s] single features; x0_self: [B, L, 3] estimate (zeros: none); mask: [B, L].
        Returns:
            PairFactors (left, right [B, L, r, C_f]) to add to x_t's; zero on padding and for samples
            without an estimate.
        """
        x0 = _masked_estimate(x0_self, mask)  # [B, L, 3]
        with skip_input_checks():  # the prefix mask was checked on x_t's frames: no second host sync
            frames = frenet_serret_frames(x0, mask.float())  # Frames [B, L] of the estimate
        factors = self.factorizer(s, None, frames, mask)  # left, right [B, L, r, C_f]
        gate = estimate_present(x0_self)[:, None, None, None]  # [B, 1, 1, 1]
        left = self.out_left(factors.left)  # [B, L, r, C_f]
        right = self.out_right(factors.right)  # [B, L, r, C_f]
        return PairFactors(left * gate.to(left.dtype), right * gate.to(right.dtype))
