"""mHC: Manifold-Constrained Hyper-Connections around any residual branch.

Source: Xie et al., "mHC: Manifold-Constrained Hyper-Connections", arXiv 2512.24880 (DeepSeek),
which constrains the Hyper-Connections of Zhu et al. (arXiv 2409.19606). Equation numbers below are
the mHC paper's:

- Eq. (3)  layer update   x_{l+1} = H_res x_l + H_post^T F(H_pre x_l, W_l)
- Eq. (6)  H_res on the Birkhoff polytope: H_res 1 = 1, 1^T H_res = 1^T, H_res >= 0
- Eq. (7)  x' = RMSNorm(vec(x_l));  H~_pre = a_pre (x' phi_pre) + b_pre,
           H~_post = a_post (x' phi_post) + b_post,  H~_res = a_res mat(x' phi_res) + b_res
- Eq. (8)  H_pre = sigmoid(H~_pre), H_post = 2 sigmoid(H~_post), H_res = Sinkhorn-Knopp(H~_res)
- Eq. (9)  M(0) = exp(H~_res), M(t) = T_r(T_c(M(t-1))), t_max = mhcSinkhornIters
- Eq. (14)-(16) the fused form: one GEMM x phi, then scale by 1 / rms(x) (normalisation reordered;
           the kernels of model/mhc_pre_triton.py and model/mhc_map_triton.py, the reference
           normalises first)

Symbols: B batch, L residues, n streams (``mhcExpansionRate``), C channels (C_s).

The single representation s [B, L, C] is copied into n streams S [B, L, n, C] (``expand``), every
structure layer is an ``MHCResidual(branch, dim, config)`` that applies Eq. (3) per residue, and the
streams are averaged back at the end (``contract``; the user's document) or read out by a learned
gate (``GatedReadout``, ``mhcReadout gated``). ``mhc_diagnostics`` turns the recorded H_res of every
layer into the paper's stability numbers (row / column sum errors, composite "Amax gain").

NOTE (differences from the paper, each also marked where it happens):
- phi_pre, phi_post, phi_res are stored as one matrix ``phi`` [nC, 2n + n^2] (one GEMM, Eq. 14).
- RMSNorm has no learnable gain (as in Eq. 15; a gain would be absorbed by phi).
- The mappings and the stream mixing run in float32 (at least) even under autocast; the branch
  runs in whatever precision autocast gives it. (The fused kernels run x phi on tensor cores as
  tf32x3, which is float32 accuracy, not float32 arithmetic.)
- Bias initialisation (the paper does not fix it): see ``MHCMappings.reset_parameters``.
- n = 1 has no mappings at all: H_pre = H_post = H_res = 1, so the update is exactly s + f(s).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from model.mhc.kernels import map as mhc_map_triton
from model.mhc.kernels import mix as mhc_mix_triton
from model.mhc.kernels import pre as mhc_pre_triton
from model.mhc.kernels import sinkhorn as sinkhorn_triton
from model.mhc.kernels.support import needs_grad

__all__ = [
    "GatedReadout",
    "MHCMappings",
    "MHCResidual",
    "MeanReadout",
    "build_readout",
    "contract",
    "expand",
    "find_mhc_modules",
    "is_mean_readout",
    "mhc_diagnostics",
    "mhc_pre_reference",
    "sinkhorn_knopp",
    "sinkhorn_knopp_direct",
    "sinkhorn_knopp_log",
]

# Diagonal of exp-Sinkhorn(b_res) at initialisation (see MHCMappings.reset_parameters).
RES_DIAG_INIT = 0.9
RMS_EPS = 1e-6
# Floor of the max-shifted Sinkhorn logits (float64: exp(-600) ~ 1e-261 is still a normal number).
SINKHORN_LOGIT_FLOOR = 600.0


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """At least float32: float64 stays float64 (gradcheck), half / bf16 go up to float32."""
    out = torch.float32
    for dt in dtypes:
        out = torch.promote_types(out, dt)
    return out


def sinkhorn_knopp(logits: torch.Tensor, num_iters: int, *, fused: bool | None = None) -> torch.Tensor:
    """Project logits onto (approximately) doubly stochastic matrices, Eq. (9).

    Args:
        logits: [..., n, n] H~_res (any float dtype).
        num_iters: t_max >= 1; each iteration normalises columns (T_c) then rows (T_r), as Eq. (9),
            so rows sum to 1 to rounding and columns to within the remaining Sinkhorn error.
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
    The [..., n, n] tensors are tiny, so float64 costs nothing measurable on the GPU either.
    Fused path: on CUDA (n * n a power of two, Triton present, not under torch.compile) the same
    math runs as one Triton kernel forward and one backward (model/sinkhorn_triton.py), instead of
    ~4 launches per iteration; ``fused=False`` forces this loop, the reference the tests compare
    the kernel against (forward and gradients), ``fused=True`` forces the kernel.
    """
    if num_iters < 1:
        raise ValueError(f"sinkhorn_knopp: num_iters must be >= 1 (mhcSinkhornIters), got {num_iters}")
    if logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn_knopp: expected square [..., n, n] logits, got {tuple(logits.shape)}")
    if fused is None:
        fused = sinkhorn_triton.available(logits)
    if fused:
        return sinkhorn_triton.sinkhorn_fused(logits, num_iters, SINKHORN_LOGIT_FLOOR)
    out_dtype = _compute_dtype(logits.dtype)
    with torch.autocast(device_type=logits.device.type, enabled=False):
        x = logits.to(torch.float64)  # [..., n, n]
        shift = x.detach().amax(dim=(-2, -1), keepdim=True)  # [..., 1, 1] (cancels exactly)
        m = (x - shift).clamp(min=-SINKHORN_LOGIT_FLOOR).exp()  # [..., n, n] in (0, 1]
        for _ in range(num_iters):
            m = m / m.sum(dim=-2, keepdim=True)  # T_c: columns sum to 1
            m = m / m.sum(dim=-1, keepdim=True)  # T_r: rows sum to 1
        return m.to(out_dtype)


def sinkhorn_knopp_log(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Eq. (9) in log space (logsumexp subtraction): the reference for ``sinkhorn_knopp``.

    [..., n, n] -> [..., n, n] float32 (float64 for float64 input); never overflows for any logits.
    """
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_m = logits.to(_compute_dtype(logits.dtype))  # [..., n, n]
        for _ in range(num_iters):
            log_m = log_m - torch.logsumexp(log_m, dim=-2, keepdim=True)  # T_c: columns sum to 1
            log_m = log_m - torch.logsumexp(log_m, dim=-1, keepdim=True)  # T_r: rows sum to 1
        return log_m.exp()


