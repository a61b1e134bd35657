"""Genie-style protein backbone diffusion with mHC and Flash-IPA.

Entry point: ``model.build_denoiser(config) -> nn.Module``, called as
``denoiser(x_t [B, L, 3], t [B], mask [B, L]) -> eps_hat [B, L, 3]`` (zero on padding); the mode
(standard / mhc / flash / mhc_flash) comes from ``config.useMHCMode`` and ``config.useFlashMode``.
With ``config.selfConditioning`` it also takes ``x0_self`` [B, L, 3], its previous x0 estimate.

Symbols used in every shape comment of the package:

    B   batch (chains)                  T   diffusion timesteps
    L   residues (padded length)        n   mHC residual streams (mhcExpansionRate)
    H   attention heads                 r   Flash-IPA pair-factor rank (zFactorRank)
    P   IPA points per head             k   nearest neighbours (kNeighbors)
    C   channels (C_s single, C_p pair, C per-head hidden)
    *   any leading batch dimensions

Where each idea lives: ``config`` (Config, load_config), ``geometry`` (Frames, Frenet-Serret,
quaternions), ``ipa/`` (attention backends, dense IPA, Flash-IPA, pair factorizers, k-NN), ``mhc/``
(mHC: reference, fused kernels, residual wrapper), ``network/`` (features, pair transform, structure
layers, the composed Denoiser, torch.compile), ``mhc_flash_denoiser``, ``diffusion``, ``weights_io``,
``training``, ``data/``, ``evaluation/``, ``cli``.
Heavy submodules are imported lazily, so ``import model.config`` stays cheap.
"""

from __future__ import annotations

__all__ = ["build_denoiser", "compile_denoiser"]


def build_denoiser(config):
    """The denoiser for ``config``'s mode: one composed ``Denoiser`` class for all four modes.

    ``model.network.builder.denoiser_parts`` is the one place that reads the config's keys; the
    layers take plain keyword arguments. Returns an ``nn.Module`` with ``.config`` set; the combined
    mode is an ``mHCFlashDenoiser``.
    """
    if config.useMHCMode and config.useFlashMode:
        from model.mhc_flash_denoiser import mHCFlashDenoiser

        return mHCFlashDenoiser(config)
    from model.network.builder import denoiser_parts
    from model.network.denoiser import Denoiser

    return Denoiser(**denoiser_parts(config))


def compile_denoiser(denoiser, **kwargs):
    """``torch.compile`` of a denoiser's pair stack, in place (see :func:`model.network.compile.compile_denoiser`)."""
    from model.network.compile import compile_denoiser as _compile

    return _compile(denoiser, **kwargs)
