"""``MHCResidual`` (model/mhc/residual.py): the fused path against its reference twin (same parameters,
``fused=False``), the ``fused`` policy, and the streams' mean for the structure layer's backbone update
(``forward_with_mean``). The fused path runs on CUDA or, on the CPU, under Triton's interpreter in a
subprocess."""

from __future__ import annotations

import contextlib

import pytest
import torch
from mhc_cases import (
    ALPHA,
    ATOL_RESIDUAL,
    MAPS,
    Branch,
    assert_runs_match,
    in_triton_interpreter,
    residual_case,
    residual_runs,
    twin,
)

from model.mhc import GatedReadout, MeanReadout, MHCResidual, contract, expand, is_mean_readout

ATOL_MEAN = 1e-5  # forward_with_mean vs forward then contract (float32 sums of 4 streams in another order)


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


def fused_residual_matches_reference(device: str) -> None:
    """Two applications of one MHCResidual(fused=True) (n = 4, C = 32; perturbed mappings, padded mask;
    the first on ``expand``'s stride-0 streams) against its reference twin, float32 and under bf16
    autocast: without gradient (sampling) the output and the recorded H_res; with one (training) also
    the gradients of s and of every parameter. The fused ops really run (counted), the Sinkhorn on a side
    stream exactly without gradient below OVERLAP_BELOW residues."""
    from model.mhc.kernels import mix, pre

    block, s, mask, w, _ = residual_case(41, device, fused=True)
    ref = twin(block, fused=False)
    with counting(pre, "fused_pre") as calls, counting(mix, "mix_out") as mixes:
        for autocast in (False, True):
            runs = []
            for module in (block, ref):
                calls.clear()
                with torch.no_grad(), torch.autocast(device_type=s.device.type, dtype=torch.bfloat16,
                                                     enabled=autocast):
                    out = module(module(expand(s, 4), mask), mask)  # [2, 5, 4, 32]
                assert calls == ([{"res_logit_cap": 0.0, "side_stream": True}] * 2 if module is block else [])
                runs.append((out, module.last_h_res))
            for a, b in zip(*runs, strict=True):
                torch.testing.assert_close(a, b, atol=ATOL_RESIDUAL, rtol=0)
            calls.clear()
            mixes.clear()
            fused = residual_runs(block, s, mask, w, autocast)
            assert calls == [{"res_logit_cap": 0.0, "side_stream": False}] * 2 and len(mixes) == 2
            calls.clear()
            assert_runs_match(fused, residual_runs(ref, s, mask, w, autocast), autocast)
            assert calls == []
        below = pre.OVERLAP_BELOW
        try:  # at OVERLAP_BELOW residues and more: no side stream (the case has 10)
            pre.OVERLAP_BELOW = 10
            calls.clear()
            with torch.no_grad():
                block(expand(s, 4), mask)
            assert calls == [{"res_logit_cap": 0.0, "side_stream": False}]
        finally:
            pre.OVERLAP_BELOW = below


def residual_with_mean_matches(device: str) -> None:
    """``MHCResidual.forward_with_mean`` (two layers, the first on ``expand``'s stride-0 streams, padded
    mask) vs ``forward`` then ``contract``: the streams, the mean and the gradients of s and of every
    parameter, float32; where the kernels run, the mean really comes from the mixing kernel (its grad_fn)."""
    block, s, mask, w_out, g = residual_case(37, device)
    w_mean = torch.randn(2, 5, 32, generator=g).to(device)
    runs = []
    for fused_mean in (True, False):
        block.zero_grad(set_to_none=True)
        s.grad = None
        mid = block(expand(s, 4), mask)
        if fused_mean:
            out, mean = block.forward_with_mean(mid, mask)
        else:
            out = block(mid, mask)
            mean = contract(out)
        assert (type(out.grad_fn).__name__ == "MixOutBackward") == block.runs_fused(mid)
        ((out * w_out).sum() + (mean * w_mean).sum()).backward()
        runs.append([out.detach(), mean.detach(), s.grad, *(p.grad for p in block.parameters())])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL_MEAN, rtol=1e-4, msg=lambda m, i=i: f"tensor {i}: {m}")


def fused_residual_checks(device: str) -> None:
    fused_residual_matches_reference(device)
    residual_with_mean_matches(device)


def test_fused_residual_in_the_triton_interpreter():
    in_triton_interpreter("fused_residual_checks", module="test_mhc_residual")


def test_residual_with_mean_on_the_cpu_path():
    """Without Triton kernels (plain CPU): forward_with_mean is forward + contract, exactly."""
    residual_with_mean_matches("cpu")


