"""Fused Triton kernels of mHC (imported lazily: Triton is never needed to import the package)."""
