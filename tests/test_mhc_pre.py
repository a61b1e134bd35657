"""Tests for model/mhc_pre_triton.py, the fused mHC pre-branch (mappings + H_pre S, forward and backward),
against ``model.mhc.mhc_pre_reference``. The kernels run on CUDA or, on the CPU, under Triton's
interpreter in a subprocess (``_in_triton_interpreter``). Small odd sizes; tolerances named below."""

from __future__ import annotations

import contextlib

import pytest
import torch
from test_mhc import _in_triton_interpreter, assert_residual_runs_match, residual_ab_runs, residual_case

from model.mhc import expand, mhc_pre_reference

ITERS = 20  # mhcSinkhornIters default
# fused vs reference, max |a - b| / max(1, max |exact|) per tensor, float32 (measured <= 1.4e-6 in the
# interpreter: the alpha gradients, sums of N gl raw products)
REL_PRE = 1e-5
# 16-bit x and gS: one rounding of a float32 sum, relative to the tensor's max (the interpreter truncates
# float32 to bf16: up to 2^-7, hence 2^-6)
REL_PRE_16 = 2.0**-6
# mhc_pre_split vs mhc_pre: the same float64 Sinkhorn in another kernel (float32 outputs)
ATOL_OVERLAP = 1e-6
# ... where the two forwards' tilings differ in GEMM precision (SPLIT_FORWARD_TILINGS' float32 FMAs vs
# tf32x3, 1,024 residues and more): x differed by up to 4.7e-6 relative (H100, 4,032 residues, session 8)
RTOL_SPLIT = 1e-5
NAMES = ("x", "h_post", "h_res", "g_streams", "g_phi", "g_alpha_pre", "g_alpha_post", "g_alpha_res",
         "g_b_pre", "g_b_post", "g_b_res")


def _pre_case(n: int, c: int, lead: tuple[int, ...], g: torch.Generator, *, expanded: bool = False):
    """float64 inputs of mhc_pre, moved away from the init so every term matters: streams [*lead, n, c]
    (a different scale per residue; [*lead, c] to be ``expand``-ed when ``expanded``), phi ~ N(0, 1 / nC),
    alphas ~ 0.5 (logits O(1)), biases ~ N(0, 1); and weights for x, h_post, h_res (the upstream grads)."""
    f64 = {"generator": g, "dtype": torch.float64}
    d, m = n * c, 2 * n + n * n
    shape = (*lead, c) if expanded else (*lead, n, c)
    scale = torch.exp(0.3 * torch.randn(*lead, *([1] * (len(shape) - len(lead))), **f64))
    inputs = [torch.randn(*shape, **f64) * scale, torch.randn(d, m, **f64) / d**0.5,
              *(0.4 + 0.2 * torch.rand((), **f64) for _ in range(3)),
              torch.randn(n, **f64), torch.randn(n, **f64), torch.randn(n, n, **f64)]
    weights = [torch.randn(*lead, c, **f64), torch.randn(*lead, n, **f64), torch.randn(*lead, n, n, **f64)]
    return inputs, weights


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


def _split_with_wait(streams, *args):
    """``mhc_pre_split`` as ``mhc_pre``'s signature: (x, h_post, H_res after the join)."""
    from model.mhc.kernels import pre as mhc_pre_triton

    x, h_post, pending = mhc_pre_triton.mhc_pre_split(streams, *args)
    return x, h_post, pending.wait()


