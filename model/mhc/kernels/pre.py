"""Fused mHC pre-branch: the three mappings and the branch input H_pre S, one Triton kernel each way,
then H_res's Sinkhorn as a kernel of its own.

The reference is ``model.mhc.reference.mhc_pre_reference``: RMSNorm, a float32 GEMM, alpha and bias,
sigmoid, 2 sigmoid, the Sinkhorn loop and then H_pre S: about 9 kernels forward (plus ~80 of the
Sinkhorn loop), and in training many more backward. On the H100 the CUDA-graphed training step paid
+8.8 % for mHC and batch-1 sampling +11.9 % with separate mapping / mixing kernels; with this op
+4.0-4.2 % and +4.3 % (BENCHMARKS.md).

Math per residue r (v = vec(S_r) in R^D, D = nC, M = 2n + n^2 columns; Eqs. 7-8 and 14-16 of the mHC
paper, the GEMM on the raw v and the 1 / rms scale after it):

    rinv = 1 / sqrt(mean(v^2) + RMS_EPS);  raw = (v phi) rinv  [M];  l = alpha raw + b
    h_pre = sigmoid(l_pre);  h_post = 2 sigmoid(l_post);  z = mat(l_res)  (H_res = Sinkhorn(z), Eq. 9,
    by ``sinkhorn.py``'s kernel);  x = sum_i h_pre_i S_i  [C]

Backward, for the output gradients gx [C], g_post [n], gl_res [n, n] (the logits' gradient, from the
Sinkhorn's autograd node; any may be absent: zero):

    g_hpre_i = gx . S_i;  gl_pre = g_hpre h_pre (1 - h_pre);  gl_post = g_post h_post (1 - h_post / 2)
    graw = alpha gl;  g_alpha_group = sum_r sum_group gl raw;  g_b = sum_r gl
    du = graw rinv;  g_phi = sum_r v^T du  [D, M]
    gS = du phi^T - (graw . raw) rinv^2 v / D + h_pre_i gx   (the RMSNorm term, then H_pre S's)

Kernels (``_pre_triton.py``), one program per ``BLOCK_M`` residues. Forward: pass 1 over D in chunks of
``BLOCK_K``: one ``tl.dot`` per chunk into a single [BLOCK_M, MP] accumulator holding all 2n + n^2
columns (reordered res | pre | post so each group can be taken out exactly), and sum(v^2); then the
sigmoids; pass 2 over the (L2-resident) streams in chunks of ``BLOCK_C`` for x. Backward: pass 1 over C
for g_hpre; the logits gradients of all columns as one [BLOCK_M, MP] tile; pass 2 over D, two tf32x3
dots per chunk (du phi^T for gS, v^T du for this program's g_phi). Row sums (g_phi, g_alpha, g_b) are
written per program to a [programs, D M + M + 3] buffer that one ``torch.sum`` reduces (deterministic,
no atomics; the parameter gradients are views of its result).

Why the Sinkhorn is not in the pre-branch kernel: there it is 40 dependent float64 half steps per
program of 16-64 residues; as its own kernel it runs 16 matrices per program, more programs in flight
(H100, 8,064 residues, eager: pre-branch forward 40 -> 25 us, the Sinkhorn kernel 7.8 us; graphed
training step +4.9 % -> +4.1 % at 56 x 72). In training it is its own autograd node
(``sinkhorn.sinkhorn_fused``); when sampling small batches it runs on a side stream while the branch
runs (``side_stream``, ``OVERLAP_BELOW``). The values and gradients are those of the reference up to
float32 rounding.

CUDA-graph safe: the host only reads shapes; outputs, gradients and scratch come from ``torch.empty``.
The backward is not differentiable again (``once_differentiable``). n * n must be a power of two and C
a power of two >= 16 (``supports``), phi float32 [nC, 2n + n^2]; streams float32 / bf16 / fp16 (sums in
float32, x stored in the streams' dtype). Triton is imported lazily (``_kernels``).
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.autograd.function import once_differentiable

from model.mhc.kernels import sinkhorn
from model.mhc.kernels.support import FLOAT_DTYPES, dot_width, is_pow2, needs_grad, triton_can_run
from model.mhc.reference import RMS_EPS

__all__ = ["OVERLAP_BELOW", "MHCPre", "PendingHRes", "available", "fused_pre", "overlap_pays", "supports"]

# Tilings (BLOCK_M residues per program, BLOCK_K channels of vec(S) per GEMM step, BLOCK_C channels per step
# of the mixing passes, num_warps, tl.dot input precision) by residue count; BLOCK_K and BLOCK_C are capped
# at C (backward: one stream per chunk). Swept on the H100 (n = 4, C = 128, float32, graphed).
# Precision: "ieee" (float32 FMAs) or "tf32x3" (three tensor-core products, ~float32); plain tf32 would
# round v and phi to 10 bits (1e-3 errors). Forward: "ieee" won at every size swept (training forward with
# saved tensors: 4,032 residues 16.8 -> 13.6 us, 8,064 24.5 -> 18.2 us; no gradient: 8,192 24.9 -> 17.2 us,
# 32,768 72.8 -> 59.0 us). Backward: tf32x3 (forward + backward in ieee was slower: 91.8 vs 73.2 us at 4,032;
# 112 us at 4,032 and 442 us at 32,768). BLOCK_M 64 with BLOCK_K 64 runs out of shared memory in the backward.
FORWARD_TILINGS = ((1024, (16, 64, 32, 4, "ieee")), (16384, (32, 32, 32, 4, "ieee")),
                   (None, (64, 64, 32, 4, "ieee")))
BACKWARD_TILINGS = ((16384, (32, 64, 32, 4, "tf32x3")), (None, (32, 128, 32, 4, "tf32x3")))
# Without gradient and below this many residues, the Sinkhorn runs on a side stream, overlapping the branch.
# Graphed sampling steps of configs/ship_pairfree.txt on the H100, mHC's cost over the flash mode (the
# engine's step), side stream vs not: 1 x 128 +4.0-4.4 vs +5.3-5.8 %, 1 x 256 +3.5-3.8 vs +6.7-7.0 %,
# 64 x 128 (8,192 residues) +4.5-4.8 vs +4.2-4.7 %, 256 x 128 +3.6-4.2 vs +3.4-4.0 %: a gain where the
# step is latency-bound, a small loss where the card is busy. In training the side stream lost
# (+5.4-5.6 % vs +4.7-4.9 %), so it is never used with a gradient. BENCHMARKS.md has the tables.
OVERLAP_BELOW = 1024


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels; Triton is imported here, never at package import."""
    from model.mhc.kernels import _pre_triton as k

    return k.pre_forward_kernel, k.pre_backward_kernel


