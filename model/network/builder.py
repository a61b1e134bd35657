"""The one place that reads a ``Config``: its keys -> the keyword arguments of every layer of the denoiser.

The layers of ``model.ipa``, ``model.mhc`` and ``model.network`` take plain keyword arguments; the
functions here build each one from a Config, and ``denoiser_parts`` builds all of them for one mode
(``model.build_denoiser(config)`` composes the ``Denoiser`` from those parts).

    Config key                                layer (keyword argument)
    singleFeatureDimension                    C_s of every layer (c_s, dim, single_dim)
    pairFeatureDimension                      PairFeatureNet / PairTransformNet / dense IPA (c_p),
                                              factorizers and Flash-IPA: factor channels C_f (channels, c_f)
    positionalEmbeddingDimension, timestepEmbeddingDimension, numTimesteps, maximumNumResidues
                                              SingleFeatureNet (c_pos_emb, c_timestep_emb, num_timesteps,
                                              max_residues)
    relativePositionK, templateType           PairFeatureNet (relpos_k, template_type);
                                              relativePositionK also PairFreeFactorizer (max_offset)
    numPairTransformLayers, includeTriangular*, triangular*, pairTransitionN
                                              PairTransformNet (num_layers, include_mul_update,
                                              include_tri_att, c_hidden_mul, c_hidden_att, num_heads_att,
                                              dropout, transition_n)
    ipaHiddenDimension, ipaNumHeads, ipaNumQkPoints, ipaNumVPoints
                                              InvariantPointAttention (c_hidden, num_heads, num_qk_points,
                                              num_v_points) / FlashIPA (hidden, heads, qk_points, v_points)
    zFactorRank, kNeighbors, usePairFree      factorizers (rank, k) and FlashIPA (rank); which factorizer
    useFlashAttn3                             FlashIPA (use_flash_attn3)
    numStructureTransitionLayers, ipaDropout, structureTransitionDropout
                                              StructureBranch (num_transition_layers, ipa_dropout,
                                              transition_dropout)
    mhcExpansionRate, mhcAlphaInit, mhcSinkhornIters, mhcResLogitCap
                                              MHCResidual (n, alpha_init, sinkhorn_iters, res_logit_cap)
    mhcReadout                                mhc.build_readout (kind; GatedReadout: alpha_init)
    numStructureLayers, numStructureBlocks    Denoiser (len(structure_layers), num_blocks)
    useGradientCheckpointing                  Denoiser and PairTransformNet (checkpointing)
    useMHCMode, useFlashMode                  which residual (PlainResidual / MHCResidual) and which IPA
                                              (dense / Flash) the structure layers hold
    selfConditioning                          Denoiser (self_condition): DistogramSelfCondition (c_p) or,
                                              pair-free, PairFreeSelfCondition (as the factorizer); None off

NOTE: the parts are built in a fixed order (single features, pair features, pair transform,
factorizer, then per structure layer: IPA, branch, residual, backbone update; the read-out, then the
self-conditioning parts last), so a seeded build draws the same initial parameters as before
(``tests/test_state_dict.py`` pins them), and a self-conditioned build the same ones for every shared key.
"""

from __future__ import annotations

from torch import nn

from model import mhc
from model.ipa.dense import InvariantPointAttention
from model.ipa.factorizer import PairFactorizer, PairFreeFactorizer
from model.ipa.flash import FlashIPA
from model.network.features import PairFeatureNet, SingleFeatureNet
from model.network.pair_transform import PairTransformNet
from model.network.self_condition import DistogramSelfCondition, PairFreeSelfCondition
from model.network.structure import PlainResidual, StructureBranch, StructureLayer

__all__ = [
    "build_factorizer",
    "build_ipa",
    "build_mhc_residual",
    "build_pair_feature_net",
    "build_pair_transform",
    "build_self_condition",
    "build_single_feature_net",
    "build_structure_layer",
    "denoiser_parts",
]


def build_single_feature_net(config) -> SingleFeatureNet:
    return SingleFeatureNet(c_s=config.singleFeatureDimension, c_pos_emb=config.positionalEmbeddingDimension,
                            c_timestep_emb=config.timestepEmbeddingDimension, num_timesteps=config.numTimesteps,
                            max_residues=config.maximumNumResidues)


def build_pair_feature_net(config) -> PairFeatureNet:
    return PairFeatureNet(c_s=config.singleFeatureDimension, c_p=config.pairFeatureDimension,
                          relpos_k=config.relativePositionK, template_type=config.templateType)


def build_pair_transform(config) -> PairTransformNet | None:
    """The pair-transform stack, or None when ``numPairTransformLayers`` is 0."""
    if config.numPairTransformLayers == 0:
        return None
    return PairTransformNet(c_p=config.pairFeatureDimension, num_layers=config.numPairTransformLayers,
                            include_mul_update=config.includeTriangularMultiplicativeUpdate,
                            include_tri_att=config.includeTriangularAttention,
                            c_hidden_mul=config.triangularMultiplicativeHiddenDimension,
                            c_hidden_att=config.triangularAttentionHiddenDimension,
                            num_heads_att=config.triangularAttentionNumHeads, dropout=config.triangularDropout,
                            transition_n=config.pairTransitionN, checkpointing=config.useGradientCheckpointing)


