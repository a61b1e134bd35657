"""The denoiser: Genie's network, composed for all four modes (useMHCMode x useFlashMode).

Sources: Genie (Lin & AlQuraishi 2023, ``genie/model/model.py``): single features -> pair features ->
pair transform -> structure layers from Frenet-Serret frames of x_t -> eps_hat = x_t - translations;
mHC (arXiv 2512.24880, Eq. 3) and Flash-IPA (arXiv 2505.11580) for the other three modes.

    s      = SingleFeatureNet(t, mask)                             [B, L, C_s]
    p      = PairTransformNet(PairFeatureNet(s, x_t, mask)         [B, L, L, C_p]  (not pair-free)
                              [+ DistogramSelfCondition(x0_self)])
    pair   = p (standard IPA) | Factorizer(p or s, x_t, mask)      (flash: PairFactors)
             [+ PairFreeSelfCondition(s, x0_self)]                 (pair-free)
    S      = s | mhc.expand(s, n)                                  [B, L, C_s] | [B, L, n, C_s]
    frames = frenet_serret_frames(x_t, mask)                       Frames [B, L]
    repeat numStructureBlocks times (shared weights), for each of numStructureLayers layers:
        S, frames = StructureLayer(S, pair, frames, mask)          (plain or mHC residual, backbone update)
    eps_hat = (x_t - frames.trans) * mask                          [B, L, 3]

The four modes differ only in which IPA sits in the branch (dense or Flash) and which residual
wrapper holds it (``PlainResidual`` or ``mhc.MHCResidual``); there is one code path.

Self-conditioning (``selfConditioning``, ``model.network.self_condition``): ``x0_self`` [B, L, 3], the
previous estimate of the clean trace, adds a zero-initialised term to the pair features (dense) or
the pair factors (pair-free); None or all zeros: exactly the model without it.

NOTE: between layers the backbone update reads the stream mean ``mhc.contract(S)``; the
last layer reads the configured read-out (``mhcReadout``: mean, or the learned gated sum), which is
the only place the read-out enters eps_hat.
NOTE: gradient checkpointing (``useGradientCheckpointing``) recomputes every structure layer and every pair-transform layer in
the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout masks
match).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.geometry import Frames, frenet_serret_frames
from model.ipa.factorizer import PairFactors
from model.mhc import MHCResidual, contract, expand
from model.network.features import PairFeatureNet, SingleFeatureNet
from model.network.pair_transform import PairTransformNet
from model.network.structure import StructureLayer

__all__ = ["Denoiser"]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class Denoiser(nn.Module):
    """Genie-style noise predictor: ``denoiser(x_t [B, L, 3], t [B], mask [B, L]) -> eps_hat [B, L, 3]``;
    self-conditioned (``self_condition`` set): ``denoiser(x_t, t, mask, x0_self [B, L, 3] | None)``.

    Composed from built parts (``model.build_denoiser(config)`` builds them, through
    ``model.network.builder``); the mode follows from the parts:

    Args:
        single_feature_net: SingleFeatureNet, s [B, L, C_s].
        pair_feature_net: PairFeatureNet, p [B, L, L, C_p]; None on the pair-free path.
        pair_transform_net: PairTransformNet on p; None for no pair-transform layers (or pair-free).
        factorizer: p (or s) -> PairFactors for Flash-IPA (flash modes); None for the dense IPA.
        structure_layers: the StructureLayers, all with ``PlainResidual`` or all with ``MHCResidual``.
        readout: the mHC read-out of the last layer (mHC modes: MeanReadout or GatedReadout);
            None with plain residuals.
        num_blocks: passes over the structure layers (shared weights, ``numStructureBlocks``).
        self_condition: ``DistogramSelfCondition`` (dense pair features) or ``PairFreeSelfCondition``
            (pair-free), or None: no self-conditioning (``selfConditioning False``; no parameters).
        checkpointing: recompute every structure layer in the backward pass.
        config: the ``Config`` the parts were built from, kept as ``denoiser.config`` (weights files and
            the sampler read it); the network itself never reads it.
    """

    def __init__(self, *, single_feature_net: SingleFeatureNet, pair_feature_net: PairFeatureNet | None,
                 pair_transform_net: PairTransformNet | None, factorizer: nn.Module | None,
                 structure_layers: list[StructureLayer], readout: nn.Module | None, num_blocks: int = 1,
                 checkpointing: bool = False, self_condition: nn.Module | None = None, config=None) -> None:
        super().__init__()
        self.config = config
        mhc_layers = [isinstance(layer.residual, MHCResidual) for layer in structure_layers]
        if not structure_layers or len(set(mhc_layers)) != 1 or mhc_layers[0] != (readout is not None):
            raise ValueError("Denoiser: the structure layers must be all plain (readout None) or all mHC "
                             "(with a readout), and at least one")
        if pair_feature_net is None and factorizer is None:
            raise ValueError("Denoiser: without pair features (pair-free) a factorizer is needed")
        self.use_mhc, self.use_flash = mhc_layers[0], factorizer is not None
        self.pair_free = pair_feature_net is None
        self.checkpointing = bool(checkpointing)
        self.num_blocks = int(num_blocks)

        self.single_feature_net = single_feature_net
        self.pair_feature_net = pair_feature_net
        self.pair_transform_net = pair_transform_net
        self.factorizer = factorizer
        self.structure_layers = nn.ModuleList(structure_layers)
        self.readout = readout
        self.self_condition = self_condition  # None: no state-dict keys at all

    @property
    def self_conditioning(self) -> bool:
        """Whether the model takes ``x0_self`` (built with ``selfConditioning True``)."""
        return self.self_condition is not None

    # ---------------------------------------------------------------------------------- forward
    def _check_inputs(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> None:
        if x_t.ndim != 3 or x_t.shape[-1] != 3:
            raise ValueError(f"denoiser: x_t must be [B, L, 3] CA coordinates, got {tuple(x_t.shape)}")
        if mask.shape != x_t.shape[:2]:
            raise ValueError(f"denoiser: mask must be [B, L] = {tuple(x_t.shape[:2])}, got {tuple(mask.shape)}")
        if t.shape != x_t.shape[:1]:
            raise ValueError(f"denoiser: t must be [B] = [{x_t.shape[0]}] (one timestep per sample), "
                             f"got {tuple(t.shape)}")
        if x_t.shape[0] == 0 or x_t.shape[1] == 0:
            raise ValueError(f"denoiser: empty batch {tuple(x_t.shape)}")

    def _structure_layer(self, index: int, last: bool, streams: torch.Tensor, rots: torch.Tensor,
                         trans: torch.Tensor, pair, mask: torch.Tensor):
        """One structure layer on plain tensors (so it can be checkpointed)."""
        if self.use_mhc:
            readout = self.readout if last else contract
        else:
            readout = _identity
        streams, frames = self.structure_layers[index](streams, pair, Frames(rots, trans), mask, readout)
        return streams, frames.rots, frames.trans

    def pair_features(self, s: torch.Tensor, x_t: torch.Tensor, frames: Frames, mask: torch.Tensor,
                      x0_self: torch.Tensor | None = None):
        """Dense pair tensor [B, L, L, C_p] (standard IPA) or ``PairFactors`` (flash modes);
        ``x0_self`` [B, L, 3] (self-conditioned models only) adds its term."""
        p = None
        if self.pair_feature_net is not None:
            p = self.pair_feature_net(s, x_t, mask)  # [B, L, L, C_p]
            if x0_self is not None:
                p = p + self.self_condition(s, x0_self, mask)  # [B, L, L, C_p]
            if self.pair_transform_net is not None:
                p = self.pair_transform_net(p, mask)  # [B, L, L, C_p]
        if self.factorizer is None:
            return p
        factors = self.factorizer(s, p, frames, mask)  # PairFactors (p is None when pair-free)
        if x0_self is not None and self.pair_free:
            extra = self.self_condition(s, x0_self, mask)  # PairFactors [B, L, r, C_f]
            factors = PairFactors(factors.left + extra.left, factors.right + extra.right)
        return factors

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                x0_self: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            x_t: [B, L, 3] noisy, centred CA coordinates (Angstrom).
            t: [B] integer timesteps in [1, T] (one per sample).
            mask: [B, L] 1 residue / 0 padding (float or bool), real residues first.
            x0_self: [B, L, 3] the previous estimate of the clean CA trace (self-conditioned models
                only); None or a sample's all-zero rows: no estimate (the same eps as without one).
        Returns:
            eps_hat: [B, L, 3] predicted noise, zero on padding.
        """
        self._check_inputs(x_t, t, mask)
        if x0_self is not None:
            if self.self_condition is None:
                raise ValueError("denoiser: x0_self given, but this model was built without selfConditioning")
            if x0_self.shape != x_t.shape:
                raise ValueError(f"denoiser: x0_self must be [B, L, 3] = {tuple(x_t.shape)}, "
                                 f"got {tuple(x0_self.shape)}")
            x0_self = x0_self.detach().float()  # an input, never a path for gradients
        mask = mask.to(x_t.dtype) if x_t.is_floating_point() else mask.float()
        x_t = x_t.float()
        mask = mask.float()

        frames = frenet_serret_frames(x_t, mask)  # Frames [B, L], float32
        s = self.single_feature_net(t, mask)  # [B, L, C_s]
        pair = self.pair_features(s, x_t, frames, mask, x0_self)
        if self.use_mhc:
            streams = expand(s, self.structure_layers[0].residual.n)  # [B, L, n, C_s]
        else:
            streams = s  # [B, L, C_s]

        rots, trans = frames.rots, frames.trans
        num_layers = len(self.structure_layers)
        for block in range(self.num_blocks):
            for i in range(num_layers):
                last = block == self.num_blocks - 1 and i == num_layers - 1
                if self.checkpointing and torch.is_grad_enabled():
                    streams, rots, trans = checkpoint(self._structure_layer, i, last, streams, rots, trans,
                                                      pair, mask, use_reentrant=False)
                else:
                    streams, rots, trans = self._structure_layer(i, last, streams, rots, trans, pair, mask)
        return (x_t - trans) * mask[..., None]  # [B, L, 3]
