"""model/mhc/kernels/mix.py (H_res S + H_post^T y and the new streams' mean, one Triton kernel each way)
against the reference ``model.mhc.reference.mix_out`` followed by ``contract``: outputs and the gradients
of all four inputs, when both outputs are used, only the mean, or only the streams; float32 against the
float32 reference (both forms) and the float64 one, bf16 / fp16 against the float32 reference of the
same rounded inputs. The kernels run on CUDA or, on the CPU, under Triton's interpreter in a subprocess."""

from __future__ import annotations

import pytest
import torch
from mhc_cases import in_triton_interpreter, mix_inputs

from model.mhc.reference import contract, mix_out

ATOL = 1e-5  # fused vs reference outputs and gradients, float32 (C = 128 sums: measured <= 3.5e-6)
RTOL = 1e-5
# 16-bit outputs: one rounding of a float32 sum, at most 2^-8 (bf16) or 2^-11 (fp16) of the value (twice
# that allowed). NOTE: Triton's CPU interpreter converts float32 to bf16 by truncation (up to 2^-7 of the
# value; measured 0.0077), hence 2^-6 there
RTOL_16 = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
RTOL_BF16_INTERPRETER = 2.0**-6
USES = ((True, True), (False, True), (True, False))  # (the streams' gradient, the mean's gradient)


def _run(fused: bool, inputs, w_out, w_mean, use_out: bool = True, use_mean: bool = True,
         matmul: bool | None = None) -> list[torch.Tensor]:
    """out = H_res S + H_post^T y and mean = contract(out) (fused: the kernel's ``with_mean``), loss
    <out, w_out> use_out + <mean, w_mean> use_mean; returns [out, mean, then the gradients of h_post,
    h_res, S, y]. ``inputs``: ``mix_inputs``' list (its h_pre unused)."""
    from model.mhc.kernels import mix

    leaves = [t.detach().clone().requires_grad_() for t in inputs[1:]]  # h_post, h_res, S, y
    h_post, h_res, s, y = leaves
    if fused:
        out, mean = mix.mix_out(h_res, h_post, s, y, with_mean=True)
        assert type(out.grad_fn).__name__ == "MixOutBackward"
    else:
        out = mix_out(h_res, h_post, s, y, matmul)
        mean = contract(out)
    loss = (out * w_out).sum() * use_out + (mean * w_mean).sum() * use_mean
    grads = torch.autograd.grad(loss, leaves)
    return [out.detach(), mean.detach(), *grads]


