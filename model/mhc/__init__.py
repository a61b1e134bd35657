"""mHC: Manifold-Constrained Hyper-Connections around any residual branch.

Source: Xie et al., "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880 (DeepSeek),
which constrains the Hyper-Connections of Zhu et al. (arXiv 2409.19606). Equation numbers are the
mHC paper's:

- Eq. (3)  layer update   x_{l+1} = H_res x_l + H_post^T F(H_pre x_l, W_l)
- Eq. (6)  H_res on the Birkhoff polytope: H_res 1 = 1, 1^T H_res = 1^T, H_res >= 0
- Eq. (7)  x' = RMSNorm(vec(x_l));  H~_pre = a_pre (x' phi_pre) + b_pre,
           H~_post = a_post (x' phi_post) + b_post,  H~_res = a_res mat(x' phi_res) + b_res
- Eq. (8)  H_pre = sigmoid(H~_pre), H_post = 2 sigmoid(H~_post), H_res = Sinkhorn-Knopp(H~_res)
- Eq. (9)  M(0) = exp(H~_res), M(t) = T_r(T_c(M(t-1))), t_max = mhcSinkhornIters
- Eq. (14)-(16) the fused form: one GEMM x phi, then scale by 1 / rms(x) (normalisation reordered:
           the kernels do this, the reference normalises first)

Symbols:
    B  batch              L  residues           n  streams (``mhcExpansionRate``)
    C  channels (C_s)     M  mapping columns, 2n + n^2 (pre | post | res)
    s [B, L, C] single representation;  S [B, L, n, C] the residual streams

The single representation s is copied into n streams (``expand``), every structure layer is an
``MHCResidual(branch, dim, n=..., alpha_init=..., sinkhorn_iters=...)`` that applies Eq. (3) per
residue, and the streams are averaged back at the end (``contract`` / ``MeanReadout``) or read out
by a learned gate (``GatedReadout``, ``mhcReadout gated``). ``mhc_diagnostics`` turns the recorded
H_res of every layer into the paper's stability numbers (row / column sum errors, composite "Amax
gain"). The layers take plain keyword arguments; ``model.network.builder`` reads them from a Config.

Modules (each imports only those above it; none imports this package's ``__init__``):
    reference.py    the paper's math in PyTorch (Sinkhorn, mappings, expand / mixing / contract):
                    the reference every kernel is tested against
    kernels/        the fused Triton kernels with their launchers (Triton imported lazily)
    mappings.py     MHCMappings: the parameters of one layer's mappings and their initialisation
    readout.py      MeanReadout, GatedReadout, build_readout
    residual.py     MHCResidual: reference or fused, chosen once at construction (``fused``)
    diagnostics.py  find_mhc_modules, mhc_diagnostics (Amax gain)

NOTE (differences from the paper, each also marked where it happens):
- phi_pre, phi_post, phi_res are stored as one matrix ``phi`` [nC, 2n + n^2] (one GEMM, Eq. 14).
- RMSNorm has no learnable gain (as in Eq. 15; a gain would be absorbed by phi).
- The mappings and the stream mixing run in float32 (at least) even under autocast; the branch
  runs in whatever precision autocast gives it. The Sinkhorn runs in float64 on max-shifted,
  floored logits (``reference.sinkhorn_knopp``). (The fused backward runs x phi on tensor cores as
  tf32x3, which is float32 accuracy, not float32 arithmetic.)
- Bias initialisation (the paper does not fix it): see ``MHCMappings.reset_parameters``.
- The gated read-out is our own form (``GatedReadout``).
- n = 1 has no mappings at all: H_pre = H_post = H_res = 1, so the update is exactly s + f(s).
"""

from model.mhc.diagnostics import find_mhc_modules, mhc_diagnostics
from model.mhc.mappings import MHCMappings
from model.mhc.readout import GatedReadout, MeanReadout, build_readout, is_mean_readout
from model.mhc.reference import (
    SINKHORN_LOGIT_FLOOR,
    contract,
    expand,
    mapping_logits,
    mhc_pre_reference,
    mix_in,
    mix_out,
    sinkhorn_knopp,
    sinkhorn_knopp_direct,
    sinkhorn_knopp_log,
)
from model.mhc.residual import MHCResidual

__all__ = [
    "SINKHORN_LOGIT_FLOOR",
    "GatedReadout",
    "MHCMappings",
    "MHCResidual",
    "MeanReadout",
    "build_readout",
    "contract",
    "expand",
    "find_mhc_modules",
    "is_mean_readout",
    "mapping_logits",
    "mhc_diagnostics",
    "mhc_pre_reference",
    "mix_in",
    "mix_out",
    "sinkhorn_knopp",
    "sinkhorn_knopp_direct",
    "sinkhorn_knopp_log",
]
