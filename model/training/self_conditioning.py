"""The self-conditioned training forward (``selfConditioning True``), shared by eager and CUDA-graphed steps.

Source: Chen, Zhang & Hinton 2022 ("Analog Bits", arXiv 2208.04202, sec. 3.2 and Fig. 3), as
FrameDiff and Genie 2 train it: half of the time the network first predicts x0 without an estimate
(no gradient), and the gradient pass then sees that estimate, detached.

    keep    = Bernoulli(SELF_CONDITION_RATE) per sample        [B]  (the step's generator, after t and eps)
    no grad: eps_0  = denoiser(x_t, t, mask)                    [B, L, 3]  (no estimate)
             x0_hat = predict_x0(schedule, x_t, eps_0, t, mask) [B, L, 3]
    eps_hat = denoiser(x_t, t, mask, x0_hat * keep)             [B, L, 3]  (the gradient pass)

NOTE: the papers draw one coin per batch and skip the first pass on tails. Here the coin is per
sample and the first pass always runs, so every step has the same computation (one CUDA graph per
batch shape, ``model.training.graphed_step``; no host sync on the coin) at the cost of a no-grad
forward on every step; a sample whose coin is 0 sees all-zero x0_self, which the denoiser treats
exactly as no estimate.
NOTE: the first pass runs in the module's current mode (training: with dropout), as in FrameDiff.

Symbols: B batch, L residues.
"""

from __future__ import annotations

import torch
from torch import nn

from model.diffusion import Schedule, predict_x0

__all__ = ["SELF_CONDITION_RATE", "draw_keep", "self_conditioned_eps"]

SELF_CONDITION_RATE = 0.5  # share of training samples that see an estimate (Chen et al.: 0.5)


def draw_keep(batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sample coins: [B] float, 1 (sees its estimate) with probability SELF_CONDITION_RATE, else 0.

    Drawn from ``generator`` (None: the default generator of ``device``, which the trainer seeds and a
    resumed run restores), so the draws are part of the run's random stream.
    """
    u = torch.rand(batch, device=device, generator=generator)  # [B]
    return (u < SELF_CONDITION_RATE).float()


def self_conditioned_eps(denoiser: nn.Module, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor,
                         mask: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """eps_hat of the gradient pass (module docstring).

    Args:
        denoiser: a self-conditioned denoiser (``denoiser.self_conditioning``).
        x_t: [B, L, 3]; t: [B] long; mask: [B, L]; keep: [B] (1: the sample sees its estimate, 0: zeros).
    Returns:
        eps_hat: [B, L, 3] with gradients to the parameters (none through the estimate).
    """
    with torch.no_grad():
        eps_0 = denoiser(x_t, t, mask)  # [B, L, 3], no estimate
        x0_hat = predict_x0(schedule, x_t, eps_0, t, mask)  # [B, L, 3]
        x0_self = x0_hat * keep.to(x0_hat.dtype)[:, None, None]  # [B, L, 3]
    return denoiser(x_t, t, mask, x0_self.detach())