def supports(n: int, c: int) -> bool:
    """Whether the kernels take n streams of C channels: n >= 2 with n * n a power of two (n = 2, 4, 8,
    ...), C a power of two >= 16. (The mixing and Sinkhorn kernels take every such shape too.)"""
    return n >= 2 and is_pow2(n * n) and is_pow2(c) and c >= 16


def available(streams: torch.Tensor, phi: torch.Tensor) -> bool:
    """True when the fused op can run for ``streams`` [..., n, C] and ``phi`` [nC, 2n + n^2], with or
    without a gradient: a supported shape (``supports``), CUDA (or CPU under ``TRITON_INTERPRET=1``),
    streams float32 / 16-bit, phi float32 on the same device, Triton importable, not inside
    torch.compile (which fuses the reference itself)."""
    if streams.dim() < 3 or phi.dim() != 2:
        return False
    n, c = streams.shape[-2:]
    if not supports(n, c) or tuple(phi.shape) != (n * c, 2 * n + n * n):
        return False
    if streams.dtype not in FLOAT_DTYPES or phi.dtype != torch.float32 or phi.device != streams.device:
        return False
    return triton_can_run(streams)


def _tiling(count: int, c: int, backward: bool) -> tuple[int, int, int, int, str]:
    """(BLOCK_M, BLOCK_K, BLOCK_C, num_warps, precision) for ``count`` residues of C channels."""
    for below, tiling in BACKWARD_TILINGS if backward else FORWARD_TILINGS:
        if below is None or count < below:
            block_m, block_k, block_c, warps, precision = tiling
            return block_m, min(block_k, c), min(block_c, c), warps, precision
    raise AssertionError("the tiling tables end with None")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _forward(s: torch.Tensor, phi: torch.Tensor, params: tuple[torch.Tensor, ...],
             save: bool) -> tuple[torch.Tensor, ...]:
    """s [..., n, C] contiguous -> x [..., C] (s's dtype), h_post [..., n], z [..., n, n] (H_res's logits),
    and if ``save`` raw [N, M], rinv [N] (float32; else None)."""
    n, c = s.shape[-2:]
    lead = s.shape[:-2]
    count, m = s.numel() // (n * c), 2 * n + n * n
    dev = s.device
    x = torch.empty(*lead, c, device=dev, dtype=s.dtype)
    h_post = torch.empty(*lead, n, device=dev, dtype=torch.float32)
    z = torch.empty(*lead, n, n, device=dev, dtype=torch.float32)
    raw = rinv = None
    if save:
        raw = torch.empty(count, m, device=dev, dtype=torch.float32)
        rinv = torch.empty(count, device=dev, dtype=torch.float32)
    if count:
        dummy = h_post  # never read or written when SAVE is off
        block_m, block_k, block_c, warps, precision = _tiling(count, c, backward=False)
        _kernels()[0][(-(-count // block_m),)](
            s, _f32(phi), *(_f32(p) for p in params), x, h_post, z,
            raw if save else dummy, rinv if save else dummy, count, RMS_EPS,
            N=n, C=c, MP=dot_width(m), BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, SAVE=save,
            PRECISION=precision, num_warps=warps)
    return x, h_post, z, raw, rinv


class MHCPre(torch.autograd.Function):
    """(streams [..., n, C], phi [nC, M], alpha_pre, alpha_post, alpha_res (scalars), b_pre [n],
    b_post [n], b_res [n, n]) -> (x [..., C], h_post [..., n], z [..., n, n]): z is H_res's logits
    (float32); the caller runs the Sinkhorn on them as its own autograd node.

    Saves the contiguous streams, the parameters and the forward's raw, rinv. Output gradients that
    autograd does not produce stay None (not materialised as zeros): the kernel skips them.
    NOTE: every input gradient is always computed (in training all are needed).
    """

    @staticmethod
    def forward(ctx, streams, phi, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res):
        ctx.set_materialize_grads(False)
        s = streams.contiguous()  # [..., n, C] (an expand view is copied here)
        params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
        x, h_post, z, raw, rinv = _forward(s, phi, params, save=True)
        ctx.save_for_backward(s, phi, *params, raw, rinv)
        return x, h_post, z

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, g_post, g_z):
        s, phi, a_pre, a_post, a_res, b_pre, b_post, b_res, raw, rinv = ctx.saved_tensors
        n, c = s.shape[-2:]
        count, m, d = raw.shape[0], raw.shape[1], n * c
        block_m, block_k, block_c, warps, precision = _tiling(count, c, backward=True)
        programs = -(-count // block_m)
        gs = torch.empty_like(s)  # [..., n, C]
        part = torch.empty(programs, d * m + m + 3, device=s.device, dtype=torch.float32)  # per-program sums
        if count:
            dummy = rinv  # never read when its HAS_* flag is off
            _kernels()[1][(programs,)](
                s, _f32(phi), *(_f32(p) for p in (a_pre, a_post, a_res, b_pre, b_post, b_res)), raw, rinv,
                dummy if gx is None else gx.contiguous(), dummy if g_post is None else _f32(g_post),
                dummy if g_z is None else _f32(g_z), gs, part, count, N=n, C=c, MP=dot_width(m),
                BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c,
                HAS_GX=gx is not None, HAS_POST=g_post is not None, HAS_RES=g_z is not None,
                PRECISION=precision, num_warps=warps)
        total = part.sum(dim=0)  # [D M + M + 3]: one reduction for every parameter gradient
        g_phi = total[:d * m].view(d, m)
        g_b = total[d * m:d * m + m]
        g_alpha = total[d * m + m:]

        def like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return g.view(p.shape).to(p.dtype)

        return (gs, like(g_phi, phi), like(g_alpha[0], a_pre), like(g_alpha[1], a_post),
                like(g_alpha[2], a_res), like(g_b[:n], b_pre), like(g_b[n:2 * n], b_post),
                like(g_b[2 * n:], b_res))


def _checked_iters(streams: torch.Tensor, params: tuple[torch.Tensor, ...], sinkhorn_iters: int) -> int:
    """``sinkhorn_iters`` as an int, after checking it and the column parameters' shapes."""
    iters = int(sinkhorn_iters)
    if iters < 1:
        raise ValueError(f"fused_pre: sinkhorn_iters must be >= 1 (mhcSinkhornIters), got {iters}")
    n = streams.shape[-2]
    for name, t, shape in zip(("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res"), params,
                              ((), (), (), (n,), (n,), (n, n)), strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"fused_pre: {name} must have shape {list(shape)}, got {list(t.shape)}")
    return iters


class PendingHRes:
    """H_res from :func:`fused_pre`, its Sinkhorn perhaps still running on a side stream. Holds the
    logits it reads too, so that neither buffer is freed before ``wait()``."""

    def __init__(self, h_res: torch.Tensor, logits: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
        self._h_res = h_res
        self._logits = logits
        self._stream = stream

    def wait(self) -> torch.Tensor:
        """H_res [..., n, n] float32; the current stream is ordered after the side stream's Sinkhorn first."""
        if self._stream is not None:
            torch.cuda.current_stream(self._h_res.device).wait_stream(self._stream)
            self._stream = None
        self._logits = None
        return self._h_res

    def __del__(self) -> None:
        # never waited for (the branch raised, e.g. out of memory): order the current stream after the
        # Sinkhorn before the two buffers go back to the allocator, so that it cannot write into memory
        # that has been handed out again
        if getattr(self, "_stream", None) is not None:
            try:
                torch.cuda.current_stream(self._h_res.device).wait_stream(self._stream)
            except RuntimeError:  # CUDA already torn down at interpreter exit: nothing left to protect
                pass


# Per thread and device: a stream taking part in one thread's CUDA-graph capture must not receive
# another thread's eager work (and two threads' Sinkhorns would wait for each other for nothing).
_SIDE_STREAMS = threading.local()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """This thread's side stream on ``device`` (created on first use, freed with the thread)."""
    index = torch.cuda.current_device() if device.index is None else device.index
    streams = getattr(_SIDE_STREAMS, "by_device", None)
    if streams is None:
        streams = _SIDE_STREAMS.by_device = {}
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    return streams[index]


def overlap_pays(streams: torch.Tensor) -> bool:
    """Whether a side stream is worth its fork and join for ``streams`` [..., n, C] without gradient
    (:func:`fused_pre`'s ``side_stream``): below OVERLAP_BELOW residues, where the step is
    latency-bound and the side stream finds idle SMs."""
    return streams.numel() // max(1, streams.shape[-2] * streams.shape[-1]) < OVERLAP_BELOW


def fused_pre(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor, alpha_post: torch.Tensor,
              alpha_res: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
              sinkhorn_iters: int, *, res_logit_cap: float = 0.0,
              side_stream: bool = False) -> tuple[torch.Tensor, torch.Tensor, PendingHRes]:
    """streams [..., n, C], phi [nC, 2n + n^2], alpha_* [] (scalars), b_pre [n], b_post [n], b_res [n, n]
    -> (x = H_pre S [..., C] in the streams' dtype, H_post [..., n] float32, PendingHRes); call ``.wait()``
    for H_res [..., n, n] float32 when it is needed (after the branch: ``mix_out``).

    With a gradient (training): ``MHCPre`` (fused backward), then the Sinkhorn as its own autograd node
    (``sinkhorn.sinkhorn_fused``). Without: the forward kernel alone (nothing saved, no autograd node),
    then the Sinkhorn's forward kernel into a buffer allocated here.
    ``side_stream`` (CUDA, without gradient only: sampling): the Sinkhorn runs on a side stream, ordered
    after the pre-branch kernel, while the current stream goes on with the branch; ``wait()`` joins the
    two. Both buffers are allocated on the current stream before the fork and stay referenced until
    after the join, so the caching allocator cannot hand their memory out while the side stream uses
    them. Works eagerly and inside CUDA-graph capture (the fork and join become graph edges). On a CPU
    tensor (Triton's interpreter) there is no side stream. ``res_logit_cap``: the Sinkhorn's soft cap of
    the H_res logits (``reference.cap_logits``; 0: none)."""
    params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    iters = _checked_iters(streams, params, sinkhorn_iters)
    if needs_grad(streams, phi, *params):
        if side_stream:
            raise ValueError("fused_pre: side_stream only without gradient (call it under torch.no_grad())")
        x, h_post, z = MHCPre.apply(streams, phi, *params)  # z: H_res's logits [..., n, n]
        return x, h_post, PendingHRes(sinkhorn.sinkhorn_fused(z, iters, cap=res_logit_cap), z, None)
    x, h_post, z, _, _ = _forward(streams.contiguous(), phi, params, save=False)
    h_res = torch.empty_like(z)  # [..., n, n]
    side = _side_stream(h_res.device) if side_stream and h_res.is_cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(h_res.device))
    with torch.cuda.stream(side):  # None: the current stream
        sinkhorn.sinkhorn_into(z, h_res, iters, cap=res_logit_cap)
    return x, h_post, PendingHRes(h_res, z, side)
