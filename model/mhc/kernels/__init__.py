"""The fused Triton kernels of an mHC residual, each with its launcher (the reference beside each is in
``model/mhc/reference.py``; tests compare them, forward and gradients).

    pre.py        fused_pre: the mappings (Eqs. 7-8, 14-16) and H_pre S, one kernel each way; then
                  H_res's Sinkhorn by sinkhorn.py (its own autograd node; a side stream when sampling
                  small batches).                                   reference: mhc_pre_reference
    sinkhorn.py   the float64 Sinkhorn of Eq. 9, one kernel each way.   reference: sinkhorn_knopp
    mix.py        mix_out: H_res S + H_post^T y and the new streams' mean, one kernel each way.
                                                                    reference: mix_out, contract
    support.py    whether a kernel can run for a tensor (CUDA or Triton's CPU interpreter, not compiling).
    _*_triton.py  the Triton source (imports Triton at module level: loaded lazily by the launchers).

Nothing here imports Triton at import time: the package imports and runs on a CPU-only machine
without it. ``pre.available(streams, phi)`` is the one condition under which ``MHCResidual`` takes the
fused path (the mixing and Sinkhorn kernels take every shape the pre-branch kernel takes).
"""
