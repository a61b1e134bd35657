"""Attention backends: choose once, run, report. The one place that calls a fused attention kernel.

Backends, in order of preference on CUDA:

- ``fa4``: FlashAttention 4 (PyPI ``flash-attn-4``: ``flash_attn.cute``, CuTe-DSL kernels compiled at
  first use), when ``config.useFlashAttn3`` is True, it is installed and the GPU is Hopper (sm 9.x:
  q / k and v widths each <= 256, unequal allowed) or Blackwell (sm 10.x / 11.x: each <= 128);
  fp16 / bf16, widths multiples of 8. ``useFlashAttn3`` reads "use the FlashAttention generation
  built for this GPU": FA4 where it is installed, else FA3.
- ``fa3``: FlashAttention 3 (``flash_attn_interface``), when ``config.useFlashAttn3`` is True, it is
  installed and the GPU is Hopper (sm 9.x); fp16 / bf16, head width <= 256.
- ``fa2``: FlashAttention 2 (``flash_attn``), when installed (sm >= 8.0); fp16 / bf16, width <= 256.
  NOTE: FA4 installs as ``flash_attn/cute/`` without ``flash_attn/__init__.py``, so ``import flash_attn``
  then succeeds as an empty namespace package: a backend counts as installed only when its module
  has ``flash_attn_func``.
- ``sdpa_cudnn``, ``sdpa_flash``, ``sdpa_efficient``: PyTorch ``scaled_dot_product_attention`` pinned
  to one kernel; the first whose own support check (``torch.backends.cuda.can_use_*``) accepts the
  head widths and dtype. The memory-efficient kernel takes wide heads and fp32.
- ``math``: :func:`math_attention`, the reference: explicit fp32 logits and softmax, chunked over
  query rows so its memory is O(chunk * L), never O(L^2) for the whole batch. The CPU backend.

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
to what the chosen kernel needs (a multiple of 8, equal widths for FA / SDPA-flash; cuDNN: each a
multiple of 16, unequal where the device's cuDNN takes that) and the output is cut back to D_v.
Optional accelerators are imported lazily, inside functions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "BACKEND_ORDER",
    "AttentionBackendError",
    "BackendChoice",
    "BackendStatus",
    "attention",
    "available_backends",
    "describe",
    "mask_value",
    "math_attention",
    "pack_rows",
    "packed_attention",
    "resolve_backend",
]

BACKEND_ORDER = ("fa4", "fa3", "fa2", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math")
FA_MAX_HEAD_DIM = 256  # FlashAttention 2, 3 and 4 on Hopper (forward and backward)
FA4_BLACKWELL_MAX_HEAD_DIM = 128  # FlashAttention 4 on sm 10.x / 11.x (besides a few fixed shapes)
# Import name and the distributions that may carry it, per FlashAttention backend.
FA_MODULES = {"fa4": ("flash_attn.cute", ("flash-attn-4",)),
              "fa3": ("flash_attn_interface", ("flash_attn_3", "flash-attn-3", "flashattn-hopper")),
              "fa2": ("flash_attn", ("flash-attn",))}
HALF_DTYPES = (torch.float16, torch.bfloat16)
CUDNN_WIDTH_MULTIPLE = 16  # cuDNN attention: q / k and v widths each padded to a multiple of this
# Elements of one fp32 logit block in math_attention (B * H * chunk * L_k): 64 Mi = 256 MiB.
MATH_BLOCK_ELEMENTS = 1 << 26


class AttentionBackendError(RuntimeError):
    """No attention backend accepts the requested head widths / dtype. The message names the knobs."""


class BackendChoice(NamedTuple):
    """Which kernel runs: ``name`` in BACKEND_ORDER, the FlashAttention version (or None), and why."""

    name: str
    flash_attn_version: str | None
    reason: str


class BackendStatus(NamedTuple):
    """Self-check row: the package / kernel is ``found``; it is ``usable`` on this device; details."""

    found: bool
    usable: bool
    detail: str


def mask_value(dtype: torch.dtype) -> float:
    """The large finite negative added to padded keys' logits (fits the dtype; never -inf)."""
    return 3.0e4 if dtype == torch.float16 else 1.0e6