def sinkhorn_knopp_direct(logits: torch.Tensor, num_iters: int) -> torch.Tensor:
    """Eq. (9) literally: exp, then alternate column and row division. Reference for tests only.

    [..., n, n] -> [..., n, n] in the input dtype; overflows / underflows for large logits, which is
    why ``sinkhorn_knopp`` works in log space.
    """
    m = logits.exp()  # [..., n, n]
    for _ in range(num_iters):
        m = m / m.sum(dim=-2, keepdim=True)
        m = m / m.sum(dim=-1, keepdim=True)
    return m


def expand(s: torch.Tensor, n: int) -> torch.Tensor:
    """Copy the single representation into n residual streams: [B, L, C] -> [B, L, n, C] (a view)."""
    return s.unsqueeze(-2).expand(*s.shape[:-1], n, s.shape[-1])


def contract(streams: torch.Tensor) -> torch.Tensor:
    """Mean over streams (the user's document): [B, L, n, C] -> [B, L, C]."""
    return streams.mean(dim=-2)


def _rms_normalize(x: torch.Tensor) -> torch.Tensor:
    """RMSNorm without a gain over the last axis: [..., D] -> [..., D] (Eq. 7 / Eq. 15)."""
    return nn.functional.rms_norm(x, (x.shape[-1],), eps=RMS_EPS)  # x * rsqrt(mean(x^2) + eps), one op


