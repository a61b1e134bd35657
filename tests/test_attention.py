"""Attention (model/ipa/attention.py) and its backends (model/ipa/backends.py): math reference, mask folding,
backend choice and errors."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import model.ipa.attention as att
import model.ipa.backends as bk

ATOL_FP32 = 1e-5
ATOL_HALF = 2e-2  # bf16 kernels vs fp32 math on O(1) inputs


def naive(q, k, v, mask, scale):
    """Unchunked textbook attention with a -1e9 key bias (fp64)."""
    logits = torch.einsum("bihd,bjhd->bhij", q.double(), k.double()) * scale
    logits = logits.masked_fill(~mask.bool()[:, None, None, :], -1e9)
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(logits, -1), v.double())
    return (out * mask[:, :, None, None]).float()


def make(batch=3, length=21, heads=2, dqk=13, dv=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, length, heads, dqk, generator=g) for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=g)
    mask = torch.ones(batch, length)
    mask[1, 15:] = 0
    mask[batch - 1, :] = 0  # a fully padded sample: must stay finite (no -inf -> NaN)
    return q, k, v, mask


def test_math_matches_naive_and_is_chunked(monkeypatch):
    q, k, v, mask = make()
    ref = naive(q, k, v, mask, 0.3)
    out = att.math_attention(q, k, v, mask, scale=0.3)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=ATOL_FP32, rtol=0)
    assert bool((out[1, 15:] == 0).all()) and bool((out[2] == 0).all())
    monkeypatch.setattr(att, "MATH_BLOCK_ELEMENTS", 2 * 21 * 5)  # 5 query rows per block
    torch.testing.assert_close(att.math_attention(q, k, v, mask, scale=0.3), ref, atol=ATOL_FP32, rtol=0)


@pytest.mark.parametrize("name", ["math", "sdpa_cudnn", "sdpa_efficient"])
def test_packed_rows_fold_the_mask_and_pad_to_the_kernel_width(name):
    """pack_rows: column blocks + folded mask column + zero padding; softmax(q~.k~) v~ equals the
    masked softmax(scale q.k) v for real query rows, at each kernel's padded widths."""
    q, k, v, mask = make(seed=1)  # mask has real zeros (a padded tail and an empty chain)
    dq, dv = q.shape[-1], v.shape[-1]
    qs, ks, vs = att.pack_rows([q[..., :5] * 0.25, q[..., 5:] * 0.25], [k[..., :5], k[..., 5:]],
                               [v[..., :3], v[..., 3:]], mask, name)
    assert (qs.shape[-1], vs.shape[-1]) == bk.padded_dims(name, dq + 1 + att.ANCHOR_COLUMNS, dv)
    assert qs.is_contiguous() and ks.is_contiguous() and vs.is_contiguous()
    real = mask.bool()
    assert bool((qs[..., dq][real] == 1).all()) and bool((qs[..., dq + 3:] == 0).all())
    anchor = -(q * 0.25 * k).sum(-1)  # [B, L, H]: the row anchor, -logit_ii (high + low part)
    torch.testing.assert_close(qs[..., dq + 1:dq + 3].sum(-1)[real], anchor[real], atol=ATOL_FP32, rtol=0)
    assert bool((ks[..., dq + 1:dq + 3] == 1).all()) and bool((ks[..., dq + 3:] == 0).all())
    self_logit = (qs * ks).sum(-1)  # [B, L, H]: 0 on every real row
    assert float(self_logit[real].abs().max()) < 1e-5
    assert bool((qs[~real] == 0).all())  # padded query rows are zeroed
    assert bool((ks[..., dq][mask.bool()] == 0).all()) and bool((ks[..., dq][~mask.bool()] < -1e5).all())
    out = att.math_attention(qs, ks, vs, None, scale=1.0)[..., :dv] * mask[:, :, None, None]
    torch.testing.assert_close(out, naive(q, k, v, mask, 0.25), atol=ATOL_FP32, rtol=0)
    packed = att.packed_attention([q * 0.25], [k], [v], mask, backend="math") * mask[:, :, None, None]
    torch.testing.assert_close(packed, out, atol=ATOL_FP32, rtol=0)


