"""Attention backends: which kernel runs softmax attention here, chosen once per shape and dtype.

Backends, in order of preference on CUDA (``BACKEND_ORDER``):

- ``fa3``: FlashAttention 3 (``flash_attn_interface``), when ``use_flash_attn3`` is True, it is
  installed and the GPU is Hopper (sm 9.x); fp16 / bf16, head width <= 256.
- ``fa2``: FlashAttention 2 (``flash_attn``), when installed (sm >= 8.0); fp16 / bf16, width <= 256.
  NOTE: FA4 installs as ``flash_attn/cute/`` without ``flash_attn/__init__.py``, so ``import flash_attn``
  then succeeds as an empty namespace package: a backend counts as installed only when its module
  has ``flash_attn_func``.
- ``sdpa_cudnn``: PyTorch ``scaled_dot_product_attention`` pinned to cuDNN, when its own support check
  (``torch.backends.cuda.can_use_cudnn_attention``) accepts the head widths and dtype.
- ``fa4``: FlashAttention 4 (PyPI ``flash-attn-4``: ``flash_attn.cute``, CuTe-DSL kernels compiled at
  first use); after cuDNN, which measured as fast or faster at the shipped widths (so FA4 runs where
  cuDNN rejects the widths, or when ``MHCFLASH_ATTENTION_BACKEND`` forces it). Usable when ``use_flash_attn3`` is True (the config's ``useFlashAttn3``), it is installed and
  the GPU is Hopper (sm 9.x: q / k and v widths each <= 256, unequal allowed) or Blackwell (sm 10.x /
  11.x: each <= 128); fp16 / bf16, widths multiples of 8. ``useFlashAttn3`` reads "use the
  FlashAttention generation built for this GPU": FA4 or FA3, whichever is installed.
- ``sdpa_flash``, ``sdpa_efficient``: PyTorch SDPA pinned to those kernels, by the same support check.
  The memory-efficient kernel takes wide heads and fp32.
- ``math``: ``model.ipa.attention.math_attention``, the reference: explicit fp32 logits and softmax,
  chunked over query rows so its memory is O(chunk * L), never O(L^2) for the whole batch. The CPU
  backend.

Widths: a kernel receives q / k [B, L, H, W_qk] and v [B, L, H, W_v], the caller's D_qk (+ the folded
mask column and the row anchor, see ``model.ipa.attention.pack_rows``) and D_v zero-padded to what it
needs (``padded_dims``: a multiple of 8, equal widths for FA2 / FA3 / SDPA-flash; FA4 and cuDNN take
unequal widths). Running the chosen kernel is ``model.ipa.attention``; this module only discovers and
chooses. Optional accelerators are imported lazily, inside functions.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
from typing import NamedTuple

import torch

__all__ = [
    "BACKEND_ORDER",
    "FA_MODULES",
    "AttentionBackendError",
    "BackendChoice",
    "BackendStatus",
    "available_backends",
    "describe",
    "flash_attn_module",
    "padded_dims",
    "resolve_backend",
]

# Environment variable that forces one backend (auto: the order below); benchmarks compare backends with it.
FORCE_ENV = "MHCFLASH_ATTENTION_BACKEND"
# sdpa_cudnn before fa4: on one H200 (torch 2.11+cu130, flash-attn-4 4.0.0b40) FA4 was no faster at any
# serving shape of the shipped widths (sampling step 1.91 vs 1.92 ms at 1 x 128, 6.87 vs 6.76 ms at
# 64 x 128, 3.37 vs 3.32 ms at 4 x 512) and its sm90 backward rejects v width 104 (shared memory);
# BENCHMARKS.md, "Attention backends".
BACKEND_ORDER = ("fa3", "fa2", "sdpa_cudnn", "fa4", "sdpa_flash", "sdpa_efficient", "math")
FA_MAX_HEAD_DIM = 256  # FlashAttention 2, 3 and 4 on Hopper (forward and backward)
FA4_BLACKWELL_MAX_HEAD_DIM = 128  # FlashAttention 4 on sm 10.x / 11.x (besides a few fixed shapes)
# Import name and the distributions that may carry it, per FlashAttention backend.
FA_MODULES = {"fa4": ("flash_attn.cute", ("flash-attn-4",)),
              "fa3": ("flash_attn_interface", ("flash_attn_3", "flash-attn-3", "flashattn-hopper")),
              "fa2": ("flash_attn", ("flash-attn",))}
HALF_DTYPES = (torch.float16, torch.bfloat16)
CUDNN_WIDTH_MULTIPLE = 16  # cuDNN attention: q / k and v widths each padded to a multiple of this


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


def flash_attn_module(name: str):
    """``flash_attn.cute`` (FA4), ``flash_attn_interface`` (FA3) or ``flash_attn`` (FA2), or None."""
    return _flash_attn_import(name)[0]


@functools.cache
def _flash_attn_version(name: str) -> str | None:
    module = flash_attn_module(name)
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


def padded_dims(name: str, dim_qk: int, dim_v: int, device: torch.device | None = None) -> tuple[int, int]:
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
    dq, dv = padded_dims(name, dim_qk, dim_v, device)
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


def resolve_backend(head_dims: tuple[int, int] = (64, 64), device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, *, use_flash_attn3: bool = True,
                    allow_math_on_gpu: bool = True) -> BackendChoice:
    """Choose the attention kernel for q / k width ``head_dims[0]`` and v width ``head_dims[1]``.

    ``use_flash_attn3`` (the config's ``useFlashAttn3``) allows FA4 and FA3. On the CPU the answer is always ``math``. On
    CUDA: the first usable backend of BACKEND_ORDER that accepts the widths (+3 q / k columns: the
    folded mask and the row anchor) and dtype; ``math`` last (correct, O(chunk * L) memory, slow) unless
    ``allow_math_on_gpu`` is False. Raises AttentionBackendError naming the width, the limit and the
    knobs when nothing accepts.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return BackendChoice("math", None, f"{device.type} device: explicit math attention")
    dim_qk, dim_v = int(head_dims[0]) + 3, int(head_dims[1])  # +3: the key-padding column and the row anchor's 2
    status = available_backends(device)
    rejected = []
    order = BACKEND_ORDER
    forced = os.environ.get(FORCE_ENV, "").strip()
    if forced and forced != "auto":  # an operator's or a benchmark's choice: that backend or an error
        if forced not in BACKEND_ORDER:
            raise AttentionBackendError(f"{FORCE_ENV}={forced!r} is not a backend: use auto or one of "
                                        f"{', '.join(BACKEND_ORDER)}")
        order = (forced,)
    for name in order:
        st = status.get(name)
        if st is None or not st.usable:
            if st is not None and name != "math":
                rejected.append(f"{name}: {'not usable here' if st.found else 'not installed'}")
            continue
        if name in ("fa4", "fa3") and not use_flash_attn3:
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
    if order != BACKEND_ORDER:
        raise AttentionBackendError(f"{FORCE_ENV}={order[0]} cannot run head widths q/k {dim_qk}, v {dim_v} "
                                    f"({dtype}) on {device}: {'; '.join(rejected) or 'not accepted'}. Unset it "
                                    "(auto) or name another backend.")
    raise AttentionBackendError(
        f"No attention backend accepts head widths q/k {dim_qk}, v {dim_v} ({dtype}) on {device}: "
        + "; ".join(rejected)
        + f". FlashAttention 2/3 cap the head width at {FA_MAX_HEAD_DIM}. Flash-IPA's widths grow with "
        "zFactorRank (v: + rank * pair-value channels, q/k: + rank), ipaHiddenDimension, ipaNumQkPoints "
        "(q/k: 3 or 9 per point) and ipaNumVPoints (v: 3 per point) and pairFeatureDimension (v: rank * "
        "pairFeatureDimension/4): lower those, or install / enable a backend that takes wide heads "
        "(PyTorch SDPA memory-efficient, or fp32 math).")


def describe(choice: BackendChoice) -> str:
    """One line for logs / the self-check: ``sdpa_efficient (FlashAttention -): reason``."""
    return f"{choice.name} (FlashAttention {choice.flash_attn_version or '-'}): {choice.reason}"
