"""Single and pair input features of the denoiser (Genie, ``genie/model/{single,pair}_feature_net.py``).

- ``SingleFeatureNet``: residue-index sinusoidal embedding + timestep sinusoidal embedding, concatenated,
  one Linear to C_s (Genie).
- ``PairFeatureNet``: outer sum of two Linear projections of the single features, a Linear of the
  one-hot relative sequence offset clipped to [-K, K] (AlphaFold 2 Algorithms 4-5), and a Linear of
  template features from the noisy CA trace (Genie's ``templateType v1``), masked to real pairs.

Shapes: B batch, L residues, C_s / C_p channels, T timesteps.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "TEMPLATE_BINS",
    "PairFeatureNet",
    "SingleFeatureNet",
    "distance_bins",
    "sinusoidal_encoding",
    "timestep_embedding",
]

# Distance bins of the v1 template (Angstrom): edges 3.25 .. 50.75 in 38 steps -> 39 one-hot bins,
# the binning AlphaFold 2 uses for its distogram-style template features.
TEMPLATE_BINS = {"min_bin": 3.25, "max_bin": 50.75, "num_bins": 39}
# Genie's time-embedding frequency scale (``get_time_embedding(..., max_positions=2056)``).
TIME_MAX_POSITIONS = 2056


def sinusoidal_encoding(v: torch.Tensor, period: float, dim: int) -> torch.Tensor:
    """Genie's ``sinusoidal_encoding``: cos in even channels, sin in odd channels.

    Channel ``k`` (1-based) has wavelength ``period ** (2 k / dim)`` (sin) or ``period ** (2 (k-1) / dim)``
    (cos), in units of ``pi``.

    Args:
        v: [*] positions (float or int).
        period: the scale N (Genie: the padded length).
        dim: D, number of channels.
    Returns:
        [*, D] float32
    """
    k = torch.arange(1, dim + 1, device=v.device, dtype=torch.float32)  # [D]
    v = v.float()[..., None]  # [*, 1]
    sin_enc = torch.sin(v * math.pi / period ** (2 * k / dim))  # [*, D]
    cos_enc = torch.cos(v * math.pi / period ** (2 * (k - 1) / dim))  # [*, D]
    even = (torch.arange(dim, device=v.device) % 2 == 0)  # [D]
    return torch.where(even, cos_enc, sin_enc)


def timestep_embedding(t: torch.Tensor, num_timesteps: int, dim: int) -> torch.Tensor:
    """DDPM sinusoidal timestep embedding (Ho et al. ``diffusion_tf/nn.py``, as in Genie).

    NOTE: Genie multiplies the raw integer timestep by ``max_positions``; here the timestep is first
    divided by T, so ``t / T * max_positions`` spans the frequencies the DDPM embedding was designed for
    whatever ``numTimesteps`` is (for T = 1000 the two differ only by a constant time scale).

    Args:
        t: [B] integer timesteps in [0, T].
        num_timesteps: T.
        dim: embedding size.
    Returns:
        [B, dim] float32
    """
    half = dim // 2
    scale = math.log(TIME_MAX_POSITIONS) / max(half - 1, 1)
    freqs = torch.exp(-scale * torch.arange(half, device=t.device, dtype=torch.float32))  # [dim/2]
    arg = (t.float() / num_timesteps * TIME_MAX_POSITIONS)[:, None] * freqs[None, :]  # [B, dim/2]
    emb = torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1)  # [B, 2 * (dim/2)]
    if dim % 2 == 1:
        emb = nn.functional.pad(emb, (0, 1))  # [B, dim]
    return emb


def distance_bins(ca: torch.Tensor, *, min_bin: float, max_bin: float, num_bins: int) -> torch.Tensor:
    """One-hot CA-CA distance bins (AlphaFold 2 Algorithm 32 style binning).

    Args:
        ca: [B, L, 3]
    Returns:
        [B, L, L, num_bins] float (first bin: d < min_bin, last bin: d >= max_bin).
    """
    d = torch.cdist(ca.float(), ca.float())  # [B, L, L]
    edges = torch.linspace(min_bin, max_bin, num_bins - 1, device=ca.device)  # [num_bins - 1]
    index = torch.bucketize(d, edges, right=True)  # [B, L, L] in [0, num_bins - 1]
    return nn.functional.one_hot(index, num_bins).to(ca.dtype)


class SingleFeatureNet(nn.Module):
    """Genie's single features: Linear(concat(pos_emb(i), time_emb(t))) -> [B, L, C_s], zero on padding.

    NOTE: Genie scales the residue-index encoding by the padded length of the batch, so a chain's
    features change with how much padding follows it. Here the scale is ``maximumNumResidues`` (what
    Genie's length was when it padded every batch to that maximum), which keeps Genie's encoding for
    training and makes outputs independent of padding.
    NOTE: the output is multiplied by the mask (Genie masks the embeddings, then adds the Linear's bias
    on padding too).
    """

    def __init__(self, *, c_s: int, c_pos_emb: int, c_timestep_emb: int, num_timesteps: int,
                 max_residues: int) -> None:
        super().__init__()
        self.c_pos_emb, self.c_timestep_emb = c_pos_emb, c_timestep_emb
        self.num_timesteps, self.max_residues = num_timesteps, max_residues
        self.linear = nn.Linear(c_pos_emb + c_timestep_emb, c_s)

    def forward(self, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            t: [B] integer timesteps.
            mask: [B, L] 1 residue / 0 padding.
        Returns:
            s: [B, L, C_s]
        """
        batch, length = mask.shape
        pos = torch.arange(length, device=mask.device)  # [L]
        pos_emb = sinusoidal_encoding(pos, self.max_residues, self.c_pos_emb)  # [L, C_pos]
        time_emb = timestep_embedding(t, self.num_timesteps, self.c_timestep_emb)  # [B, C_t]
        feats = torch.cat([pos_emb.expand(batch, length, -1),
                           time_emb[:, None, :].expand(batch, length, -1)], dim=-1)  # [B, L, C_pos + C_t]
        return self.linear(feats.to(self.linear.weight.dtype)) * mask[..., None].to(feats.dtype)


class PairFeatureNet(nn.Module):
    """Genie's pair features: p_ij = W_i s_i + W_j s_j + W_rel onehot(clip(i - j)) + W_tpl tpl(x_i, x_j).

    NOTE: Genie's ``v1`` template is the raw CA-CA distance (one channel, up to ~100 A) fed to a Linear;
    here ``v1`` is that distance one-hot encoded into 39 bins (3.25-50.75 A), which keeps the Linear's
    input O(1) at any chain size (+38 * C_p parameters).
    NOTE: relative offsets are computed from ``arange(L)`` (single chains, as Genie).
    """

    def __init__(self, *, c_s: int, c_p: int, relpos_k: int, template_type: str = "v1") -> None:
        super().__init__()
        if template_type != "v1":
            raise ValueError(f"templateType {template_type!r} is not implemented (only 'v1')")
        self.relpos_k = relpos_k
        self.linear_s_p_i = nn.Linear(c_s, c_p)
        self.linear_s_p_j = nn.Linear(c_s, c_p)
        self.linear_relpos = nn.Linear(2 * relpos_k + 1, c_p)
        self.linear_template = nn.Linear(TEMPLATE_BINS["num_bins"], c_p)

    def relpos(self, length: int, device: torch.device) -> torch.Tensor:
        """One-hot of clip(i - j, -K, K) -> [L, L, 2K + 1]."""
        pos = torch.arange(length, device=device)  # [L]
        offset = (pos[:, None] - pos[None, :]).clamp(-self.relpos_k, self.relpos_k) + self.relpos_k  # [L, L]
        return nn.functional.one_hot(offset, 2 * self.relpos_k + 1)

    def forward(self, s: torch.Tensor, ca: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            s: [B, L, C_s] single features.
            ca: [B, L, 3] noisy CA coordinates.
            mask: [B, L]
        Returns:
            p: [B, L, L, C_p], zero where either residue is padding.
        """
        dtype = self.linear_relpos.weight.dtype
        p = self.linear_s_p_i(s)[:, :, None, :] + self.linear_s_p_j(s)[:, None, :, :]  # [B, L, L, C_p]
        p = p + self.linear_relpos(self.relpos(s.shape[1], s.device).to(dtype))  # [L, L, C_p] broadcast
        p = p + self.linear_template(distance_bins(ca, **TEMPLATE_BINS).to(dtype))  # [B, L, L, C_p]
        pair_mask = mask[:, :, None] * mask[:, None, :]  # [B, L, L]
        return p * pair_mask[..., None].to(p.dtype)
