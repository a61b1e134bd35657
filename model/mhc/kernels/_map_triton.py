"""Triton kernel of model/mhc_map_triton.py (imports Triton at module level: import this lazily).

Layout: streams x [count, K] contiguous (vec of the residue's n streams, K = n * C), phi [K, M]
float32 contiguous (M = 2n + n^2), alpha / bias [M] float32, out [count, M] float32. One program
handles BLOCK_M residues and walks K in chunks of BLOCK_K (K a multiple of BLOCK_K); the M columns
are padded to MP (a power of two >= 16, what ``tl.dot`` needs) with masks. ``gemm_and_sumsq`` (pass 1) is
shared with the fused pre-branch (model/_mhc_pre_kernels.py).
"""

import triton
import triton.language as tl


@triton.jit
def gemm_and_sumsq(x_ptr, row_offs, valid, phi_ptr, phi_cols, cols_ok, K: tl.constexpr, M: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, MP: tl.constexpr, PRECISION: tl.constexpr):
    """Pass 1 of the mapping kernels over the K = n C entries of vec(S_r), in chunks of BLOCK_K:
    (acc [BLOCK_M, MP] = v phi[:, phi_cols], sumsq [BLOCK_M] = sum v^2), float32, for the rows at
    ``row_offs`` (int64 element offsets; ``valid`` masks the rest: zeros). Register column a holds phi
    column phi_cols[a] (zero where not ``cols_ok``).
    NOTE: PRECISION "tf32x3" (three tf32 tensor-core products, hi / lo split) keeps ~float32 accuracy, which
    the logits need (Sinkhorn exponentiates them); plain tf32 rounds v and phi to 10 mantissa bits; "ieee"
    (float32 FMAs) is exact float32 and the faster for a few hundred rows (mhc_pre_triton.FORWARD_TILINGS)."""
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
def mapping_logits_kernel(x_ptr, phi_ptr, alpha_ptr, bias_ptr, out_ptr, count, eps, K: tl.constexpr,
                          M: tl.constexpr, MP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                          PRECISION: tl.constexpr):
    """out[r, j] = bias[j] + alpha[j] * (sum_k x[r, k] phi[k, j]) * rsqrt(mean_k x[r, k]^2 + eps)
    (Eq. 14-16: the GEMM on the raw x, then the 1 / rms scale; Eq. 7-8's RMSNorm-first form reordered)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    valid = rows < count
    row_offs = rows.to(tl.int64) * K  # NOTE: int64, count * K may pass 2^31 for long batches
    cols = tl.arange(0, MP)  # [MP]
    col_ok = cols < M
    acc, sumsq = gemm_and_sumsq(x_ptr, row_offs, valid, phi_ptr, cols, col_ok, K, M, BLOCK_M, BLOCK_K, MP,
                                PRECISION)  # x phi [BLOCK_M, MP], sum_k x^2 [BLOCK_M]
    inv_rms = 1.0 / tl.sqrt(sumsq / K + eps)  # [BLOCK_M]
    alpha = tl.load(alpha_ptr + cols, mask=col_ok, other=0.0)  # [MP]
    bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0)  # [MP]
    out = bias[None, :] + alpha[None, :] * (acc * inv_rms[:, None])  # [BLOCK_M, MP]
    offs = rows.to(tl.int64)[:, None] * M + cols[None, :]
    tl.store(out_ptr + offs, out, mask=valid[:, None] & col_ok[None, :])
