"""model/mhc/kernels/pre.py, the fused mHC pre-branch (mappings + H_pre S, one kernel each way, then the
Sinkhorn kernel), against ``model.mhc.reference.mhc_pre_reference``: outputs and the gradients of all 8
inputs. The kernels run on CUDA or, on the CPU, under Triton's interpreter in a subprocess. Small odd
sizes where the kernels allow; tolerances named below."""

from __future__ import annotations

import pytest
import torch
from mhc_cases import ITERS, in_triton_interpreter

from model.mhc.reference import expand, mhc_pre_reference

# fused vs reference, max |a - b| / max(1, max |exact|) per tensor, float32 (measured <= 1.4e-6 in the
# interpreter: the alpha gradients, sums of N gl raw products)
REL_PRE = 1e-5
# 16-bit x and gS: one rounding of a float32 sum, relative to the tensor's max (the interpreter truncates
# float32 to bf16: up to 2^-7, hence 2^-6)
REL_PRE_16 = 2.0**-6
NAMES = ("x", "h_post", "h_res", "g_streams", "g_phi", "g_alpha_pre", "g_alpha_post", "g_alpha_res",
         "g_b_pre", "g_b_post", "g_b_res")


def _pre_case(n: int, c: int, lead: tuple[int, ...], g: torch.Generator, *, expanded: bool = False):
    """float64 inputs of the pre-branch, moved away from the init so every term matters: streams
    [*lead, n, c] (a different scale per residue; [*lead, c] to be ``expand``-ed when ``expanded``),
    phi ~ N(0, 1 / nC), alphas ~ 0.5 (logits O(1)), biases ~ N(0, 1); and weights for x, h_post, h_res
    (the upstream gradients)."""
    f64 = {"generator": g, "dtype": torch.float64}
    d, m = n * c, 2 * n + n * n
    shape = (*lead, c) if expanded else (*lead, n, c)
    scale = torch.exp(0.3 * torch.randn(*lead, *([1] * (len(shape) - len(lead))), **f64))
    inputs = [torch.randn(*shape, **f64) * scale, torch.randn(d, m, **f64) / d**0.5,
              *(0.4 + 0.2 * torch.rand((), **f64) for _ in range(3)),
              torch.randn(n, **f64), torch.randn(n, **f64), torch.randn(n, n, **f64)]
    weights = [torch.randn(*lead, c, **f64), torch.randn(*lead, n, **f64), torch.randn(*lead, n, n, **f64)]
    return inputs, weights


def _fused(streams, *args):
    """``fused_pre`` with ``mhc_pre_reference``'s signature and results: (x, h_post, H_res after the join)."""
    from model.mhc.kernels import pre

    x, h_post, pending = pre.fused_pre(streams, *args)
    return x, h_post, pending.wait()


