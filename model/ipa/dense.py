"""Standard Invariant Point Attention over a dense pair tensor (Genie mode).

Source: AlphaFold 2 supplement, Algorithm 22 (IPA), as in OpenFold ``structure_module.py``
``InvariantPointAttention`` and Genie ``genie/model/structure_net.py``:

    a_ij = softmax_j( w_L ( q_i.k_j / sqrt(C) + b_ij - gamma_h w_C / 2 sum_p |T_i q_ip - T_j k_jp|^2 ) )
    o_i       = sum_j a_ij v_j                          (scalar values)
    o_i^pt    = T_i^-1 sum_j a_ij T_j v_jp              (point values, back in the local frame)
    o_i^pair  = sum_j a_ij z_ij                         (pair values)
    out_i     = Linear(concat(o, o^pt, |o^pt|, o^pair))

with w_L = sqrt(1/3), w_C = sqrt(2 / (9 P_qk)), gamma_h = softplus(head weight). Invariant to a global
rotation / translation of the frames, because points only enter through distances and local
coordinates.

Shapes: B batch, L residues, H heads, C per-head channels, P points, C_s / C_p single / pair channels.

NOTE: the logits, the squared point distances and the softmax run in float32 with autocast off,
whatever the surrounding precision (bf16 logits of |x|^2 ~ 1e4 A^2 lose all resolution).
NOTE: the squared distance uses |q|^2 + |k|^2 - 2 q.k (O(L^2 H) memory) rather than materialising the
[B, L, L, H, P, 3] differences as OpenFold does; the same expansion Flash-IPA builds on.
NOTE: only keys are masked (padding never contributes to a real residue); padded query rows are
computed but are garbage by design and must be masked by the caller.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import nn

from model.geometry import Frames

__all__ = ["MASK_VALUE", "InvariantPointAttention"]

# Added to the logits of padded keys (finite, so a fully padded row gives a uniform softmax, not NaN).
MASK_VALUE = -1e9
# softplus^-1(1): the head weights gamma_h start at 1 (OpenFold ``ipa_point_weights_init_``).
_SOFTPLUS_INV_1 = math.log(math.e - 1.0)


def _at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """float16 / bfloat16 / float32 -> float32; float64 stays float64 (gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


class InvariantPointAttention(nn.Module):
    """AF2 Algorithm 22 with dense pair bias and pair values.

    Called as ``ipa(s [B, L, C_s], z [B, L, L, C_p], frames Frames[B, L], mask [B, L]) -> [B, L, C_s]``.
    """

    def __init__(self, *, c_s: int, c_p: int, c_hidden: int, num_heads: int, num_qk_points: int,
                 num_v_points: int, eps: float = 1e-8) -> None:
        super().__init__()
        self.c_hidden, self.num_heads = c_hidden, num_heads
        self.num_qk_points, self.num_v_points, self.eps = num_qk_points, num_v_points, eps
        h, c, pq, pv = num_heads, c_hidden, num_qk_points, num_v_points
        self.linear_q = nn.Linear(c_s, h * c)
        self.linear_kv = nn.Linear(c_s, 2 * h * c)
        self.linear_q_points = nn.Linear(c_s, h * pq * 3)
        self.linear_kv_points = nn.Linear(c_s, h * (pq + pv) * 3)
        self.linear_b = nn.Linear(c_p, h)
        self.head_weights = nn.Parameter(torch.full((h,), _SOFTPLUS_INV_1))
        self.linear_out = nn.Linear(h * (c + 4 * pv + c_p), c_s)
        nn.init.zeros_(self.linear_out.weight)  # OpenFold "final" init: the block starts as identity
        nn.init.zeros_(self.linear_out.bias)

    def _points(self, linear: nn.Linear, s: torch.Tensor, frames: Frames, num_points: int) -> torch.Tensor:
        """Project local points and move them to the global frame: [B, L, C_s] -> [B, L, H, P, 3]."""
        pts = rearrange(linear(s), "b l (h p x) -> b l h p x", h=self.num_heads, p=num_points, x=3)
        return frames[:, :, None, None].apply(_at_least_f32(pts))  # float32 points (frames are float32)

    def forward(self, s: torch.Tensor, z: torch.Tensor, frames: Frames, mask: torch.Tensor) -> torch.Tensor:
        """
        Args:
            s: [B, L, C_s] single representation.
            z: [B, L, L, C_p] pair representation.
            frames: Frames [B, L] (float32).
            mask: [B, L] 1 residue / 0 padding.
        Returns:
            [B, L, C_s]
        """
        h, c, pq, pv = self.num_heads, self.c_hidden, self.num_qk_points, self.num_v_points
        q = rearrange(self.linear_q(s), "b l (h c) -> b h l c", h=h)  # [B, H, L, C]
        k, v = rearrange(self.linear_kv(s), "b l (two h c) -> two b h l c", two=2, h=h)  # 2 x [B, H, L, C]
        q_pts = self._points(self.linear_q_points, s, frames, pq)  # [B, L, H, Pq, 3]
        kv_pts = self._points(self.linear_kv_points, s, frames, pq + pv)  # [B, L, H, Pq + Pv, 3]
        k_pts, v_pts = kv_pts[..., :pq, :], kv_pts[..., pq:, :]  # [B, L, H, Pq, 3], [B, L, H, Pv, 3]
        bias = rearrange(self.linear_b(z), "b i j h -> b h i j")  # [B, H, L, L]

        with torch.autocast(device_type=s.device.type, enabled=False):
            w_l, w_c = math.sqrt(1.0 / 3.0), math.sqrt(2.0 / (9.0 * pq))
            gamma = nn.functional.softplus(_at_least_f32(self.head_weights))[None, :, None, None]  # [1, H, 1, 1]
            qf = rearrange(q_pts, "b l h p x -> b h l (p x)")  # [B, H, L, Pq*3]
            kf = rearrange(k_pts, "b l h p x -> b h l (p x)")  # [B, H, L, Pq*3]
            sq_dist = ((qf * qf).sum(-1)[..., :, None] + (kf * kf).sum(-1)[..., None, :]
                       - 2.0 * qf @ kf.transpose(-1, -2))  # [B, H, L, L]  sum_p |q_ip - k_jp|^2
            logits = _at_least_f32(q) @ _at_least_f32(k).transpose(-1, -2) / math.sqrt(c) + _at_least_f32(bias)  # [B, H, L, L]
            logits = w_l * (logits - 0.5 * gamma * w_c * sq_dist)
            key_mask = mask[:, None, None, :].bool()  # [B, 1, 1, L]
            logits = logits.masked_fill(~key_mask, MASK_VALUE)
            attn = torch.softmax(logits, dim=-1)  # [B, H, L, L] float32

            o_pts = torch.einsum("bhij,bjhpx->bihpx", attn, v_pts)  # [B, L, H, Pv, 3] global
            o_pts = frames[:, :, None, None].invert_apply(o_pts)  # [B, L, H, Pv, 3] local to frame i
            o_pts_norm = torch.sqrt((o_pts * o_pts).sum(-1) + self.eps)  # [B, L, H, Pv]

        attn_s = attn.to(v.dtype)
        o = rearrange(attn_s @ v, "b h l c -> b l (h c)")  # [B, L, H*C]
        o_pair = rearrange(torch.einsum("bhij,bijc->bihc", attn.to(z.dtype), z), "b l h c -> b l (h c)")
        o_pts_flat = rearrange(o_pts, "b l h p x -> b l (h p x)").to(o.dtype)  # [B, L, H*Pv*3]
        feats = torch.cat([o, o_pts_flat, rearrange(o_pts_norm, "b l h p -> b l (h p)").to(o.dtype),
                           o_pair.to(o.dtype)], dim=-1)  # [B, L, H*(C + 4 Pv + C_p)]
        return self.linear_out(feats)