def fused_pre_matches_reference(device: str) -> None:
    """mhc_pre (fused, autograd Function) vs mhc_pre_reference in float32 and float64 (the exact answer):
    outputs and the gradients of all 8 inputs for n = 4 with C = 32 and 128 and n = 2 with C = 16 (padded
    column groups), residue counts not multiples of BLOCK_M, 2-D leading shapes, an ``expand``-ed input;
    only x used (h_post, h_res get no gradient); the no-grad path; bf16 / fp16 streams against the float32
    reference of the same rounded streams; every tiling of the size tables. Runs on CUDA, or on the CPU
    under TRITON_INTERPRET=1."""
    from model.mhc.kernels import pre as mhc_pre_triton

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
        assert mhc_pre_triton.available(streams, cast(inputs)[1])
        for used in ((True, True, True), (True, False, False)):
            fused = _pre_with_grads(mhc_pre_triton.mhc_pre, cast(inputs), cast(weights), n, expanded=expanded,
                                    used=used)
            ref = _pre_with_grads(mhc_pre_reference, cast(inputs), cast(weights), n, expanded=expanded,
                                  used=used)
            ref64 = exact if all(used) else _pre_with_grads(mhc_pre_reference, inputs, weights, n,
                                                            expanded=expanded, used=used)
            for name, a, b, e in zip(NAMES, fused, ref, ref64, strict=True):
                assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape, name
                assert _rel(a, b) <= REL_PRE and _rel(a, e) <= REL_PRE, (n, c, lead, used, name, _rel(a, e))
        # sampling: the forward kernel alone, no autograd node, the same outputs
        with torch.no_grad():
            outs = mhc_pre_triton.mhc_pre(streams, *cast(inputs)[1:], ITERS)
        assert all(o.grad_fn is None for o in outs)
        for name, a, e in zip(NAMES, outs, exact, strict=False):
            assert _rel(a, e) <= REL_PRE, (name, _rel(a, e))
        # sampling with the Sinkhorn as its own kernel (on a side stream or not): the same values
        for side_stream in (True, False):
            with torch.no_grad():
                x, h_post, pending = mhc_pre_triton.mhc_pre_split(streams, *cast(inputs)[1:], ITERS,
                                                                  side_stream=side_stream)
                h_res = pending.wait()
            for name, a, b, e in zip(NAMES, (x, h_post, h_res), outs, exact, strict=False):
                torch.testing.assert_close(a, b, atol=ATOL_OVERLAP, rtol=RTOL_SPLIT, msg=lambda m, k=name: f"{k}: {m}")
                assert _rel(a, e) <= REL_PRE, ("split", side_stream, name, _rel(a, e))
        # ... and in training: MHCPre without its Sinkhorn, the Sinkhorn its own autograd node
        split = _pre_with_grads(_split_with_wait, cast(inputs), cast(weights), n, expanded=expanded)
        for name, a, e in zip(NAMES, split, exact, strict=True):
            assert _rel(a, e) <= REL_PRE, ("split", n, c, lead, name, _rel(a, e))
    # every tiling of the tables on one case (the default picks by residue count; small counts here)
    inputs, weights = _pre_case(4, 128, (2, 19), g)
    exact = _pre_with_grads(mhc_pre_reference, inputs, weights, 4, expanded=False)
    names = ("FORWARD_TILINGS", "SPLIT_FORWARD_TILINGS", "BACKWARD_TILINGS")
    tables = {name: getattr(mhc_pre_triton, name) for name in names}
    rows = {name: [tiling for _, tiling in table] for name, table in tables.items()}
    try:
        for k in range(max(len(r) for r in rows.values())):
            for name in names:
                setattr(mhc_pre_triton, name, ((None, rows[name][k % len(rows[name])]),))
            for fn in (mhc_pre_triton.mhc_pre, _split_with_wait):
                fused = _pre_with_grads(fn, cast(inputs), cast(weights), 4, expanded=False)
                for out, a, e in zip(NAMES, fused, exact, strict=True):
                    assert _rel(a, e) <= REL_PRE, (k, fn, out, _rel(a, e))
    finally:
        for name, table in tables.items():
            setattr(mhc_pre_triton, name, table)
    # 16-bit streams: x and gS in the streams' dtype, everything else float32
    n, c, lead = 4, 32, (37,)
    inputs, weights = _pre_case(n, c, lead, g)
    for dtype in (torch.bfloat16, torch.float16):
        low = [inputs[0].to(dtype)] + cast(inputs[1:])
        w = [weights[0].to(dtype).float()] + cast(weights[1:])  # gx exactly representable in 16 bits
        fused = _pre_with_grads(mhc_pre_triton.mhc_pre, [t.to(device) for t in low], cast(w), n,
                                expanded=False)
        ref = _pre_with_grads(mhc_pre_reference, cast(low), cast(w), n, expanded=False)
        for name, a, b in zip(NAMES, fused, ref, strict=True):
            low_out = name in ("x", "g_streams")
            assert a.dtype == (dtype if low_out else torch.float32), name
            assert _rel(a, b) <= (REL_PRE_16 if low_out else REL_PRE), (dtype, name, _rel(a, b))


@contextlib.contextmanager
def counting(module, name: str):
    """``module.name`` replaced by a wrapper that appends its keyword arguments to the yielded list at each
    call (restored after)."""
    calls = []
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, original)


