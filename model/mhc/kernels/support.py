"""Whether the fused mHC kernels can run for a tensor (shared by the launchers of this package).

Triton is never imported at package import: the package runs and tests on machines without it.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["FLOAT_DTYPES", "dot_width", "is_pow2", "needs_grad", "triton_can_run"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # tensor dtypes the mHC kernels load


@functools.cache
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - absent or broken: the reference runs
        return False
    return True


def triton_can_run(tensor: torch.Tensor) -> bool:
    """True for a CUDA tensor (or a CPU one under ``TRITON_INTERPRET=1``, Triton's interpreter, which
    the tests use), outside torch.compile (which fuses the references itself), where Triton imports."""
    if torch.compiler.is_compiling():
        return False
    if not (tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    return _triton_importable()


def is_pow2(v: int) -> bool:
    """True for 1, 2, 4, 8, ... (Triton block shapes must be powers of two)."""
    return v > 0 and v & (v - 1) == 0


def dot_width(m: int) -> int:
    """``m`` columns padded to a power of two >= 16 (``tl.dot``'s smallest tile side)."""
    return max(16, 1 << (m - 1).bit_length())


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd will want a gradient of any of ``tensors`` (the fused ops then take their
    autograd Function, else the bare forward kernel)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
