"""Fused mHC mapping logits: RMSNorm(vec(S)) phi, scaled and shifted, as one Triton kernel (+ gradients).

The reference is ``model.mhc.mapping_logits`` (what ``MHCMappings.forward`` computes before the
sigmoids and Sinkhorn, Eqs. 7-8 and 14): an RMSNorm pass over x = vec(S) [N, nC], then x' phi with
phi [nC, 2n + n^2] in float32 and an ``addcmul``. Measured on the H100 (``benchmarks/mhc_cost.py``):
that float32 GEMM runs on CUDA cores (cutlass SIMT sgemm), 95 us per call at 32,768 residues with the
norm and the affine. This kernel reads each residue's streams once, in their own dtype, accumulates
x phi on tensor cores in tf32x3 (~float32 accuracy) and sum(x^2) beside it, and writes
bias + alpha * (x phi) / rms(x): the normalisation moved after the GEMM, as the paper's Eqs. 14-16 do
(``model/_mhc_map_kernels.py``): 46 us.

Sampling (no gradient): the kernel alone. Training: ``_Projection``, an autograd Function whose
forward is the same kernel and whose backward is a few PyTorch ops (its docstring has the math).
nC must be a multiple of ``BLOCK_K`` (32; n = 4 and C_s = 128 give 512) and phi [nC, M] with M <= 128;
other shapes, float64, torch.compile, and CPU tensors without ``TRITON_INTERPRET=1`` take the
reference. Imported lazily, like ``model.sinkhorn_triton``.
"""

from __future__ import annotations

import functools

import torch

from model.triton_support import triton_can_run

__all__ = ["available", "mapping_logits"]

# Tiling measured on the H100 (benchmarks/mhc_cost.py, tf32x3, n = 4, C = 128): 4,032 residues 14.3 us
# at 32 x 32 (64 x 64: 16.9 us), 32,768 residues 45.0 us at 128 x 32 (32 x 64: 81.9 us).
BLOCK_M = 32  # residues per program below LARGE_COUNT residues
BLOCK_M_LARGE = 128  # residues per program from LARGE_COUNT residues on
LARGE_COUNT = 16384
BLOCK_K = 32  # channels of vec(S) per loop step (nC must be a multiple)
NUM_WARPS = 4
PRECISION = "tf32x3"  # tl.dot input precision
MAX_COLS = 128  # padded 2n + n^2 columns held per program (n <= 10)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _kernel():
    """The Triton kernel; Triton is imported here, never at package import."""
    from model import _mhc_map_kernels as k

    return k.mapping_logits_kernel


def _padded_cols(m: int) -> int:
    """2n + n^2 columns padded to a power of two >= 16 (``tl.dot``'s smallest tile side)."""
    return max(16, 1 << (m - 1).bit_length())


def available(streams: torch.Tensor, phi: torch.Tensor) -> bool:
    """True when the kernel can run for ``streams`` [..., n, C] and ``phi`` [nC, M]: CUDA (or CPU under
    ``TRITON_INTERPRET=1``), streams float32 / 16-bit, phi not float64, nC a multiple of ``BLOCK_K``,
    M <= ``MAX_COLS``, Triton importable (with or without gradients)."""
    if streams.dim() < 2 or phi.dim() != 2:
        return False
    k = streams.shape[-2] * streams.shape[-1]
    if phi.shape[0] != k or k % BLOCK_K or _padded_cols(phi.shape[1]) > MAX_COLS:
        return False
    if streams.dtype not in _DTYPES or phi.dtype == torch.float64 or phi.device != streams.device:
        return False
    return triton_can_run(streams)


