"""Triton kernels of model/mhc/kernels/pre.py (imports Triton at module level: import this lazily).

Layout: streams S [count, N, C] contiguous (vec(S_r) = row r of a [count, D] matrix, D = N * C), phi
[D, M] float32 contiguous (M = 2N + N^2 columns: pre | post | res), alpha_* scalars and b_pre / b_post
[N], b_res [N, N] float32. Outputs: x [count, C] (the streams' dtype), h_post [count, N] and z [count,
N * N] (the H_res logits, which model/mhc/kernels/_sinkhorn_triton.py turns into H_res), float32; saved
for backward: raw [count, M] = (v phi) / rms(v) and rinv [count] = 1 / rms(v), float32.

One program handles BLOCK_M residues. In registers the M columns live in one [BLOCK_M, MP] tile (MP =
M padded to a power of two >= 16, what ``tl.dot`` takes), in the order res | pre | post | padding
(``_phi_col`` maps a register column to phi's column), so that each group starts at a multiple of its
own width: ``_fold`` (mask, reshape [BLOCK_M, MP / K, K], sum) then extracts a group as [BLOCK_M, K]
exactly (Triton has no column slicing), and ``_repeat`` spreads [BLOCK_M, N] back over the columns.
One GEMM step per chunk of D forward (v phi), two backward (du phi^T and v^T du).
"""

import triton
import triton.language as tl


@triton.jit
def gemm_and_sumsq(x_ptr, row_offs, valid, phi_ptr, phi_cols, cols_ok, K: tl.constexpr, M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr, PRECISION: tl.constexpr):
    """Pass 1 of the forward over the K = n C entries of vec(S_r), in chunks of BLOCK_K: (acc [BLOCK_M, MP]
    = v phi[:, phi_cols], sumsq [BLOCK_M] = sum v^2), float32, for the rows at ``row_offs`` (int64 element
    offsets; ``valid`` masks the rest: zeros). Register column a holds phi column phi_cols[a] (zero where
    not ``cols_ok``).
    NOTE: PRECISION "tf32x3" (three tf32 tensor-core products, hi / lo split) keeps ~float32 accuracy, which
    the logits need (Sinkhorn exponentiates them); plain tf32 rounds v and phi to 10 mantissa bits; "ieee"
    (float32 FMAs) is exact float32 (pre.FORWARD_TILINGS picks it: the faster there)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, MP), dtype=tl.float32)
    sumsq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # the streams' own dtype (float32 / bf16 / fp16) in memory, float32 in registers
        v = tl.load(x_ptr + row_offs[:, None] + (k0 + ks)[None, :], mask=valid[:, None],
                    other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        w = tl.load(phi_ptr + (k0 + ks)[:, None] * M + phi_cols[None, :], mask=cols_ok[None, :],
                    other=0.0)  # [BLOCK_K, MP]
        sumsq += tl.sum(v * v, axis=1)
        acc = tl.dot(v, w, acc, input_precision=PRECISION)  # [BLOCK_M, MP]
    return acc, sumsq


@triton.jit
def _phi_col(a, N: tl.constexpr):
    """phi's column of register column ``a`` (res | pre | post order; meaningful where a < M)."""
    return tl.where(a < N * N, 2 * N + a, a - N * N)