def mapping_logits(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The logits of Eqs. (7)-(8): bias + alpha * RMSNorm(vec(S)) phi, per residue (reference).

    streams [..., n, C], phi [nC, M], alpha [M], bias [M] -> [..., M] in float32 (at least: float64
    if streams or phi are). ``model.mhc_map_triton.mapping_logits`` is the fused sampling kernel of
    the same (tests compare them).
    """
    dtype = _compute_dtype(streams.dtype, phi.dtype)
    with torch.autocast(device_type=streams.device.type, enabled=False):
        x = streams.reshape(*streams.shape[:-2], phi.shape[0]).to(dtype)  # vec: [..., nC]
        x = _rms_normalize(x)  # [..., nC]  (Eq. 7)
        raw = x @ phi.to(dtype)  # [..., M]  (Eq. 14)
        return torch.addcmul(bias.to(dtype), alpha.to(dtype), raw)  # [..., M]  alpha * raw + b (Eq. 7)


def _columns(n: int, alpha_pre: torch.Tensor, alpha_post: torch.Tensor, alpha_res: torch.Tensor,
             b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column alpha and bias of the 2n + n^2 logits (pre | post | res): ([M], [M])."""
    alpha = torch.cat([alpha_pre.expand(n), alpha_post.expand(n), alpha_res.expand(n * n)])
    bias = torch.cat([b_pre, b_post, b_res.flatten()])
    return alpha, bias


def mhc_pre_reference(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor,
                      alpha_post: torch.Tensor, alpha_res: torch.Tensor, b_pre: torch.Tensor,
                      b_post: torch.Tensor, b_res: torch.Tensor,
                      sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Everything MHCResidual computes before its branch, from the references (Eqs. 7-9, then H_pre S).

    streams [..., n, C], phi [nC, 2n + n^2], alpha_* [] (scalars), b_pre [n], b_post [n], b_res [n, n]
    -> (x [..., C] in the streams' dtype, h_post [..., n], h_res [..., n, n] in float32 at least).
    ``model.mhc_pre_triton.mhc_pre`` is the fused op of the same, forward and backward (tests compare).
    """
    n = streams.shape[-2]
    with torch.autocast(device_type=streams.device.type, enabled=False):
        alpha, bias = _columns(n, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)  # [M], [M]
        logits = mapping_logits(streams, phi, alpha, bias)  # [..., 2n + n^2]
        pre, post, res = logits.split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(pre)  # [..., n]
        h_post = 2.0 * torch.sigmoid(post)  # [..., n]
        h_res = sinkhorn_knopp(res.reshape(*res.shape[:-1], n, n), sinkhorn_iters, fused=False)  # [..., n, n]
        x = mix_in(h_pre.to(streams.dtype), streams, matmul=False)  # [..., C]
    return x, h_post, h_res


class MHCMappings(nn.Module):
    """H_pre, H_post, H_res of one layer from the current streams, Eqs. (7)-(9), per residue.

    Args:
        dim: C, channels per stream.
        n: number of streams (>= 2; n = 1 needs no mappings, see ``MHCResidual``).
        config: reads ``mhcAlphaInit`` and ``mhcSinkhornIters``.
    forward(streams [B, L, n, C]) -> (h_pre [B, L, n], h_post [B, L, n], h_res [B, L, n, n]),
    all float32 (at least).
    ``fused`` (default True): without gradients on CUDA the logits come from one Triton kernel
    (model/mhc_map_triton.py); False forces the reference ``mapping_logits`` (and keeps
    ``MHCResidual`` off its fused pre-branch, which does not call this module's forward).
    """

    def __init__(self, dim: int, n: int, config) -> None:
        super().__init__()
        if n < 2:
            raise ValueError(f"MHCMappings needs n >= 2 streams, got {n} (n = 1 is the plain residual)")
        self.dim, self.n = dim, n
        self.alpha_init = float(config.mhcAlphaInit)
        self.sinkhorn_iters = int(config.mhcSinkhornIters)
        # NOTE: phi_pre | phi_post | phi_res as one [nC, 2n + n^2] matrix: one GEMM (Eq. 14).
        self.phi = nn.Parameter(torch.empty(n * dim, 2 * n + n * n))
        self.alpha_pre = nn.Parameter(torch.empty(()))
        self.alpha_post = nn.Parameter(torch.empty(()))
        self.alpha_res = nn.Parameter(torch.empty(()))
        self.b_pre = nn.Parameter(torch.empty(n))
        self.b_post = nn.Parameter(torch.empty(n))
        self.b_res = nn.Parameter(torch.empty(n, n))
        self.fused = True  # without gradients on CUDA: model/mhc_map_triton.py (False: reference)
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
        - b_res = log(RES_DIAG_INIT (n-1) / (1 - RES_DIAG_INIT)) on the diagonal, 0 off it:
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
        diag = math.log(RES_DIAG_INIT * (n - 1) / (1.0 - RES_DIAG_INIT))
        self.b_res.copy_(torch.eye(n) * diag)

    def column_parameters(self) -> tuple[torch.Tensor, ...]:
        """(alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res): the arguments of ``mhc_pre``."""
        return self.alpha_pre, self.alpha_post, self.alpha_res, self.b_pre, self.b_post, self.b_res

    def forward(self, streams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.n
        with torch.autocast(device_type=streams.device.type, enabled=False):
            # Eq. 8's three maps alpha * raw + b over the 2n + n^2 columns at once (launch count:
            # the step is CPU-bound in mHC mode, every op of the 10 residuals costs host time).
            alpha, bias = _columns(n, *self.column_parameters())  # [2n + n^2] each
            # sampling (no gradient) on CUDA: norm, GEMM, scale and shift as one Triton kernel
            if self.fused and mhc_map_triton.available(streams, self.phi):
                logits = mhc_map_triton.mapping_logits(streams, self.phi, alpha, bias)  # [B, L, 2n + n^2]
            else:
                logits = mapping_logits(streams, self.phi, alpha, bias)  # [B, L, 2n + n^2]
            pre, post, res = logits.split([n, n, n * n], dim=-1)
            h_pre = torch.sigmoid(pre)  # [B, L, n]   (Eq. 8)
            h_post = 2.0 * torch.sigmoid(post)  # [B, L, n]
            h_res = sinkhorn_knopp(res.reshape(*res.shape[:-1], n, n), self.sinkhorn_iters)  # [B, L, n, n]
        return h_pre, h_post, h_res


def _mix(h: torch.Tensor, streams: torch.Tensor, matmul: bool) -> torch.Tensor:
    """h [B, L, m, n] times streams [B, L, n, C] -> [B, L, m, C], per residue.

    ``matmul``: one batched GEMM (the GPU path: one kernel each way instead of a [B, L, m, n, C]
    broadcast product and its reduction). Otherwise the broadcast multiply-sum, the reference and
    the CPU path (CPU bmm over B * L tiny matrices is a slow per-matrix loop). Tests compare them.
    On CUDA, MHCResidual normally runs neither: the fused kernels of model/mhc_mix_triton.py replace
    both mixings (forward and backward); this stays for shapes they do not take, float64,
    ``fused_mixing = False``, torch.compile and the CPU, and as the reference the tests compare with.
    """
    if matmul:
        return h @ streams
    return (h.unsqueeze(-1) * streams.unsqueeze(-3)).sum(dim=-2)


def mix_in(h_pre: torch.Tensor, streams: torch.Tensor, matmul: bool) -> torch.Tensor:
    """The branch input H_pre S: h_pre [B, L, n], streams [B, L, n, C] -> [B, L, C] (reference)."""
    return _mix(h_pre.unsqueeze(-2), streams, matmul).squeeze(-2)


def mix_out(h_res: torch.Tensor, h_post: torch.Tensor, streams: torch.Tensor, y: torch.Tensor,
            matmul: bool) -> torch.Tensor:
    """The new streams H_res S + H_post^T y: h_res [B, L, n, n], h_post [B, L, n], y [B, L, C] ->
    [B, L, n, C] (reference)."""
    return torch.addcmul(_mix(h_res, streams, matmul), h_post.unsqueeze(-1), y.unsqueeze(-2))


class MHCResidual(nn.Module):
    """Eq. (3) around any branch: S <- H_res S + H_post^T branch(H_pre S, *args, **kwargs).

    Args:
        branch: any module y = f(x, ...) with x, y [B, L, C]; extra arguments (pair tensor or
            factors, frames, mask, ...) are passed through untouched.
        dim: C.
        config: reads ``mhcExpansionRate`` (n), ``mhcAlphaInit``, ``mhcSinkhornIters``.
        n: overrides ``config.mhcExpansionRate`` (keyword only).
    forward(streams [B, L, n, C], *args, **kwargs) -> [B, L, n, C] in the streams' dtype.

    With n = 1 there are no mappings (H_pre = H_post = H_res = 1) and the forward is literally
    ``S + f(S[..., 0, :])[..., None, :]``: bit-identical to the plain residual s + f(s).
    After each forward ``last_h_res`` holds the detached H_res [B, L, n, n] (float32) for
    ``mhc_diagnostics``; set ``record = False`` to skip that (e.g. under torch.compile / serving).
    On CUDA (``fused_pre``, ``fused_mixing`` and ``mappings.fused`` all True, the default) everything
    before the branch (the mappings and H_pre S) is one fused op, forward and backward
    (model/mhc_pre_triton.py; its reference is ``mhc_pre_reference``); ``fused_pre = False`` keeps
    ``MHCMappings`` and the separate mixing kernel (A/B benchmarks).
    """

    def __init__(self, branch: nn.Module, dim: int, config, *, n: int | None = None) -> None:
        super().__init__()
        self.branch = branch
        self.dim = dim
        self.n = int(config.mhcExpansionRate if n is None else n)
        if self.n < 1:
            raise ValueError(f"MHCResidual: mhcExpansionRate must be >= 1, got {self.n}")
        self.mappings = MHCMappings(dim, self.n, config) if self.n > 1 else None
        self.record = True
        self.last_h_res: torch.Tensor | None = None
        self.matmul_mixing: bool | None = None  # None: batched GEMM on CUDA, broadcast sums on CPU
        self.fused_mixing = True  # on CUDA, training too: model/mhc_mix_triton.py (False: reference)
        # with fused_mixing and mappings.fused: mappings + H_pre S as one op, model/mhc_pre_triton.py
        # (False: MHCMappings, then the mixing kernel, as before)
        self.fused_pre = True
        # with fused_pre: H_res's Sinkhorn as its own kernel after the pre-branch kernel
        # (mhc_pre_triton.mhc_pre_split), on a side stream overlapping the branch without gradient below
        # mhc_pre_triton.OVERLAP_BELOW residues (False: inside the pre-branch kernel, as before; A/B)
        self.split_sinkhorn = True

    def forward(self, streams: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self._update(streams, args, kwargs, with_mean=False)

    def forward_with_mean(self, streams: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(forward(streams, ...), contract(of that))``: the new streams and their mean [B, L, C], which
        the structure layer's backbone update reads. On the fused path the mean comes from the kernel
        that writes the streams (``mhc_mix_triton.mix_out(with_mean=True)``): one pass fewer over the
        streams forward, and no separate broadcast-and-add of its gradient backward."""
        return self._update(streams, args, kwargs, with_mean=True)

    def _update(self, streams: torch.Tensor, args: tuple, kwargs: dict, *, with_mean: bool):
        if streams.shape[-2:] != (self.n, self.dim):
            raise ValueError(f"MHCResidual: expected streams [..., {self.n}, {self.dim}], "
                             f"got {tuple(streams.shape)}")
        if self.mappings is None:  # n = 1: the plain residual, exactly
            y = self.branch(streams[..., 0, :], *args, **kwargs)  # [B, L, C]
            if self.record:
                self.last_h_res = torch.ones(*streams.shape[:-2], 1, 1, device=streams.device)
            out = streams + y.unsqueeze(-2)
            return (out, contract(out)) if with_mean else out
        dt = streams.dtype
        # NOTE: stream mixing outside autocast, in the streams' dtype (float32 in training), so the
        # residual stream is never rounded to bf16 (the plain residual s + y promotes the same way).
        matmul = streams.is_cuda if self.matmul_mixing is None else self.matmul_mixing
        # on CUDA: one fused Triton kernel per mixing (model/mhc_mix_triton.py), in sampling and, through
        # its autograd Functions (one backward kernel each), in training; the reference where it cannot run
        fused = self.fused_mixing and mhc_mix_triton.available(streams)
        maps = self.mappings
        pending = None  # H_res from mhc_pre_split (its Sinkhorn perhaps still running on a side stream)
        if fused and self.fused_pre and maps.fused and mhc_pre_triton.available(streams, maps.phi):
            # mappings and H_pre S as one kernel each way (model/mhc_pre_triton.py)
            if streams.stride(-2) == 0:  # expand's view (the first layer): copied once here, not by both ops
                streams = streams.contiguous()
            params = maps.column_parameters()
            with torch.autocast(device_type=streams.device.type, enabled=False):
                if self.split_sinkhorn:
                    side = not needs_grad(streams, *maps.parameters()) and mhc_pre_triton.overlap_pays(streams)
                    x, h_post, pending = mhc_pre_triton.mhc_pre_split(streams, maps.phi, *params,
                                                                      maps.sinkhorn_iters, side_stream=side)
                    h_res = None
                else:
                    x, h_post, h_res = mhc_pre_triton.mhc_pre(streams, maps.phi, *params,
                                                              maps.sinkhorn_iters)  # [B, L, C], [B, L, n], [B, L, n, n]
        else:
            h_pre, h_post, h_res = maps(streams)  # [B, L, n], [B, L, n], [B, L, n, n]
            with torch.autocast(device_type=streams.device.type, enabled=False):
                h_pre = h_pre.to(dt)
                x = mhc_mix_triton.mix_in(h_pre, streams) if fused else mix_in(h_pre, streams, matmul)  # [B, L, C]
        if self.record and pending is None:
            self.last_h_res = h_res.detach()
        y = self.branch(x, *args, **kwargs)  # [B, L, C]
        if pending is not None:
            h_res = pending.wait()  # [B, L, n, n]
            if self.record:
                self.last_h_res = h_res.detach()
        with torch.autocast(device_type=streams.device.type, enabled=False):
            h_res, h_post, y = h_res.to(dt), h_post.to(dt), y.to(dt)
            if fused:  # [B, L, n, C] (and its mean [B, L, C] from the same kernel)
                return mhc_mix_triton.mix_out(h_res, h_post, streams, y, with_mean=with_mean)
            out = mix_out(h_res, h_post, streams, y, matmul)  # H_res S + H_post^T y
            return (out, contract(out)) if with_mean else out


def is_mean_readout(readout) -> bool:
    """True for the mean read-out (``contract`` or a ``MeanReadout``), which ``MHCResidual.forward_with_mean``
    computes together with the streams."""
    return readout is contract or isinstance(readout, MeanReadout)


class MeanReadout(nn.Module):
    """The user's read-out: [B, L, n, C] -> [B, L, C] by a mean over streams (no parameters)."""

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        return contract(streams)


class GatedReadout(nn.Module):
    """Learned gated sum of the streams (``mhcReadout gated``): [B, L, n, C] -> [B, L, C].

    NOTE: our own form (the official code's learned sum is not specified in the paper): an H_pre
    mapping of Eqs. (7)-(8), w = sigmoid(alpha (x' phi_out) + b_out), out = sum_i w_i S_i, with
    b_out = logit(1/n) so that it starts as the mean read-out (up to O(alpha)). With n = 1 it is
    the identity read-out S[..., 0, :].
    """

    def __init__(self, dim: int, n: int, config) -> None:
        super().__init__()
        self.dim, self.n = dim, n
        self.alpha_init = float(config.mhcAlphaInit)
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
        cdt = _compute_dtype(dt, self.phi_out.dtype)
        with torch.autocast(device_type=streams.device.type, enabled=False):
            x = _rms_normalize(streams.reshape(*streams.shape[:-2], -1).to(cdt))  # [B, L, nC]
            w = torch.sigmoid(self.alpha_out * (x @ self.phi_out.to(cdt)) + self.b_out)  # [B, L, n]
            return (w.to(dt).unsqueeze(-1) * streams).sum(dim=-2)  # [B, L, C]


def build_readout(dim: int, config, *, n: int | None = None) -> nn.Module:
    """``config.mhcReadout`` "mean" (default) -> MeanReadout, "gated" -> GatedReadout."""
    n = int(config.mhcExpansionRate if n is None else n)
    kind = getattr(config, "mhcReadout", "mean")
    if kind == "mean":
        return MeanReadout()
    if kind == "gated":
        return GatedReadout(dim, n, config)
    raise ValueError(f"mhcReadout must be 'mean' or 'gated', got {kind!r}")


def find_mhc_modules(model: nn.Module) -> list[MHCResidual]:
    """All MHCResidual modules of ``model`` in registration order (= depth order for a ModuleList)."""
    return [m for m in model.modules() if isinstance(m, MHCResidual)]


def mhc_diagnostics(source: nn.Module | Sequence[nn.Module] | Sequence[torch.Tensor],
                    mask: torch.Tensor | None = None) -> dict[str, float]:
    """Stability numbers of the recorded H_res over depth (the paper's Figs. 3 and 7).

    Args:
        source: a model (its MHCResidual modules are found in order), a list of MHCResidual
            modules (their ``last_h_res``), or a list of H_res tensors [..., n, n] in depth order
            with a common leading shape (e.g. [B, L]).
        mask: optional [...] (e.g. [B, L]); 1 real residue, 0 padding. Padding is excluded.
    Returns (floats; empty dict when nothing has been recorded):
        row_sum_err_max / col_sum_err_max: max over layers and residues of |row (col) sum - 1|.
        amax_gain_fwd: composite P = H_res^(D) ... H_res^(1) (Eq. 4 over the whole depth) per
            residue; max_i |sum_j P_ij| (forward signal gain), averaged over real residues (the
            paper averages over the tokens of a sequence).
        amax_gain_bwd: the same with column sums (backward gradient gain).
        amax_gain: max(fwd, bwd); amax_gain_worst: max over residues instead of the mean.
        single_gain_max: max over layers of the per-layer gain (mean over residues).
        num_layers, num_streams.
    The paper reports amax_gain ~1.6 for mHC and ~3000 for unconstrained HC at 27B.
    NOTE: each MHCResidual keeps only its last call, so with shared weights applied several times
    per forward (``numStructureBlocks`` > 1) the composite covers the last application only.
    """
    if isinstance(source, nn.Module):
        source = find_mhc_modules(source)
    mats: list[torch.Tensor] = []
    for item in source:
        h = item.last_h_res if isinstance(item, MHCResidual) else item
        if h is not None:
            mats.append(h.detach())
    if not mats:
        return {}
    with torch.no_grad(), torch.autocast(device_type=mats[0].device.type, enabled=False):
        mats = [h.double() for h in mats]
        lead = mats[0].shape[:-2]
        weight = torch.ones(lead, dtype=torch.float64, device=mats[0].device)  # [...]
        if mask is not None:
            weight = weight * mask.to(weight)  # [...] (broadcast)
        keep = weight > 0
        if not bool(keep.any()):
            return {}
        total = weight[keep].sum()

        def gains(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fwd = m.sum(dim=-1).abs().amax(dim=-1)  # [...] max abs row sum
            bwd = m.sum(dim=-2).abs().amax(dim=-1)  # [...] max abs column sum
            return fwd, bwd

        def wmean(v: torch.Tensor) -> float:
            return float((v * weight)[keep].sum() / total)

        row_err = max(float((h.sum(-1) - 1).abs().amax(-1)[keep].max()) for h in mats)
        col_err = max(float((h.sum(-2) - 1).abs().amax(-1)[keep].max()) for h in mats)
        single = max(max(wmean(g) for g in gains(h)) for h in mats)
        composite = mats[0]
        for h in mats[1:]:
            composite = h @ composite  # [..., n, n]  H^(l) ... H^(1)
        fwd, bwd = gains(composite)
        out = {
            "row_sum_err_max": row_err,
            "col_sum_err_max": col_err,
            "amax_gain_fwd": wmean(fwd),
            "amax_gain_bwd": wmean(bwd),
            "amax_gain_worst": float(torch.maximum(fwd, bwd)[keep].max()),
            "single_gain_max": single,
            "num_layers": float(len(mats)),
            "num_streams": float(mats[0].shape[-1]),
        }
        out["amax_gain"] = max(out["amax_gain_fwd"], out["amax_gain_bwd"])
        return out

