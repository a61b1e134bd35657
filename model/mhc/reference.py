"""The mHC paper's math in PyTorch: the reference every fused kernel is tested against.

Symbols (see ``model/mhc/__init__.py``): B batch, L residues, n streams, C channels, M = 2n + n^2.

- ``cap_logits``: the optional soft cap of H~_res (``mhcResLogitCap``) that keeps Eq. (9) converged
- ``sinkhorn_knopp`` (Eq. 9; ``sinkhorn_knopp_log`` and ``sinkhorn_knopp_direct`` are its references)
- ``expand`` / ``contract``: s [B, L, C] <-> S [B, L, n, C] (copy in, mean out)
- ``mapping_logits`` (Eqs. 7 and 14), ``mappings`` (Eq. 8: H_pre, H_post, H_res)
- ``mix_in`` (H_pre S), ``mix_out`` (H_res S + H_post^T y: Eq. 3 after the branch)
- ``mhc_pre_reference``: everything before the branch (``kernels.pre.fused_pre`` is the fused form)

Everything runs in float32 at least (float64 stays float64, for gradcheck), with autocast disabled.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "RES_DIAG_INIT", "RMS_EPS", "SINKHORN_LOGIT_FLOOR", "cap_logits", "column_vectors", "compute_dtype", "contract",
    "expand", "mapping_logits", "mappings", "mhc_pre_reference", "mix_in", "mix_out", "rms_normalize",
    "sinkhorn_knopp", "sinkhorn_knopp_direct", "sinkhorn_knopp_log",
]

# Diagonal of exp-Sinkhorn(b_res) at initialisation (see MHCMappings.reset_parameters).
RES_DIAG_INIT = 0.9
RMS_EPS = 1e-6
# Floor of the max-shifted Sinkhorn logits (float64: exp(-600) ~ 1e-261 is still a normal number).
SINKHORN_LOGIT_FLOOR = 600.0


def cap_logits(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """The soft cap of H~_res (``mhcResLogitCap``): cap * tanh(logits / cap), so every logit lies in
    (-cap, cap); cap = 0 leaves the logits as they are (the paper's Eq. 8).

    Why: Sinkhorn-Knopp converges fast only while the logits' spread is bounded. Unbounded, the learned
    alpha_res * x' phi_res grows in training until t_max = 20 iterations leave H_res far from doubly
    stochastic (column sums of 0 and 2), the composite gain of Eq. (4) climbs past 3 and the constraint
    that makes mHC stable is gone. Under the cap 20 iterations keep every column sum within a few
    per cent of 1 for any input (tests/test_mhc_sinkhorn_cap.py searches for the worst case).
    """
    if cap <= 0:
        return logits
    return torch.tanh(logits / cap) * cap


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32: float64 stays float64 (gradcheck), half / bf16 go up to float32."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


# ----------------------------------------------------------------------------- Sinkhorn (Eq. 9)


def sinkhorn_knopp(logits: torch.Tensor, num_iters: int, cap: float = 0.0) -> torch.Tensor:
    """Project logits onto (approximately) doubly stochastic matrices, Eq. (9).

    Args:
        logits: [..., n, n] H~_res (any float dtype).
        num_iters: t_max >= 1; each iteration normalises columns (T_c) then rows (T_r), as Eq. (9),
            so rows sum to 1 to rounding and columns to within the remaining Sinkhorn error.
        cap: ``cap_logits`` first (in float64) when > 0 (``mhcResLogitCap``); 0: the logits as given.
    Returns:
        [..., n, n] non-negative, float32 (float64 if the input is float64). The caller casts.

    Runs with autocast disabled: bf16 Sinkhorn is a known failure.
    NOTE (speed): Eq. (9) literally (exp once, then divide by column / row sums: 2 ops per half
    iteration instead of a logsumexp's ~6, the same in backward), made safe by (1) subtracting each
    matrix's (detached) max logit, which Sinkhorn is invariant to, so exp never overflows, and
    (2) running in float64 with the shifted logits floored at -SINKHORN_LOGIT_FLOOR, so no column
    underflows to an all-zero (0 / 0) column: logits of +-50 (spread 100) are exact. Logit spreads
    beyond the floor (~600, never reached by alpha x' phi + b) saturate instead of being resolved.
    ``sinkhorn_knopp_log`` is the log-space form, the reference beside it (tests compare them).
    ``kernels/sinkhorn.py`` is the same math as one Triton kernel each way.
    """
    if num_iters < 1:
        raise ValueError(f"sinkhorn_knopp: num_iters must be >= 1 (mhcSinkhornIters), got {num_iters}")
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp: expected square [..., n, n] logits, got {tuple(logits.shape)}")
    out_dtype = compute_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = cap_logits(logits.to(torch.float64), cap)  # [..., n, n]
        shift = x.detach().amax(dim=(-2, -1), keepdim=True)  # [..., 1, 1] (cancels exactly)
        m = (x - shift).clamp(min=-SINKHORN_LOGIT_FLOOR).exp()  # [..., n, n] in (0, 1]
        for _ in range(num_iters):
            m = m / m.sum(dim=-2, keepdim=True)  # T_c: columns sum to 1
            m = m / m.sum(dim=-1, keepdim=True)  # T_r: rows sum to 1
        return m.to(out_dtype)


def sinkhorn_knopp_log(logits: torch.Tensor, num_iters: int, cap: float = 0.0) -> torch.Tensor:
    """Eq. (9) in log space (logsumexp subtraction): the reference for ``sinkhorn_knopp``.

    [..., n, n] -> [..., n, n] float32 (float64 for float64 input); never overflows for any logits.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_m = cap_logits(logits.to(compute_dtype(logits.dtype)), cap)  # [..., n, n]
        for _ in range(num_iters):
            log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # T_c: columns sum to 1
            log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # T_r: rows sum to 1
        return log_m.exp()


def sinkhorn_knopp_direct(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Eq. (9) literally: exp, then alternate column and row division. Reference for tests only.

    [..., n, n] -> [..., n, n] in the input dtype; overflows / underflows for large logits, which is
    why ``sinkhorn_knopp`` shifts and floors the logits first.
    """
    m = logits.exp()  # [..., n, n]
    for _ in range(num_iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


# ----------------------------------------------------------------------------- streams in and out


def expand(s: torch.Tensor, n: int) -> torch.Tensor:
    """Copy the single representation into n residual streams: [B, L, C] -> [B, L, n, C] (a view)."""
    return s.unsqueeze(-2).expand(*s.shape[:-1], n, s.shape[-1])


def contract(streams: torch.Tensor) -> torch.Tensor:
    """Mean over streams (the reference configuration's read-out): [B, L, n, C] -> [B, L, C]."""
    return streams.mean(dim=-2)


# ----------------------------------------------------------------------------- mappings (Eqs. 7-8)


def rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a gain over the last axis: [..., D] -> [..., D] (Eq. 7 / Eq. 15)."""
    return nn.functional.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)  # x * rsqrt(mean(x^2) + eps), one op


def mapping_logits(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor,
                   bias: torch.Tensor) -> torch.Tensor:
    """The logits of Eqs. (7)-(8): bias + alpha * RMSNorm(vec(S)) phi, per residue.

    streams [..., n, C], phi [nC, M], alpha [M], bias [M] -> [..., M] in float32 (at least: float64
    if streams or phi are).
    """
    dtype = compute_dtype(streams.dtype, phi.dtype)
    with torch.autocast(device_type=streams.device.type, enabled=False):
        x = streams.reshape(*streams.shape[:-2], phi.shape[0]).to(dtype)  # vec: [..., nC]
        x = rms_normalize(x)  # [..., nC]  (Eq. 7)
        raw = x @ phi.to(dtype)  # [..., M]  (Eq. 14)
        return torch.addcmul(bias.to(dtype), alpha.to(dtype), raw)  # [..., M]  alpha * raw + b (Eq. 7)


def column_vectors(n: int, alpha_pre: torch.Tensor, alpha_post: torch.Tensor, alpha_res: torch.Tensor,
                   b_pre: torch.Tensor, b_post: torch.Tensor,
                   b_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column alpha and bias of the M = 2n + n^2 logits (pre | post | res): ([M], [M]).

    alpha_* [] (scalars), b_pre [n], b_post [n], b_res [n, n]."""
    alpha = torch.cat([alpha_pre.expand(n), alpha_post.expand(n), alpha_res.expand(n * n)])
    bias = torch.cat([b_pre, b_post, b_res.flatten()])
    return alpha, bias


def mappings(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor, alpha_post: torch.Tensor,
             alpha_res: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
             sinkhorn_iters: int, res_logit_cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """H_pre, H_post, H_res of Eq. (8), per residue.

    streams [..., n, C], phi [nC, 2n + n^2], alpha_* [], b_pre [n], b_post [n], b_res [n, n]
    -> (h_pre [..., n], h_post [..., n], h_res [..., n, n]), float32 at least.
    ``res_logit_cap``: the soft cap of H~_res before the Sinkhorn (``cap_logits``; 0: none).
    NOTE: the three maps alpha * raw + b run over the 2n + n^2 columns at once (one GEMM, Eq. 14).
    """
    n = streams.shape[-2]
    with torch.autocast(device_type=streams.device.type, enabled=False):
        alpha, bias = column_vectors(n, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)  # [M], [M]
        logits = mapping_logits(streams, phi, alpha, bias)  # [..., 2n + n^2]
        pre, post, res = logits.split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(pre)  # [..., n]
        h_post = 2.0 * torch.sigmoid(post)  # [..., n]
        h_res = sinkhorn_knopp(res.reshape(*res.shape[:-1], n, n), sinkhorn_iters, res_logit_cap)  # [..., n, n]
    return h_pre, h_post, h_res


# ----------------------------------------------------------------------------- stream mixing (Eq. 3)


def _mix(h: torch.Tensor, streams: torch.Tensor, matmul: bool | None) -> torch.Tensor:
    """h [..., m, n] times streams [..., n, C] -> [..., m, C], per residue.

    ``matmul`` (default: on CUDA): one batched GEMM (one kernel each way instead of a [..., m, n, C]
    broadcast product and its reduction). Otherwise the broadcast multiply-sum, the CPU form (CPU bmm
    over B * L tiny matrices is a slow per-matrix loop). Tests compare the two.
    """
    if streams.is_cuda if matmul is None else matmul:
        return h @ streams
    return (h.unsqueeze(-1) * streams.unsqueeze(-3)).sum(dim=-2)


def mix_in(h_pre: torch.Tensor, streams: torch.Tensor, matmul: bool | None = None) -> torch.Tensor:
    """The branch input H_pre S: h_pre [..., n], streams [..., n, C] -> [..., C]."""
    return _mix(h_pre.unsqueeze(-2), streams, matmul).squeeze(-2)


def mix_out(h_res: torch.Tensor, h_post: torch.Tensor, streams: torch.Tensor, y: torch.Tensor,
            matmul: bool | None = None) -> torch.Tensor:
    """The new streams H_res S + H_post^T y: h_res [..., n, n], h_post [..., n], streams [..., n, C],
    y [..., C] -> [..., n, C]."""
    return torch.addcmul(_mix(h_res, streams, matmul), h_post.unsqueeze(-1), y.unsqueeze(-2))


def mhc_pre_reference(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor,
                      alpha_post: torch.Tensor, alpha_res: torch.Tensor, b_pre: torch.Tensor,
                      b_post: torch.Tensor, b_res: torch.Tensor, sinkhorn_iters: int,
                      res_logit_cap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything an mHC residual computes before its branch: Eqs. (7)-(9), then H_pre S.

    streams [..., n, C], phi [nC, 2n + n^2], alpha_* [] (scalars), b_pre [n], b_post [n], b_res [n, n]
    -> (x [..., C] in the streams' dtype, h_post [..., n], h_res [..., n, n] in float32 at least).
    ``kernels.pre.fused_pre`` is the fused op of the same, forward and backward (tests compare).
    """
    h_pre, h_post, h_res = mappings(streams, phi, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res,
                                    sinkhorn_iters, res_logit_cap)
    with torch.autocast(device_type=streams.device.type, enabled=False):
        x = mix_in(h_pre.to(streams.dtype), streams)  # [..., C]
    return x, h_post, h_res