def test_row_anchor_is_exact_for_huge_bf16_self_logits():
    """bf16 rows whose self logit is ~30,000 (Flash-IPA's point term between far-apart frames, after long
    training): the anchored self logit, as a kernel computes it (bf16 inputs, float32 accumulation), is
    within 1 of 0 on every real row. A single bf16 anchor column rounds -logit_ii to 8 significant bits
    and leaves errors of tens, enough to put a whole row's logits below exp's underflow in a kernel's
    backward (cuDNN: NaN)."""
    g = torch.Generator().manual_seed(11)
    b, l, h, d = 2, 64, 4, 16
    q = (torch.randn(b, l, h, d, generator=g) * 45).bfloat16()
    k = (q.float() + torch.randn(b, l, h, d, generator=g)).bfloat16()  # q_i . k_i ~ 30,000
    mask = torch.ones(b, l)
    mask[1, 50:] = 0
    qs, ks, _ = att.pack_rows([q], [k], [k], mask, "math")
    real = mask.bool()
    logit_ii = (q.float() * k.float()).sum(-1)  # [B, L, H]
    assert float(logit_ii[real].abs().min()) > 5e3 and float(logit_ii[real].abs().max()) > 3e4
    self_logit = (qs.float() * ks.float()).sum(-1)  # [B, L, H]
    assert float(self_logit[real].abs().max()) < 1.0
    one_column = (q.float() * k.float()).sum(-1) + (-logit_ii).bfloat16().float()  # the single-column anchor
    assert float(one_column[real].abs().max()) > 10.0


def test_cpu_resolves_to_math_and_attention_runs():
    choice = bk.resolve_backend((300, 700), "cpu", torch.float32)
    assert choice.name == "math" and choice.flash_attn_version is None
    q, k, v, mask = make(dqk=300, dv=70)  # wide heads are fine for math
    out = att.attention(q, k, v, mask, backend=choice, scale=0.1)
    torch.testing.assert_close(out, naive(q, k, v, mask, 0.1), atol=ATOL_FP32, rtol=0)
    status = bk.available_backends("cpu")
    assert set(status) == set(bk.BACKEND_ORDER) and status["math"].usable


def _only(monkeypatch, *names):
    """Pretend only the named backends exist (the availability function, not the kernels)."""
    def fake(device=None):
        return {n: bk.BackendStatus(True, n in names, "simulated") for n in bk.BACKEND_ORDER}
    monkeypatch.setattr(bk, "available_backends", fake)
    monkeypatch.setattr(bk, "_flash_attn_version", lambda name: "2.7.4" if name == "flash_attn" else "3.0.0")


FAKE_FA4 = '''
import torch
__version__ = "0.0.0"  # what FA4's own __init__ reports when its distribution name is not found
calls = []

def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    calls.append((tuple(q.shape), tuple(v.shape), softmax_scale))
    logits = torch.einsum("bihd,bjhd->bhij", q.float(), k.float()) * softmax_scale
    out = torch.einsum("bhij,bjhd->bihd", torch.softmax(logits, -1), v.float())
    return out.to(q.dtype), torch.logsumexp(logits, -1)
'''


@pytest.fixture
def fake_fa4(tmp_path, monkeypatch):
    """A FlashAttention-4-shaped install on sys.path: ``flash_attn/cute/__init__.py`` with
    ``flash_attn_func`` returning (out, lse), and NO ``flash_attn/__init__.py`` (a namespace package)."""
    (tmp_path / "flash_attn" / "cute").mkdir(parents=True)
    (tmp_path / "flash_attn" / "cute" / "__init__.py").write_text(FAKE_FA4)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m == "flash_attn" or m.startswith("flash_attn.")]:
        monkeypatch.delitem(sys.modules, name)
    bk._flash_attn_import.cache_clear()
    bk._flash_attn_version.cache_clear()
    yield importlib.import_module("flash_attn.cute")
    bk._flash_attn_import.cache_clear()
    bk._flash_attn_version.cache_clear()


def test_fa4_is_found_by_its_function_and_its_namespace_is_not_fa2(fake_fa4):
    import flash_attn

    assert not hasattr(flash_attn, "flash_attn_func")  # `import flash_attn` succeeds: a namespace package
    status = bk.available_backends("cpu")
    assert status["fa4"].found and not status["fa4"].usable  # installed, but no GPU here
    assert not status["fa2"].found and "no flash_attn_func" in status["fa2"].detail
    assert bk._flash_attn_version("flash_attn.cute") == "0.0.0"  # no distribution: the module's own


