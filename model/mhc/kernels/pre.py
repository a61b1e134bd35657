"""Fused mHC pre-branch: the three mappings and the branch input H_pre S, one Triton kernel each way.

The reference is ``model.mhc.mhc_pre_reference``: what ``MHCResidual`` runs before its branch, i.e.
``MHCMappings`` (torch.cat of alpha / bias, ``mapping_logits``: RMSNorm + a float32 GEMM + addcmul,
split, sigmoid, 2 sigmoid, the fused Sinkhorn) and then ``mix_in``: about 9 kernels forward, and in
training their backward (rms_norm backward, two GEMMs, addcmul / sigmoid / cat backward, Sinkhorn and
mix_in backward, autograd's adds of the stream gradients): many more. On the H100 the CUDA-graphed
training step paid +8.8 % for mHC and batch-1 sampling +11.9 % (launch-bound), against a 5 % budget.

Math per residue r (v = vec(S_r) in R^D, D = nC, M = 2n + n^2 columns; Eqs. 7-9 and 14-16 of the mHC
paper, the GEMM on the raw v and the 1 / rms scale after it, as ``model/_mhc_map_kernels.py``):

    rinv = 1 / sqrt(mean(v^2) + RMS_EPS);  raw = (v phi) rinv  [M];  l = alpha raw + b
    h_pre = sigmoid(l_pre);  h_post = 2 sigmoid(l_post);  h_res = Sinkhorn(mat(l_res))  (Eq. 9, as
    model/_sinkhorn_kernels.py: float64, max shift, floor, t_max column-then-row normalisations)
    x = sum_i h_pre_i S_i  [C]

Backward, for the output gradients gx [C], g_post [n], g_res [n, n] (any may be absent: zero):

    g_hpre_i = gx . S_i;  gl_pre = g_hpre h_pre (1 - h_pre);  gl_post = g_post h_post (1 - h_post / 2)
    gl_res = the Sinkhorn VJP of g_res (the existing kernel of model/sinkhorn_triton.py, its own launch)
    graw = alpha gl;  g_alpha_group = sum_r sum_group gl raw;  g_b = sum_r gl
    du = graw rinv;  g_phi = sum_r v^T du  [D, M]
    gS = du phi^T - (graw . raw) rinv^2 v / D + h_pre_i gx   (the RMSNorm term, then mix_in's)

Kernels (model/_mhc_pre_kernels.py), one program per ``BLOCK_M`` residues. Forward: pass 1 over D in
chunks of ``BLOCK_K``: one tf32x3 ``tl.dot`` per chunk (tensor cores, ~float32 accuracy) into a single
[BLOCK_M, MP] accumulator holding all 2n + n^2 columns (reordered res | pre | post so each group can be
taken out exactly: see the kernels' docstring), and sum(v^2); then the sigmoids and the Sinkhorn in
registers; pass 2 over the (L2-resident) streams in chunks of ``BLOCK_C`` for x. Backward: pass 1 over
C for g_hpre; the logits gradients of all columns as one [BLOCK_M, MP] tile; pass 2 over D, two tf32x3
dots per chunk (du phi^T for gS, v^T du for this program's g_phi). Row sums (g_phi, g_alpha, g_b) are
written per program to a [programs, D M + M + 3] buffer that one ``torch.sum`` reduces (deterministic,
no atomics; the parameter gradients are views of its result).
Launches: forward 1 (was ~9); backward 3: the Sinkhorn VJP (when g_res is given), this kernel, the sum.

Measured on one H100 (n = 4, C = 128, float32 streams, CUDA graphs; BENCHMARKS.md, session 6):
pre-branch forward without gradient 31.4 -> 23.1 us at 128 residues, 34.0 -> 29.9 us at 4,032,
110.1 -> 89.3 us at 32,768 (MHCMappings + the fused mix_in before); forward + backward 175.7 -> 112 us
at 4,032. Graphed training step of configs/ship_pairfree.txt at 56 x 72 (``profile_train_step.py --ab
flash,mhc_flash --graph``, 3 runs each): mHC overhead +8.4 % -> +5.3 %; graphed sampling step of
mhc_flash_pairfree_v1 at 1 x 128: 1.80 -> 1.76 ms.

``mhc_pre_split`` (what ``MHCResidual`` runs by default) skips the kernel's Sinkhorn and runs
``sinkhorn_triton``'s kernel on the logits instead (faster at every size measured; in training the
Sinkhorn is then its own autograd node), on a side stream when sampling small batches.
``mhc_pre`` launches the forward kernel alone when no gradient is needed (sampling under
``torch.no_grad``: nothing saved, no autograd node), and goes through the autograd Function ``MHCPre``
when one is (training), which also saves raw [N, M], z = l_res [N, n^2] and rinv [N] (float32).
CUDA-graph safe: the host only reads shapes; outputs, gradients and scratch come from ``torch.empty``.
The backward is not differentiable again (``once_differentiable``).

n * n must be a power of two and C a power of two >= 16 (mhcExpansionRate 4 and C_s = 128 are), phi
float32 [nC, 2n + n^2]; streams float32 / bf16 / fp16 (sums in float32, x stored in the streams'
dtype). Other shapes, float64, torch.compile and CPU tensors without ``TRITON_INTERPRET=1`` take the
reference (``available``). Imported lazily, like ``model.sinkhorn_triton``.
NOTE: the whole forward is one chain of dependent steps per program (16 GEMM chunks, 40 float64 Sinkhorn
half steps, the mixing pass), so at a few thousand residues (one program per SM) it is latency-bound.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch.autograd.function import once_differentiable

from model.mhc.kernels import sinkhorn as sinkhorn_triton
from model.mhc.kernels.support import FLOAT_DTYPES, dot_width, is_pow2, needs_grad, triton_can_run

__all__ = ["MHCPre", "PendingHRes", "available", "mhc_pre", "mhc_pre_split", "overlap_pays"]

# Tilings (BLOCK_M residues per program, BLOCK_K channels of vec(S) per GEMM step, BLOCK_C channels per step
# of the mixing passes, num_warps, tl.dot input precision) by residue count; BLOCK_K and BLOCK_C are capped
# at C (backward: one stream per chunk). Swept on the H100 (n = 4, C = 128, float32, graphed; forward
# no-grad at 128 / 4,032 / 32,768 residues: 23.1 / 29.9 / 89.3 us with tf32x3; forward + backward 112 us at
# 4,032 and 442 us at 32,768). BLOCK_M 64 with BLOCK_K 64 runs out of shared memory in the backward.
# Precision: "tf32x3" (three tensor-core products, ~float32) or "ieee" (float32 FMAs, no tensor cores);
# plain tf32 would round v and phi to 10 bits (1e-3 errors). ieee is the faster below 1,024 residues
# (a batch-1 sampling step: 17.1 vs 23.3 us at 128, session 7), tf32x3 above (and in every backward:
# 32,768 residues forward 101 vs 88 us).
FORWARD_TILINGS = ((1024, (16, 64, 32, 4, "ieee")), (16384, (32, 32, 32, 4, "tf32x3")),
                   (None, (64, 32, 32, 4, "tf32x3")))
BACKWARD_TILINGS = ((16384, (32, 64, 32, 4, "tf32x3")), (None, (32, 128, 32, 4, "tf32x3")))
# The forward with the Sinkhorn split out (mhc_pre_split, the default): without its float64 steps the GEMM
# pass dominates and "ieee" wins everywhere swept (H100, graphed, session 8, `split_sweep.json`; training
# forward, SAVE: 4,032 residues 16.8 -> 13.6 us, 8,064 24.5 -> 18.2 us; no gradient: 8,192 24.9 -> 17.2 us,
# 32,768 72.8 -> 59.0 us; the forward with the Sinkhorn inside: 30.4 / 39.0 / 39.5 / 87.6 us). Below
# 1,024 residues (sampling, the Sinkhorn on a side stream) the table above's tiling, not re-swept.
SPLIT_FORWARD_TILINGS = ((1024, (16, 64, 32, 4, "ieee")), (16384, (32, 32, 32, 4, "ieee")),
                         (None, (64, 64, 32, 4, "ieee")))
# MHCResidual runs the Sinkhorn on a side stream (mhc_pre_split(side_stream=True)) below this many residues
# without gradient; above, and in training, on the current stream. Graphed sampling steps of
# configs/ship_pairfree.txt on the H100, mHC's cost over the flash mode, overlapped vs not (session 7, two
# runs; the engine's step, then the bare step's graph): 1 x 128 +4.0-4.4 vs +5.3-5.8 % (+4.5-4.6 vs
# +5.7-5.9 %); 1 x 256 +3.5-3.8 vs +6.7-7.0 % (but the bare graph +6.5-6.7 vs +4.9-5.0 %); 64 x 128 (8,192
# residues) +4.5-4.8 vs +4.2-4.7 %; 256 x 128 +3.6-4.2 vs +3.4-4.0 %: a gain where the step is latency-bound,
# a small loss where the card is already busy. Session 8, with the split on the current stream above the
# threshold: engine +3.45 % at 64 x 128 and +3.65 % at 256 x 128 (Sinkhorn in the kernel: +4.38 / +3.67 %).
# BENCHMARKS.md has the tables.
OVERLAP_BELOW = 1024


@functools.cache
def _kernels():
    """(forward, backward) Triton kernels; Triton is imported here, never at package import."""
    from model.mhc.kernels import _pre_triton as k

    return k.pre_forward_kernel, k.pre_backward_kernel


def available(streams: torch.Tensor, phi: torch.Tensor) -> bool:
    """True when the fused op can run for ``streams`` [..., n, C] and ``phi`` [nC, 2n + n^2], with or
    without a gradient: CUDA (or CPU under ``TRITON_INTERPRET=1``), streams float32 / 16-bit, phi
    float32 on the same device, n >= 2 with n * n a power of two, C a power of two >= 16, Triton
    importable, not inside torch.compile (which fuses the reference itself)."""
    if streams.dim() < 3 or phi.dim() != 2:
        return False
    n, c = streams.shape[-2:]
    if n < 2 or not is_pow2(n * n) or not is_pow2(c) or c < 16:
        return False
    if tuple(phi.shape) != (n * c, 2 * n + n * n):
        return False
    if streams.dtype not in FLOAT_DTYPES or phi.dtype != torch.float32 or phi.device != streams.device:
        return False
    return triton_can_run(streams)


def _tiling(count: int, c: int, backward: bool, sinkhorn: bool = True) -> tuple[int, int, int, int, str]:
    """(BLOCK_M, BLOCK_K, BLOCK_C, num_warps, precision) for ``count`` residues of C channels (the forward
    with its Sinkhorn, or without: ``sinkhorn`` False)."""
    table = BACKWARD_TILINGS if backward else FORWARD_TILINGS if sinkhorn else SPLIT_FORWARD_TILINGS
    for below, tiling in table:
        if below is None or count < below:
            block_m, block_k, block_c, warps, precision = tiling
            return block_m, min(block_k, c), min(block_c, c), warps, precision
    raise AssertionError("the tiling tables end with None")


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


def _forward(s: torch.Tensor, phi: torch.Tensor, params: tuple[torch.Tensor, ...], iters: int,
             save: bool, sinkhorn: bool = True) -> tuple[torch.Tensor, ...]:
    """s [..., n, C] contiguous -> x [..., C] (s's dtype), h_post [..., n], h_res [..., n, n], and if
    ``save`` raw [N, M], z [N, n^2], rinv [N] (float32; else None). ``sinkhorn`` False: h_res is left
    unwritten and z [N, n^2] holds the H_res logits (``sinkhorn_triton.sinkhorn_into`` finishes it)."""
    from model.mhc import RMS_EPS, SINKHORN_LOGIT_FLOOR  # NOTE: here: model.mhc imports this module

    n, c = s.shape[-2:]
    lead = s.shape[:-2]
    count, m = s.numel() // (n * c), 2 * n + n * n
    dev = s.device
    x = torch.empty(*lead, c, device=dev, dtype=s.dtype)
    h_post = torch.empty(*lead, n, device=dev, dtype=torch.float32)
    h_res = torch.empty(*lead, n, n, device=dev, dtype=torch.float32)
    raw = z = rinv = None
    if save or not sinkhorn:
        z = torch.empty(count, n * n, device=dev, dtype=torch.float32)
    if save:
        raw = torch.empty(count, m, device=dev, dtype=torch.float32)
        rinv = torch.empty(count, device=dev, dtype=torch.float32)
    if count:
        dummy = h_post  # never read or written when SAVE is off
        block_m, block_k, block_c, warps, precision = _tiling(count, c, backward=False, sinkhorn=sinkhorn)
        _kernels()[0][(-(-count // block_m),)](
            s, _f32(phi), *(_f32(p) for p in params), x, h_post, h_res,
            raw if save else dummy, dummy if z is None else z, rinv if save else dummy, count, RMS_EPS,
            N=n, C=c, MP=dot_width(m), ITERS=iters, FLOOR=SINKHORN_LOGIT_FLOOR,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c, SAVE=save, SINKHORN=sinkhorn, PRECISION=precision,
            num_warps=warps)
    return x, h_post, h_res, raw, z, rinv


class MHCPre(torch.autograd.Function):
    """(streams [..., n, C], phi [nC, M], alpha_pre, alpha_post, alpha_res (scalars), b_pre [n],
    b_post [n], b_res [n, n], sinkhorn_iters, sinkhorn) -> (x [..., C], h_post [..., n], h_res [..., n, n]);
    ``sinkhorn`` False: the third output is H_res's logits [..., n, n] (float32), not H_res, and its
    gradient is the logits' (the caller runs the Sinkhorn as its own autograd node: ``mhc_pre_split``).

    Saves the contiguous streams, the parameters and the forward's raw, rinv (and z when the Sinkhorn
    VJP is this op's). Output gradients that autograd does not produce stay None (not materialised as
    zeros): the kernel skips them.
    NOTE: every input gradient is always computed (in training all are needed).
    """

    @staticmethod
    def forward(ctx, streams, phi, alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res, sinkhorn_iters,
                sinkhorn=True):
        ctx.set_materialize_grads(False)
        s = streams.contiguous()  # [..., n, C] (an expand view is copied here)
        params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
        x, h_post, h_res, raw, z, rinv = _forward(s, phi, params, sinkhorn_iters, save=True, sinkhorn=sinkhorn)
        ctx.save_for_backward(s, phi, *params, raw, z if sinkhorn else None, rinv)
        ctx.iters = sinkhorn_iters
        return x, h_post, h_res if sinkhorn else z.view(h_res.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, gx, g_post, g_res):
        s, phi, a_pre, a_post, a_res, b_pre, b_post, b_res, raw, z, rinv = ctx.saved_tensors
        from model.mhc import SINKHORN_LOGIT_FLOOR

        n, c = s.shape[-2:]
        count, m, d = raw.shape[0], raw.shape[1], n * c
        block_m, block_k, block_c, warps, precision = _tiling(count, c, backward=True)
        programs = -(-count // block_m)
        gs = torch.empty_like(s)  # [..., n, C]
        part = torch.empty(programs, d * m + m + 3, device=s.device, dtype=torch.float32)  # per-program sums
        if count:
            gl_res = None
            if g_res is not None and z is None:  # g_res is already the logits' gradient (sinkhorn False)
                gl_res = _f32(g_res).view(count, n * n)
            elif g_res is not None:  # the Sinkhorn VJP, the existing kernel (its own launch)
                gl_res = sinkhorn_triton.sinkhorn_vjp(z.view(count, n, n), g_res, ctx.iters,
                                                      SINKHORN_LOGIT_FLOOR).view(count, n * n)  # [N, n^2]
            dummy = rinv  # never read when its HAS_* flag is off
            _kernels()[1][(programs,)](
                s, _f32(phi), *(_f32(p) for p in (a_pre, a_post, a_res, b_pre, b_post, b_res)), raw, rinv,
                dummy if gx is None else gx.contiguous(), dummy if g_post is None else _f32(g_post),
                dummy if gl_res is None else gl_res, gs, part, count, N=n, C=c, MP=dot_width(m),
                BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_C=block_c,
                HAS_GX=gx is not None, HAS_POST=g_post is not None, HAS_RES=gl_res is not None,
                PRECISION=precision, num_warps=warps)
        total = part.sum(dim=0)  # [D M + M + 3]: one reduction for every parameter gradient
        g_phi = total[:d * m].view(d, m)
        g_b = total[d * m:d * m + m]
        g_alpha = total[d * m + m:]

        def like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return g.view(p.shape).to(p.dtype)

        return (gs, like(g_phi, phi), like(g_alpha[0], a_pre), like(g_alpha[1], a_post), like(g_alpha[2], a_res),
                like(g_b[:n], b_pre), like(g_b[n:2 * n], b_post), like(g_b[2 * n:], b_res), None, None)


def _checked_iters(streams: torch.Tensor, params: tuple[torch.Tensor, ...], sinkhorn_iters: int) -> int:
    """``sinkhorn_iters`` as an int, after checking it and the column parameters' shapes."""
    iters = int(sinkhorn_iters)
    if iters < 1:
        raise ValueError(f"mhc_pre: sinkhorn_iters must be >= 1 (mhcSinkhornIters), got {iters}")
    n = streams.shape[-2]
    for name, t, shape in zip(("alpha_pre", "alpha_post", "alpha_res", "b_pre", "b_post", "b_res"), params,
                              ((), (), (), (n,), (n,), (n, n)), strict=True):
        if tuple(t.shape) != shape:
            raise ValueError(f"mhc_pre: {name} must have shape {list(shape)}, got {list(t.shape)}")
    return iters


