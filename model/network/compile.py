"""``torch.compile`` of a denoiser's hot spots, in place, and its undo (``compileModel True``; the service's
``MHCFLASH_COMPILE``).

Two parts are compiled: the pair-transform layers (memory-bound work on [B, L, L, C_p] tensors that
inductor fuses) and Flash-IPA's point rotations (many points x one 3 x 3 rotation per residue). The
parameters, ``state_dict`` names and call signature of the denoiser stay unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["compile_denoiser", "compiled_parts", "uncompile_denoiser"]


def compile_denoiser(denoiser: nn.Module, *, dynamic: bool | None = True, mode: str | None = None,
                     backend="inductor") -> nn.Module:
    """``compileModel True``: ``torch.compile`` the denoiser's pair-transform layers, in place; returns it.

    The parameters, ``state_dict`` names and call signature are unchanged (save and load the module as
    before). ``dynamic=True`` compiles batch size and length as symbols on the first call, so later
    shapes reuse that graph (torch still specialises a batch of 1: one more graph for B = 1);
    ``dynamic``, ``mode`` and ``backend`` are passed to ``torch.compile``; :func:`uncompile_denoiser`
    undoes it.

    Why only the pair stack: it is where a step of a model with a pair stack spends its time, in
    memory-bound kernels on [B, L, L, C_p] tensors that inductor fuses (``benchmarks/pair_stack.py``:
    B = 64, L = 128 forward 119.9 -> 40.1 ms on an H100); it compiles in ~12 s. Compiling the whole
    model (mHC + Flash-IPA structure layers included) did not finish in 200 s on an H100, and the
    sampling step of those layers is CUDA-graphed by the service instead. Flash-IPA's point rotations
    (many points x one 3 x 3 rotation per residue: a batched GEMM with K = 3, slow in cuBLAS) become one
    fused kernel (``model.geometry.rotate_points_elementwise`` compiled); that is all a pair-free model
    gets.
    """
    net = getattr(denoiser, "pair_transform_net", None)
    if net is not None:
        net.compile_layers(dynamic=dynamic, mode=mode, backend=backend)
    flash = _flash_ipa_modules(denoiser)
    if flash:
        from model.geometry import rotate_points_elementwise

        fused = torch.compile(rotate_points_elementwise, dynamic=dynamic, mode=mode, backend=backend)
        for module in flash:
            module.rotate = fused
    return denoiser


def compiled_parts(denoiser: nn.Module) -> list[str]:
    """What :func:`compile_denoiser` compiled in ``denoiser``: ``pair_stack``, ``point_rotations``."""
    from model.geometry import rotate_points

    parts = []
    net = getattr(denoiser, "pair_transform_net", None)
    if net is not None and any(getattr(layer, "_compiled_call_impl", None) is not None for layer in net.layers):
        parts.append("pair_stack")
    if any(m.rotate is not rotate_points for m in _flash_ipa_modules(denoiser)):
        parts.append("point_rotations")
    return parts


def _flash_ipa_modules(denoiser: nn.Module) -> list[nn.Module]:
    """The Flash-IPA layers of ``denoiser`` (whose point rotations compile_denoiser swaps)."""
    from model.ipa.flash import FlashIPA

    return [m for m in denoiser.modules() if isinstance(m, FlashIPA)]


def uncompile_denoiser(denoiser: nn.Module) -> nn.Module:
    """Undo :func:`compile_denoiser` in place (the service's fallback when compiling fails); returns it."""
    from model.geometry import rotate_points

    net = getattr(denoiser, "pair_transform_net", None)
    if net is not None:
        net.eager_layers()
    for module in _flash_ipa_modules(denoiser):
        module.rotate = rotate_points
    return denoiser