def fused_pre_residual_matches_reference(device: str) -> None:
    """Two applications of one MHCResidual (n = 4, C = 32; perturbed mappings, padded mask), forward and
    backward, ``fused_pre`` True vs False (both with the fused mixing): the output, the recorded H_res, the
    gradient of s (the first call sees ``expand``'s stride-0 streams) and of every parameter; float32,
    then under bf16 autocast. The fused op must really run (counted) and only when ``fused_pre`` is on.
    Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc.kernels import pre as mhc_pre_triton

    with counting(mhc_pre_triton, "mhc_pre") as calls:
        block, s, mask, w, _ = residual_case(31, device)
        block.split_sinkhorn = False  # the op itself (split_residual_matches compares the flag)

        def check(fused: bool, out: torch.Tensor) -> None:
            assert len(calls) == (2 if fused else 0)
            calls.clear()

        for autocast in (False, True):
            runs = residual_ab_runs(block, s, mask, w, "fused_pre", autocast, check)
            assert_residual_runs_match(runs[True], runs[False], autocast)


def split_residual_matches(device: str) -> None:
    """MHCResidual, ``split_sinkhorn`` True vs False, two applications (the first on ``expand``'s stride-0
    streams), float32 and under bf16 autocast: without gradient (sampling) the same output and recorded
    H_res; with one (training) also the gradients of s and of every parameter. The split op really runs
    (counted) exactly when the flag is on, on a side stream exactly without gradient below OVERLAP_BELOW
    residues. Runs on CUDA, or on the CPU under TRITON_INTERPRET=1 (no side stream there: the data path)."""
    from model.mhc.kernels import pre as mhc_pre_triton

    with counting(mhc_pre_triton, "mhc_pre_split") as calls:
        block, s, mask, w, _ = residual_case(41, device)
        for autocast in (False, True):
            runs = {}
            for split in (True, False):
                block.split_sinkhorn = split
                calls.clear()
                with torch.no_grad(), torch.autocast(device_type=s.device.type, dtype=torch.bfloat16,
                                                     enabled=autocast):
                    out = block(block(expand(s, 4), mask), mask)  # [2, 5, 4, 32]
                assert calls == ([{"side_stream": True}] * 2 if split else [])
                runs[split] = (out, block.last_h_res)
            for a, b in zip(runs[True], runs[False], strict=True):
                torch.testing.assert_close(a, b, atol=ATOL_OVERLAP, rtol=0)

            def check(split: bool, out: torch.Tensor) -> None:
                assert calls == ([{"side_stream": False}] * 2 if split else [])
                calls.clear()

            calls.clear()
            runs = residual_ab_runs(block, s, mask, w, "split_sinkhorn", autocast, check)
            assert_residual_runs_match(runs[True], runs[False], autocast)
        block.split_sinkhorn = True
        below = mhc_pre_triton.OVERLAP_BELOW
        try:  # at OVERLAP_BELOW residues and more: split, not on a side stream (the case has 10)
            mhc_pre_triton.OVERLAP_BELOW = 10
            calls.clear()
            with torch.no_grad():
                block(expand(s, 4), mask)
            assert calls == [{"side_stream": False}]
        finally:
            mhc_pre_triton.OVERLAP_BELOW = below
        with pytest.raises(ValueError, match="side_stream only without gradient"):
            mhc_pre_triton.mhc_pre_split(expand(s, 4), block.mappings.phi, *block.mappings.column_parameters(),
                                         ITERS, side_stream=True)


def test_split_residual_in_the_triton_interpreter():
    _in_triton_interpreter("split_residual_matches", module="test_mhc_pre")


def test_fused_pre_matches_reference_in_the_triton_interpreter():
    """The forward and backward kernels' source, executed by Triton's CPU interpreter."""
    _in_triton_interpreter("fused_pre_matches_reference", module="test_mhc_pre")


def test_fused_pre_residual_in_the_triton_interpreter():
    _in_triton_interpreter("fused_pre_residual_matches_reference", module="test_mhc_pre")


def test_fused_pre_dispatch_rules(monkeypatch):
    """The fused pre-branch runs only where it can: not on a plain CPU tensor, not for float64 (gradcheck
    keeps the reference), not for phi other than float32 [nC, 2n + n^2], n * n not a power of two or C not a
    power of two >= 16; with or without gradients. Checked on the CPU with TRITON_INTERPRET=1 set (no
    kernel is launched here)."""
    from model.mhc.kernels import pre as mhc_pre_triton

    s, phi = torch.zeros(3, 5, 4, 32), torch.zeros(128, 24)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert not mhc_pre_triton.available(s, phi)  # CPU without the interpreter
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            assert mhc_pre_triton.available(s, phi)
            assert mhc_pre_triton.available(s.bfloat16(), phi) and mhc_pre_triton.available(s.half(), phi)
            assert mhc_pre_triton.available(torch.zeros(7, 2, 16), torch.zeros(32, 8))  # n = 2, C = 16
            assert not mhc_pre_triton.available(s.double(), phi)  # float64 streams (gradcheck)
            assert not mhc_pre_triton.available(s, phi.double())  # float64 phi
            assert not mhc_pre_triton.available(s, phi.bfloat16())  # 16-bit phi
            assert not mhc_pre_triton.available(torch.zeros(3, 3, 32), torch.zeros(96, 15))  # n = 3
            assert not mhc_pre_triton.available(torch.zeros(3, 4, 24), torch.zeros(96, 24))  # C = 24
            assert not mhc_pre_triton.available(torch.zeros(3, 4, 8), torch.zeros(32, 24))  # C = 8 < 16
            assert not mhc_pre_triton.available(s, torch.zeros(256, 24))  # phi does not match nC
            assert not mhc_pre_triton.available(s, torch.zeros(128, 25))  # nor 2n + n^2
            assert not mhc_pre_triton.available(s.long(), phi)
    # argument checks come before any launch
    params = [torch.zeros(()), torch.zeros(()), torch.zeros(()), torch.zeros(4), torch.zeros(4), torch.zeros(4, 4)]
    with pytest.raises(ValueError, match="b_res must have shape"):
        mhc_pre_triton.mhc_pre(s, phi, *params[:5], torch.zeros(16), ITERS)
    with pytest.raises(ValueError, match="sinkhorn_iters"):
        mhc_pre_triton.mhc_pre(s, phi, *params, 0)


@pytest.mark.gpu
def test_gpu_fused_pre_matches_reference(monkeypatch):
    # the reference GEMM must be a true float32 GEMM (no TF32) for the tolerances
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_pre_matches_reference("cuda")
    fused_pre_residual_matches_reference("cuda")


@pytest.mark.gpu
def test_gpu_split_sinkhorn_residual():
    split_residual_matches("cuda")


@pytest.mark.gpu
def test_gpu_overlapped_sinkhorn_in_cuda_graph():
    """Three MHCResidual applications without gradient captured in one CUDA graph with the Sinkhorn on
    its side stream (fork and join inside the capture), each branch allocating and freeing more than
    the H_res buffers (so the allocator would hand their memory out if the join came too late):
    replays on new inputs give what eager runs give with the Sinkhorn in the pre-branch kernel."""
    block, _, _, _, g = residual_case(43, "cuda")
    block.record = False
    mask = torch.ones(8, 40, device="cuda")
    mask[3, 25:] = 0

    def run(s):
        for _ in range(3):
            s = block(s, mask)
        return s

    static = torch.randn(8, 40, 4, 32, generator=g).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    block.split_sinkhorn = True
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm-up (Triton compiles, the side stream exists) outside the capture
            for _ in range(2):
                run(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(static)
        for _ in range(3):
            static.copy_(torch.randn(8, 40, 4, 32, generator=g))
            graph.replay()
            block.split_sinkhorn = False
            eager = run(static)
            block.split_sinkhorn = True
            torch.testing.assert_close(captured, eager, atol=ATOL_OVERLAP, rtol=0)


@pytest.mark.gpu
def test_gpu_fused_pre_in_cuda_graph(monkeypatch):
    """MHCPre forward + backward captured in one CUDA graph (training size, float32), replayed on new
    inputs copied into the static ones: the same outputs and gradients as eager calls (bit-identical:
    deterministic partial sums, no atomics)."""
    from model.mhc.kernels import pre as mhc_pre_triton

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    g = torch.Generator().manual_seed(37)
    n, c, lead = 4, 128, (56, 72)

    def fresh():
        inputs, weights = _pre_case(n, c, lead, g)
        return [t.float().cuda() for t in inputs], [t.float().cuda() for t in weights]

    def run(inputs, weights):
        return _pre_with_grads(mhc_pre_triton.mhc_pre, inputs, weights, n, expanded=False)

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
