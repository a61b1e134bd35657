"""Flash-IPA: invariant point attention over factorized pair features as ONE bias-free softmax attention.

Sources: AlphaFold 2 supplement Algorithm 22 (IPA) as in OpenFold ``structure_module.py``; Flash-IPA
(arXiv 2505.11580, Sec. 3: "every logit term is a dot product"). Per head h (AF2 eq. in Alg. 22):

    a_ij = softmax_j( w_L * ( q_i.k_j / sqrt(C) + b_ij - (gamma_h / 2) * sum_p |T_i q_ip - T_j k_jp|^2 ) )

with w_L = sqrt(1/3), gamma_h = softplus(theta_h) * sqrt(2 / (9 P)). Here the pair bias comes from
the factors (model/factorizer.py): b_ij = sum_r bl[i, r, h] * br[j, r, h], bl / br = Linear(left /
right factor), and the pair values are z'_ij = sum_r pl[i, r] * pr[j, r] (C_pv = C_f // 4 channels).
Expanding |Q - K|^2 = |Q|^2 + |K|^2 - 2 Q.K and dropping |Q_i|^2 (constant over j, it cancels in
the softmax) gives widened rows (all fp32 before the cast to the attention dtype):

    q~_i = [ w_L q_i / sqrt(C) | Q_i (3P)              | 1                       | w_L bl_i (r) ]
    k~_j = [ k_j               | w_L gamma K_j (3P)    | -w_L gamma / 2 |K_j|^2  | br_j (r)     ]
    v~_j = [ v_j (C)           | V_j (3 P_v, global)   | pr_j (r * C_pv)                         ]

so ``attention(q~, k~, v~, mask, scale=1)`` (model/attention.py: FA3 / FA2 / SDPA / math) returns
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

from model.attention import BackendChoice, attention, mask_value, resolve_backend
from model.factorizer import PairFactorizer, PairFactors, PairFreeFactorizer, build_factorizer
from model.geometry import Frames
from model.knn import Neighbours, knn

# The factorizers and the k-NN search live in model/factorizer.py and model/knn.py (one concept per
# file); they are re-exported here because docs/ARCHITECTURE.md places them under flash_ipa.
__all__ = ["FlashIPA", "Neighbours", "PairFactorizer", "PairFactors", "PairFreeFactorizer", "build_factorizer",
           "flash_ipa_head_dims", "knn"]

POINT_NORM_EPS = 1e-8  # inside sqrt of the output point norms (AF2 / OpenFold)


def flash_ipa_head_dims(*, hidden: int, qk_points: int, v_points: int, rank: int, pair_value_dim: int,
                        split: bool) -> tuple[int, int]:
    """Widened (q / k, v) head widths, before the attention module's +1 mask column and padding."""
    dim_qk = hidden + 3 * qk_points * (3 if split else 1) + (2 if split else 1) + rank
    dim_v = hidden + 3 * v_points + rank * pair_value_dim
    return dim_qk, dim_v