def fused_mix_matches_reference(device: str) -> None:
    """n = 4 and 2, C = 128 and 32, residue counts not multiples of the block of 8, 2-D leading shapes.
    Runs on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc.kernels import mix

    g = torch.Generator().manual_seed(17)
    cases = [(4, 128, (1,)), (4, 128, (2, 13)), (4, 32, (130,)), (2, 32, (3, 5))]
    if device == "cuda":  # the profiled training batch: 56 chains x 72 residues
        cases += [(4, 128, (56, 72))]

    def cast(ts, dtype=torch.float32):
        return [t.to(device=device, dtype=dtype) for t in ts]

    for n, c, lead in cases:
        inputs = mix_inputs(n, c, lead, g)
        weights = [torch.randn(*lead, n, c, generator=g, dtype=torch.float64),
                   torch.randn(*lead, c, generator=g, dtype=torch.float64)]
        for use in USES:
            exact = _run(False, inputs, *weights, *use)  # float64 on the CPU
            fused = _run(True, cast(inputs), *cast(weights), *use)
            for matmul in (False, True):
                ref = _run(False, cast(inputs), *cast(weights), *use, matmul=matmul)
                for i, (a, b) in enumerate(zip(fused, ref, strict=True)):
                    assert a.dtype == torch.float32 and a.shape == b.shape
                    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL,
                                               msg=lambda m, i=i, u=use: f"{u} {i}: {m}")
            for i, (a, b) in enumerate(zip(fused, exact, strict=True)):
                torch.testing.assert_close(a.cpu().double(), b, atol=ATOL, rtol=RTOL,
                                           msg=lambda m, i=i, u=use: f"{u} {i} vs float64: {m}")
        # no gradient: the forward kernel alone, the same values; without with_mean one output
        h_post, h_res, s, y = cast(inputs)[1:]
        with torch.no_grad():
            out, mean = mix.mix_out(h_res, h_post, s, y, with_mean=True)
            plain = mix.mix_out(h_res, h_post, s, y)
        assert out.grad_fn is None
        torch.testing.assert_close(out, plain, atol=0, rtol=0)
        torch.testing.assert_close(out, mix_out(h_res, h_post, s, y), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(mean, contract(plain), atol=ATOL, rtol=RTOL)
        # 16-bit inputs: the streams and the gradients in that dtype, against the float32 reference of the
        # same inputs (the mean is left out: the kernel averages the rounded streams)
        for dtype in (torch.bfloat16, torch.float16):
            low, w_low = cast(inputs, dtype), cast(weights, dtype)
            fused = _run(True, low, *w_low, use_mean=False)
            ref = _run(False, cast(low), *cast(w_low), use_mean=False)
            rtol = RTOL_BF16_INTERPRETER if dtype == torch.bfloat16 and device == "cpu" else RTOL_16[dtype]
            for i, (a, b) in enumerate(zip(fused, ref, strict=True)):
                assert a.dtype == dtype
                if i == 1:
                    continue
                torch.testing.assert_close(a.float(), b, atol=ATOL, rtol=rtol,
                                           msg=lambda m, i=i, d=dtype: f"{d} {i}: {m}")


def test_mix_out_checks_shapes():
    """The kernels index every tensor by the streams' residues: no broadcasting (checked before any launch,
    so this runs without Triton)."""
    from model.mhc.kernels import mix

    s = torch.zeros(3, 4, 8)
    with pytest.raises(ValueError, match="y must be"):
        mix.mix_out(torch.zeros(3, 4, 4), torch.zeros(3, 4), s, torch.zeros(1, 8))
    with pytest.raises(ValueError, match="h_res must be"):
        mix.mix_out(torch.zeros(4, 4), torch.zeros(3, 4), s, torch.zeros(3, 8))


def test_fused_mix_matches_reference_in_the_triton_interpreter():
    """The forward and backward kernels' source, executed by Triton's CPU interpreter."""
    in_triton_interpreter("fused_mix_matches_reference", module="test_mhc_mix_kernel")


def fused_mix_in_cuda_graph() -> None:
    """MixOut forward + backward captured in one CUDA graph (training size, float32), replayed on new
    inputs copied into the static ones: the same outputs and gradients as eager calls."""
    g = torch.Generator().manual_seed(23)
    n, c, lead = 4, 128, (56, 72)

    def fresh():
        return [t.float().cuda() for t in mix_inputs(n, c, lead, g)], [
            torch.randn(*lead, n, c, generator=g).cuda(), torch.randn(*lead, c, generator=g).cuda()]

    static, static_w = fresh()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles) outside the capture
        for _ in range(2):
            _run(True, static, *static_w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _run(True, static, *static_w)
    for _ in range(2):
        inputs, weights = fresh()
        for dst, src in zip(static + static_w, inputs + weights, strict=True):
            dst.copy_(src)
        graph.replay()
        eager = _run(True, inputs, *weights)
        ref = _run(False, inputs, *weights)
        for a, b, r in zip(captured, eager, ref, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
            torch.testing.assert_close(a, r, atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
def test_gpu_fused_mix_matches_reference(monkeypatch):
    # the GEMM form of the reference must be a true float32 bmm (no TF32) for the tolerances
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    fused_mix_matches_reference("cuda")
    fused_mix_in_cuda_graph()
