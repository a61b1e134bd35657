"""Flash-IPA: invariant point attention over factorized pair features as ONE bias-free softmax attention.

Sources: AlphaFold 2 supplement Algorithm 22 (IPA) as in OpenFold ``structure_module.py``; Flash-IPA
(arXiv 2505.11580, Sec. 3: "every logit term is a dot product"). Per head h (AF2 eq. in Alg. 22):

    a_ij = softmax_j( w_L * ( q_i.k_j / sqrt(C) + b_ij - (gamma_h / 2) * sum_p |T_i q_ip - T_j k_jp|^2 ) )

with w_L = sqrt(1/3), gamma_h = softplus(theta_h) * sqrt(2 / (9 P)). Here the pair bias comes from
the factors (model/ipa/factorizer.py): b_ij = sum_r bl[i, r, h] * br[j, r, h], bl / br = Linear(left /
right factor), and the pair values are z'_ij = sum_r pl[i, r] * pr[j, r] (C_pv = C_f // 4 channels).
Expanding |Q - K|^2 = |Q|^2 + |K|^2 - 2 Q.K and dropping |Q_i|^2 (constant over j, it cancels in
the softmax) gives widened rows (geometry in fp32, scalar and factor terms in the activation dtype,
all cast to the attention dtype once):

    q~_i = [ w_L q_i / sqrt(C) | Q_i (3P)              | 1                       | w_L bl_i (r) ]
    k~_j = [ k_j               | w_L gamma K_j (3P)    | -w_L gamma / 2 |K_j|^2  | br_j (r)     ]
    v~_j = [ v_j (C)           | V_j (3 P_v, global)   | pr_j (r * C_pv)                         ]

so ``packed_attention(q~, k~, v~, mask)`` (model/ipa/attention.py: FA3 / FA2 / SDPA / math) returns
sum_j a_ij v~_j, from which the scalar, point (moved into the local frame of i, plus norms) and pair
outputs (sum_r pl_ir * (sum_j a_ij pr_jr)) are read, concatenated and projected to C_s (AF2).

Precision. NOTE (our additions): (1) points are taken relative to each chain's masked CA centroid
(distances unchanged, magnitudes smaller); (2) when the attention runs in fp16 / bf16 the point and
norm columns are split into hi + lo 16-bit parts, Q.K = Qh.Kh + Qh.Kl + Ql.Kh, so the large
cancelling point terms carry ~16 mantissa bits instead of 8 (the kernels accumulate in fp32);
(3) geometry (frames, points, norms, local outputs) is fp32 even under autocast. The point *values*
are still rounded to the attention dtype once (bf16: ~0.4% of |V - centroid|); tests state the
resulting bf16 tolerance.

The dense reference (``forward(..., reference=True)``) uses the SAME parameters, materialises the
[B, H, L, L] logits (scalar + exact point distances + factor bias) and the [B, L, L, C_pv] pair
values from the same factors, and must agree with the fast path (tests/test_flash_ipa.py).
NOTE: the public flash_ipa uses different parameterisations in its flash and dense paths; its
pair bias is not transferable between them. Here they are one module.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from model.geometry import Frames, rotate_points
from model.ipa.attention import mask_value, packed_attention
from model.ipa.backends import BackendChoice, resolve_backend
from model.ipa.factorizer import PairFactors

__all__ = ["FlashIPA", "flash_ipa_head_dims", "has_legacy_layout", "upgrade_legacy_state"]

POINT_NORM_EPS = 1e-8  # inside sqrt of the output point norms (AF2 / OpenFold)


def flash_ipa_head_dims(*, hidden: int, qk_points: int, v_points: int, rank: int, pair_value_dim: int,
                        split: bool) -> tuple[int, int]:
    """Widened (q / k, v) head widths, before the attention module's +1 mask column and padding."""
    dim_qk = hidden + (3 * qk_points + 1) * (3 if split else 1) + rank
    dim_v = hidden + 3 * v_points + rank * pair_value_dim
    return dim_qk, dim_v


