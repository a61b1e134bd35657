"""Stability diagnostics of mHC over depth: row / column sum errors of H_res and the composite
"Amax gain" of the paper's Figs. 3 and 7."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from model.mhc.residual import MHCResidual

__all__ = ["find_mhc_modules", "mhc_diagnostics"]


def find_mhc_modules(model: nn.Module) -> list[MHCResidual]:
    """All MHCResidual modules of ``model`` in registration order (= depth order for a ModuleList)."""
    return [m for m in model.modules() if isinstance(m, MHCResidual)]


def mhc_diagnostics(source: nn.Module | Sequence[nn.Module] | Sequence[torch.Tensor],
                    mask: torch.Tensor | None = None) -> dict[str, float]:
    """Stability numbers of the recorded H_res over depth (the paper's Figs. 3 and 7).

    Args:
        source: a model (its MHCResidual modules are found in order), a list of MHCResidual
            modules (their ``last_h_res``), or a list of H_res tensors [..., n, n] in depth order
            with a common leading shape (e.g. [B, L]).
        mask: optional [...] (e.g. [B, L]); 1 real residue, 0 padding. Padding is excluded.
    Returns (floats; empty dict when nothing has been recorded):
        row_sum_err_max / col_sum_err_max: max over layers and residues of |row (col) sum - 1|.
        amax_gain_fwd: composite P = H_res^(D) ... H_res^(1) (Eq. 4 over the whole depth) per
            residue; max_i |sum_j P_ij| (forward signal gain), averaged over real residues (the
            paper averages over the tokens of a sequence).
        amax_gain_bwd: the same with column sums (backward gradient gain).
        amax_gain: max(fwd, bwd); amax_gain_worst: max over residues instead of the mean.
        single_gain_max: max over layers of the per-layer gain (mean over residues).
        num_layers, num_streams.
    The paper reports amax_gain ~1.6 for mHC and ~3000 for unconstrained HC at 27B.
    NOTE: each MHCResidual keeps only its last call, so with shared weights applied several times
    per forward (``numStructureBlocks`` > 1) the composite covers the last application only.
    """
    if isinstance(source, nn.Module):
        source = find_mhc_modules(source)
    mats: list[torch.Tensor] = []
    for item in source:
        h = item.last_h_res if isinstance(item, MHCResidual) else item
        if h is not None:
            mats.append(h.detach())
    if not mats:
        return {}
    with torch.no_grad(), torch.autocast(device_type=mats[0].device.type, enabled=False):
        mats = [h.double() for h in mats]
        lead = mats[0].shape[:-2]
        weight = torch.ones(lead, dtype=torch.float64, device=mats[0].device)  # [...]
        if mask is not None:
            weight = weight * mask.to(weight)  # [...] (broadcast)
        keep = weight > 0
        if not bool(keep.any()):
            return {}
        total = weight[keep].sum()

        def gains(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            fwd = m.sum(dim=-1).abs().amax(dim=-1)  # [...] max abs row sum
            bwd = m.sum(dim=-2).abs().amax(dim=-1)  # [...] max abs column sum
            return fwd, bwd

        def wmean(v: torch.Tensor) -> float:
            return float((v * weight)[keep].sum() / total)

        row_err = max(float((h.sum(-1) - 1).abs().amax(-1)[keep].max()) for h in mats)
        col_err = max(float((h.sum(-2) - 1).abs().amax(-1)[keep].max()) for h in mats)
        single = max(max(wmean(g) for g in gains(h)) for h in mats)
        composite = mats[0]
        for h in mats[1:]:
            composite = h @ composite  # [..., n, n]  H^(l) ... H^(1)
        fwd, bwd = gains(composite)
        out = {
            "row_sum_err_max": row_err,
            "col_sum_err_max": col_err,
            "amax_gain_fwd": wmean(fwd),
            "amax_gain_bwd": wmean(bwd),
            "amax_gain_worst": float(torch.maximum(fwd, bwd)[keep].max()),
            "single_gain_max": single,
            "num_layers": float(len(mats)),
            "num_streams": float(mats[0].shape[-1]),
        }
        out["amax_gain"] = max(out["amax_gain_fwd"], out["amax_gain_bwd"])
        return out