def test_fa4_runs_packed_rows_at_unequal_widths_and_matches_math(fake_fa4):
    """fa4 gets q / k and v padded separately to multiples of 8, softmax scale 1, (out, lse) unwrapped."""
    assert bk.padded_dims("fa4", 59, 104) == (64, 104)
    q, k, v, mask = make(seed=4, dqk=21, dv=10)
    out = att.packed_attention([q * 0.25], [k], [v], mask, backend="fa4") * mask[:, :, None, None]
    ref = att.packed_attention([q * 0.25], [k], [v], mask, backend="math") * mask[:, :, None, None]
    torch.testing.assert_close(out, ref, atol=ATOL_FP32, rtol=0)
    assert fake_fa4.calls[-1] == ((3, 21, 2, 24), (3, 21, 2, 16), 1.0)


def test_fa4_comes_after_cudnn_is_gated_by_use_flash_attn3_and_its_limits_hold(monkeypatch):
    _only(monkeypatch, "fa4", "sdpa_cudnn")
    accepts = bk._kernel_accepts
    monkeypatch.setattr(bk, "_kernel_accepts", lambda name, *a: (True, "") if name == "sdpa_cudnn" else accepts(name, *a))
    assert bk.resolve_backend((60, 104), "cuda", torch.bfloat16).name == "sdpa_cudnn"  # measured no slower
    _only(monkeypatch, "fa4", "math")  # cuDNN, FA2, FA3 absent: FA4 ahead of the reference
    monkeypatch.setattr(bk, "_capability", lambda device: (9, 0))
    assert bk.resolve_backend((60, 104), "cuda", torch.bfloat16, use_flash_attn3=True).name == "fa4"
    off = bk.resolve_backend((60, 104), "cuda", torch.bfloat16, use_flash_attn3=False)
    assert off.name == "math" and "fa4: useFlashAttn3 is False" in off.reason
    assert bk._kernel_accepts("fa4", 64, 256, torch.bfloat16, torch.device("cuda"))[0]
    monkeypatch.setattr(bk, "_capability", lambda device: (10, 0))  # Blackwell: each width <= 128
    ok, why = bk._kernel_accepts("fa4", 64, 136, torch.bfloat16, torch.device("cuda"))
    assert not ok and "136 > 128" in why
    assert not bk._kernel_accepts("fa4", 64, 104, torch.float32, torch.device("cuda"))[0]


def test_forced_backend_is_taken_or_refused_by_name(monkeypatch):
    _only(monkeypatch, "fa4", "fa2", "sdpa_cudnn")
    accepts = bk._kernel_accepts
    monkeypatch.setattr(bk, "_kernel_accepts", lambda name, *a: (True, "") if name == "sdpa_cudnn" else accepts(name, *a))
    monkeypatch.setattr(bk, "_capability", lambda device: (9, 0))
    monkeypatch.setenv(bk.FORCE_ENV, "fa4")
    assert bk.resolve_backend((60, 104), "cuda", torch.bfloat16).name == "fa4"
    monkeypatch.setenv(bk.FORCE_ENV, "auto")
    assert bk.resolve_backend((60, 104), "cuda", torch.bfloat16).name == "fa2"  # the order: fa2 first
    monkeypatch.setenv(bk.FORCE_ENV, "fa5")
    with pytest.raises(bk.AttentionBackendError, match="MHCFLASH_ATTENTION_BACKEND='fa5' is not a backend"):
        bk.resolve_backend((60, 104), "cuda", torch.bfloat16)
    monkeypatch.setenv(bk.FORCE_ENV, "fa4")
    with pytest.raises(bk.AttentionBackendError, match="MHCFLASH_ATTENTION_BACKEND=fa4 cannot run"):
        bk.resolve_backend((60, 300), "cuda", torch.bfloat16)
    assert bk.resolve_backend((60, 104), "cpu").name == "math"  # the CPU is always math