# ------------------------------------------------------------------------------------- discovery
@functools.cache
def _flash_attn_import(name: str) -> tuple[object | None, str]:
    """(module, "") for an installed FlashAttention module that has ``flash_attn_func``, else (None, why)."""
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken build (undefined symbol, no cutlass)
        return None, f"{type(exc).__name__}: {exc}"
    if not callable(getattr(module, "flash_attn_func", None)):  # e.g. FA4's bare flash_attn namespace
        return None, f"{name} has no flash_attn_func"
    return module, ""


def _flash_attn_module(name: str):
    """``flash_attn.cute`` (FA4), ``flash_attn_interface`` (FA3) or ``flash_attn`` (FA2), or None."""
    return _flash_attn_import(name)[0]


@functools.cache
def _flash_attn_version(name: str) -> str | None:
    module = _flash_attn_module(name)
    if module is None:
        return None
    key = next(k for k, (mod, _) in FA_MODULES.items() if mod == name)
    version = None
    for dist in FA_MODULES[key][1]:  # the distribution first: FA4's own __version__ reads "0.0.0"
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    version = version or getattr(module, "__version__", None) or key[-1]
    return str(version)


def _capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def available_backends(device: torch.device | str | None = None) -> dict[str, BackendStatus]:
    """Every backend of BACKEND_ORDER: found (installed / compiled in) and usable on ``device``.

    ``device`` defaults to the current CUDA device when there is one, else the CPU. This is what the
    self-check prints; :func:`resolve_backend` chooses among the usable ones.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    cap = _capability(device)
    gpu = f"sm {cap[0]}.{cap[1]}" if cap else "no CUDA device"
    out: dict[str, BackendStatus] = {}
    install = {"fa4": "pip install flash-attn-4 (Hopper / Blackwell)",
               "fa3": "FA3 is built from the hopper/ folder of the flash-attention repository",
               "fa2": "pip install flash-attn --no-build-isolation"}
    archs = {"fa4": lambda c: c[0] in (9, 10, 11), "fa3": lambda c: c[0] == 9, "fa2": lambda c: c >= (8, 0)}
    for key, (module, _) in FA_MODULES.items():
        found, why = _flash_attn_import(module)
        usable = found is not None and cap is not None and archs[key](cap)
        detail = (f"{module} {_flash_attn_version(module)}, {gpu}" if found is not None
                  else f"{module} not installed ({install[key]}; import: {why})")
        out[key] = BackendStatus(found is not None, usable, detail)
    flags = {"sdpa_cudnn": "cudnn_sdp_enabled", "sdpa_flash": "flash_sdp_enabled",
             "sdpa_efficient": "mem_efficient_sdp_enabled"}
    for key, flag in flags.items():
        found = torch.backends.cuda.is_built() and getattr(torch.backends.cuda, flag, lambda: False)()
        usable = found and cap is not None and (key == "sdpa_efficient" or cap >= (8, 0))
        out[key] = BackendStatus(found, usable, f"torch {torch.__version__}, {gpu}")
    out["math"] = BackendStatus(True, True, "explicit fp32 softmax, chunked over queries")
    return out


@functools.lru_cache(maxsize=256)
def _sdpa_accepts(name: str, dim_qk: int, dim_v: int, dtype: torch.dtype, device_index: int) -> bool:
    """PyTorch's own support check for one SDPA kernel at these padded widths (tiny probe tensors)."""
    fn = {"sdpa_cudnn": "can_use_cudnn_attention", "sdpa_flash": "can_use_flash_attention",
          "sdpa_efficient": "can_use_efficient_attention"}[name]
    check = getattr(torch.backends.cuda, fn, None)
    if check is None:
        return False
    device = torch.device("cuda", device_index)
    q = torch.zeros(1, 2, 16, dim_qk, dtype=dtype, device=device, requires_grad=True)
    k = torch.zeros(1, 2, 16, dim_qk, dtype=dtype, device=device, requires_grad=True)
    v = torch.zeros(1, 2, 16, dim_v, dtype=dtype, device=device, requires_grad=True)
    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False, False)
    except TypeError:  # older signature without enable_gqa
        params = torch.backends.cuda.SDPAParams(q, k, v, None, 0.0, False)
    try:
        return bool(check(params, False))
    except Exception:  # noqa: BLE001 - a probe failure means "not supported"
        return False


