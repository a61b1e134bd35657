"""Fused Sinkhorn-Knopp for mHC's H_res: one Triton kernel forward, one backward.

The reference is ``model.mhc.reference.sinkhorn_knopp`` (a PyTorch loop: 2 kernels per half iteration,
so ~80 forward and ~160 backward launches for ``mhcSinkhornIters`` 20, per mHC residual and step).
Measured on the H100 (BENCHMARKS.md): mHC with that loop cost +24 % of the shipped model's training
step and +30 % of a batch-1 sampling step. The fused pre-branch (``pre.fused_pre``) writes the H_res
logits and runs this kernel on them: its own autograd node in training (``sinkhorn_fused``), the bare
forward kernel on a side stream when sampling small batches (``sinkhorn_into``).

Same math as the reference, per [n, n] matrix of logits z, in float64 registers:

    z <- CAP tanh(z / CAP) if CAP > 0 (``reference.cap_logits``, ``mhcResLogitCap``)
    m_0 = exp(max(z - max(z), -FLOOR));  m <- m / colsum(m);  m <- m / rowsum(m)   (ITERS times)

Backward: the half step y = m / s (s the column or row sums of m) has the vector-Jacobian product
g_m = (g_y - sum_{along s} g_y * y) / s, and m = y * s. The backward kernel reruns the forward from z
(2 ITERS half steps in registers), writing each half step's sums to a float64 scratch [count, 2 ITERS,
n] (n values per matrix and half step; allocated for the call, nothing kept between forward and
backward), then walks the half steps backwards, recovering each m_k from m_{k+1} and its sums. Finally
g_z = g_m0 * m_0 where z - max(z) > -FLOOR (the max shift is detached: Sinkhorn is invariant to it),
times the cap's derivative 1 - tanh^2.
NOTE: recomputing m_k from m_0 for every k instead (O(ITERS^2) half steps, no scratch) took 1.9 ms per
call on the H100, 7.5 % of the shipped model's training step.

One program handles BLOCK matrices; n * n must be a power of two (the fused pre-branch's condition).
Triton is imported lazily (``_kernels``).
"""

from __future__ import annotations

import functools

import torch

from model.mhc.reference import SINKHORN_LOGIT_FLOOR

__all__ = ["sinkhorn_fused", "sinkhorn_into", "sinkhorn_vjp"]

# NOTE: 16, not 64: a training batch has only ~4,000 matrices per call (56 x 72 residues), and 64 per
# program left most of the H100's 132 SMs idle behind a 40-half-step dependency chain (backward
# 80 us per call, BENCHMARKS.md); sampling batches (32,768 matrices) fill the card either way.
BLOCK = 16  # matrices per program
NUM_WARPS = 4  # warps per program (Triton's default)


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels; Triton is imported here, never at package import."""
    from model.mhc.kernels import _sinkhorn_triton as k

    return k.forward_kernel, k.backward_kernel


def _launch(kernel, count: int, *tensors, iters: int, n: int, cap: float, block: int | None = None,
            num_warps: int | None = None) -> None:
    """One program per ``block`` matrices (default ``BLOCK``, ``NUM_WARPS``: read at each call)."""
    block = BLOCK if block is None else block
    num_warps = NUM_WARPS if num_warps is None else num_warps
    grid = (max(1, -(-count // block)),)
    kernel[grid](*tensors, count, ITERS=iters, N=n, FLOOR=SINKHORN_LOGIT_FLOOR, CAP=max(0.0, float(cap)),
                 BLOCK=block, num_warps=num_warps)


class _SinkhornFused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, iters: int, cap: float, tiling: tuple[int, int]) -> torch.Tensor:
        z = logits.detach().float().contiguous()  # [..., n, n]
        block, warps = tiling
        out = sinkhorn_into(z, torch.empty_like(z), iters, cap=cap, block=block, num_warps=warps)
        ctx.save_for_backward(z)
        ctx.iters, ctx.cap, ctx.tiling = iters, cap, tiling
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (z,) = ctx.saved_tensors
        block, warps = ctx.tiling
        return sinkhorn_vjp(z, grad_out, ctx.iters, cap=ctx.cap, block=block, num_warps=warps), None, None, None


def sinkhorn_vjp(z: torch.Tensor, grad_out: torch.Tensor, num_iters: int, *, cap: float = 0.0,
                 block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The backward kernel alone: the gradient of the logits z [..., n, n] (float32, contiguous) of
    :func:`sinkhorn_fused`, given the output's gradient [..., n, n]; float32."""
    grad = torch.empty_like(z)
    count, n = z.numel() // (z.shape[-1] ** 2), z.shape[-1]
    if count:
        sums = torch.empty(count, 2 * num_iters, n, dtype=torch.float64, device=z.device)  # scratch
        _launch(_kernels()[1], count, z, grad_out.float().contiguous(), grad, sums, iters=num_iters, n=n,
                cap=cap, block=block, num_warps=num_warps)
    return grad


def sinkhorn_into(z: torch.Tensor, out: torch.Tensor, num_iters: int, *, cap: float = 0.0,
                  block: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """The forward kernel alone, without autograd: writes Sinkhorn(z) into ``out`` (both [..., n, n]
    float32, contiguous, the same shape), exactly what :func:`sinkhorn_fused` returns. For callers that
    own the buffers and need no gradient: the fused pre-branch's sampling path runs it on a side
    stream. Returns ``out``."""
    for name, t in (("z", z), ("out", out)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != z.shape:
            raise ValueError(f"sinkhorn_into: {name} must be contiguous float32 of z's shape "
                             f"{list(z.shape)}, got {t.dtype} {list(t.shape)} strides {t.stride()}")
    count, n = z.numel() // (z.shape[-1] ** 2), z.shape[-1]
    if count:
        _launch(_kernels()[0], count, z, out, iters=num_iters, n=n, cap=cap, block=block, num_warps=num_warps)
    return out


def sinkhorn_fused(logits: torch.Tensor, num_iters: int, *, cap: float = 0.0, block: int | None = None,
                   num_warps: int | None = None) -> torch.Tensor:
    """``sinkhorn_knopp`` as one kernel each way: logits [..., n, n] (fp32 / bf16 / fp16) -> H_res
    [..., n, n] float32; ``cap`` as ``sinkhorn_knopp``'s. ``block`` (matrices per program, a power of two) and ``num_warps``: the tiling,
    forward and backward (``benchmarks/mhc_cost.py`` times the choices)."""
    tiling = (BLOCK if block is None else int(block), NUM_WARPS if num_warps is None else int(num_warps))
    return _SinkhornFused.apply(logits, int(num_iters), max(0.0, float(cap)), tiling)