@triton.jit
def _fold(tile, keep, BLOCK_M: tl.constexpr, W: tl.constexpr, K: tl.constexpr):
    """The columns ``keep`` [W] of [BLOCK_M, W] as [BLOCK_M, K]: a group of K columns starting at a
    multiple of K (the other W / K - 1 terms of each sum are zeros, so this is exact)."""
    return tl.sum(tl.reshape(tl.where(keep[None, :], tile, 0.0), (BLOCK_M, W // K, K)), axis=1)


@triton.jit
def _repeat(v, BLOCK_M: tl.constexpr, W: tl.constexpr, K: tl.constexpr):
    """[BLOCK_M, K] -> [BLOCK_M, W]: column a holds v[:, a % K] (mask it to the group's columns)."""
    return tl.reshape(tl.broadcast_to(v[:, None, :], (BLOCK_M, W // K, K)), (BLOCK_M, W))


@triton.jit
def _column_params(a, a_pre_ptr, a_post_ptr, a_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr, N: tl.constexpr):
    """alpha and bias per register column a: [MP] each (zero bias on the padding)."""
    NN: tl.constexpr = N * N
    is_pre = (a >= NN) & (a < NN + N)
    is_post = (a >= NN + N) & (a < NN + 2 * N)
    alpha = tl.where(a < NN, tl.load(a_res_ptr), tl.where(is_pre, tl.load(a_pre_ptr), tl.load(a_post_ptr)))
    bias = (tl.load(b_res_ptr + a, mask=a < NN, other=0.0) + tl.load(b_pre_ptr + (a - NN), mask=is_pre, other=0.0)
            + tl.load(b_post_ptr + (a - NN - N), mask=is_post, other=0.0))
    return alpha, bias, is_pre, is_post


@triton.jit
def _stream_tile(s_ptr, row_offs, valid, c0, N: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """S[rows, :, c0 : c0 + BLOCK_C] as float32: [BLOCK_M, N, BLOCK_C] (row_offs = rows * N * C, int64)."""
    offs = (row_offs[:, None, None] + tl.arange(0, N)[None, :, None] * C
            + (c0 + tl.arange(0, BLOCK_C))[None, None, :])
    return tl.load(s_ptr + offs, mask=valid[:, None, None], other=0.0).to(tl.float32)


@triton.jit
def pre_forward_kernel(s_ptr, phi_ptr, a_pre_ptr, a_post_ptr, a_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr,
                       x_ptr, post_ptr, z_ptr, raw_ptr, rinv_ptr, count, eps, N: tl.constexpr,
                       C: tl.constexpr, MP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_C: tl.constexpr, SAVE: tl.constexpr, PRECISION: tl.constexpr):
    """Per residue r (v = vec(S_r)): raw = (v phi) / rms(v); h_pre = sigmoid(a_pre raw_pre + b_pre),
    h_post = 2 sigmoid(a_post raw_post + b_post), z = a_res raw_res + b_res (the H_res logits: the
    Sinkhorn is _sinkhorn_triton.forward_kernel, launched after this one); x = sum_i h_pre_i S_i.
    SAVE: also raw and rinv."""
    NN: tl.constexpr = N * N
    D: tl.constexpr = N * C
    M: tl.constexpr = 2 * N + NN
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    valid = rows < count
    rows = rows.to(tl.int64)  # NOTE: int64, count * D may pass 2^31 for long batches
    row_offs = rows * D
    a = tl.arange(0, MP)  # register columns: res | pre | post | padding
    col = _phi_col(a, N)
    ok = a < M
    # pass 1 over D: v phi (tf32x3 tensor-core products or float32 FMAs) and sum(v^2)
    acc, sumsq = gemm_and_sumsq(s_ptr, row_offs, valid, phi_ptr, col, ok, D, M, BLOCK_M, BLOCK_K, MP,
                                PRECISION)  # [BLOCK_M, MP], [BLOCK_M]
    rinv = 1.0 / tl.sqrt(sumsq / D + eps)  # [BLOCK_M]
    raw = acc * rinv[:, None]  # [BLOCK_M, MP] (zero on the padding)
    alpha, bias, is_pre, is_post = _column_params(a, a_pre_ptr, a_post_ptr, a_res_ptr, b_pre_ptr, b_post_ptr,
                                                  b_res_ptr, N)
    logits = alpha[None, :] * raw + bias[None, :]  # [BLOCK_M, MP]
    sig = tl.sigmoid(logits)
    h_pre = _fold(sig, is_pre, BLOCK_M, MP, N)  # [BLOCK_M, N]
    tl.store(post_ptr + rows[:, None] * N + (a - NN - N)[None, :], 2.0 * sig,
             mask=valid[:, None] & is_post[None, :])  # h_post = 2 sigmoid
    z = _fold(logits, a < NN, BLOCK_M, MP, NN)  # [BLOCK_M, N*N] float32 H_res logits
    nn_offs = rows[:, None] * NN + tl.arange(0, NN)[None, :]  # [BLOCK_M, N*N]
    tl.store(z_ptr + nn_offs, z, mask=valid[:, None])
    if SAVE:
        tl.store(raw_ptr + rows[:, None] * M + col[None, :], raw, mask=valid[:, None] & ok[None, :])
        tl.store(rinv_ptr + rows, rinv, mask=valid)
    # pass 2 over C (the streams again, from L2): x = H_pre S
    cc = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        s = _stream_tile(s_ptr, row_offs, valid, c0, N, C, BLOCK_C)  # [BLOCK_M, N, BLOCK_C]
        x = tl.sum(h_pre[:, :, None] * s, axis=1)  # [BLOCK_M, BLOCK_C]
        tl.store(x_ptr + rows[:, None] * C + (c0 + cc)[None, :], x.to(x_ptr.dtype.element_ty),
                 mask=valid[:, None])


@triton.jit
def pre_backward_kernel(s_ptr, phi_ptr, a_pre_ptr, a_post_ptr, a_res_ptr, b_pre_ptr, b_post_ptr, b_res_ptr,
                        raw_ptr, rinv_ptr, gx_ptr, gpost_ptr, glres_ptr, gs_ptr, part_ptr, count,
                        N: tl.constexpr, C: tl.constexpr, MP: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, HAS_GX: tl.constexpr,
                        HAS_POST: tl.constexpr, HAS_RES: tl.constexpr, PRECISION: tl.constexpr):
    """Vector-Jacobian product of pre_forward_kernel for gx [count, C], g_post [count, N] and
    gl_res [count, N*N] (the logits' gradient: the Sinkhorn is its own autograd node; HAS_*: False = zero
    gradient, not read):

        g_hpre = S gx;  gl = g_hpre h_pre (1 - h_pre) | g_post h_post (1 - h_post / 2) | gl_res
        graw = alpha gl;  du = graw rinv;  coef = (graw . raw) rinv^2 / D
        gS = du phi^T - coef v + h_pre gx   (per residue, stored in the streams' dtype)

    and this program's partial sums over its residues, row pid of part [programs, D M + M + 3]:
    v^T du [D, M] (g_phi), sum gl [M] (g_bias), sum gl raw per group [3] (g_alpha pre, post, res)."""
    NN: tl.constexpr = N * N
    D: tl.constexpr = N * C
    M: tl.constexpr = 2 * N + NN
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    valid = rows < count
    rows = rows.to(tl.int64)
    row_offs = rows * D
    a = tl.arange(0, MP)
    col = _phi_col(a, N)
    ok = a < M
    # pass 1 over C: g_hpre[r, i] = sum_c gx[r, c] S[r, i, c]
    g_hpre = tl.zeros((BLOCK_M, N), dtype=tl.float32)
    cc = tl.arange(0, BLOCK_C)
    if HAS_GX:
        for c0 in range(0, C, BLOCK_C):
            s = _stream_tile(s_ptr, row_offs, valid, c0, N, C, BLOCK_C)  # [BLOCK_M, N, BLOCK_C]
            gx = tl.load(gx_ptr + rows[:, None] * C + (c0 + cc)[None, :], mask=valid[:, None],
                         other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_C]
            g_hpre += tl.sum(s * gx[:, None, :], axis=2)
    # logits gradients, all groups in one [BLOCK_M, MP] tile (zero on invalid rows and the padding)
    rinv = tl.load(rinv_ptr + rows, mask=valid, other=0.0)  # [BLOCK_M]
    raw = tl.load(raw_ptr + rows[:, None] * M + col[None, :], mask=valid[:, None] & ok[None, :], other=0.0)
    alpha, bias, is_pre, is_post = _column_params(a, a_pre_ptr, a_post_ptr, a_res_ptr, b_pre_ptr, b_post_ptr,
                                                  b_res_ptr, N)
    sig = tl.sigmoid(alpha[None, :] * raw + bias[None, :])  # [BLOCK_M, MP]
    dsig = sig * (1.0 - sig)  # h_pre (1 - h_pre); 2 dsig = h_post (1 - h_post / 2)
    gl = tl.where(is_pre[None, :], _repeat(g_hpre, BLOCK_M, MP, N) * dsig, 0.0)
    if HAS_POST:
        g_post = tl.load(gpost_ptr + rows[:, None] * N + (a - NN - N)[None, :],
                         mask=valid[:, None] & is_post[None, :], other=0.0)
        gl += g_post * 2.0 * dsig
    if HAS_RES:
        gl += tl.load(glres_ptr + rows[:, None] * NN + a[None, :], mask=valid[:, None] & (a < NN)[None, :],
                      other=0.0)
    # this program's g_bias and g_alpha partials
    part = part_ptr + pid.to(tl.int64) * (D * M + M + 3)
    tl.store(part + D * M + col, tl.sum(gl, axis=0), mask=ok)
    glr = tl.sum(gl * raw, axis=0)  # [MP]
    tl.store(part + D * M + M, tl.sum(tl.where(is_pre, glr, 0.0), axis=0))
    tl.store(part + D * M + M + 1, tl.sum(tl.where(is_post, glr, 0.0), axis=0))
    tl.store(part + D * M + M + 2, tl.sum(tl.where(a < NN, glr, 0.0), axis=0))
    # through raw = (v phi) rinv: du = graw rinv, and the rms term coef v
    graw = alpha[None, :] * gl
    coef = tl.sum(graw * raw, axis=1) * rinv * rinv / D  # [BLOCK_M]
    du = graw * rinv[:, None]  # [BLOCK_M, MP]
    h_pre = _fold(sig, is_pre, BLOCK_M, MP, N)  # [BLOCK_M, N]
    sn = tl.arange(0, N)
    # pass 2 over D (chunks of one stream each): gS chunk and the g_phi partial v^T du
    ks = tl.arange(0, BLOCK_K)
    for c0 in range(0, C, BLOCK_K):
        if HAS_GX:
            gx = tl.load(gx_ptr + rows[:, None] * C + (c0 + ks)[None, :], mask=valid[:, None],
                         other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
        for i in tl.static_range(N):
            k0 = i * C + c0
            v = tl.load(s_ptr + row_offs[:, None] + (k0 + ks)[None, :], mask=valid[:, None],
                        other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_K]
            gs = -coef[:, None] * v
            if HAS_GX:
                h_i = tl.sum(tl.where(sn[None, :] == i, h_pre, 0.0), axis=1)  # [BLOCK_M] h_pre of stream i
                gs += h_i[:, None] * gx
            w_t = tl.load(phi_ptr + (k0 + ks)[None, :] * M + col[:, None], mask=ok[:, None],
                          other=0.0)  # [MP, BLOCK_K] phi^T
            gs = tl.dot(du, w_t, gs, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K]
            tl.store(gs_ptr + row_offs[:, None] + (k0 + ks)[None, :], gs.to(gs_ptr.dtype.element_ty),
                     mask=valid[:, None])
            g_phi = tl.dot(tl.trans(v), du, input_precision=PRECISION)  # [BLOCK_K, MP] (invalid rows: v = 0)
            tl.store(part + (k0 + ks)[:, None] * M + col[None, :], g_phi, mask=ok[None, :])
