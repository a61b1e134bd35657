"""``MHCMappings``: the parameters of one mHC layer's three mappings (Eqs. 7-8) and their initialisation.

The math is ``reference.mappings``; ``MHCResidual`` passes these parameters to it or to the fused
pre-branch kernel (``kernels.pre.fused_pre``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.mhc.reference import RES_DIAG_INIT, mappings

__all__ = ["MHCMappings"]


class MHCMappings(nn.Module):
    """H_pre, H_post, H_res of one layer from the current streams, Eqs. (7)-(9), per residue.

    Args:
        dim: C, channels per stream.
        n: number of streams (>= 2; n = 1 needs no mappings, see ``MHCResidual``).
        alpha_init: the initial alpha_pre / alpha_post / alpha_res (``mhcAlphaInit``; the paper: 0.01).
        sinkhorn_iters: t_max of Eq. (9) (``mhcSinkhornIters``).
        res_logit_cap: soft cap of the H_res logits before the Sinkhorn (``mhcResLogitCap``,
            ``reference.cap_logits``); 0: none, the paper's form.
    forward(streams [B, L, n, C]) -> (h_pre [B, L, n], h_post [B, L, n], h_res [B, L, n, n]),
    all float32 (at least), by the reference (``reference.mappings``).
    Parameters: phi [nC, 2n + n^2], alpha_pre / alpha_post / alpha_res [], b_pre [n], b_post [n],
    b_res [n, n] (their names are the state-dict keys of shipped weights: do not rename).
    NOTE: phi_pre | phi_post | phi_res are stored as one [nC, 2n + n^2] matrix: one GEMM (Eq. 14).
    """

    def __init__(self, dim: int, n: int, *, alpha_init: float, sinkhorn_iters: int,
                 res_logit_cap: float = 0.0) -> None:
        super().__init__()
        if n < 2:
            raise ValueError(f"MHCMappings needs n >= 2 streams, got {n} (n = 1 is the plain residual)")
        self.dim, self.n = dim, n
        self.alpha_init = float(alpha_init)
        self.sinkhorn_iters = int(sinkhorn_iters)
        self.res_logit_cap = float(res_logit_cap)
        diag = _diag_logit(n)
        if 0 < self.res_logit_cap <= diag:
            raise ValueError(f"mhcResLogitCap {self.res_logit_cap:g} must be 0 (no cap) or above {diag:.2f}, the "
                             f"diagonal H_res logit at initialisation for n = {n} streams; try 5")
        self.phi = nn.Parameter(torch.empty(n * dim, 2 * n + n * n))
        self.alpha_pre = nn.Parameter(torch.empty(()))
        self.alpha_post = nn.Parameter(torch.empty(()))
        self.alpha_res = nn.Parameter(torch.empty(()))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise so that the block starts as (almost) a plain residual block.

        NOTE: the paper fixes alpha = 0.01 (its Table 5; our ``mhcAlphaInit``) but not phi or b.
        - phi ~ N(0, 1 / nC): x' has unit RMS, so x' phi is O(1) and alpha * x' phi is O(alpha).
        - b_pre = logit(1 / n): H_pre = 1/n per stream, so H_pre S = mean(S) = s while the streams
          are equal copies (they are, right after ``expand``): the branch sees what it would see
          without mHC.
        - b_post = 0: H_post = 2 sigmoid(0) = 1 per stream, so every stream gets y once and the
          mean read-out gets y exactly once. Since H_res is column stochastic,
          mean_i (H_res S)_i = mean(S) for any H_res, so the mean read-out follows
          s <- s + y up to the O(alpha) dynamic terms.
        - b_res = d = log(RES_DIAG_INIT (n-1) / (1 - RES_DIAG_INIT)) on the diagonal, 0 off it
          (under a logit cap c, c atanh(d / c), which the cap maps back to d):
          exp(b_res) is already doubly stochastic after scaling, with diagonal 0.9 and off-diagonal
          0.1 / (n-1): close to the identity (the plain residual's H_res) but far from saturation,
          so dH_res / db_res ~ p (1 - p) >= 0.09 and H_res can learn. (Public code that starts
          from -8 off-diagonal logits gives exp(-8) ~ 3e-4 and gradients of the same size.)
        """
        n, nc = self.n, self.n * self.dim
        nn.init.normal_(self.phi, mean=0.0, std=1.0 / math.sqrt(nc))
        for a in (self.alpha_pre, self.alpha_post, self.alpha_res):
            a.fill_(self.alpha_init)
        self.b_pre.fill_(-math.log(n - 1))  # logit(1/n)
        self.b_post.zero_()
        diag, cap = _diag_logit(n), self.res_logit_cap
        if cap > 0:
            diag = cap * math.atanh(diag / cap)
        self.b_res.copy_(torch.eye(n) * diag)

    def column_parameters(self) -> tuple[torch.Tensor, ...]:
        """(alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res): the arguments after phi of
        ``reference.mappings``, ``reference.mhc_pre_reference`` and ``kernels.pre.fused_pre``."""
        return self.alpha_pre, self.alpha_post, self.alpha_res, self.b_pre, self.b_post, self.b_res

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mappings(streams, self.phi, *self.column_parameters(), self.sinkhorn_iters, self.res_logit_cap)


def _diag_logit(n: int) -> float:
    """The diagonal H_res logit that makes exp-Sinkhorn's diagonal RES_DIAG_INIT (off-diagonal logits 0)."""
    return math.log(RES_DIAG_INIT * (n - 1) / (1.0 - RES_DIAG_INIT))