def _split_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, split: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns (for the q side, for the k side) whose dot product is a.b, cast to ``dtype``.

    With ``split``: a = ah + al, b = bh + bl in 16-bit parts; [ah, ah, al] . [bh, bl, bh] = a.b up to
    the al.bl term (~2^-16 relative). Gradients: d/da flows through ah (al has zero net gradient), and
    the two ah columns sum to the exact b; likewise for b.
    """
    if not split:
        return a.to(dtype), b.to(dtype)
    ah, bh = a.to(dtype), b.to(dtype)
    al, bl = (a - ah.float()).to(dtype), (b - bh.float()).to(dtype)
    return torch.cat([ah, ah, al], dim=-1), torch.cat([bh, bl, bh], dim=-1)


class FlashIPA(nn.Module):
    """IPA over PairFactors: ``ipa(x [B, L, C_s], factors, frames [B, L], mask [B, L]) -> [B, L, C_s]``."""

    def __init__(self, *, single_dim: int, factor_dim: int, hidden: int, heads: int, qk_points: int,
                 v_points: int, rank: int, config=None):
        super().__init__()
        self.hidden, self.heads, self.qk_points, self.v_points, self.rank = hidden, heads, qk_points, v_points, rank
        self.pair_value_dim = max(1, factor_dim // 4)
        self.config = config  # only useFlashAttn3 is read (backend choice)
        h, c, p, pv = heads, hidden, qk_points, v_points
        self.linear_q = nn.Linear(single_dim, h * c)
        self.linear_kv = nn.Linear(single_dim, 2 * h * c)
        self.linear_q_points = nn.Linear(single_dim, h * p * 3)
        self.linear_kv_points = nn.Linear(single_dim, h * (p + pv) * 3)
        self.bias_left = nn.Linear(factor_dim, h, bias=False)  # bl [B, L, r, H]
        self.bias_right = nn.Linear(factor_dim, h, bias=False)  # br [B, L, r, H]
        self.value_left = nn.Linear(factor_dim, self.pair_value_dim, bias=False)  # pl [B, L, r, C_pv]
        self.value_right = nn.Linear(factor_dim, self.pair_value_dim, bias=False)  # pr [B, L, r, C_pv]
        # softplus^-1(1) so gamma starts at sqrt(2 / 9P) (AF2 / OpenFold initialisation)
        self.head_weights = nn.Parameter(torch.full((h,), math.log(math.e - 1.0)))
        self.linear_out = nn.Linear(h * (c + 4 * pv + self.pair_value_dim), single_dim)
        nn.init.zeros_(self.linear_out.weight)  # AF2 "final" init: the block starts as the identity
        nn.init.zeros_(self.linear_out.bias)
        self._choices: dict[tuple, BackendChoice] = {}
        self.last_backend: BackendChoice | None = None

    @classmethod
    def from_config(cls, config) -> FlashIPA:
        return cls(single_dim=config.singleFeatureDimension, factor_dim=config.pairFeatureDimension,
                   hidden=config.ipaHiddenDimension, heads=config.ipaNumHeads, qk_points=config.ipaNumQkPoints,
                   v_points=config.ipaNumVPoints, rank=config.zFactorRank, config=config)

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
            self._choices[key] = resolve_backend(self.config, self.head_dims(dtype), device, dtype)
        return self._choices[key]

    # ------------------------------------------------------------------------------------ shared
    def _project(self, x: torch.Tensor, factors: PairFactors, frames: Frames, centre: torch.Tensor):
        """Scalar q / k / v, global points (fp32, minus ``centre`` [B, 1, 3]), factor projections."""
        b, l, _ = x.shape
        h, c, p, pv = self.heads, self.hidden, self.qk_points, self.v_points
        q = self.linear_q(x).view(b, l, h, c).float()  # [B, L, H, C]
        k, v = self.linear_kv(x).view(b, l, h, 2 * c).float().split(c, dim=-1)  # [B, L, H, C] x 2
        qp = self.linear_q_points(x).view(b, l, h, p, 3).float()  # [B, L, H, P, 3] local
        kvp = self.linear_kv_points(x).view(b, l, h, p + pv, 3).float()  # [B, L, H, P + P_v, 3]
        with torch.autocast(x.device.type, enabled=False):
            fr = Frames(frames.rots.float(), frames.trans.float() - centre)[:, :, None, None]  # [B, L, 1, 1]
            qg = fr.apply(qp)  # [B, L, H, P, 3]
            kg, vg = fr.apply(kvp).split([p, pv], dim=-2)  # [B, L, H, P, 3], [B, L, H, P_v, 3]
        left, right = factors.left, factors.right  # [B, L, r, C_f]
        bl, br = self.bias_left(left).float(), self.bias_right(right).float()  # [B, L, r, H]
        pl, pr = self.value_left(left).float(), self.value_right(right).float()  # [B, L, r, C_pv]
        gamma = nn.functional.softplus(self.head_weights.float()) * math.sqrt(2.0 / (9.0 * p))  # [H]
        return q, k, v, qg, kg, vg, bl, br, pl, pr, gamma

    def _output(self, o: torch.Tensor, o_pt: torch.Tensor, o_pair: torch.Tensor, frames: Frames,
                centre: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """o [B, L, H, C], o_pt [B, L, H, P_v, 3] global (minus centre), o_pair [B, L, H, C_pv] -> [B, L, C_s]."""
        with torch.autocast(o.device.type, enabled=False):
            fr = Frames(frames.rots.float(), frames.trans.float() - centre)[:, :, None, None]
            local = fr.invert_apply(o_pt.float())  # [B, L, H, P_v, 3]
            norms = torch.sqrt((local * local).sum(-1) + POINT_NORM_EPS)  # [B, L, H, P_v]
        feats = torch.cat([o.float(), local.flatten(-2), norms, o_pair.float()], dim=-1)  # [B, L, H, C + 4 P_v + C_pv]
        out = self.linear_out(feats.flatten(-2).to(self.linear_out.weight.dtype))  # [B, L, C_s]
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
        """Widened q~ / k~ / v~ (module docstring) through one softmax attention."""
        b, l, h, c = q.shape
        dtype = torch.get_autocast_dtype(q.device.type) if torch.is_autocast_enabled(q.device.type) else self.linear_q.weight.dtype
        split = dtype in (torch.float16, torch.bfloat16)
        w_l = math.sqrt(1.0 / 3.0)
        kg_scaled = kg * (w_l * gamma)[:, None, None]  # [B, L, H, P, 3]
        k_norm = -0.5 * (kg_scaled * kg).sum(dim=(-1, -2))  # [B, L, H]  -w_L gamma / 2 |K|^2
        pq, pk = _split_dot(qg.flatten(-2), kg_scaled.flatten(-2), dtype, split)  # [B, L, H, 3P or 9P]
        nq, nk = _split_dot(torch.ones_like(k_norm)[..., None], k_norm[..., None], dtype, split)  # [B, L, H, 1|3]
        if split:  # the norm column needs only [1, 1] . [nh, nl]
            nq, nk = nq[..., :2], torch.cat([nk[..., :1], nk[..., 1:2]], dim=-1)
        q_wide = torch.cat([(q * (w_l / math.sqrt(c))).to(dtype), pq, nq,
                            (w_l * bl.transpose(-1, -2)).to(dtype)], dim=-1)  # [B, L, H, D_qk]
        k_wide = torch.cat([k.to(dtype), pk, nk, br.transpose(-1, -2).to(dtype)], dim=-1)  # [B, L, H, D_qk]
        pair_v = pr.flatten(-2)[:, :, None].expand(b, l, h, -1)  # [B, L, H, r * C_pv]
        v_wide = torch.cat([v, vg.flatten(-2), pair_v], dim=-1).to(dtype)  # [B, L, H, D_v]
        choice = self.backend(q.device, dtype)
        self.last_backend = choice
        out = attention(q_wide, k_wide, v_wide, mask, backend=choice, scale=1.0).float()  # [B, L, H, D_v]
        return self._read_out(out, pl)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _read_out(self, out: torch.Tensor, pl: torch.Tensor):
        """Attention output [B, L, H, D_v] -> o [B, L, H, C], o_pt [B, L, H, P_v, 3], o_pair [B, L, H, C_pv]."""
        c = self.hidden
        o, o_pt, o_pair_r = out.split([c, 3 * self.v_points, self.rank * self.pair_value_dim], dim=-1)
        o_pt = o_pt.unflatten(-1, (self.v_points, 3))  # [B, L, H, P_v, 3]
        o_pair = torch.einsum("blhrc,blrc->blhc", o_pair_r.unflatten(-1, (self.rank, -1)), pl)  # [B, L, H, C_pv]
        return o, o_pt, o_pair

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def _dense_core(self, q, k, v, qg, kg, vg, bl, br, pl, pr, gamma, mask):
        """Reference: materialised [B, H, L, L] logits and [B, L, L, C_pv] pair values, fp32."""
        c = q.shape[-1]
        w_l = math.sqrt(1.0 / 3.0)
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
