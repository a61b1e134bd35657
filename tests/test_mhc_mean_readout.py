"""The mean read-out fused into mHC's mix_out kernel (model/mhc_mix_triton.py, ``with_mean``).

The structure layer's backbone update reads the mean of the new streams (``model.mhc.contract``);
``mix_out(..., with_mean=True)`` returns it from the kernel that writes the streams, and its backward
takes both gradients in one pass. Checked against the reference ``mix_out`` followed by ``contract``:
outputs and the gradients of all four inputs, when both outputs are used, only the mean, or only the
streams. Runs on CUDA, or on the CPU under Triton's interpreter.
"""

from __future__ import annotations

import pytest
import torch
from test_mhc import Branch, _cfg, _in_triton_interpreter, _mix_inputs, residual_case

from model.mhc import MHCResidual, contract, expand, is_mean_readout

ATOL = 1e-5  # float32 sums of 4 streams in another order (the mean: one more division)
RTOL = 1e-5


def _run(fused: bool, inputs, w_out, w_mean, use_out: bool, use_mean: bool):
    from model.mhc import contract, mix_out
    from model.mhc.kernels import mix as mhc_mix_triton

    leaves = [t.detach().clone().requires_grad_() for t in inputs[1:]]  # h_post, h_res, S, y
    h_post, h_res, s, y = leaves
    if fused:
        out, mean = mhc_mix_triton.mix_out(h_res, h_post, s, y, with_mean=True)
        assert type(out.grad_fn).__name__ == "MixOutBackward"
    else:
        out = mix_out(h_res, h_post, s, y, matmul=False)
        mean = contract(out)
    loss = (out * w_out).sum() * use_out + (mean * w_mean).sum() * use_mean
    grads = torch.autograd.grad(loss, leaves, allow_unused=False)
    return [out.detach(), mean.detach(), *grads]


def fused_mean_matches_reference(device: str) -> None:
    from model.mhc.kernels import mix as mhc_mix_triton

    g = torch.Generator().manual_seed(29)
    cases = [(4, 128, (2, 13)), (4, 32, (9,)), (2, 32, (3, 5))]
    if device == "cuda":
        cases.append((4, 128, (56, 72)))
    for n, c, lead in cases:
        inputs = [t.float().to(device) for t in _mix_inputs(n, c, lead, g)]
        w_out = torch.randn(*lead, n, c, generator=g).to(device)
        w_mean = torch.randn(*lead, c, generator=g).to(device)
        assert mhc_mix_triton.available(inputs[3])
        for use_out, use_mean in ((True, True), (False, True), (True, False)):
            fused = _run(True, inputs, w_out, w_mean, use_out, use_mean)
            ref = _run(False, inputs, w_out, w_mean, use_out, use_mean)
            for i, (a, b) in enumerate(zip(fused, ref, strict=True)):
                assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
                torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL,
                                           msg=lambda m, i=i, u=(use_out, use_mean): f"{u} output {i}: {m}")
        # no gradient: the forward kernel alone, same values; without with_mean the old single output
        with torch.no_grad():
            out, mean = mhc_mix_triton.mix_out(inputs[2], inputs[1], inputs[3], inputs[4], with_mean=True)
            plain = mhc_mix_triton.mix_out(inputs[2], inputs[1], inputs[3], inputs[4])
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        torch.testing.assert_close(mean, plain.mean(dim=-2), atol=ATOL, rtol=RTOL)


def residual_with_mean_matches(device: str) -> None:
    """``MHCResidual.forward_with_mean`` (two layers, the first on ``expand``'s stride-0 streams, padded
    mask) vs ``forward`` then ``contract``: the streams, the mean and the gradients of s and of every
    parameter, float32; where the kernels run, the mean really comes from the mixing kernel (its grad_fn)."""
    from model.mhc.kernels import mix as mhc_mix_triton

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
        assert (type(out.grad_fn).__name__ == "MixOutBackward") == mhc_mix_triton.available(mid)
        ((out * w_out).sum() + (mean * w_mean).sum()).backward()
        runs.append([out.detach(), mean.detach(), s.grad, *(p.grad for p in block.parameters())])
    for i, (a, b) in enumerate(zip(*runs, strict=True)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4, msg=lambda m, i=i: f"tensor {i}: {m}")


def fused_mean_checks(device: str) -> None:
    fused_mean_matches_reference(device)
    residual_with_mean_matches(device)


def test_fused_mean_matches_reference_in_the_triton_interpreter():
    """The kernels' source, executed by Triton's CPU interpreter."""
    _in_triton_interpreter("fused_mean_checks", module="test_mhc_mean_readout")


def test_residual_with_mean_on_the_cpu_path():
    """Without Triton kernels (plain CPU): forward_with_mean is forward + contract, exactly."""
    residual_with_mean_matches("cpu")


def test_structure_layer_takes_the_mean_from_the_residual(monkeypatch):
    """The structure layer asks an mHC residual for the streams and their mean together when its read-out
    is the mean (``contract`` or ``MeanReadout``), and calls the read-out itself otherwise."""
    from model.mhc import GatedReadout, MeanReadout
    from model.structure import StructureLayer

    assert is_mean_readout(contract) and is_mean_readout(MeanReadout())
    assert not is_mean_readout(GatedReadout(32, 4, _cfg()))
    class LayerBranch(Branch):  # the structure layer's branch signature (x, pair, frames, mask)
        def forward(self, x, pair, frames, mask):
            return super().forward(x, mask)

    calls = []
    block = MHCResidual(LayerBranch(32), 32, _cfg(mhcExpansionRate=4))
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
    gated = GatedReadout(32, 4, _cfg())
    out, _ = layer(streams, mask, None, mask, gated)
    assert len(calls) == 1 and torch.equal(calls[0], gated(out))


@pytest.mark.gpu
def test_gpu_fused_mean_matches_reference():
    fused_mean_matches_reference("cuda")


def test_one_stream_forward_with_mean_is_the_plain_residual():
    """n = 1 (no mappings): the streams are s + f(s) and their mean is that one stream, exactly."""
    torch.manual_seed(41)
    block = MHCResidual(Branch(32), 32, _cfg(mhcExpansionRate=1))
    s = torch.randn(2, 5, 32)
    mask = torch.ones(2, 5)
    mask[0, 4:] = 0
    out, mean = block.forward_with_mean(expand(s, 1), mask)
    torch.testing.assert_close(out, block(expand(s, 1), mask), rtol=0, atol=0)
    torch.testing.assert_close(mean, s + block.branch(s, mask), rtol=0, atol=0)
