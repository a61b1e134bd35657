"""Softmax attention on the chosen backend: the fp32 math reference beside the fused kernels, and the
packing of widened rows. The one place that calls a fused attention kernel.

Which kernel runs is chosen in ``model.ipa.backends`` (``resolve_backend``); here it runs.

Masking. Every backend takes one ``key_padding_mask`` [B, L]. NOTE: the fused kernels get no mask
argument at all: the mask is folded into one extra q / k column (q: 1, k: 0 for a real key and
``-mask_value`` for a padded one), so a key-padded dot product is exact for real keys and hugely
negative for padding. This lets bias-free kernels (FA2 / FA3 dense, SDPA flash) handle padding
without varlen unpadding, and it is the same large finite negative the math reference adds, never
``-inf``: a fully-masked row gives a uniform softmax, not NaN. Padded query rows output zeros.

Padded query rows. NOTE: ``pack_rows`` zeroes them (self-attention: the key-padding mask is also the
query mask), so each has logit 0 for every real key, and its gradient is exactly zero. Their outputs are
discarded anyway, but rows left as they came (Flash-IPA's points of padding residues, far from every
real key) have every logit near -1e3 .. -4e3, and on such rows PyTorch's cuDNN attention backward
(torch 2.11, bf16, on an H200) returned NaN for dq although its forward and all inputs were finite;
the NaN then reached every weight through the query projection: the non-finite training steps of the
pair-free model at ~10,000 steps. The flash and memory-efficient kernels gave finite gradients on the
same inputs. (``scripts/hunt_nonfinite.py`` found it; ``tests/test_attention.py`` keeps the case.)

Shapes: q, k [B, L, H, D_qk], v [B, L, H, D_v]; D_qk may differ from D_v: the inputs are zero-padded
to what the chosen kernel needs (``model.ipa.backends.padded_dims``) and the output is cut back to D_v.
Optional accelerators are imported lazily, inside functions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.ipa.backends import (
    BACKEND_ORDER,
    FA_MODULES,
    BackendChoice,
    flash_attn_module,
    padded_dims,
    resolve_backend,
)

__all__ = [
    "MATH_BLOCK_ELEMENTS",
    "attention",
    "mask_value",
    "math_attention",
    "pack_rows",
    "packed_attention",
]

# Elements of one fp32 logit block in math_attention (B * H * chunk * L_k): 64 Mi = 256 MiB.
MATH_BLOCK_ELEMENTS = 1 << 26


def mask_value(dtype: torch.dtype) -> float:
    """The large finite negative added to padded keys' logits (fits the dtype; never -inf)."""
    return 3.0e4 if dtype == torch.float16 else 1.0e6


# --------------------------------------------------------------------------------------- running
def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                   *, scale: float | None = None) -> torch.Tensor:
    """The reference: ``softmax(scale * q.k + mask) v`` with fp32 logits, chunked over query rows.

    Args:
        q: [B, L_q, H, D_qk]; k: [B, L_k, H, D_qk]; v: [B, L_k, H, D_v].
        key_padding_mask: [B, L_k] (1 / True = real key) or None.
    Returns:
        [B, L_q, H, D_v] in v's dtype; query rows zeroed where the mask is 0 (when L_q == L_k).
    """
    with torch.autocast(q.device.type, enabled=False):  # fp32 logits even inside autocast
        return _math_attention(q, k, v, key_padding_mask, scale)