def _split_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
               split: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Column blocks (for the q side, for the k side) whose dot product is a.b, in ``dtype``.

    With ``split``: a = ah + al, b = bh + bl in 16-bit parts; [ah, ah, al] . [bh, bl, bh] = a.b up to
    the al.bl term (~2^-16 relative). Gradients: d/da flows through ah (al has zero net gradient), and
    the two ah columns sum to the exact b; likewise for b. Both sides are split together (one stack,
    one cast, one difference, one cast) and the blocks go straight into the packed rows.
    """
    if not split:
        return [a.to(dtype)], [b.to(dtype)]
    both = torch.stack([a, b])  # [2, ..., D] fp32
    hi = both.to(dtype)
    lo = (both - hi).to(dtype)  # fp32 difference (type promotion), then rounded
    (ah, bh), (al, bl) = hi.unbind(0), lo.unbind(0)
    return [ah, ah, al], [bh, bl, bh]


# Tensors of the earlier layout (separate Linears) and the fused tensor each concatenates into.
_LEGACY_GROUPS = {
    "linear_in.weight": ("linear_q.weight", "linear_kv.weight", "linear_q_points.weight", "linear_kv_points.weight"),
    "linear_in.bias": ("linear_q.bias", "linear_kv.bias", "linear_q_points.bias", "linear_kv_points.bias"),
    "factor_left.weight": ("bias_left.weight", "value_left.weight"),
    "factor_right.weight": ("bias_right.weight", "value_right.weight"),
}


_LEGACY_MARKER = "bias_left.weight"  # present only in the earlier layout


def has_legacy_layout(state: dict[str, torch.Tensor]) -> bool:
    """True when ``state`` holds FlashIPA tensors of the earlier separate-projection layout."""
    return any(key.endswith(_LEGACY_MARKER) for key in state)


def upgrade_legacy_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with FlashIPA's earlier separate projections rewritten to the fused names.

    Rows of the fused Linear are the old Linears' rows in order, so the layer computes exactly the
    same function. States already in the fused layout (or without FlashIPA) come back unchanged.
    """
    prefixes = {key[: -len(_LEGACY_MARKER)] for key in state if key.endswith(_LEGACY_MARKER)}
    if not prefixes:
        return state
    out = dict(state)
    for prefix in prefixes:
        for fused, parts in _LEGACY_GROUPS.items():
            if all(prefix + part in out for part in parts):
                out[prefix + fused] = torch.cat([out.pop(prefix + part) for part in parts])
    return out