def _pre_with_grads(fn, inputs, weights, n: int, *, expanded: bool, used=(True, True, True)) -> list:
    """fn(streams, phi, alphas, biases, ITERS) -> [x, h_post, h_res, then the gradients of all 8 inputs] of
    the loss sum_k <out_k, w_k> over the ``used`` outputs (the others get no gradient at all)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    streams = expand(leaves[0], n) if expanded else leaves[0]
    outs = fn(streams, *leaves[1:], ITERS)
    loss = sum((o.to(w.dtype) * w).sum() for o, w, u in zip(outs, weights, used, strict=True) if u)
    grads = torch.autograd.grad(loss, leaves)
    return [o.detach() for o in outs] + list(grads)


def _rel(a: torch.Tensor, exact: torch.Tensor) -> float:
    return float((a.double().cpu() - exact.double().cpu()).abs().max() / max(1.0, float(exact.abs().max())))


def fused_pre_matches_reference(device: str) -> None:
    """fused_pre vs mhc_pre_reference in float32 and float64 (the exact answer): outputs and the gradients
    of all 8 inputs for n = 4 with C = 32 and 128 and n = 2 with C = 16 (padded column groups), residue
    counts not multiples of BLOCK_M, 2-D leading shapes, an ``expand``-ed input; only x used (h_post,
    h_res get no gradient); the no-grad path, with and without the side stream; bf16 / fp16 streams
    against the float32 reference of the same rounded streams; every tiling of the size tables. Runs on
    CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc.kernels import pre

    def cast(ts, dtype=torch.float32):
        return [t.to(device=device, dtype=dtype) for t in ts]

    g = torch.Generator().manual_seed(29)
    cases = [(4, 32, (37,), False), (4, 128, (2, 19), False), (4, 32, (3, 5), True), (2, 16, (7,), False)]
    if device == "cuda":  # the profiled training batch: 56 chains x 72 residues
        cases += [(4, 128, (56, 72), False), (4, 128, (56, 72), True)]
    for n, c, lead, expanded in cases:
        inputs, weights = _pre_case(n, c, lead, g, expanded=expanded)
        exact = _pre_with_grads(mhc_pre_reference, inputs, weights, n, expanded=expanded)
        streams = expand(cast(inputs)[0], n) if expanded else cast(inputs)[0]
        assert pre.available(streams, cast(inputs)[1])
        for used in ((True, True, True), (True, False, False)):
            fused = _pre_with_grads(_fused, cast(inputs), cast(weights), n, expanded=expanded, used=used)
            ref = _pre_with_grads(mhc_pre_reference, cast(inputs), cast(weights), n, expanded=expanded,
                                  used=used)
            ref64 = exact if all(used) else _pre_with_grads(mhc_pre_reference, inputs, weights, n,
                                                            expanded=expanded, used=used)
            for name, a, b, e in zip(NAMES, fused, ref, ref64, strict=True):
                assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
                assert _rel(a, b) <= REL_PRE and _rel(a, e) <= REL_PRE, (n, c, lead, used, name, _rel(a, e))
        # sampling: the forward kernels alone (no autograd node), the Sinkhorn on a side stream or not
        for side_stream in (True, False):
            with torch.no_grad():
                x, h_post, pending = pre.fused_pre(streams, *cast(inputs)[1:], ITERS, side_stream=side_stream)
                outs = (x, h_post, pending.wait())
            assert all(o.grad_fn is None for o in outs)
            for name, a, e in zip(NAMES, outs, exact, strict=False):
                assert _rel(a, e) <= REL_PRE, (side_stream, name, _rel(a, e))
    # every tiling of the tables on one case (the default picks by residue count; small counts here)
    inputs, weights = _pre_case(4, 128, (2, 19), g)
    exact = _pre_with_grads(mhc_pre_reference, inputs, weights, 4, expanded=False)
    names = ("FORWARD_TILINGS", "BACKWARD_TILINGS")
    tables = {name: getattr(pre, name) for name in names}
    rows = {name: [tiling for _, tiling in table] for name, table in tables.items()}
    try:
        for k in range(max(len(r) for r in rows.values())):
            for name in names:
                setattr(pre, name, ((None, rows[name][k % len(rows[name])]),))
            fused = _pre_with_grads(_fused, cast(inputs), cast(weights), 4, expanded=False)
            for out, a, e in zip(NAMES, fused, exact, strict=True):
                assert _rel(a, e) <= REL_PRE, (k, out, _rel(a, e))
    finally:
        for name, table in tables.items():
            setattr(pre, name, table)
    # 16-bit streams: x and gS in the streams' dtype, everything else float32
    n, c, lead = 4, 32, (37,)
    inputs, weights = _pre_case(n, c, lead, g)
    for dtype in (torch.bfloat16, torch.float16):
        low = [inputs[0].to(dtype)] + cast(inputs[1:])
        w = [weights[0].to(dtype).float()] + cast(weights[1:])  # gx exactly representable in 16 bits
        fused = _pre_with_grads(_fused, [t.to(device) for t in low], cast(w), n, expanded=False)
        ref = _pre_with_grads(mhc_pre_reference, cast(low), cast(w), n, expanded=False)
        for name, a, b in zip(NAMES, fused, ref, strict=True):
            low_out = name in ("x", "g_streams")
            assert a.dtype == (dtype if low_out else torch.float32), name
            assert _rel(a, b) <= (REL_PRE_16 if low_out else REL_PRE), (dtype, name, _rel(a, b))