def test_fa_only_wide_head_errors_clearly(monkeypatch):
    _only(monkeypatch, "fa2")
    ok = bk.resolve_backend((60, 104), "cuda", torch.bfloat16)
    assert ok.name == "fa2" and ok.flash_attn_version == "2.7.4"
    with pytest.raises(bk.AttentionBackendError) as err:
        bk.resolve_backend((60, 300), "cuda", torch.bfloat16)
    msg = str(err.value)
    for needle in ("300", "256", "zFactorRank", "ipaHiddenDimension", "ipaNumQkPoints", "ipaNumVPoints"):
        assert needle in msg
    with pytest.raises(bk.AttentionBackendError, match="fp16/bf16"):  # FA has no fp32
        bk.resolve_backend((60, 100), "cuda", torch.float32)


def test_use_flash_attn3_flag_is_respected(monkeypatch):
    _only(monkeypatch, "fa3", "fa2")
    assert bk.resolve_backend((60, 100), "cuda", torch.bfloat16, use_flash_attn3=True).name == "fa3"
    choice = bk.resolve_backend((60, 100), "cuda", torch.bfloat16, use_flash_attn3=False)
    assert choice.name == "fa2" and "useFlashAttn3 is False" in choice.reason


def far_padded_queries(batch=2, length=64, heads=2, dqk=58, dv=104, shift=100.0, device="cpu"):
    """Rows as Flash-IPA packs them, where the padded query rows and ten real ones are 'far' from every
    key: all their logits <= -shift + O(1) (the points of padding residues, at the origin, against keys
    tens of A away). Other real rows have O(1) logits. Padded query rows get zero upstream gradient."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(batch, length, heads, dqk, generator=g) * 0.3 for _ in range(2))
    v = torch.randn(batch, length, heads, dv, generator=g)
    mask = torch.ones(batch, length)
    mask[0, 50:] = 0
    mask[1, 37:] = 0
    q[..., -1], k[..., -1] = 0.0, 0.0
    q[~mask.bool()] = 0.0
    q[..., -1][~mask.bool()] = 1.0  # padded queries: 1 in a column where every key holds -shift
    q[0, :10, :, -1] = 1.0  # and ten real ones: all their logits, the self logit too, <= -shift + O(1)
    k[..., -1] = -shift
    gout = torch.randn(batch, length, heads, dv, generator=g) * mask[:, :, None, None]
    return [t.to(device) for t in (q, k, v, mask, gout)]


def _packed_grads(q, k, v, mask, gout, backend, dtype):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = att.packed_attention([leaves[0]], [leaves[1]], [leaves[2]], mask, backend=backend)
    return out, torch.autograd.grad(out.float(), leaves, gout.float())


def test_far_rows_stay_exact_and_padded_query_rows_get_exactly_zero_gradient():
    """Padded query rows are zeroed before the kernel: whatever they held, their gradient is exactly 0.
    Real rows whose every logit is far below 0 are anchored (self logit 0): outputs and gradients of all
    real rows are those of the textbook masked softmax in float64."""
    q, k, v, mask, gout = far_padded_queries(shift=300.0)
    tol = 1e-4  # fp32 dot products with a term of size `shift` are exact to ~shift * 2**-23 (the fp64 reference: exact)
    out, (dq, dk, dv) = _packed_grads(q, k, v, mask, gout, "math", torch.float32)
    assert all(bool(torch.isfinite(t).all()) for t in (out, dq, dk, dv))
    assert bool((dq[~mask.bool()] == 0).all())
    leaves = [t.double().requires_grad_() for t in (q, k, v)]  # the textbook reference, fp64, no packing
    ref = naive(*leaves, mask, 1.0)
    torch.testing.assert_close(out * mask[:, :, None, None], ref.float(), atol=tol, rtol=0)
    ref_dq, ref_dk, ref_dv = torch.autograd.grad(ref, leaves, gout.double())
    # dq's far column is shift * sum_j dS_ij: 0 up to rounding times shift (a constant 1 in Flash-IPA)
    for a, b in ((dq[..., :-1], ref_dq[..., :-1]), (dk, ref_dk), (dv, ref_dv)):
        torch.testing.assert_close(a, b.float(), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------- GPU


def fa4_backward_refused(name: str, err: ValueError) -> bool:
    """FlashAttention 4's sm90 backward refuses some width pairs for lack of shared memory (measured on an
    H200, flash-attn-4 4.0.0b40: q / k 64 with v 104, "SM90 backward tiles ... need 236544 bytes"). The
    service samples with it (forward only); training uses cuDNN, which the backend order puts first."""
    return name == "fa4" and "backward" in str(err).lower()


@pytest.mark.gpu
@pytest.mark.parametrize("shift", [100.0, 1000.0])
def test_far_padded_queries_give_finite_gradients_on_every_gpu_backend(shift):
    """The non-finite training steps: cuDNN attention's backward returned NaN in dq for query rows whose
    logits were all <= ~-88 (padded rows of Flash-IPA), with finite inputs and a zero upstream gradient
    there. Through packed_attention every backend must give finite gradients equal to the reference's,
    for far padded rows and far real rows alike."""
    q, k, v, mask, gout = far_padded_queries(shift=shift, device="cuda")
    _, ref = _packed_grads(q, k, v, mask, gout, "math", torch.float32)
    ran = []
    for name, st in bk.available_backends("cuda").items():
        if name == "math" or not st.usable or not bk._kernel_accepts(name, 61, 104, torch.bfloat16,
                                                                     torch.device("cuda"))[0]:
            continue
        try:
            _, grads = _packed_grads(q, k, v, mask, gout, name, torch.bfloat16)
        except ValueError as err:
            if fa4_backward_refused(name, err):
                continue
            raise
        for label, a, b in zip(("dq", "dk", "dv"), grads, ref):
            bad = int((~torch.isfinite(a)).sum())
            assert bad == 0, f"{name}: {bad} non-finite entries in {label}"
            if label == "dq":  # NOTE: the far column's dq is shift * sum_j dS_ij (0 up to rounding) for a real
                a, b = a[..., :-1], b[..., :-1]  # row; in Flash-IPA that column is a constant 1 (no gradient)
            torch.testing.assert_close(a.float(), b, atol=ATOL_HALF * 5, rtol=0, msg=lambda m, w=f"{name} {label}": f"{w}: {m}")
        ran.append(name)
    assert ran, "no fused backend ran"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_every_gpu_backend_matches_math(dtype):
    q, k, v, mask = (t.cuda() for t in make(batch=2, length=77, heads=3, dqk=40, dv=72, seed=2))
    mask[1, :60] = 1
    mask[0, 50:] = 0
    ran = []
    for name, st in bk.available_backends("cuda").items():
        if not st.usable or not bk._kernel_accepts(name, 42, 72, dtype, torch.device("cuda"))[0]:
            continue
        tensors = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        ref_t = [t.detach().float().requires_grad_() for t in tensors]
        out = att.attention(*tensors, mask, backend=name, scale=0.2)
        ref = att.math_attention(*ref_t, mask, scale=0.2)
        tol = ATOL_FP32 * 10 if dtype == torch.float32 else ATOL_HALF
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=0)
        gout = torch.randn_like(ref)
        try:
            grads = torch.autograd.grad(out.float(), tensors, gout)
        except ValueError as err:
            if fa4_backward_refused(name, err):
                ran.append(f"{name} (forward)")
                continue
            raise
        rgrads = torch.autograd.grad(ref, ref_t, gout)
        for a, b in zip(grads, rgrads):
            torch.testing.assert_close(a.float(), b, atol=tol * 5, rtol=0)
        ran.append(name)
    assert "math" in ran and len(ran) >= 2, ran


@pytest.mark.gpu
def test_fa4_forward_matches_math_at_flash_ipa_widths():
    """FA4 where installed: the packed rows of the shipped Flash-IPA widths (q / k 58 + 2, v 104), bf16,
    masks with real zeros, against the fp32 reference: the forward the service would sample with."""
    status = bk.available_backends("cuda").get("fa4")
    if status is None or not status.usable:
        pytest.skip("FlashAttention 4 is not installed / usable here")
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k = (torch.randn(4, 96, 8, 58, generator=g, device="cuda") * 0.13 for _ in range(2))
    v = torch.randn(4, 96, 8, 104, generator=g, device="cuda")
    mask = torch.ones(4, 96, device="cuda")
    mask[1, 70:] = 0
    mask[3, 10:] = 0
    out = att.packed_attention([q.bfloat16()], [k.bfloat16()], [v.bfloat16()], mask, backend="fa4")
    ref = att.packed_attention([q], [k], [v], mask, backend="math")
    real = mask.bool()
    torch.testing.assert_close(out.float()[real], ref.float()[real], atol=ATOL_HALF, rtol=0)
