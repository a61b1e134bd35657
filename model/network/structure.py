"""Structure layers: an IPA + transition residual branch, its residual wrapper, the backbone update.

Sources: AlphaFold 2 supplement, Algorithm 20 lines 6-10 (IPA, transition, backbone update) and
Algorithm 23 (backbone update); Genie ``genie/model/structure_net.py`` (``StructureLayer``), OpenFold
``StructureModuleTransition``; the residual-branch form is what mHC (arXiv 2512.24880, Eq. 3) wraps.

One structure layer is

    S      <- Residual(S, f, pair, frames, mask)   plain: s + f(s);  mHC: H_res S + H_post^T f(H_pre S)
    frames <- frames o BackboneUpdate(readout(S))  (AF2 Algorithm 23; readout = identity without mHC)

with the branch (``StructureBranch``)

    a = Dropout(IPA(LN(x), pair, frames, mask))
    h = x + a;   for each transition layer: h <- h + Dropout(MLP(LN(h)))
    f(x) = h - x          (so a plain layer gives exactly h)

The IPA is pluggable: ``model.ipa.dense.InvariantPointAttention`` (dense pair tensor z [B, L, L, C_p]) or
Flash-IPA from ``model.ipa.flash`` (``PairFactors``); the branch only passes ``pair`` through.

Shapes: B batch, L residues, n mHC streams, C_s single channels.

NOTE: Genie (like AF2) is post-LN: s = LN(s + Dropout(IPA(s))); s = LN(s + Transition(s)). Here the
layer norms move inside the branch (pre-LN) so that a layer is ``x + f(x)`` with ``f`` free of the
residual stream, which is what a residual wrapper (plain or mHC) needs; parameter count is unchanged.
NOTE: the backbone update reads LayerNorm(s) (pre-LN streams are not normalised; Genie's update reads
a post-LN s). That adds 2 C_s parameters per layer.
NOTE: the branch output is multiplied by the mask, and padded residues get no backbone update, so
padding stays at identity frames and zero features.
"""

from __future__ import annotations

import torch
from torch import nn

from model.geometry import Frames, quaternion_update
from model.mhc import MHCResidual, is_mean_readout

__all__ = ["BackboneUpdate", "PlainResidual", "StructureBranch", "StructureLayer", "StructureTransition"]


class StructureTransition(nn.Module):
    """One OpenFold transition MLP: Linear-ReLU-Linear-ReLU-Linear, C_s -> C_s (last Linear zero-init)."""

    def __init__(self, *, c_s: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_s)
        self.linear_1 = nn.Linear(c_s, c_s)
        self.linear_2 = nn.Linear(c_s, c_s)
        self.linear_3 = nn.Linear(c_s, c_s)
        nn.init.zeros_(self.linear_3.weight)  # OpenFold "final" init
        nn.init.zeros_(self.linear_3.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h: [B, L, C_s] -> update [B, L, C_s] (not yet added)."""
        x = torch.relu(self.linear_1(self.layer_norm(h)))
        x = torch.relu(self.linear_2(x))
        return self.linear_3(x)


class StructureBranch(nn.Module):
    """The residual branch f(x, pair, frames, mask) -> y [B, L, C_s] of one structure layer.

    Args:
        ipa: a module called as ``ipa(x [B, L, C_s], pair, frames Frames[B, L], mask [B, L]) -> [B, L, C_s]``
            (dense ``InvariantPointAttention`` or Flash-IPA).
        c_s: C_s.
        num_transition_layers: ``numStructureTransitionLayers``.
        ipa_dropout: ``ipaDropout``.
        transition_dropout: ``structureTransitionDropout``.
    """

    def __init__(self, *, ipa: nn.Module, c_s: int, num_transition_layers: int, ipa_dropout: float,
                 transition_dropout: float) -> None:
        super().__init__()
        self.ipa = ipa
        self.ipa_layer_norm = nn.LayerNorm(c_s)
        self.ipa_dropout = nn.Dropout(ipa_dropout)
        self.transitions = nn.ModuleList([StructureTransition(c_s=c_s) for _ in range(num_transition_layers)])
        self.transition_dropout = nn.Dropout(transition_dropout)

    def forward(self, x: torch.Tensor, pair, frames: Frames, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: [B, L, C_s]
            pair: dense z [B, L, L, C_p] or ``PairFactors`` (whatever ``self.ipa`` takes).
            frames: Frames [B, L].
            mask: [B, L]
        Returns:
            y: [B, L, C_s], zero on padding; the plain layer output is ``x + y``.
        """
        y = self.ipa_dropout(self.ipa(self.ipa_layer_norm(x), pair, frames, mask))  # [B, L, C_s]
        h = x + y
        for transition in self.transitions:
            d = self.transition_dropout(transition(h))  # [B, L, C_s]
            h = h + d
            y = y + d  # accumulate the update itself (no x + ... - x cancellation)
        return y * mask[..., None].to(y.dtype)


class PlainResidual(nn.Module):
    """``s <- s + f(s, *args)``: the residual wrapper of the standard and flash modes.

    Same calling convention as ``model.mhc.MHCResidual`` (stream tensor first, branch arguments after),
    with the stream being s [B, L, C_s] itself.
    """

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, s: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """s: [B, L, C_s] -> [B, L, C_s]."""
        return s + self.branch(s, *args, **kwargs)


class BackboneUpdate(nn.Module):
    """AF2 Algorithm 23: Linear(LN(s)) -> [B, L, 6] -> ``quaternion_update`` (zero-init: starts as identity)."""

    def __init__(self, *, c_s: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_s)
        self.linear = nn.Linear(c_s, 6)
        nn.init.zeros_(self.linear.weight)  # OpenFold "final" init
        nn.init.zeros_(self.linear.bias)

    def forward(self, frames: Frames, s: torch.Tensor, mask: torch.Tensor) -> Frames:
        """
        Args:
            frames: Frames [B, L] (float32).
            s: [B, L, C_s] single representation (contracted streams in mHC mode).
            mask: [B, L]
        Returns:
            Frames [B, L]; padded residues keep their frames.
        """
        update = self.linear(self.layer_norm(s)).float() * mask[..., None].float()  # [B, L, 6]
        return quaternion_update(frames, update)


class StructureLayer(nn.Module):
    """One structure layer: residual wrapper (plain or mHC) around a branch, then a backbone update.

    ``forward(S, pair, frames, mask, readout) -> (S', frames')`` with S [B, L, C_s] (plain) or
    [B, L, n, C_s] (mHC); ``readout`` maps S to the single representation [B, L, C_s] the backbone
    update reads (identity for plain, the stream mean / gated read-out for mHC).
    """

    def __init__(self, *, residual: nn.Module, c_s: int) -> None:
        super().__init__()
        self.residual = residual
        self.backbone_update = BackboneUpdate(c_s=c_s)

    def forward(self, streams: torch.Tensor, pair, frames: Frames, mask: torch.Tensor,
                readout) -> tuple[torch.Tensor, Frames]:
        if isinstance(self.residual, MHCResidual) and is_mean_readout(readout):
            # the streams' mean comes out of the residual's last kernel (one pass fewer, fwd and bwd)
            streams, s = self.residual.forward_with_mean(streams, pair, frames, mask)  # [B, L, n, C_s], [B, L, C_s]
        else:
            streams = self.residual(streams, pair, frames, mask)  # [B, L, C_s] or [B, L, n, C_s]
            s = readout(streams)  # [B, L, C_s]
        frames = self.backbone_update(frames, s, mask)
        return streams, frames