def _launch(x: torch.Tensor, w: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
            inv: torch.Tensor | None, block_m: int | None, block_k: int, num_warps: int, precision: str) -> None:
    """x [N, K] (streams' dtype), w [K, M] float32, alpha / bias [M] float32 -> out [N, M] (and inv [N])."""
    count, (k, m) = x.shape[0], w.shape
    if block_m is None:
        block_m = BLOCK_M_LARGE if count >= LARGE_COUNT else BLOCK_M
    if count:
        from model.mhc import RMS_EPS  # NOTE: here, not at the top: model.mhc imports this module

        _kernel()[(-(-count // block_m),)](x, w, alpha, bias, out, out if inv is None else inv, count, RMS_EPS,
                                           K=k, M=m, MP=_padded_cols(m), BLOCK_M=block_m, BLOCK_K=block_k,
                                           PRECISION=precision, STORE_INV=inv is not None, num_warps=num_warps)


class _Projection(torch.autograd.Function):
    """raw = RMSNorm(vec(S)) phi with gradients (training): the kernel forward, a PyTorch backward.

    With u = x phi and inv = rsqrt(mean(x^2) + eps) per residue, raw = u inv, so for g = dL/draw:
        du = g inv,  dphi = x^T du,  dx = du phi^T - (sum_j g_j raw_j) inv^2 x / K.
    NOTE: the two backward GEMMs run in ``gemm_dtype``: the autocast dtype when the caller runs under
    autocast (bf16 in training: tensor cores, as autocast gives every other weight gradient), float32
    otherwise. The reference's float32 GEMMs ran on CUDA cores, 0.14 ms per residual and training step
    on the H100 (BENCHMARKS.md). The forward (the logits Sinkhorn exponentiates) stays tf32x3.
    """

    @staticmethod
    def forward(ctx, streams: torch.Tensor, phi: torch.Tensor, gemm_dtype: torch.dtype) -> torch.Tensor:
        k, m = phi.shape
        x = streams.reshape(-1, k).contiguous()  # [N, K] (a view unless expand()'s stride-0 copies)
        w = phi.float().contiguous()  # [K, M]
        raw = torch.empty(x.shape[0], m, device=x.device, dtype=torch.float32)  # [N, M]
        inv = torch.empty(x.shape[0], device=x.device, dtype=torch.float32)  # [N]
        ones, zeros = torch.ones(m, device=x.device), torch.zeros(m, device=x.device)
        _launch(x, w, ones, zeros, raw, inv, None, BLOCK_K, NUM_WARPS, PRECISION)
        ctx.save_for_backward(x, w, raw, inv)
        ctx.gemm_dtype, ctx.streams_shape, ctx.streams_dtype, ctx.phi_dtype = (
            gemm_dtype, streams.shape, streams.dtype, phi.dtype)
        return raw.reshape(*streams.shape[:-2], m)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_raw: torch.Tensor):
        x, w, raw, inv = ctx.saved_tensors
        g = grad_raw.reshape(raw.shape).float()  # [N, M]
        du = g * inv[:, None]  # [N, M]
        gd = ctx.gemm_dtype
        grad_streams = grad_phi = None
        if ctx.needs_input_grad[1]:
            grad_phi = (x.to(gd).t() @ du.to(gd)).to(ctx.phi_dtype)  # [K, M]
        if ctx.needs_input_grad[0]:
            coef = (g * raw).sum(-1) * inv * inv / x.shape[1]  # [N]
            gx = torch.addcmul((du.to(gd) @ w.to(gd).t()).float(), coef[:, None], x.float(), value=-1.0)  # [N, K]
            grad_streams = gx.to(ctx.streams_dtype).reshape(ctx.streams_shape)
        return grad_streams, grad_phi, None


def mapping_logits(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, *,
                   gemm_dtype: torch.dtype = torch.float32, block_m: int | None = None, block_k: int = BLOCK_K,
                   num_warps: int = NUM_WARPS, precision: str = PRECISION) -> torch.Tensor:
    """streams [..., n, C], phi [nC, M], alpha [M], bias [M] -> bias + alpha * RMSNorm(vec(S)) phi [..., M]
    (float32). Without gradients: one kernel (the keywords are its tiling and ``tl.dot`` precision;
    ``benchmarks/mhc_cost.py`` times the choices; nC must be a multiple of ``block_k``). With gradients
    (streams or phi require grad): the kernel computes RMSNorm(vec(S)) phi, autograd takes it from there
    (``_Projection``, backward GEMMs in ``gemm_dtype``), and alpha / bias are applied by an ``addcmul``."""
    k, m = phi.shape
    if torch.is_grad_enabled() and (streams.requires_grad or phi.requires_grad):
        raw = _Projection.apply(streams, phi, gemm_dtype)  # [..., M]
        return torch.addcmul(bias.float(), alpha.float(), raw)
    x = streams.reshape(-1, k).contiguous()  # [N, nC] in the streams' dtype (expand views get copied here)
    out = torch.empty(*streams.shape[:-2], m, device=streams.device, dtype=torch.float32)
    _launch(x, phi.float().contiguous(), alpha.float().contiguous(), bias.float().contiguous(), out, None,
            block_m, block_k, num_warps, precision)
    return out