def _cudnn_takes_unequal_widths(device: torch.device | None) -> bool:
    """Whether this device's cuDNN attention accepts q / k narrower than v (PyTorch's own check; torch
    2.11 with cuDNN 9 does). Without a CUDA device (CPU tests of the packing) the answer is True."""
    if device is None or device.type != "cuda":
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sdpa_accepts("sdpa_cudnn", 64, 112, torch.bfloat16, index)


def _padded_dims(name: str, dim_qk: int, dim_v: int, device: torch.device | None = None) -> tuple[int, int]:
    """Widths the kernel ``name`` receives for a (mask-folded) q / k of ``dim_qk`` and a v of ``dim_v``.

    NOTE (cuDNN): q / k and v are padded separately, each to a multiple of ``CUDNN_WIDTH_MULTIPLE``,
    where the device's cuDNN takes unequal widths (else both to the wider, as FA / SDPA-flash need).
    Flash-IPA's shipped rows (q / k 58 + the mask column, v 104): 64 / 112 instead of 104 / 104 ran the
    forward 10-16 % and forward + backward 9-12 % faster on the H100 (L = 4096, B = 32 and 8;
    ``benchmarks/attention_widths.py``, BENCHMARKS.md); 64 / 104 was 2-3 % slower forward + backward.
    """
    if name == "math":
        return dim_qk, dim_v
    up = lambda d, multiple=8: -(-d // multiple) * multiple
    if name == "sdpa_efficient":
        return up(dim_qk), up(dim_v)
    if name == "fa4":  # unequal widths, each a multiple of 8 (16-byte rows in bf16 / fp16)
        return up(dim_qk), up(dim_v)
    if name == "sdpa_cudnn" and _cudnn_takes_unequal_widths(device):
        return up(dim_qk, CUDNN_WIDTH_MULTIPLE), up(dim_v, CUDNN_WIDTH_MULTIPLE)
    width = up(max(dim_qk, dim_v))
    return width, width


def _kernel_accepts(name: str, dim_qk: int, dim_v: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    dq, dv = _padded_dims(name, dim_qk, dim_v, device)
    if name in FA_MODULES:
        if dtype not in HALF_DTYPES:
            return False, f"{name} needs fp16/bf16, got {dtype}"
        cap = _capability(device)
        limit = FA4_BLACKWELL_MAX_HEAD_DIM if name == "fa4" and cap is not None and cap[0] >= 10 else FA_MAX_HEAD_DIM
        if max(dq, dv) > limit:
            return False, f"{name} head width {max(dq, dv)} > {limit}"
        return True, ""
    if name == "math":
        return True, ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    ok = _sdpa_accepts(name, dq, dv, dtype, index)
    return ok, "" if ok else f"{name} rejects head widths ({dq}, {dv}) in {dtype}"


def resolve_backend(config=None, head_dims: tuple[int, int] = (64, 64), device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, *, allow_math_on_gpu: bool = True) -> BackendChoice:
    """Choose the attention kernel for q / k width ``head_dims[0]`` and v width ``head_dims[1]``.

    ``config.useFlashAttn3`` (default True) allows FA3. On the CPU the answer is always ``math``. On
    CUDA: the first usable backend of BACKEND_ORDER that accepts the widths (+2 q / k columns: the
    folded mask and the row anchor) and dtype; ``math`` last (correct, O(chunk * L) memory, slow) unless
    ``allow_math_on_gpu`` is False. Raises AttentionBackendError naming the width, the limit and the
    knobs when nothing accepts.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return BackendChoice("math", None, f"{device.type} device: explicit math attention")
    use_fa3 = True if config is None else bool(config.useFlashAttn3)
    dim_qk, dim_v = int(head_dims[0]) + 2, int(head_dims[1])  # +2: the key-padding column and the row anchor
    status = available_backends(device)
    rejected = []
    for name in BACKEND_ORDER:
        st = status.get(name)
        if st is None or not st.usable:
            if st is not None and name != "math":
                rejected.append(f"{name}: {'not usable here' if st.found else 'not installed'}")
            continue
        if name in ("fa4", "fa3") and not use_fa3:
            rejected.append(f"{name}: useFlashAttn3 is False")
            continue
        if name == "math" and not allow_math_on_gpu:
            continue
        ok, why = _kernel_accepts(name, dim_qk, dim_v, dtype, device)
        if not ok:
            rejected.append(why)
            continue
        version = _flash_attn_version(FA_MODULES[name][0]) if name in FA_MODULES else None
        reason = f"{name} accepts head widths q/k {dim_qk}, v {dim_v} in {dtype}"
        if rejected:
            reason += " (skipped: " + "; ".join(rejected) + ")"
        return BackendChoice(name, version, reason)
    raise AttentionBackendError(
        f"No attention backend accepts head widths q/k {dim_qk}, v {dim_v} ({dtype}) on {device}: "
        + "; ".join(rejected)
        + f". FlashAttention 2/3 cap the head width at {FA_MAX_HEAD_DIM}. Flash-IPA's widths grow with "
        "zFactorRank (v: + rank * pair-value channels, q/k: + rank), ipaHiddenDimension, ipaNumQkPoints "
        "(q/k: 3 or 9 per point) and ipaNumVPoints (v: 3 per point) and pairFeatureDimension (v: rank * "
        "pairFeatureDimension/4): lower those, or install / enable a backend that takes wide heads "
        "(PyTorch SDPA memory-efficient, or fp32 math).")


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
    - for self-attention, the row anchor: q ``-(q_i . k_i)`` (detached), k 1. It adds the constant
      ``-logit_ii`` to every logit of row i, which softmax ignores (exactly, whatever its rounding: the
      same value for every key), so each real row's self logit is 0 and its largest logit >= 0. NOTE:
      without it a row whose logits are all far below 0 (Flash-IPA's point term at large distances) can
      underflow exp in a kernel's backward: cuDNN's returned NaN for rows whose logits were all <= ~-88.
    Padded query rows are zeroed (see the module docstring). Returns contiguous q, k [B, L, H, W_qk] and
    v [B, L, H, W_v]; the caller cuts the output to D_v.
    """
    dtype, device = q_cols[0].dtype, q_cols[0].device
    b, l, h = q_cols[0].shape[:3]
    dim_qk, dim_v = sum(t.shape[-1] for t in q_cols), sum(t.shape[-1] for t in v_cols)
    self_attention = k_cols[0].shape[1] == l and [t.shape[-1] for t in q_cols] == [t.shape[-1] for t in k_cols]
    extra = 2 if self_attention else 1  # the mask column (+ the row anchor)
    pad_qk, pad_v = _padded_dims(name, dim_qk + extra, dim_v, device)
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
        q_tail.append((-logit_ii).to(dtype)[..., None])  # [B, L, H, 1]
        k_tail.append(_constant_row(1, 1, dtype, device).expand(b, l, h, 1))
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
        out = _flash_attn_module(FA_MODULES[name][0]).flash_attn_func(q, k, v, softmax_scale=1.0)
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
              config=None) -> torch.Tensor:
    """Softmax attention ``softmax(scale * q.k) v`` with key padding, on the chosen backend.

    Args:
        q, k: [B, L, H, D_qk]; v: [B, L, H, D_v] (self-attention lengths).
        key_padding_mask: [B, L] 1 / True for real residues, or None.
        backend: a BackendChoice, a name of BACKEND_ORDER, or None to resolve now from ``config``.
        scale: softmax scale (default 1 / sqrt(D_qk)).
    Returns:
        [B, L, H, D_v] in q's dtype (fp32 from math); zero on padded query rows.
    """
    dim_qk, dim_v = q.shape[-1], v.shape[-1]
    scale = dim_qk ** -0.5 if scale is None else scale
    if backend is None:
        backend = resolve_backend(config, (dim_qk, dim_v), q.device, q.dtype)
    name = backend.name if isinstance(backend, BackendChoice) else str(backend)
    if name not in BACKEND_ORDER:
        raise ValueError(f"unknown attention backend {name!r}; one of {BACKEND_ORDER}")
    if name == "math":
        return math_attention(q, k, v, key_padding_mask, scale=scale)
    out = packed_attention([q * scale], [k], [v], key_padding_mask, backend=name)  # [B, L, H, D_v]
    if key_padding_mask is not None and q.shape[1] == k.shape[1]:
        out = out * key_padding_mask.to(out.dtype)[:, :, None, None]
    return out


def describe(choice: BackendChoice) -> str:
    """One line for logs / the self-check: ``sdpa_efficient (FlashAttention -): reason``."""
    return f"{choice.name} (FlashAttention {choice.flash_attn_version or '-'}): {choice.reason}"

