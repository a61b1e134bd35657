"""Triton kernels of model/mhc/kernels/sinkhorn.py (imports Triton at module level: import this lazily).

Kernels are module-level functions because Triton resolves the helpers a kernel calls from its
module's globals. Math and layout: see model/mhc/kernels/sinkhorn.py.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(u):
    """tanh in float64 from exp (no overflow: exp(-2|u|) <= 1)."""
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -t, t)


@triton.jit
def _init(z, shift, FLOOR: tl.constexpr):
    d = z - shift[:, None, None]
    return tl.exp(tl.maximum(d, -FLOOR)), d > -FLOOR


@triton.jit
def forward_kernel(z_ptr, out_ptr, count, ITERS: tl.constexpr, N: tl.constexpr, FLOOR: tl.constexpr,
                   CAP: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # [BLOCK] matrix index
    offs = rows[:, None] * (N * N) + tl.arange(0, N * N)[None, :]  # [BLOCK, N*N]
    valid = rows[:, None] < count
    z = tl.reshape(tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    if CAP > 0:  # the soft cap CAP tanh(z / CAP)
        z = CAP * _tanh(z / CAP)
    shift = tl.max(tl.max(z, axis=2), axis=1)  # [BLOCK]
    m, _ = _init(z, shift, FLOOR)
    for _ in range(ITERS):
        m = m * (1.0 / tl.sum(m, axis=1, keep_dims=True))  # T_c (n reciprocals, n^2 products: no n^2 divisions)
        m = m * (1.0 / tl.sum(m, axis=2, keep_dims=True))  # T_r
    tl.store(out_ptr + offs, tl.reshape(m, (BLOCK, N * N)).to(out_ptr.dtype.element_ty), mask=valid)

@triton.jit
def backward_kernel(z_ptr, gout_ptr, gz_ptr, sums_ptr, count, ITERS: tl.constexpr, N: tl.constexpr,
                    FLOOR: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    offs = rows[:, None] * (N * N) + tl.arange(0, N * N)[None, :]
    valid = rows[:, None] < count
    z = tl.reshape(tl.load(z_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    if CAP > 0:  # the capped logits and d(capped) / dz
        t = _tanh(z / CAP)
        z = CAP * t
        dcap = 1.0 - t * t
    else:
        dcap = tl.full((BLOCK, N, N), 1.0, tl.float64)
    g = tl.reshape(tl.load(gout_ptr + offs, mask=valid, other=0.0).to(tl.float64), (BLOCK, N, N))
    shift = tl.max(tl.max(z, axis=2), axis=1)
    m0, live = _init(z, shift, FLOOR)
    # forward again, recording each half step's sums (scratch [count, 2 ITERS, N], float64)
    sums = sums_ptr + rows[:, None] * (2 * ITERS * N) + tl.arange(0, N)[None, :]  # [BLOCK, N] pointers
    m = m0
    for it in range(ITERS):
        c = tl.sum(m, axis=1)  # [BLOCK, N] column sums (T_c)
        tl.store(sums + (2 * it) * N, c, mask=valid)
        m = m * tl.expand_dims(1.0 / c, 1)
        r = tl.sum(m, axis=2)  # [BLOCK, N] row sums (T_r)
        tl.store(sums + (2 * it + 1) * N, r, mask=valid)
        m = m * tl.expand_dims(1.0 / r, 2)
    # NOTE: a barrier before reading the scratch back: a sum is stored by the threads of one layout and
    # loaded by those of another, and without it a thread could read a value another thread had not
    # yet written (the uninitialised scratch: wrong or NaN gradients; seen on the H100 at 32,768 matrices)
    tl.debug_barrier()
    # backwards through the half steps: y = m / s  =>  g_m = (g_y - sum_s g_y y) / s, and m = y s
    for back in range(ITERS):
        it = ITERS - 1 - back
        r = tl.expand_dims(tl.load(sums + (2 * it + 1) * N, mask=valid, other=1.0), 2)  # [BLOCK, N, 1]
        g = (g - tl.sum(g * m, axis=2, keep_dims=True)) * (1.0 / r)
        m = m * r
        c = tl.expand_dims(tl.load(sums + (2 * it) * N, mask=valid, other=1.0), 1)  # [BLOCK, 1, N]
        g = (g - tl.sum(g * m, axis=1, keep_dims=True)) * (1.0 / c)
        m = m * c
    gz = tl.where(live, g * m0 * dcap, 0.0)
    tl.store(gz_ptr + offs, tl.reshape(gz, (BLOCK, N * N)).to(gz_ptr.dtype.element_ty), mask=valid)
