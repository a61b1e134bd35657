"""Start-up warm-up of the sampling service, and the compile it triggers (``MHCFLASH_COMPILE``).

Before ``/ready`` the service runs a few sampling steps through the engine's own step function
(``service.graphs.eager_step``, the service's autocast), so the first request pays no first-call cost.
With the model compiled (``model.network.compile.compile_denoiser``: the pair stack, the point rotations)
those steps are where ``torch.compile`` builds its graphs; if that fails (no C compiler or Python
headers for Triton, an inductor bug), the failure is logged, the model goes back to eager and the
warm-up runs again.
Non-finite warm-up output (broken weights) stops the start-up (:class:`WarmupError`).
"""

from __future__ import annotations

import logging

import torch

from service.graphs import eager_step
from service.schemas import Limits

log = logging.getLogger("mhcflash.service")

__all__ = ["WarmupError", "compile_enabled", "warm_up", "warm_up_with_fallback"]


class WarmupError(RuntimeError):
    """The warm-up ran but its output is not finite (broken weights): the service must not start."""


def compile_enabled(setting: str, device: torch.device) -> bool:
    """``MHCFLASH_COMPILE``: auto -> on CUDA devices; on -> any device; off -> never."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def warm_up(denoiser: torch.nn.Module, schedule, device: torch.device, limits: Limits,
            autocast: torch.dtype | None, compiled: bool) -> None:
    """Sampling steps on padded, masked batches (the engine's eager step, its autocast), so the first
    request pays no first-call cost. With the pair stack compiled, a batch of 1 and a batch of 2 of
    other lengths: ``torch.compile`` builds its dynamic-shape graph and its B = 1 graph here."""
    short, long_ = limits.min_length, min(limits.max_length, limits.min_length + 5)
    batches = [[short, long_], [long_]] if compiled else [[short, long_]]
    for lengths in batches:
        L = max(lengths)
        x = torch.randn(len(lengths), L, 3, device=device)  # [B, L, 3]
        mask = torch.zeros(len(lengths), L, device=device)  # [B, L]
        for b, n in enumerate(lengths):
            mask[b, :n] = 1.0
        t = torch.tensor([1, denoiser.config.numTimesteps][:len(lengths)], dtype=torch.long, device=device)
        out = eager_step(denoiser, schedule, x * mask[..., None], t, mask, torch.randn_like(x),
                         torch.ones(len(lengths), device=device), autocast_dtype=autocast)  # [B, L, 3]
        if not torch.isfinite(out).all():
            raise WarmupError("warm-up produced NaN / Inf: the weights are broken")


def warm_up_with_fallback(denoiser, schedule, device, limits, autocast, compiled: bool) -> bool:
    """Warm up; if compiling fails (no C compiler or Python headers for Triton, an
    inductor bug), log it, fall back to the eager model and warm up again. Returns whether the
    model's compiled parts (``model.network.compile.compiled_parts``) are kept."""
    try:
        warm_up(denoiser, schedule, device, limits, autocast, compiled)
        return compiled
    except WarmupError:
        raise
    except Exception as exc:
        if not compiled:
            raise
        from model.network.compile import uncompile_denoiser

        root = exc  # dynamo wraps the compiler's error (BackendCompilerFailed.inner_exception): report that
        while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None:
            root = inner
        log.warning("torch.compile of the model (pair stack / point rotations) failed, serving it eagerly "
                    "(set MHCFLASH_COMPILE=off "
                    "to skip the attempt; see README troubleshooting): %s: %s", type(root).__name__,
                    (str(root).strip().splitlines() or [""])[0])
        uncompile_denoiser(denoiser)
        warm_up(denoiser, schedule, device, limits, autocast, False)
        return False
