"""Fused mHC mapping logits for sampling: RMSNorm(vec(S)) phi, scaled and shifted, as one Triton kernel.

The reference is ``model.mhc.mapping_logits`` (what ``MHCMappings.forward`` computes before the
sigmoids and Sinkhorn, Eqs. 7-8 and 14): an RMSNorm pass over x = vec(S) [N, nC], then x' phi with
phi [nC, 2n + n^2] in float32 and an ``addcmul``; that float32 GEMM runs on CUDA cores (cutlass SIMT
sgemm). Measured on the H100 (``benchmarks/mhc_cost.py``, graphed, n = 4, C = 128): 95 us per call at
32,768 residues for the reference, 46 us for this kernel, which reads each residue's streams once, in
their own dtype, accumulates x phi on tensor cores in tf32x3 (~float32 accuracy) and sum(x^2) beside
it, and writes bias + alpha * (x phi) / rms(x): the normalisation moved after the GEMM, as the paper's
Eqs. 14-16 do (``model/_mhc_map_kernels.py``).

Forward only: used when no gradient is needed (sampling under ``torch.no_grad``); training keeps the
reference, whose gradients autograd provides. (The kernel with a PyTorch backward was tried in
training: no faster, BENCHMARKS.md.) nC must be a multiple of ``BLOCK_K`` (32; n = 4 and
C_s = 128 give 512) and phi [nC, M] with M <= 128; other shapes, float64, and CPU tensors without
``TRITON_INTERPRET=1`` take the reference. Imported lazily, like ``model.sinkhorn_triton``.
"""

from __future__ import annotations

import functools

import torch

from model.mhc.kernels.support import FLOAT_DTYPES, dot_width, triton_can_run

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


@functools.cache
def _kernel():
    """The Triton kernel; Triton is imported here, never at package import."""
    from model.mhc.kernels import _map_triton as k

    return k.mapping_logits_kernel


def available(streams: torch.Tensor, phi: torch.Tensor) -> bool:
    """True when the kernel can run for ``streams`` [..., n, C] and ``phi`` [nC, M]: CUDA (or CPU under
    ``TRITON_INTERPRET=1``), streams float32 / 16-bit, phi not float64, nC a multiple of ``BLOCK_K``,
    M <= ``MAX_COLS``, no gradient needed, Triton importable."""
    if streams.dim() < 2 or phi.dim() != 2 or torch.is_grad_enabled():
        return False
    k = streams.shape[-2] * streams.shape[-1]
    if phi.shape[0] != k or k % BLOCK_K or dot_width(phi.shape[1]) > MAX_COLS:
        return False
    if streams.dtype not in FLOAT_DTYPES or phi.dtype == torch.float64 or phi.device != streams.device:
        return False
    return triton_can_run(streams)


def mapping_logits(streams: torch.Tensor, phi: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor, *,
                   block_m: int | None = None, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
                   precision: str = PRECISION) -> torch.Tensor:
    """streams [..., n, C], phi [nC, M], alpha [M], bias [M] -> bias + alpha * RMSNorm(vec(S)) phi [..., M]
    (float32). The keywords are the kernel's tiling and ``tl.dot`` precision (``benchmarks/mhc_cost.py``
    times the choices; nC must be a multiple of ``block_k``)."""
    k, m = phi.shape
    x = streams.reshape(-1, k).contiguous()  # [N, nC] in the streams' dtype (expand views get copied here)
    w = phi.float().contiguous()  # [nC, M]
    out = torch.empty(*streams.shape[:-2], m, device=streams.device, dtype=torch.float32)
    count = x.shape[0]
    if block_m is None:
        block_m = BLOCK_M_LARGE if count >= LARGE_COUNT else BLOCK_M
    if count:
        from model.mhc import RMS_EPS  # NOTE: here, not at the top: model.mhc imports this module

        _kernel()[(-(-count // block_m),)](x, w, alpha.float().contiguous(), bias.float().contiguous(), out,
                                            count, RMS_EPS, K=k, M=m, MP=dot_width(m), BLOCK_M=block_m,
                                            BLOCK_K=block_k, PRECISION=precision, num_warps=num_warps)
    return out
