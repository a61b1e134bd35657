"""``mHCFlashDenoiser``: the combined mode (mHC + Flash-IPA) under its documented name.

``from model.mhc_flash_denoiser import mHCFlashDenoiser`` (Genie's layout: ``genie.model.mhc_flash_denoiser``)
is the entry point for the combined mode. It is the one ``model.network.denoiser.Denoiser``, built by
``model.network.builder`` with ``useMHCMode`` and ``useFlashMode`` forced on (mHC-wrapped Flash-IPA
structure layers), not a copy.
"""

from __future__ import annotations

from model.network.builder import denoiser_parts
from model.network.denoiser import Denoiser

__all__ = ["mHCFlashDenoiser"]


class mHCFlashDenoiser(Denoiser):
    """``Denoiser`` built from ``config.replace(useMHCMode=True, useFlashMode=True)``.

    ``denoiser.config`` is the forced config (so saving and reloading the weights gives the same mode).
    """

    def __init__(self, config) -> None:
        if not (config.useMHCMode and config.useFlashMode):
            config = config.replace(useMHCMode=True, useFlashMode=True)
        super().__init__(**denoiser_parts(config))
