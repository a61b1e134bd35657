"""The denoiser network: Genie's trunk, composed for all four modes from ``model.ipa`` and ``model.mhc``.

Sources: Genie (Lin & AlQuraishi 2023, ``genie/model/``); AlphaFold 2 supplement (Algorithms 4-5
features, 11-15 pair transform, 20 and 23 structure layers); mHC (arXiv 2512.24880, Eq. 3) as the
residual wrapper; Flash-IPA (arXiv 2505.11580) as the IPA of the flash modes.

Symbols:
    B  batch             L  residues            n  mHC residual streams   T  diffusion timesteps
    C_s single channels  C_p pair channels      H  heads                  C  per-head channels
    S  the residual streams: s [B, L, C_s] (plain) or [B, L, n, C_s] (mHC)

Modules:
    features.py        SingleFeatureNet (residue index + timestep), PairFeatureNet (outer sum,
                       relative offset, CA template)
    pair_transform.py  triangle multiplicative updates, triangle attention, pair transition
    structure.py       StructureBranch (IPA + transitions), PlainResidual, BackboneUpdate,
                       StructureLayer (residual wrapper + backbone update)
    self_condition.py  self-conditioning on the previous x0 estimate: distance bins (dense pair features)
                       or a factorizer over the estimate's k-NN graph (pair-free), zero-initialised
    denoiser.py        Denoiser: x_t, t, mask (, x0_self) -> eps_hat, composed from the pieces above
    compile.py         torch.compile of the pair stack and Flash-IPA's point rotations, and its undo

The entry point is ``model.build_denoiser(config)``; ``model.mhc_flash_denoiser.mHCFlashDenoiser`` is
the combined mode under its documented name.
"""