def mhc_pre(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor, alpha_post: torch.Tensor,
            alpha_res: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
            sinkhorn_iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """streams [..., n, C], phi [nC, 2n + n^2], alpha_* [] (scalars), b_pre [n], b_post [n], b_res [n, n]
    -> (x = H_pre S [..., C] in the streams' dtype, H_post [..., n], H_res [..., n, n] float32).

    Through ``MHCPre`` (fused backward) when a gradient is needed, else the forward kernel alone."""
    params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    iters = _checked_iters(streams, params, sinkhorn_iters)
    if needs_grad(streams, phi, *params):
        return MHCPre.apply(streams, phi, *params, iters)
    x, h_post, h_res, *_ = _forward(streams.contiguous(), phi, params, iters, save=False)
    return x, h_post, h_res


class PendingHRes:
    """H_res from :func:`mhc_pre_split`, its Sinkhorn perhaps still running on a side stream. Holds the
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
    (:func:`mhc_pre_split`'s ``side_stream``): below OVERLAP_BELOW residues, where the step is
    latency-bound and the side stream finds idle SMs."""
    return streams.numel() // max(1, streams.shape[-2] * streams.shape[-1]) < OVERLAP_BELOW


def mhc_pre_split(streams: torch.Tensor, phi: torch.Tensor, alpha_pre: torch.Tensor, alpha_post: torch.Tensor,
                  alpha_res: torch.Tensor, b_pre: torch.Tensor, b_post: torch.Tensor, b_res: torch.Tensor,
                  sinkhorn_iters: int, *, side_stream: bool = False) -> tuple[torch.Tensor, torch.Tensor, PendingHRes]:
    """:func:`mhc_pre` with H_res's Sinkhorn as a kernel of its own: (x [..., C], H_post [..., n],
    PendingHRes); call ``.wait()`` for H_res [..., n, n] when it is needed (after the branch: ``mix_out``).
    The values and gradients of :func:`mhc_pre` up to float32 rounding (the same float64 Sinkhorn in
    another kernel; the GEMM by SPLIT_FORWARD_TILINGS, in float32 FMAs where mhc_pre's uses tf32x3).

    The pre-branch kernel writes x, H_post and the H_res logits (its Sinkhorn skipped), then
    ``sinkhorn_triton``'s kernel turns the logits into H_res. Why: inside the pre-branch kernel the
    Sinkhorn is 40 dependent float64 half steps per program of 16-64 residues; as its own kernel it runs
    16 matrices per program, more programs in parallel (on the H100 at 8,064 residues, eager: the
    pre-branch forward 40 -> 25 us, the Sinkhorn kernel 7.8 us).
    With a gradient (training) the pre-branch is ``MHCPre(sinkhorn=False)`` (its third output the logits)
    and the Sinkhorn its own autograd node (``sinkhorn_triton.sinkhorn_fused``, whose VJP kernel the
    fused backward used to launch itself).

    ``side_stream`` (CUDA, without gradient only: sampling): the Sinkhorn runs on a side stream, ordered
    after the pre-branch kernel, while the current stream goes on with the branch; ``wait()`` joins the
    two. Both buffers are allocated on the current stream before the fork and stay referenced until
    after the join, so the caching allocator cannot hand their memory out while the side stream uses
    them. Works eagerly and inside CUDA-graph capture (the fork and join become graph edges). (In
    training the side stream did not pay: autograd would run the VJP there too; measured slower, see
    BENCHMARKS.md, session 8.) On a CPU tensor (Triton's interpreter) there is no side stream."""
    from model.mhc import SINKHORN_LOGIT_FLOOR  # NOTE: here: model.mhc imports this module

    params = (alpha_pre, alpha_post, alpha_res, b_pre, b_post, b_res)
    iters = _checked_iters(streams, params, sinkhorn_iters)
    if needs_grad(streams, phi, *params):
        if side_stream:
            raise ValueError("mhc_pre_split: side_stream only without gradient (call it under torch.no_grad())")
        x, h_post, z = MHCPre.apply(streams, phi, *params, iters, False)  # z: H_res's logits [..., n, n]
        return x, h_post, PendingHRes(sinkhorn_triton.sinkhorn_fused(z, iters, SINKHORN_LOGIT_FLOOR), z, None)
    x, h_post, h_res, _, z, _ = _forward(streams.contiguous(), phi, params, iters, save=False, sinkhorn=False)
    z = z.view(h_res.shape)  # [..., n, n] logits
    side = _side_stream(h_res.device) if side_stream and h_res.is_cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream(h_res.device))
    with torch.cuda.stream(side):  # None: the current stream
        sinkhorn_triton.sinkhorn_into(z, h_res, iters, SINKHORN_LOGIT_FLOOR)
    return x, h_post, PendingHRes(h_res, z, side)
