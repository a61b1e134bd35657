"""Whether an optional Triton kernel can run for a tensor (shared by the fused mHC kernels).

Triton is never imported at package import: the package runs and tests on machines without it.
"""

from __future__ import annotations

import functools
import os

import torch

__all__ = ["triton_can_run"]


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
