"""Triton kernels of model/sinkhorn_triton.py (imports Triton at module level: import this lazily).

Kernels are module-level functions because Triton resolves the helpers a kernel calls from its
module's globals. Math and layout: see model/sinkhorn_triton.py.
"""

import triton
import triton.language as tl


@triton.jit
def _init(z, shift, FLOOR: tl.constexpr):
    d = z - shift[:, None, None]
    return tl.exp(tl.maximum(d, -FLOOR)), d > -FLOOR


@triton.jit
def _half(m, rows):
    # rows False: T_c (divide by the column sums, axis 1 = i); True: T_r (row sums, axis 2 = j)
    return tl.where(rows, m / tl.sum(m, axis=2, keep_dims=True), m / tl.sum(m, axis=1, keep_dims=True))


@triton.jit
def forward_kernel(z_ptr, out_ptr, count, ITERS: tl.constexpr, N: tl.constexpr, FLOOR: tl.constexpr,
                   BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] matrix index
    offs = rows[:, None] * (N * N) + tl.arange(0, N * N)[None, :]  # [BLOCK, N*N]
    valid = rows[:, None] < count
    z = tl.reshape(tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    shift = tl.max(tl.max(z, axis=2), axis=1)  # [BLOCK]
    m, _ = _init(z, shift, FLOOR)
    for _ in range(ITERS):
        m = m / tl.sum(m, axis=1, keep_dims=True)  # T_c
        m = m / tl.sum(m, axis=2, keep_dims=True)  # T_r
    tl.store(out_ptr + offs, tl.reshape(m, (BLOCK, N * N)).to(out_ptr.dtype.element_ty), mask=valid)

@triton.jit
def backward_kernel(z_ptr, gout_ptr, gz_ptr, count, ITERS: tl.constexpr, N: tl.constexpr,
                    FLOOR: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None] * (N * N) + tl.arange(0, N * N)[None, :]
    valid = rows[:, None] < count
    z = tl.reshape(tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    g = tl.reshape(tl.load(gout_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    shift = tl.max(tl.max(z, axis=2), axis=1)
    m0, live = _init(z, shift, FLOOR)
    for back in range(2 * ITERS):
        k = 2 * ITERS - 1 - back  # differentiate half step k: m_{k+1} = half_k(m_k)
        m = m0
        for j in range(2 * ITERS):  # recompute m_k: half steps j < k (alternating T_c, T_r)
            m = tl.where(j < k, _half(m, j % 2 == 1), m)
        r = tl.sum(m, axis=2, keep_dims=True)  # [BLOCK, N, 1] row sums
        c = tl.sum(m, axis=1, keep_dims=True)  # [BLOCK, 1, N] column sums
        is_row = k % 2 == 1
        gy = g * tl.where(is_row, m / r, m / c)
        g = tl.where(is_row, (g - tl.sum(gy, axis=2, keep_dims=True)) / r,
                     (g - tl.sum(gy, axis=1, keep_dims=True)) / c)
    gz = tl.where(live, g * m0, 0.0)
    tl.store(gz_ptr + offs, tl.reshape(gz, (BLOCK, N * N)).to(gz_ptr.dtype.element_ty), mask=valid)