def _math_attention(q, k, v, key_padding_mask, scale):
    batch, len_q, heads, dim = q.shape
    len_k = k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    kf = k.float().permute(0, 2, 3, 1)  # [B, H, D_qk, L_k]
    vf = v.float().transpose(1, 2)  # [B, H, L_k, D_v]
    bias = None
    if key_padding_mask is not None:
        real = key_padding_mask.bool()  # [B, L_k]
        bias = torch.zeros(real.shape, dtype=torch.float32, device=q.device).masked_fill(
            ~real, -mask_value(q.dtype))[:, None, None, :]  # [B, 1, 1, L_k]
    chunk = max(1, MATH_BLOCK_ELEMENTS // max(1, batch * heads * len_k))
    outs = []
    for start in range(0, len_q, chunk):
        qc = q[:, start:start + chunk].float().transpose(1, 2)  # [B, H, c, D_qk]
        logits = (qc @ kf) * scale  # [B, H, c, L_k]
        if bias is not None:
            logits = logits + bias
        outs.append(torch.softmax(logits, dim=-1) @ vf)  # [B, H, c, D_v]
    out = torch.cat(outs, dim=2).transpose(1, 2)  # [B, L_q, H, D_v]
    if key_padding_mask is not None and len_q == len_k:
        out = out * key_padding_mask.to(out.dtype)[:, :, None, None]
    return out.to(v.dtype)


_CONSTANT_ROWS: dict[tuple, torch.Tensor] = {}
ANCHOR_COLUMNS = 2  # the row anchor's high and low parts (pack_rows)


def _constant_row(width: int, ones: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [width] row: ``ones`` leading ones, then zeros. Cached per (width, ones, dtype, device) so the
    packing launches no fill kernels, except while a CUDA graph is being captured (a tensor made then
    lives in the graph's pool and must not outlive the graph: it is made afresh and not cached)."""
    key = (width, ones, dtype, torch.device(device))
    row = _CONSTANT_ROWS.get(key)
    if row is None:
        row = torch.zeros(width, dtype=dtype, device=device)
        row[:ones].fill_(1.0)  # on the device: no host copy (allowed during capture)
        capturing = row.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not torch.compiler.is_compiling():
            _CONSTANT_ROWS[key] = row
    return row


def pack_rows(q_cols: list[torch.Tensor], k_cols: list[torch.Tensor], v_cols: list[torch.Tensor],
              key_padding_mask: torch.Tensor | None, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate column blocks into the q / k / v rows the kernel ``name`` takes, mask folded in.

    q_cols / k_cols: blocks [B, L, H, d_i] (views or expanded tensors are fine), pairwise of equal
    widths, whose concatenated dot product is the full logit (any softmax scale already applied);
    v_cols likewise for the values. Appends two columns and the zero padding to the kernel's widths
    (``_padded_dims``) in the SAME ``cat``, one copy per tensor:
    - the key-padding column: q 1; k 0 for a real key, -mask_value for a padded one;
    - for self-attention, the row anchor: ANCHOR_COLUMNS columns, q ``-(q_i . k_i)`` (detached) split
      into a high and a low part in the rows' dtype, k 1 each. It adds the constant ``-logit_ii`` to
      every logit of row i, which softmax ignores (exactly, whatever its rounding: the same value for
      every key), so each real row's self logit is 0 and its largest logit >= 0. NOTE: without it a row
      whose logits are all far below 0 (Flash-IPA's point term at large distances) can underflow exp in
      a kernel's backward: cuDNN's returned NaN for rows whose logits were all <= ~-88. NOTE: one bf16
      column is not enough: it rounds -logit_ii to 8 significant bits, so a self logit of 25,000 (the
      point term of far-apart frames) would be anchored to within +-50 of 0, not to 0; the high + low
      split leaves |logit_ii| * 2^-16 (tests/test_attention.py).
    Padded query rows are zeroed (see the module docstring). Returns contiguous q, k [B, L, H, W_qk] and
    v [B, L, H, W_v]; the caller cuts the output to D_v.
    """
    dtype, device = q_cols[0].dtype, q_cols[0].device
    b, l, h = q_cols[0].shape[:3]
    dim_qk, dim_v = sum(t.shape[-1] for t in q_cols), sum(t.shape[-1] for t in v_cols)
    self_attention = k_cols[0].shape[1] == l and [t.shape[-1] for t in q_cols] == [t.shape[-1] for t in k_cols]
    extra = 1 + ANCHOR_COLUMNS if self_attention else 1  # the mask column (+ the row anchor)
    pad_qk, pad_v = padded_dims(name, dim_qk + extra, dim_v, device)
    zeros = pad_qk - dim_qk - extra
    if key_padding_mask is None:
        mask_col = torch.zeros(b, l, 1, 1, dtype=dtype, device=device)
    else:
        mask_col = ((~key_padding_mask.bool()).to(dtype) * -mask_value(dtype))[:, :, None, None]  # [B, L, 1, 1]
    q_tail = [_constant_row(1, 1, dtype, device).expand(b, l, h, 1)]  # the mask column's 1
    k_tail = [mask_col.expand(b, l, h, 1)]
    if self_attention:
        with torch.no_grad():
            logit_ii = sum((qb.float() * kb.float()).sum(-1) for qb, kb in zip(q_cols, k_cols))  # [B, L, H]
            high = (-logit_ii).to(dtype)  # [B, L, H]
            low = (-logit_ii - high.float()).to(dtype)  # what rounding to dtype left out
        q_tail.append(torch.stack([high, low], dim=-1))  # [B, L, H, ANCHOR_COLUMNS]
        k_tail.append(_constant_row(ANCHOR_COLUMNS, ANCHOR_COLUMNS, dtype, device).expand(b, l, h, -1))
    if zeros:
        q_tail.append(_constant_row(zeros, 0, dtype, device).expand(b, l, h, -1))
        k_tail.append(_constant_row(zeros, 0, dtype, device).expand(b, l, h, -1))
    q = torch.cat([*q_cols, *q_tail], dim=-1)
    if key_padding_mask is not None and l == key_padding_mask.shape[1]:
        # NOTE: padded query rows are zeroed (logit 0 to every key), see the module docstring
        q = q * key_padding_mask.to(dtype)[:, :, None, None]
    k = torch.cat([*k_cols, *k_tail], dim=-1)
    if pad_v > dim_v:
        v_cols = [*v_cols, _constant_row(pad_v - dim_v, 0, dtype, v_cols[0].device).expand(b, l, h, -1)]
    v = torch.cat(v_cols, dim=-1)
    return q, k, v


def packed_attention(q_cols: list[torch.Tensor], k_cols: list[torch.Tensor], v_cols: list[torch.Tensor],
                     key_padding_mask: torch.Tensor | None, *, backend: BackendChoice | str) -> torch.Tensor:
    """``softmax(q.k) v`` over rows given as column blocks (see :func:`pack_rows`), softmax scale 1.

    The entry point for callers that build widened rows (Flash-IPA): the mask fold and the kernel's
    padding cost no extra copies. Every backend, ``math`` included, runs on the same packed rows.
    Returns [B, L, H, D_v] in the blocks' dtype. NOTE: padded QUERY rows hold finite values of no
    meaning (the mean of v over the real keys); the caller masks its output.
    """
    name = backend.name if isinstance(backend, BackendChoice) else str(backend)
    if name not in BACKEND_ORDER:
        raise ValueError(f"unknown attention backend {name!r}; one of {BACKEND_ORDER}")
    dim_v = sum(t.shape[-1] for t in v_cols)
    q, k, v = pack_rows(q_cols, k_cols, v_cols, key_padding_mask, name)
    if name == "math":
        return math_attention(q, k, v, None, scale=1.0)
    return _run_fused(name, q, k, v)[..., :dim_v]


def _run_fused(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One fused kernel on [B, L, H, D] inputs, softmax scale 1 (q is pre-scaled), no mask."""
    if name in FA_MODULES:
        out = flash_attn_module(FA_MODULES[name][0]).flash_attn_func(q, k, v, softmax_scale=1.0)
        return out[0] if isinstance(out, tuple) else out  # FA4 and some FA3 builds also return the LSE
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"sdpa_cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
              "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    with sdpa_kernel([kernel]):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             scale=1.0)  # [B, H, L, D_v]
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
              *, backend: BackendChoice | str | None = None, scale: float | None = None,
              use_flash_attn3: bool = True) -> torch.Tensor:
    """Softmax attention ``softmax(scale * q.k) v`` with key padding, on the chosen backend.

    Args:
        q, k: [B, L, H, D_qk]; v: [B, L, H, D_v] (self-attention lengths).
        key_padding_mask: [B, L] 1 / True for real residues, or None.
        backend: a BackendChoice, a name of BACKEND_ORDER, or None to resolve it now
            (``resolve_backend``, with ``use_flash_attn3``).
        scale: softmax scale (default 1 / sqrt(D_qk)).
    Returns:
        [B, L, H, D_v] in q's dtype (fp32 from math); zero on padded query rows.
    """
    dim_qk, dim_v = q.shape[-1], v.shape[-1]
    scale = dim_qk ** -0.5 if scale is None else scale
    if backend is None:
        backend = resolve_backend((dim_qk, dim_v), q.device, q.dtype, use_flash_attn3=use_flash_attn3)
    name = backend.name if isinstance(backend, BackendChoice) else str(backend)
    if name not in BACKEND_ORDER:
        raise ValueError(f"unknown attention backend {name!r}; one of {BACKEND_ORDER}")
    if name == "math":
        return math_attention(q, k, v, key_padding_mask, scale=scale)
    out = packed_attention([q * scale], [k], [v], key_padding_mask, backend=name)  # [B, L, H, D_v]
    if key_padding_mask is not None and q.shape[1] == k.shape[1]:
        out = out * key_padding_mask.to(out.dtype)[:, :, None, None]
    return out
