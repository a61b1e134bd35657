"""Genie's pair transform: triangle updates and a pair transition, stacked ``numPairTransformLayers`` times.

Sources: AlphaFold 2 supplement, Algorithm 11 / 12 (triangle multiplicative update, outgoing /
incoming edges), Algorithm 13 / 14 (triangle attention around the starting / ending node), Algorithm 15
(pair transition), section 1.11.6 (shared dropout); Genie ``genie/model/pair_transform_net.py``, which
uses OpenFold's modules in this order per layer:

    p += DropoutRowwise(TriMulOut(p));  p += DropoutRowwise(TriMulIn(p))        (if enabled)
    p += DropoutRowwise(TriAttStart(p)); p += DropoutColumnwise(TriAttEnd(p))   (if enabled)
    p += PairTransition(p);  p *= pair_mask

Shapes: B batch, L residues, C_p pair channels, H heads, C hidden channels.

NOTE: the output projections (``linear_z``, ``linear_o``, the transition's second Linear) start at
zero, OpenFold's "final" initialisation, so each residual update starts as the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "PairTransformLayer",
    "PairTransformNet",
    "PairTransition",
    "SharedDropout",
    "TriangleAttention",
    "TriangleMultiplication",
    "amp_layer_norm",
    "linear_relu",
]


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype on ``x``'s device, or None when autocast is off there."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None


def amp_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` [*, C] -> [*, C], in the autocast dtype when autocast is on.

    NOTE (speed): autocast runs LayerNorm in float32, so a float32 pair tensor comes out of it in
    float32 and every following Linear casts it to bf16 again (one [B, L, L, C] copy each). Here
    x is cast once and normalised in bf16 / fp16 (the kernels accumulate the statistics in float32);
    every consumer is a Linear that would round the output to that dtype anyway. Without autocast it
    is exactly ``norm(x)``.
    """
    dt = _autocast_dtype(x)
    if dt is None or x.dtype == torch.float64:
        return norm(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return nn.functional.layer_norm(x.to(dt), norm.normalized_shape, norm.weight.to(dt),
                                        norm.bias.to(dt), norm.eps)


def linear_relu(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``relu(lin(x))`` [*, C_in] -> [*, C_out] with the bias and ReLU in the GEMM's epilogue.

    Inference only (sampling): ``torch._addmm_activation`` is the aten op behind ``relu(addmm)`` fusion
    (cuBLASLt epilogue on CUDA); ``torch.compile`` keeps it as one external kernel, so the [*, C_out]
    output is written once instead of being read and written again by a separate ReLU kernel (for the
    pair transition C_out = 4 C_p: the largest tensor of the pair stack). The op has no autocast rule,
    so under autocast the operands are cast to the autocast dtype here, as ``lin(x)`` would. The op has
    no derivative: when a gradient is needed (training) this is ``torch.relu(lin(x))``.
    """
    w, b = lin.weight, lin.bias
    if torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or b.requires_grad):
        return torch.relu(lin(x))
    dt = _autocast_dtype(x)
    if dt is not None and x.dtype != torch.float64:
        x, w, b = x.to(dt), w.to(dt), b.to(dt)
    y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t())  # [N, C_out]
    return y.view(*x.shape[:-1], y.shape[-1])


def _zero_linear(c_in: int, c_out: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(c_in, c_out, bias=bias)
    nn.init.zeros_(lin.weight)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class SharedDropout(nn.Module):
    """Dropout whose mask is shared along one axis of [B, L, L, C] (AF2 1.11.6).

    ``shared_dim=1`` (rowwise, OpenFold ``DropoutRowwise``): one mask [B, 1, L, C] for all rows i;
    ``shared_dim=2`` (columnwise): one mask [B, L, 1, C] for all columns j.
    """

    def __init__(self, *, p: float, shared_dim: int) -> None:
        super().__init__()
        self.p, self.shared_dim = p, shared_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        shape = list(x.shape)
        shape[self.shared_dim] = 1
        keep = torch.bernoulli(torch.full(shape, 1.0 - self.p, device=x.device, dtype=x.dtype))
        return x * keep / (1.0 - self.p)


class TriangleMultiplication(nn.Module):
    """AF2 Algorithm 11 (``outgoing=True``: x_ij = sum_k a_ik b_jk) / 12 (incoming: sum_k a_ki b_kj)."""

    def __init__(self, *, c_p: int, c_hidden: int, outgoing: bool) -> None:
        super().__init__()
        self.outgoing = outgoing
        self.layer_norm_in = nn.LayerNorm(c_p)
        self.linear_a_p = nn.Linear(c_p, c_hidden)
        self.linear_a_g = nn.Linear(c_p, c_hidden)
        self.linear_b_p = nn.Linear(c_p, c_hidden)
        self.linear_b_g = nn.Linear(c_p, c_hidden)
        self.linear_g = nn.Linear(c_p, c_p)
        self.layer_norm_out = nn.LayerNorm(c_hidden)
        self.linear_z = _zero_linear(c_hidden, c_p)

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """p: [B, L, L, C_p], pair_mask: [B, L, L] -> update [B, L, L, C_p].

        NOTE (speed): the five input projections run as one Linear with the concatenated weights
        (one GEMM and one cast of z instead of five; the parameters stay five Linears). The layout
        copies are explicit so that ``torch.compile`` fuses them into the gating kernel at every
        shape (with the einsum, inductor's dynamic-shape graph left them to a strided aten copy that
        cost 4.3 ms per call at B = 1, L = 1024 on an H100).
        """
        z = amp_layer_norm(self.layer_norm_in, p)  # [B, L, L, C_p]
        lins = (self.linear_a_p, self.linear_a_g, self.linear_b_p, self.linear_b_g, self.linear_g)
        proj = nn.functional.linear(z, torch.cat([lin.weight for lin in lins]),
                                    torch.cat([lin.bias for lin in lins]))  # [B, L, L, 4 C + C_p]
        c = self.linear_a_p.out_features
        a_p, a_g, b_p, b_g, g = proj.split([c, c, c, c, proj.shape[-1] - 4 * c], dim=-1)
        m = pair_mask[..., None].to(proj.dtype)  # [B, L, L, 1]
        # The gated edges in channel-first layout [B, C, L, L] (one explicit copy each; torch.einsum
        # would make the same copy inside), so each triangle product is one batched matmul over B * C.
        a = rearrange(m * torch.sigmoid(a_g) * a_p, "b r s c -> b c r s").contiguous()  # [B, C, L, L]
        b = rearrange(m * torch.sigmoid(b_g) * b_p, "b r s c -> b c r s").contiguous()  # [B, C, L, L]
        if self.outgoing:
            x = a @ b.transpose(-1, -2)  # x_cij = sum_k a_cik b_cjk          [B, C, L, L]
        else:
            x = a.transpose(-1, -2) @ b  # x_cij = sum_k a_cki b_ckj          [B, C, L, L]
        x = rearrange(x, "b c i j -> b i j c")  # [B, L, L, C] (a view)
        x = self.linear_z(amp_layer_norm(self.layer_norm_out, x))  # [B, L, L, C_p]
        return x * torch.sigmoid(g)


class TriangleAttention(nn.Module):
    """AF2 Algorithm 13 (``starting=True``: row i attends over j -> k with bias b_jk) / 14 (ending node).

    The ending-node version is the starting-node version on the transposed pair tensor (as OpenFold).
    """

    def __init__(self, *, c_p: int, c_hidden: int, num_heads: int, starting: bool) -> None:
        super().__init__()
        self.starting, self.num_heads, self.c_hidden = starting, num_heads, c_hidden
        self.layer_norm = nn.LayerNorm(c_p)
        self.linear_q = nn.Linear(c_p, num_heads * c_hidden, bias=False)
        self.linear_k = nn.Linear(c_p, num_heads * c_hidden, bias=False)
        self.linear_v = nn.Linear(c_p, num_heads * c_hidden, bias=False)
        self.linear_bias = nn.Linear(c_p, num_heads, bias=False)
        self.linear_gate = nn.Linear(c_p, num_heads * c_hidden)
        nn.init.zeros_(self.linear_gate.weight)
        nn.init.ones_(self.linear_gate.bias)
        self.linear_o = _zero_linear(num_heads * c_hidden, c_p)

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """p: [B, L, L, C_p], pair_mask: [B, L, L] -> update [B, L, L, C_p]."""
        if not self.starting:
            p, pair_mask = p.transpose(1, 2), pair_mask.transpose(1, 2)
        z = amp_layer_norm(self.layer_norm, p)  # [B, L, L, C_p]
        h = self.num_heads
        q = rearrange(self.linear_q(z), "b i j (h c) -> b i h j c", h=h)  # [B, L, H, L, C]
        k = rearrange(self.linear_k(z), "b i j (h c) -> b i h j c", h=h)  # [B, L, H, L, C]
        v = rearrange(self.linear_v(z), "b i j (h c) -> b i h j c", h=h)  # [B, L, H, L, C]
        tri_bias = rearrange(self.linear_bias(z), "b j k h -> b h j k")[:, None]  # [B, 1, H, L, L]
        logits = torch.einsum("bihjc,bihkc->bihjk", q.float(), k.float()) / math.sqrt(self.c_hidden)
        key_mask = pair_mask[:, :, None, None, :].bool()  # [B, L(i), 1, 1, L(k)]
        logits = logits + tri_bias.float()
        logits = logits.masked_fill(~key_mask, -1e9)
        attn = torch.softmax(logits, dim=-1).to(v.dtype)  # [B, L, H, L, L]
        o = torch.einsum("bihjk,bihkc->bihjc", attn, v)  # [B, L, H, L, C]
        o = rearrange(o, "b i h j c -> b i j (h c)") * torch.sigmoid(self.linear_gate(z))  # [B, L, L, H*C]
        o = self.linear_o(o)  # [B, L, L, C_p]
        return o.transpose(1, 2) if not self.starting else o


class PairTransition(nn.Module):
    """AF2 Algorithm 15: LN -> Linear(C_p, n C_p) -> ReLU -> Linear(n C_p, C_p), masked."""

    def __init__(self, *, c_p: int, n: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(c_p)
        self.linear_1 = nn.Linear(c_p, n * c_p)
        self.linear_2 = _zero_linear(n * c_p, c_p)

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """p: [B, L, L, C_p], pair_mask: [B, L, L] -> update [B, L, L, C_p]."""
        x = self.linear_2(linear_relu(self.linear_1, amp_layer_norm(self.layer_norm, p)))  # [B, L, L, C_p]
        return x * pair_mask[..., None].to(x.dtype)


class PairTransformLayer(nn.Module):
    """One Genie pair-transform layer (see module docstring for the order)."""

    def __init__(self, *, c_p: int, include_mul_update: bool, include_tri_att: bool, c_hidden_mul: int,
                 c_hidden_att: int, num_heads_att: int, dropout: float, transition_n: int) -> None:
        super().__init__()
        self.tri_mul_out = self.tri_mul_in = self.tri_att_start = self.tri_att_end = None
        if include_mul_update:
            self.tri_mul_out = TriangleMultiplication(c_p=c_p, c_hidden=c_hidden_mul, outgoing=True)
            self.tri_mul_in = TriangleMultiplication(c_p=c_p, c_hidden=c_hidden_mul, outgoing=False)
        if include_tri_att:
            self.tri_att_start = TriangleAttention(c_p=c_p, c_hidden=c_hidden_att, num_heads=num_heads_att,
                                                   starting=True)
            self.tri_att_end = TriangleAttention(c_p=c_p, c_hidden=c_hidden_att, num_heads=num_heads_att,
                                                 starting=False)
        self.pair_transition = PairTransition(c_p=c_p, n=transition_n)
        self.dropout_row = SharedDropout(p=dropout, shared_dim=1)
        self.dropout_col = SharedDropout(p=dropout, shared_dim=2)

    def forward(self, p: torch.Tensor, pair_mask: torch.Tensor) -> torch.Tensor:
        """p: [B, L, L, C_p], pair_mask: [B, L, L] -> [B, L, L, C_p]."""
        if self.tri_mul_out is not None:
            p = p + self.dropout_row(self.tri_mul_out(p, pair_mask))
            p = p + self.dropout_row(self.tri_mul_in(p, pair_mask))
        if self.tri_att_start is not None:
            p = p + self.dropout_row(self.tri_att_start(p, pair_mask))
            p = p + self.dropout_col(self.tri_att_end(p, pair_mask))
        p = p + self.pair_transition(p, pair_mask)
        return p * pair_mask[..., None].to(p.dtype)


class PairTransformNet(nn.Module):
    """``numPairTransformLayers`` PairTransformLayers; optional activation checkpointing per layer."""

    def __init__(self, *, c_p: int, num_layers: int, include_mul_update: bool, include_tri_att: bool,
                 c_hidden_mul: int, c_hidden_att: int, num_heads_att: int, dropout: float,
                 transition_n: int, checkpointing: bool = False) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList([
            PairTransformLayer(c_p=c_p, include_mul_update=include_mul_update, include_tri_att=include_tri_att,
                               c_hidden_mul=c_hidden_mul, c_hidden_att=c_hidden_att,
                               num_heads_att=num_heads_att, dropout=dropout, transition_n=transition_n)
            for _ in range(num_layers)
        ])

    def compile_layers(self, *, dynamic: bool | None = None, mode: str | None = None,
                       backend: str | Callable = "inductor") -> None:
        """``torch.compile`` every layer in place (``nn.Module.compile``; parameters and state_dict unchanged).

        Why: the pair stack is memory-bound (LayerNorm over C_p = 128, casts, gates, the layout copies
        around the triangle products); inductor fuses them into a few Triton kernels. The layers share
        one code object, so the layers of a stack reuse one compiled graph per shape. ``dynamic`` /
        ``mode`` / ``backend`` go to ``torch.compile``. Compilation happens on the first call of each
        shape; :meth:`eager_layers` undoes it.
        """
        for layer in self.layers:
            layer.compile(dynamic=dynamic, mode=mode, backend=backend)

    def eager_layers(self) -> None:
        """Drop the compiled forward of every layer (e.g. after a failed compile): run them as written."""
        for layer in self.layers:
            layer._compiled_call_impl = None

    def forward(self, p: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """p: [B, L, L, C_p], mask: [B, L] -> [B, L, L, C_p]."""
        pair_mask = mask[:, :, None] * mask[:, None, :]  # [B, L, L]
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                p = checkpoint(layer, p, pair_mask, use_reentrant=False)
            else:
                p = layer(p, pair_mask)
        return p
