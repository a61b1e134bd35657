"""Read-outs after the last mHC layer: the streams [B, L, n, C] back to one representation [B, L, C].

``MeanReadout`` (the reference configuration's, ``mhcReadout mean``) and ``GatedReadout`` (a learned
gate, ``mhcReadout gated``); ``build_readout`` picks one by name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.mhc.reference import compute_dtype, contract, rms_normalize

__all__ = ["GatedReadout", "MeanReadout", "build_readout", "is_mean_readout"]


class MeanReadout(nn.Module):
    """The mean read-out: [B, L, n, C] -> [B, L, C] by a mean over streams (no parameters)."""

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return contract(streams)


def is_mean_readout(readout) -> bool:
    """True for the mean read-out (``contract`` or a ``MeanReadout``), which
    ``MHCResidual.forward_with_mean`` computes together with the streams."""
    return readout is contract or isinstance(readout, MeanReadout)


class GatedReadout(nn.Module):
    """Learned gated sum of the streams (``mhcReadout gated``): [B, L, n, C] -> [B, L, C].

    NOTE: our own form (the official code's learned sum is not specified in the paper): an H_pre
    mapping of Eqs. (7)-(8), w = sigmoid(alpha (x' phi_out) + b_out), out = sum_i w_i S_i, with
    b_out = logit(1/n) so that it starts as the mean read-out (up to O(alpha)). With n = 1 it is
    the identity read-out S[..., 0, :].
    Parameters: phi_out [nC, n], alpha_out [], b_out [n] (state-dict keys of shipped weights).
    """

    def __init__(self, dim: int, n: int, *, alpha_init: float) -> None:
        super().__init__()
        self.dim, self.n = dim, n
        self.alpha_init = float(alpha_init)
        self.phi_out = nn.Parameter(torch.empty(n * dim, n))
        self.alpha_out = nn.Parameter(torch.empty(()))
        self.b_out = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.phi_out, mean=0.0, std=1.0 / math.sqrt(self.n * self.dim))
        self.alpha_out.fill_(self.alpha_init)
        self.b_out.fill_(-math.log(self.n - 1) if self.n > 1 else 0.0)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return streams[..., 0, :]
        dt = streams.dtype
        cdt = compute_dtype(dt, self.phi_out.dtype)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            x = rms_normalize(streams.reshape(*streams.shape[:-2], -1).to(cdt))  # [B, L, nC]
            w = torch.sigmoid(self.alpha_out * (x @ self.phi_out.to(cdt)) + self.b_out)  # [B, L, n]
            return (w.to(dt).unsqueeze(-1) * streams).sum(dim=-2)  # [B, L, C]


def build_readout(kind: str, dim: int, *, n: int, alpha_init: float) -> nn.Module:
    """The read-out named ``kind`` (``mhcReadout``): "mean" -> MeanReadout, "gated" -> GatedReadout(dim, n)."""
    if kind == "mean":
        return MeanReadout()
    if kind == "gated":
        return GatedReadout(dim, n, alpha_init=alpha_init)
    raise ValueError(f"mhcReadout must be 'mean' or 'gated', got {kind!r}")
