"""Fused mHC stream mixing after the branch: H_res S + H_post^T y (and the new streams' mean), one Triton
kernel forward and one backward.

The reference is ``model.mhc.reference.mix_out`` (then ``contract`` for the mean): on CUDA a batched
GEMM with K = n = 4 (one [n, n] matrix per residue) and an ``addcmul``, and in training their backward
(more batched GEMMs, plus the elementwise and reduction kernels of the ``addcmul`` and broadcast
gradients). Measured on the H100: in a CUDA-graphed training step of the pair-free model (56 x 72
residues, n = 4, C = 128, float32 streams) the ``aten::bmm`` of the two mixings, forward and backward,
was +640 us (30 calls), mHC's largest item; these kernels read the residue's streams once, keep them
in registers and write the result once (``_mix_triton.py``). (The branch input H_pre S is computed by
the fused pre-branch kernel, ``pre.py``.)

``mix_out`` launches the forward kernel directly when no gradient is needed (sampling under
``torch.no_grad``: no autograd node, nothing saved), and goes through the autograd Function ``MixOut``
when one is (training). Its backward is one kernel, the vector-Jacobian product of
out = H_res S + H_post^T y, per residue r (g the output gradient, plus the mean's g_mean / n):

    gS[r, k, c] = sum_i h_res[r, i, k] g[r, i, c]   gh_res[r, i, k] = sum_c g[r, i, c] S[r, k, c]
    gh_post[r, i] = sum_c g[r, i, c] y[r, c]        gy[r, c] = sum_i h_post[r, i] g[r, i, c]

The backward is not differentiable again (``once_differentiable``: no double backward). Sums run in
float32; results are stored in the inputs' dtype (float32 streams in training; bf16 / fp16 work too).
CUDA-graph safe: the host only reads shapes, outputs and gradients come from ``torch.empty``, nothing
syncs. n and C must be powers of two (the fused pre-branch's condition implies it). Triton is imported
lazily (``_kernels``).
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from model.mhc.kernels.support import needs_grad

__all__ = ["MixOut", "mix_out"]

BLOCK = 8  # residues per program: their [8, n, C] streams stay in registers


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels; Triton is imported here, never at package import."""
    from model.mhc.kernels import _mix_triton as k

    return k.mix_out_kernel, k.mix_out_backward_kernel


def _launch(kernel, count: int, *tensors, n: int, c: int, **flags: bool) -> None:
    """One program per BLOCK residues; ``flags`` are the kernel's boolean constexprs (MEAN, GRAD_OUT, ...)."""
    if count:
        kernel[(max(1, -(-count // BLOCK)),)](*tensors, count, N=n, C=c, BLOCK=BLOCK, **flags)


def _check(streams: torch.Tensor, **others: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """The kernels index every tensor by the streams' residues (no broadcasting): check the shapes."""
    lead = tuple(streams.shape[:-2])
    for name, (t, tail) in others.items():
        if tuple(t.shape) != lead + tail:
            raise ValueError(f"mix_out: {name} must be {list(lead + tail)} for streams "
                             f"{list(streams.shape)}, got {list(t.shape)}")


def _forward(h_res: torch.Tensor, h_post: torch.Tensor, s: torch.Tensor, y: torch.Tensor,
             with_mean: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """h_res [..., n, n], h_post [..., n], s [..., n, C], y [..., C] contiguous, one dtype -> ([..., n, C],
    the mean over the n new streams [..., C] if ``with_mean`` else None)."""
    n, c = s.shape[-2:]
    out = torch.empty_like(s)
    mean = torch.empty_like(y) if with_mean else None
    # (out as the mean's placeholder pointer when there is no mean: not written)
    _launch(_kernels()[0], s.numel() // (n * c), h_res, h_post, s, y, out, out if mean is None else mean,
            n=n, c=c, MEAN=with_mean)
    return out, mean


class MixOut(torch.autograd.Function):
    """H_res S + H_post^T y, both ways fused: h_res [..., n, n], h_post [..., n], streams [..., n, C],
    y [..., C] (one dtype) -> [..., n, C], and with ``with_mean`` also its mean over the streams [..., C].

    Saves all four inputs (contiguous); the backward kernel returns (gh_res, gh_post, gS, gy), taking the
    streams' gradient and the mean's (either may be absent) in one pass: the mean read-out's gradient
    reaches the streams without a separate broadcast and add.
    NOTE: all four are always computed (one kernel reads S and g once for all); in training all are needed.
    """

    @staticmethod
    def forward(ctx, h_res: torch.Tensor, h_post: torch.Tensor, streams: torch.Tensor, y: torch.Tensor,
                with_mean: bool = False):
        h_res, h_post, s, y = h_res.contiguous(), h_post.contiguous(), streams.contiguous(), y.contiguous()
        ctx.save_for_backward(h_res, h_post, s, y)
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None: no zeros read
        out, mean = _forward(h_res, h_post, s, y, with_mean)
        return (out, mean) if with_mean else out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor | None, grad_mean: torch.Tensor | None = None):
        h_res, h_post, s, y = ctx.saved_tensors
        n, c = s.shape[-2:]
        g_res, g_post, gs, gy = (torch.empty_like(t) for t in (h_res, h_post, s, y))
        has_out, has_mean = grad_out is not None, grad_mean is not None
        if not (has_out or has_mean):
            return g_res.zero_(), g_post.zero_(), gs.zero_(), gy.zero_(), None
        g = grad_out.contiguous() if has_out else gs  # a placeholder pointer when absent (not read)
        gm = grad_mean.contiguous() if has_mean else gy  # likewise
        _launch(_kernels()[1], s.numel() // (n * c), h_res, h_post, s, y, g, gm, g_res, g_post, gs, gy,
                n=n, c=c, GRAD_OUT=has_out, GRAD_MEAN=has_mean)
        return g_res, g_post, gs, gy, None


def mix_out(h_res: torch.Tensor, h_post: torch.Tensor, streams: torch.Tensor, y: torch.Tensor, *,
            with_mean: bool = False):
    """h_res [..., n, n], h_post [..., n], streams [..., n, C], y [..., C] -> H_res S + H_post^T y [..., n, C]
    (the streams' dtype; the others are cast to it). ``with_mean``: returns (new streams, their mean over
    the n streams [..., C]) from the same kernel (``contract`` of the output, which the next backbone
    update reads), instead of a second pass over the streams.

    Through ``MixOut`` (fused backward) when a gradient is needed, else the forward kernel alone."""
    n, c = streams.shape[-2:]
    _check(streams, h_res=(h_res, (n, n)), h_post=(h_post, (n,)), y=(y, (c,)))
    dt = streams.dtype
    h_res, h_post, y = h_res.to(dt), h_post.to(dt), y.to(dt)
    if needs_grad(h_res, h_post, streams, y):
        return MixOut.apply(h_res, h_post, streams, y, with_mean)
    out, mean = _forward(h_res.contiguous(), h_post.contiguous(), streams.contiguous(), y.contiguous(),
                         with_mean)
    return (out, mean) if with_mean else out
