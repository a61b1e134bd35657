"""Fused mHC stream mixing for sampling: H_pre S and H_res S + H_post^T y, one Triton kernel each.

The reference is ``model.mhc.mix_in`` / ``mix_out``: on CUDA two batched GEMMs with K = n = 4 (one
[n, n] or [1, n] matrix per residue) and an ``addcmul``. Measured on the H100 (BENCHMARKS.md, profile of
a 256 x 128 sampling step of the shipped pair-free model): those GEMMs are 1.23 ms of the step, about
half of what mHC costs there. These kernels read the residue's streams once, keep them in registers and
write the result once (``model/_mhc_mix_kernels.py``).

Forward only: used when no gradient is needed (sampling under ``torch.no_grad``); training keeps the
reference, whose gradients autograd provides. n and C must be powers of two (mhcExpansionRate 4 and
C_s = 128 are); other shapes, float64, and CPU tensors without ``TRITON_INTERPRET=1`` take the reference.
Imported lazily, like ``model.sinkhorn_triton``.
"""

from __future__ import annotations

import functools

import torch

from model.triton_support import triton_can_run

__all__ = ["available", "mix_in", "mix_out"]

BLOCK = 8  # residues per program: their [8, n, C] streams stay in registers


@functools.cache
def _kernels():
    """(mix_in, mix_out) Triton kernels; Triton is imported here, never at package import."""
    from model import _mhc_mix_kernels as k

    return k.mix_in_kernel, k.mix_out_kernel


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def available(streams: torch.Tensor) -> bool:
    """True when the kernels can run for ``streams`` [..., n, C]: CUDA (or CPU under
    ``TRITON_INTERPRET=1``), float32 / 16-bit, n and C powers of two, no gradient needed, Triton importable."""
    n, c = streams.shape[-2:]
    if not (_pow2(n) and _pow2(c)) or streams.dtype == torch.float64 or torch.is_grad_enabled():
        return False
    return triton_can_run(streams)


def _grid(count: int) -> tuple[int]:
    return (max(1, -(-count // BLOCK)),)


def mix_in(h_pre: torch.Tensor, streams: torch.Tensor) -> torch.Tensor:
    """h_pre [..., n], streams [..., n, C] -> H_pre S [..., C] (the streams' dtype)."""
    n, c = streams.shape[-2:]
    s = streams.contiguous()
    h = h_pre.to(s.dtype).contiguous()
    out = torch.empty(*s.shape[:-2], c, device=s.device, dtype=s.dtype)
    count = s.numel() // (n * c)
    if count:
        _kernels()[0][_grid(count)](h, s, out, count, N=n, C=c, BLOCK=BLOCK)
    return out


def mix_out(h_res: torch.Tensor, h_post: torch.Tensor, streams: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h_res [..., n, n], h_post [..., n], streams [..., n, C], y [..., C] -> H_res S + H_post^T y [..., n, C]."""
    n, c = streams.shape[-2:]
    s = streams.contiguous()
    out = torch.empty_like(s)
    count = s.numel() // (n * c)
    if count:
        _kernels()[1][_grid(count)](h_res.to(s.dtype).contiguous(), h_post.to(s.dtype).contiguous(), s,
                                    y.to(s.dtype).contiguous(), out, count, N=n, C=c, BLOCK=BLOCK)
    return out
