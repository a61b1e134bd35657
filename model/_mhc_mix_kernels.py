"""Triton kernels of model/mhc_mix_triton.py (imports Triton at module level: import this lazily).

Layout: streams S [count, N, C] contiguous (N streams of C channels per residue), h_pre / h_post
[count, N], h_res [count, N, N], y [count, C]. One program handles BLOCK residues and keeps their
streams in registers ([BLOCK, N, C]); N and C are powers of two.
"""

import triton
import triton.language as tl


@triton.jit
def _load_streams(s_ptr, rows, valid, N: tl.constexpr, C: tl.constexpr):
    offs = rows[:, None, None] * (N * C) + tl.arange(0, N)[None, :, None] * C + tl.arange(0, C)[None, None, :]
    return tl.load(s_ptr + offs, mask=valid[:, None, None], other=0.0).to(tl.float32)  # [BLOCK, N, C]


@triton.jit
def mix_in_kernel(h_ptr, s_ptr, out_ptr, count, N: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr):
    """out[r, c] = sum_k h[r, k] * S[r, k, c]   (the branch input H_pre S)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = rows < count
    s = _load_streams(s_ptr, rows, valid, N, C)  # [BLOCK, N, C]
    h = tl.load(h_ptr + rows[:, None] * N + tl.arange(0, N)[None, :], mask=valid[:, None], other=0.0)
    out = tl.sum(h.to(tl.float32)[:, :, None] * s, axis=1)  # [BLOCK, C]
    offs = rows[:, None] * C + tl.arange(0, C)[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def mix_out_kernel(h_res_ptr, h_post_ptr, s_ptr, y_ptr, out_ptr, count, N: tl.constexpr, C: tl.constexpr,
                   BLOCK: tl.constexpr):
    """out[r, i, c] = sum_k h_res[r, i, k] * S[r, k, c] + h_post[r, i] * y[r, c]   (H_res S + H_post^T y)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = rows < count
    s = _load_streams(s_ptr, rows, valid, N, C)  # [BLOCK, N, C]
    cols = tl.arange(0, C)
    y = tl.load(y_ptr + rows[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    for i in tl.static_range(N):
        h_i = tl.load(h_res_ptr + rows[:, None] * (N * N) + i * N + tl.arange(0, N)[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)  # [BLOCK, N]: row i of H_res
        p_i = tl.load(h_post_ptr + rows * N + i, mask=valid, other=0.0).to(tl.float32)  # [BLOCK]
        out = tl.sum(h_i[:, :, None] * s, axis=1) + p_i[:, None] * y  # [BLOCK, C]
        offs = rows[:, None] * (N * C) + i * C + cols[None, :]
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=valid[:, None])
