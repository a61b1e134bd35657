"""Triton kernels of model/mhc/kernels/mix.py (imports Triton at module level: import this lazily).

Layout: streams S [count, N, C] contiguous (N streams of C channels per residue), h_post [count, N],
h_res [count, N, N], y [count, C]; gradients have the layout of what they are the gradient
of. One program handles BLOCK residues and keeps their streams (backward: the output gradient) in
registers ([BLOCK, N, C]); N and C are powers of two. Sums run in float32, whatever the input dtype;
results are stored in the output tensor's dtype.
"""

import triton
import triton.language as tl


@triton.jit
def _stream_offsets(rows, N: tl.constexpr, C: tl.constexpr):
    """[BLOCK, N, C] element offsets of the residues ``rows`` in a [count, N, C] tensor."""
    return rows[:, None, None] * (N * C) + tl.arange(0, N)[None, :, None] * C + tl.arange(0, C)[None, None, :]


@triton.jit
def _load_streams(s_ptr, rows, valid, N: tl.constexpr, C: tl.constexpr):
    offs = _stream_offsets(rows, N, C)
    return tl.load(s_ptr + offs, mask=valid[:, None, None], other=0.0).to(tl.float32)  # [BLOCK, N, C]


@triton.jit
def mix_out_kernel(h_res_ptr, h_post_ptr, s_ptr, y_ptr, out_ptr, mean_ptr, count, N: tl.constexpr, C: tl.constexpr,
                   BLOCK: tl.constexpr, MEAN: tl.constexpr):
    """out[r, i, c] = sum_k h_res[r, i, k] * S[r, k, c] + h_post[r, i] * y[r, c]   (H_res S + H_post^T y);
    with MEAN also mean[r, c] = (1 / N) sum_i out[r, i, c] (the mean read-out of the new streams)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = rows < count
    s = _load_streams(s_ptr, rows, valid, N, C)  # [BLOCK, N, C]
    cols = tl.arange(0, C)
    y = tl.load(y_ptr + rows[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    total = tl.zeros((BLOCK, C), dtype=tl.float32)
    for i in tl.static_range(N):
        h_i = tl.load(h_res_ptr + rows[:, None] * (N * N) + i * N + tl.arange(0, N)[None, :], mask=valid[:, None],
                      other=0.0).to(tl.float32)  # [BLOCK, N]: row i of H_res
        p_i = tl.load(h_post_ptr + rows * N + i, mask=valid, other=0.0).to(tl.float32)  # [BLOCK]
        out = tl.sum(h_i[:, :, None] * s, axis=1) + p_i[:, None] * y  # [BLOCK, C]
        out = out.to(out_ptr.dtype.element_ty)
        offs = rows[:, None] * (N * C) + i * C + cols[None, :]
        tl.store(out_ptr + offs, out, mask=valid[:, None])
        if MEAN:
            total += out.to(tl.float32)  # the stored (rounded) streams, as a mean of the output would see them
    if MEAN:
        tl.store(mean_ptr + rows[:, None] * C + cols[None, :], (total / N).to(mean_ptr.dtype.element_ty),
                 mask=valid[:, None])


# ----------------------------------------------------------------------------- backward (training)


@triton.jit
def mix_out_backward_kernel(h_res_ptr, h_post_ptr, s_ptr, y_ptr, g_ptr, gmean_ptr, gh_res_ptr, gh_post_ptr,
                            gs_ptr, gy_ptr, count, N: tl.constexpr, C: tl.constexpr, BLOCK: tl.constexpr,
                            GRAD_OUT: tl.constexpr, GRAD_MEAN: tl.constexpr):
    """Vector-Jacobian product of mix_out_kernel for the output gradient g [count, N, C]:
    gS[r, k, c] = sum_i h_res[r, i, k] g[r, i, c]      gh_res[r, i, k] = sum_c g[r, i, c] S[r, k, c]
    gh_post[r, i] = sum_c g[r, i, c] y[r, c]           gy[r, c] = sum_i h_post[r, i] g[r, i, c]
    where g = (the streams' gradient if GRAD_OUT) + (gmean[r, c] / N if GRAD_MEAN: the mean read-out's).
    g stays in registers; S is read one stream k at a time (column k of H_res and of gh_res with it)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK]
    valid = rows < count
    cols = tl.arange(0, C)
    if GRAD_OUT:
        g = _load_streams(g_ptr, rows, valid, N, C)  # [BLOCK, N, C]
    else:
        g = tl.zeros((BLOCK, N, C), dtype=tl.float32)
    if GRAD_MEAN:
        gm = tl.load(gmean_ptr + rows[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
        g += gm[:, None, :] / N
    streams = tl.arange(0, N)
    y = tl.load(y_ptr + rows[:, None] * C + cols[None, :], mask=valid[:, None], other=0.0).to(tl.float32)
    p_offs = rows[:, None] * N + streams[None, :]  # [BLOCK, N]
    p = tl.load(h_post_ptr + p_offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, N]
    gp = tl.sum(g * y[:, None, :], axis=2)  # [BLOCK, N]
    tl.store(gh_post_ptr + p_offs, gp.to(gh_post_ptr.dtype.element_ty), mask=valid[:, None])
    gy = tl.sum(p[:, :, None] * g, axis=1)  # [BLOCK, C]
    tl.store(gy_ptr + rows[:, None] * C + cols[None, :], gy.to(gy_ptr.dtype.element_ty), mask=valid[:, None])
    for k in tl.static_range(N):
        col_offs = rows[:, None] * (N * N) + streams[None, :] * N + k  # [BLOCK, N]: column k of H_res
        h_k = tl.load(h_res_ptr + col_offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, N]
        k_offs = rows[:, None] * (N * C) + k * C + cols[None, :]  # [BLOCK, C]: stream k
        s_k = tl.load(s_ptr + k_offs, mask=valid[:, None], other=0.0).to(tl.float32)  # [BLOCK, C]
        gs_k = tl.sum(h_k[:, :, None] * g, axis=1)  # [BLOCK, C]
        tl.store(gs_ptr + k_offs, gs_k.to(gs_ptr.dtype.element_ty), mask=valid[:, None])
        gh_k = tl.sum(g * s_k[:, None, :], axis=2)  # [BLOCK, N]: column k of gh_res
        tl.store(gh_res_ptr + col_offs, gh_k.to(gh_res_ptr.dtype.element_ty), mask=valid[:, None])