def test_fused_pre_matches_reference_in_the_triton_interpreter():
    """The forward and backward kernels' source, executed by Triton's CPU interpreter."""
    in_triton_interpreter("fused_pre_matches_reference", module="test_mhc_pre_kernel")


def test_fused_pre_dispatch_rules(monkeypatch):
    """The fused pre-branch runs only where it can: not on a plain CPU tensor, not for float64 (gradcheck
    keeps the reference), not for phi other than float32 [nC, 2n + n^2], n * n not a power of two or C not a
    power of two >= 16; with or without gradients. Checked on the CPU with TRITON_INTERPRET=1 set (no
    kernel is launched here)."""
    from model.mhc.kernels import pre

    assert pre.supports(4, 128) and pre.supports(2, 16) and pre.supports(8, 64)
    assert not (pre.supports(1, 32) or pre.supports(3, 32) or pre.supports(6, 128) or pre.supports(4, 24)
                or pre.supports(4, 8))
    s, phi = torch.zeros(3, 5, 4, 32), torch.zeros(128, 24)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert not pre.available(s, phi)  # CPU without the interpreter
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert pre.available(s, phi)
            assert pre.available(s.bfloat16(), phi) and pre.available(s.half(), phi)
            assert pre.available(torch.zeros(7, 2, 16), torch.zeros(32, 8))  # n = 2, C = 16
            assert not pre.available(s.double(), phi)  # float64 streams (gradcheck)
            assert not pre.available(s, phi.double())  # float64 phi
            assert not pre.available(s, phi.bfloat16())  # 16-bit phi
            assert not pre.available(torch.zeros(3, 3, 32), torch.zeros(96, 15))  # n = 3
            assert not pre.available(torch.zeros(3, 4, 24), torch.zeros(96, 24))  # C = 24
            assert not pre.available(torch.zeros(3, 4, 8), torch.zeros(32, 24))  # C = 8 < 16
            assert not pre.available(s, torch.zeros(256, 24))  # phi does not match nC
            assert not pre.available(s, torch.zeros(128, 25))  # nor 2n + n^2
            assert not pre.available(s.long(), phi)
    # argument checks come before any launch
    params = [torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros(4), torch.zeros(4),
              torch.zeros(4, 4)]
    with pytest.raises(ValueError, match="b_res must have shape"):
        pre.fused_pre(s, phi, *params[:5], torch.zeros(16), ITERS)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        pre.fused_pre(s, phi, *params, 0)
    with pytest.raises(ValueError, match="side_stream only without gradient"):
        pre.fused_pre(s, phi.requires_grad_(), *params, ITERS, side_stream=True)


@pytest.mark.gpu
def test_gpu_fused_pre_matches_reference(monkeypatch):
    # the reference GEMM must be a true float32 GEMM (no TF32) for the tolerances
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_pre_matches_reference("cuda")


@pytest.mark.gpu
def test_gpu_fused_pre_in_cuda_graph(monkeypatch):
    """The fused pre-branch forward + backward (MHCPre, the Sinkhorn's node) captured in one CUDA graph
    (training size, float32), replayed on new inputs copied into the static ones: the same outputs and
    gradients as eager calls (bit-identical: deterministic partial sums, no atomics)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator().manual_seed(37)
    n, c, lead = 4, 128, (56, 72)

    def fresh():
        inputs, weights = _pre_case(n, c, lead, g)
        return [t.float().cuda() for t in inputs], [t.float().cuda() for t in weights]

    def run(inputs, weights):
        return _pre_with_grads(_fused, inputs, weights, n, expanded=False)

    static, static_w = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        for _ in range(2):
            run(static, static_w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run(static, static_w)
    for _ in range(2):
        inputs, weights = fresh()
        for dst, src in zip(static + static_w, inputs + weights, strict=True):
            dst.copy_(src)
        graph.replay()
        eager = run(inputs, weights)
        ref = _pre_with_grads(mhc_pre_reference, inputs, weights, n, expanded=False)
        for name, a, b, r in zip(NAMES, captured, eager, ref, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m, k=name: f"{k}: {m}")
            assert _rel(a, r) <= REL_PRE, (name, _rel(a, r))