def test_fused_policy_is_chosen_at_construction(monkeypatch):
    """``fused`` is fixed when the module is built: True refuses shapes the kernels do not take (here) and
    tensors they cannot run on (at the call), None falls back to the reference, False never asks; the
    attribute cannot be reassigned. The device / dtype part is read from the tensors (no kernel launched)."""
    with pytest.raises(ValueError, match="fused=True.* n = 3"):
        MHCResidual(Branch(32), 32, n=3, **MAPS, fused=True)
    with pytest.raises(ValueError, match="C = 24"):
        MHCResidual(Branch(24), 24, n=4, **MAPS, fused=True)
    # n = 1: no mappings, nothing to fuse
    assert MHCResidual(Branch(24), 24, n=1, **MAPS, fused=True).mappings is None
    blocks = {f: MHCResidual(Branch(32), 32, n=4, **MAPS, fused=f) for f in (None, True, False)}
    with pytest.raises(AttributeError):
        blocks[None].fused = False
    s = torch.zeros(2, 5, 4, 32)
    assert not blocks[None].runs_fused(s) and not blocks[False].runs_fused(s)  # CPU without the interpreter
    with pytest.raises(RuntimeError, match="fused=True.*cannot run for streams torch.float32 on cpu"):
        blocks[True](s)
    assert blocks[None](s).shape == s.shape  # the reference
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert blocks[None].runs_fused(s) and blocks[True].runs_fused(s) and not blocks[False].runs_fused(s)
    assert blocks[None].runs_fused(s.bfloat16())
    assert not blocks[None].runs_fused(s.double())  # float64 streams: the reference (gradcheck)
    with pytest.raises(RuntimeError, match="torch.float64"):
        blocks[True].runs_fused(s.double())


def test_structure_layer_takes_the_mean_from_the_residual(monkeypatch):
    """The structure layer asks an mHC residual for the streams and their mean together when its read-out
    is the mean (``contract`` or ``MeanReadout``), and calls the read-out itself otherwise."""
    from model.network.structure import StructureLayer

    assert is_mean_readout(contract) and is_mean_readout(MeanReadout())
    assert not is_mean_readout(GatedReadout(32, 4, alpha_init=ALPHA))

    class LayerBranch(Branch):  # the structure layer's branch signature (x, pair, frames, mask)
        def forward(self, x, pair, frames, mask):
            return super().forward(x, mask)

    calls = []
    block = MHCResidual(LayerBranch(32), 32, n=4, **MAPS)
    original = block.forward_with_mean
    monkeypatch.setattr(block, "forward_with_mean", lambda *a, **k: calls.append(1) or original(*a, **k))

    class Update(torch.nn.Module):  # records what the backbone update reads
        def forward(self, frames, s, mask):
            calls.append(s)
            return frames

    layer = StructureLayer(residual=block, c_s=32)
    layer.backbone_update = Update()
    streams = torch.randn(2, 5, 4, 32)
    mask = torch.ones(2, 5)
    out, _ = layer(streams, mask, None, mask, contract)
    assert calls[0] == 1 and torch.equal(calls[1], contract(out))
    calls.clear()
    gated = GatedReadout(32, 4, alpha_init=ALPHA)
    out, _ = layer(streams, mask, None, mask, gated)
    assert len(calls) == 1 and torch.equal(calls[0], gated(out))


def test_one_stream_forward_with_mean_is_the_plain_residual():
    """n = 1 (no mappings): the streams are s + f(s) and their mean is that one stream, exactly."""
    torch.manual_seed(41)
    block = MHCResidual(Branch(32), 32, n=1, **MAPS)
    s = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5)
    mask[0, 4:] = 0
    out, mean = block.forward_with_mean(expand(s, 1), mask)
    torch.testing.assert_close(out, block(expand(s, 1), mask), rtol=0, atol=0)
    torch.testing.assert_close(mean, s + block.branch(s, mask), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_fused_residual_matches_reference(monkeypatch):
    # the reference GEMMs must be true float32 GEMMs (no TF32) for the tolerances
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_residual_checks("cuda")


@pytest.mark.gpu
def test_gpu_overlapped_sinkhorn_in_cuda_graph(monkeypatch):
    """Three MHCResidual applications without gradient captured in one CUDA graph with the Sinkhorn on
    its side stream (fork and join inside the capture), each branch allocating and freeing more than
    the H_res buffers (so the allocator would hand their memory out if the join came too late):
    replays on new inputs give what eager runs give (the same kernels: 1e-6), and the reference twin."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    block, _, _, _, g = residual_case(43, "cuda", fused=True)
    ref = twin(block, fused=False)
    block.record = False
    mask = torch.ones(8, 40, device="cuda")
    mask[3, 25:] = 0

    def run(module, s):
        for _ in range(3):
            s = module(s, mask)
        return s

    static = torch.randn(8, 40, 4, 32, generator=g).cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(side):  # warm-up (Triton compiles, the side stream exists) outside the capture
            for _ in range(2):
                run(block, static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = run(block, static)
        for _ in range(3):
            static.copy_(torch.randn(8, 40, 4, 32, generator=g))
            graph.replay()
            torch.testing.assert_close(captured, run(block, static), atol=1e-6, rtol=0)
            torch.testing.assert_close(captured, run(ref, static), atol=ATOL_RESIDUAL, rtol=0)