class FlashIPA(nn.Module):
    """IPA over PairFactors: ``ipa(x [B, L, C_s], factors, frames [B, L], mask [B, L]) -> [B, L, C_s]``.

    Args:
        c_s: C_s, single channels.
        c_f: C_f, channels of the pair factors (C_pv = max(1, C_f // 4) pair-value channels).
        hidden: C, scalar channels per head.
        heads: H.
        qk_points: P, query / key points per head.
        v_points: P_v, value points per head.
        rank: r, the factors' rank.
        use_flash_attn3: allow FlashAttention 4 / 3 where they run (``model.ipa.backends``).
    """

    def __init__(self, *, c_s: int, c_f: int, hidden: int, heads: int, qk_points: int, v_points: int,
                 rank: int, use_flash_attn3: bool = True):
        super().__init__()
        self.hidden, self.heads, self.qk_points, self.v_points, self.rank = hidden, heads, qk_points, v_points, rank
        self.pair_value_dim = max(1, c_f // 4)
        self.use_flash_attn3 = bool(use_flash_attn3)
        h, c, p, pv = heads, hidden, qk_points, v_points
        # One projection of the single representation: scalar q (H C) | k, v (H 2C, per head [k | v]) |
        # local points q (H P 3) | k and v (H (P + P_v) 3); one projection per factor: pair bias (H) |
        # pair value (C_pv). NOTE (launch count): three Linears instead of six; `upgrade_legacy_state`
        # maps the older separate tensors (weights/mhc_flash_v1) onto these by concatenation.
        self.in_splits = (3 * h * c, h * p * 3, h * (p + pv) * 3)
        self.linear_in = nn.Linear(c_s, sum(self.in_splits))
        self.factor_left = nn.Linear(c_f, h + self.pair_value_dim, bias=False)  # [bl (H) | pl (C_pv)]
        self.factor_right = nn.Linear(c_f, h + self.pair_value_dim, bias=False)  # [br (H) | pr (C_pv)]
        # softplus^-1(1) so gamma starts at sqrt(2 / 9P) (AF2 / OpenFold initialisation)
        self.head_weights = nn.Parameter(torch.full((h,), math.log(math.e - 1.0)))
        self.linear_out = nn.Linear(h * (c + 4 * pv + self.pair_value_dim), c_s)
        nn.init.zeros_(self.linear_out.weight)  # AF2 "final" init: the block starts as the identity
        nn.init.zeros_(self.linear_out.bias)
        self._choices: dict[tuple, BackendChoice] = {}
        self.last_backend: BackendChoice | None = None
        # points [*, M, 3] x frames' rotations; model.network.compile.compile_denoiser swaps in a compiled,
        # fused version of the same product (model.geometry.rotate_points_elementwise)
        self.rotate = rotate_points

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Accept the earlier separate-projection tensors (see ``upgrade_legacy_state``)."""
        if prefix + _LEGACY_MARKER in state_dict:
            mine = {key: state_dict.pop(key) for key in [k for k in state_dict if k.startswith(prefix)]}
            state_dict.update(upgrade_legacy_state(mine))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def head_dims(self, dtype: torch.dtype) -> tuple[int, int]:
        """(q / k, v) head widths the attention kernel sees for an attention dtype."""
        return flash_ipa_head_dims(hidden=self.hidden, qk_points=self.qk_points, v_points=self.v_points,
                                   rank=self.rank, pair_value_dim=self.pair_value_dim,
                                   split=dtype in (torch.float16, torch.bfloat16))

    def backend(self, device: torch.device | str, dtype: torch.dtype) -> BackendChoice:
        """The attention backend for this layer on ``device`` / ``dtype`` (resolved once, cached)."""
        device = torch.device(device)
        key = (device.type, device.index, dtype)
        if key not in self._choices:
            self._choices[key] = resolve_backend(self.head_dims(dtype), device, dtype,
                                                 use_flash_attn3=self.use_flash_attn3)
        return self._choices[key]

    # ------------------------------------------------------------------------------------ shared
    def _project(self, x: torch.Tensor, factors: PairFactors, frames: Frames, centre: torch.Tensor):
        """Scalar q / k / v (activation dtype), global points (fp32, minus ``centre`` [B, 1, 3]), factor terms.

        NOTE (launch count): one matmul for all single projections, one per factor, and ONE batched
        rotation for all 2P + P_v points; the geometry is written out (fp32, autocast off) instead
        of going through Frames' dtype checks.
        """
        b, l, _ = x.shape
        h, c, p, pv = self.heads, self.hidden, self.qk_points, self.v_points
        q, kv, qp, kvp = self.linear_in(x).split((h * c, 2 * h * c) + self.in_splits[1:], dim=-1)
        q = q.view(b, l, h, c)  # [B, L, H, C]
        k, v = kv.view(b, l, h, 2 * c).split(c, dim=-1)  # [B, L, H, C] x 2
        with torch.autocast(x.device.type, enabled=False):
            rots, trans = frames.rots.float(), frames.trans.float() - centre  # [B, L, 3, 3], [B, L, 3]
            local = torch.cat([qp.view(b, l, h, p, 3), kvp.view(b, l, h, p + pv, 3)], dim=-2).float()
            glob = self.rotate(local.flatten(2, 3), rots).view(b, l, h, 2 * p + pv, 3) + trans[:, :, None, None]
            qg, kg, vg = glob.split([p, p, pv], dim=-2)  # [B, L, H, P | P | P_v, 3]
        bl, pl = self.factor_left(factors.left).split([h, self.pair_value_dim], dim=-1)  # [B, L, r, H], [B, L, r, C_pv]
        br, pr = self.factor_right(factors.right).split([h, self.pair_value_dim], dim=-1)
        gamma = nn.functional.softplus(self.head_weights.float()) * math.sqrt(2.0 / (9.0 * p))  # [H]
        return q, k, v, qg, kg, vg, bl, br, pl, pr, gamma

    def _output(self, o: torch.Tensor, o_pt: torch.Tensor, o_pair: torch.Tensor, frames: Frames,
                centre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """o [B, L, H, C], o_pt [B, L, H, P_v, 3] global (minus centre), o_pair [B, L, H, C_pv] -> [B, L, C_s]."""
        b, l, h = o.shape[:3]
        with torch.autocast(o.device.type, enabled=False):
            rots, trans = frames.rots.float(), frames.trans.float() - centre  # [B, L, 3, 3], [B, L, 3]
            rel = (o_pt.float() - trans[:, :, None, None]).flatten(2, 3)  # [B, L, H P_v, 3]
            local = self.rotate(rel, rots, inverse=True).view(b, l, h, self.v_points, 3)  # R^T (x - t)
            norms = torch.sqrt((local * local).sum(-1) + POINT_NORM_EPS)  # [B, L, H, P_v]
        dtype = self.linear_out.weight.dtype if not torch.is_autocast_enabled(o.device.type) else o.dtype
        feats = torch.cat([o.to(dtype), local.flatten(-2).to(dtype), norms.to(dtype), o_pair.to(dtype)],
                          dim=-1)  # [B, L, H, C + 4 P_v + C_pv]
        out = self.linear_out(feats.flatten(-2))  # [B, L, C_s]
        return out * mask.to(out.dtype)[..., None]

    # ------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, factors: PairFactors, frames: Frames, mask: torch.Tensor, *,
                reference: bool = False) -> torch.Tensor:
        """x [B, L, C_s]; factors (left / right [B, L, r, C_f]); frames [B, L]; mask [B, L] -> [B, L, C_s].

        ``reference=True`` runs the dense O(L^2) reference with the same parameters.
        """
        if factors.rank != self.rank:
            raise ValueError(f"FlashIPA was built for zFactorRank {self.rank}, got factors of rank {factors.rank}")
        real = mask.float()  # [B, L]
        if reference:  # exact distances from the raw coordinates: no centring in the reference
            centre = torch.zeros_like(frames.trans[:, :1].float())  # [B, 1, 3]
        else:  # masked CA centroid [B, 1, 3]
            centre = (frames.trans.float() * real[..., None]).sum(1, keepdim=True) / real.sum(1).clamp(min=1)[:, None, None]
        q, k, v, qg, kg, vg, bl, br, pl, pr, gamma = self._project(x, factors, frames, centre)
        if reference:
            o, o_pt, o_pair = self._dense_core(q, k, v, qg, kg, vg, bl, br, pl, pr, gamma, mask)
        else:
            o, o_pt, o_pair = self._flash_core(q, k, v, qg, kg, vg, bl, br, pl, pr, gamma, mask)
        return self._output(o, o_pt, o_pair, frames, centre, mask)

    def _flash_core(self, q, k, v, qg, kg, vg, bl, br, pl, pr, gamma, mask):
        """Widened q~ / k~ / v~ (module docstring) through one softmax attention.

        The rows are packed exactly as the kernel takes them (model/ipa/attention.py ``packed_attention``):
        the folded key-padding column and the zero padding to the kernel's width are part of the same
        ``cat``, so each of q~ / k~ / v~ is built by one copy kernel.
        """
        b, l, h, c = q.shape
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else self.linear_in.weight.dtype
        split = dtype in (torch.float16, torch.bfloat16)
        w_l = math.sqrt(1.0 / 3.0)
        choice = self.backend(q.device, dtype)
        self.last_backend = choice
        with torch.autocast(q.device.type, enabled=False):
            kg_scaled = kg * (w_l * gamma)[:, None, None]  # [B, L, H, P, 3]
            k_norm = -0.5 * (kg_scaled * kg).sum(dim=(-1, -2))[..., None]  # [B, L, H, 1]  -w_L gamma / 2 |K|^2
            # points and the norm column share one hi / lo split: [Q | 1] . [w gamma K | k_norm]
            pq = nn.functional.pad(qg.flatten(-2), (0, 1), value=1.0)  # [B, L, H, 3P + 1]
            pk = torch.cat([kg_scaled.flatten(-2), k_norm], dim=-1)  # [B, L, H, 3P + 1]
            pq, pk = _split_dot(pq, pk, dtype, split)  # blocks of [B, L, H, 3P + 1]
            q_cols = [(q * (w_l / math.sqrt(c))).to(dtype), *pq, (w_l * bl.transpose(-1, -2)).to(dtype)]
            k_cols = [k.to(dtype), *pk, br.transpose(-1, -2).to(dtype)]
            pair_v = pr.flatten(-2).to(dtype)[:, :, None].expand(b, l, h, -1)  # [B, L, H, r * C_pv]
            v_cols = [v.to(dtype), vg.flatten(-2).to(dtype), pair_v]
            out = packed_attention(q_cols, k_cols, v_cols, mask, backend=choice)  # [B, L, H, D_v]
        return self._read_out(out, pl)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _read_out(self, out: torch.Tensor, pl: torch.Tensor):
        """Attention output [B, L, H, D_v] -> o [B, L, H, C], o_pt [B, L, H, P_v, 3] (fp32), o_pair [B, L, H, C_pv]."""
        c = self.hidden
        o, o_pt, o_pair_r = out.split([c, 3 * self.v_points, self.rank * self.pair_value_dim], dim=-1)
        o_pt = o_pt.float().unflatten(-1, (self.v_points, 3))  # [B, L, H, P_v, 3]
        o_pair = (o_pair_r.unflatten(-1, (self.rank, -1)) * pl[:, :, None].to(out.dtype)).sum(-2)  # [B, L, H, C_pv]
        return o, o_pt, o_pair

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _dense_core(self, q, k, v, qg, kg, vg, bl, br, pl, pr, gamma, mask):
        """Reference: materialised [B, H, L, L] logits and [B, L, L, C_pv] pair values, fp32."""
        c = q.shape[-1]
        w_l = math.sqrt(1.0 / 3.0)
        q, k, v, bl, br, pl, pr = (t.float() for t in (q, k, v, bl, br, pl, pr))
        scalar = torch.einsum("bihc,bjhc->bhij", q, k) / math.sqrt(c)  # [B, H, L, L]
        bias = torch.einsum("birh,bjrh->bhij", bl, br)  # [B, H, L, L]
        diff = qg[:, :, None] - kg[:, None, :]  # [B, L, L, H, P, 3]
        dist2 = (diff * diff).sum(dim=(-1, -2)).permute(0, 3, 1, 2)  # [B, H, L, L]
        logits = w_l * (scalar + bias - 0.5 * gamma[:, None, None] * dist2)  # [B, H, L, L]
        logits = logits.masked_fill(~mask.bool()[:, None, None, :], -mask_value(torch.float32))
        a = torch.softmax(logits, dim=-1)  # [B, H, L, L]
        o = torch.einsum("bhij,bjhc->bihc", a, v)  # [B, L, H, C]
        o_pt = torch.einsum("bhij,bjhpx->bihpx", a, vg)  # [B, L, H, P_v, 3]
        pair_values = torch.einsum("birc,bjrc->bijc", pl, pr)  # [B, L, L, C_pv]
        o_pair = torch.einsum("bhij,bijc->bihc", a, pair_values)  # [B, L, H, C_pv]
        return o, o_pt, o_pair