def build_factorizer(config) -> PairFactorizer | PairFreeFactorizer:
    """The factorizer of a flash-mode config: ``usePairFree`` picks the pair-free one.

    Factor channels C_f = ``pairFeatureDimension``; rank = ``zFactorRank``; k = ``kNeighbors``.
    """
    common = {"rank": config.zFactorRank, "channels": config.pairFeatureDimension, "k": config.kNeighbors}
    if config.usePairFree:
        return PairFreeFactorizer(single_dim=config.singleFeatureDimension, max_offset=config.relativePositionK,
                                  **common)
    return PairFactorizer(pair_dim=config.pairFeatureDimension, **common)


def build_ipa(config) -> InvariantPointAttention | FlashIPA:
    """Flash-IPA (``useFlashMode``) or the dense IPA of one structure layer."""
    if config.useFlashMode:
        return FlashIPA(c_s=config.singleFeatureDimension, c_f=config.pairFeatureDimension,
                        hidden=config.ipaHiddenDimension, heads=config.ipaNumHeads,
                        qk_points=config.ipaNumQkPoints, v_points=config.ipaNumVPoints, rank=config.zFactorRank,
                        use_flash_attn3=config.useFlashAttn3)
    return InvariantPointAttention(c_s=config.singleFeatureDimension, c_p=config.pairFeatureDimension,
                                   c_hidden=config.ipaHiddenDimension, num_heads=config.ipaNumHeads,
                                   num_qk_points=config.ipaNumQkPoints, num_v_points=config.ipaNumVPoints)


def build_mhc_residual(branch: nn.Module, config, *, fused: bool | None = None) -> mhc.MHCResidual:
    """``MHCResidual`` around ``branch`` (C = ``singleFeatureDimension``); ``fused`` as in MHCResidual."""
    return mhc.MHCResidual(branch, config.singleFeatureDimension, n=config.mhcExpansionRate,
                           alpha_init=config.mhcAlphaInit, sinkhorn_iters=config.mhcSinkhornIters,
                           res_logit_cap=config.mhcResLogitCap, fused=fused)


def build_structure_layer(config) -> StructureLayer:
    """One structure layer: the IPA + transition branch in a plain or mHC (``useMHCMode``) residual."""
    c_s = config.singleFeatureDimension
    branch = StructureBranch(ipa=build_ipa(config), c_s=c_s,
                             num_transition_layers=config.numStructureTransitionLayers,
                             ipa_dropout=config.ipaDropout, transition_dropout=config.structureTransitionDropout)
    residual = build_mhc_residual(branch, config) if config.useMHCMode else PlainResidual(branch)
    return StructureLayer(residual=residual, c_s=c_s)


def build_self_condition(config) -> DistogramSelfCondition | PairFreeSelfCondition | None:
    """The self-conditioning part (``selfConditioning``): on the pair features (dense pair modes) or the
    pair factors (``usePairFree``, with the factorizer's sizes); None when off."""
    if not config.selfConditioning:
        return None
    if config.useFlashMode and config.usePairFree:
        return PairFreeSelfCondition(single_dim=config.singleFeatureDimension, rank=config.zFactorRank,
                                     channels=config.pairFeatureDimension, k=config.kNeighbors,
                                     max_offset=config.relativePositionK)
    return DistogramSelfCondition(c_p=config.pairFeatureDimension)


def denoiser_parts(config) -> dict:
    """The keyword arguments of ``Denoiser`` for ``config``'s mode, every part built (in a fixed order)."""
    pair_free = bool(config.useFlashMode and config.usePairFree)
    single_feature_net = build_single_feature_net(config)
    pair_feature_net = None if pair_free else build_pair_feature_net(config)
    pair_transform_net = None if pair_free else build_pair_transform(config)
    factorizer = build_factorizer(config) if config.useFlashMode else None
    layers = [build_structure_layer(config) for _ in range(config.numStructureLayers)]
    readout = None
    if config.useMHCMode:
        readout = mhc.build_readout(config.mhcReadout, config.singleFeatureDimension, n=config.mhcExpansionRate,
                                    alpha_init=config.mhcAlphaInit)
    self_condition = build_self_condition(config)  # last: the other parts draw what they drew without it
    return {"single_feature_net": single_feature_net, "pair_feature_net": pair_feature_net,
            "pair_transform_net": pair_transform_net, "factorizer": factorizer, "structure_layers": layers,
            "readout": readout, "num_blocks": config.numStructureBlocks,
            "checkpointing": config.useGradientCheckpointing, "self_condition": self_condition,
            "config": config}
