"""model/mhc/kernels/sinkhorn.py (the fused Sinkhorn, one Triton kernel each way) against the reference
loop ``model.mhc.reference.sinkhorn_knopp``, forward and gradients. The kernels run on CUDA or, on the
CPU, under Triton's interpreter in a subprocess."""

from __future__ import annotations

import pytest
import torch
from mhc_cases import ITERS, in_triton_interpreter

from model.mhc.reference import sinkhorn_knopp

ATOL_FUSED = 1e-6  # fused Triton kernel vs the PyTorch loop: both float64 inside, fp32 out (measured 0.0)


def fused_matches_loop(device: str) -> None:
    """The fused kernel vs the reference loop, forward and gradients, for n = 2 and 4, matrix counts
    around the kernel's block of 16, moderate and floor-clamped logits, fp32 and bf16 inputs. Runs on
    CUDA, or on the CPU under TRITON_INTERPRET=1."""
    from model.mhc.kernels import sinkhorn

    g = torch.Generator().manual_seed(5)
    for n, count, scale in [(4, 1, 1.0), (4, 130, 3.0), (2, 65, 3.0), (4, 7, 400.0)]:
        for dtype in (torch.float32, torch.bfloat16):
            logits = (torch.randn(count, n, n, generator=g) * scale).to(device, dtype)
            a_in = logits.clone().requires_grad_()
            b_in = logits.clone().requires_grad_()
            a, b = sinkhorn.sinkhorn_fused(a_in, ITERS), sinkhorn_knopp(b_in, ITERS)
            assert a.dtype == b.dtype == torch.float32 and torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=ATOL_FUSED, rtol=0)
            weights = torch.randn(a.shape, generator=g).to(device)
            (a * weights).sum().backward()
            (b * weights).sum().backward()
            torch.testing.assert_close(a_in.grad.float(), b_in.grad.float(), atol=ATOL_FUSED, rtol=0)
            # the forward kernel alone into a caller's buffer: the same values
            z = logits.float().contiguous()
            out = sinkhorn.sinkhorn_into(z, torch.empty_like(z), ITERS)
            torch.testing.assert_close(out, a.detach(), atol=0, rtol=0)


def test_sinkhorn_into_checks_its_buffers():
    """The buffer-owning entry point refuses buffers that are not contiguous float32 of one shape, before
    any launch (so this runs without Triton)."""
    from model.mhc.kernels import sinkhorn

    z = torch.zeros(3, 4, 4)
    for bad_z, bad_out in ((z.double(), z), (z, torch.zeros(3, 4, 4, dtype=torch.float64)),
                           (z.transpose(1, 2), z), (z, torch.zeros(2, 4, 4))):
        with pytest.raises(ValueError, match="sinkhorn_into: .* must be contiguous float32"):
            sinkhorn.sinkhorn_into(bad_z, bad_out, ITERS)


def test_fused_sinkhorn_matches_loop_in_the_triton_interpreter():
    """The kernel source, executed by Triton's CPU interpreter."""
    in_triton_interpreter("fused_matches_loop", module="test_mhc_sinkhorn_kernel")


@pytest.mark.gpu
def test_gpu_fused_sinkhorn_matches_loop():
    fused_matches_loop("cuda")


@pytest.mark.gpu
def test_gpu_sinkhorn_backward_reads_back_its_own_scratch():
    """The backward kernel writes each half step's sums to a scratch buffer and reads them back in the
    same program: 65,536 matrices (4,096 programs), the scratch's memory filled with NaN beforehand (the
    allocator hands the freed block back), three calls: every gradient finite and equal to the loop's.
    Without a barrier between the writes and the reads (threads of another layout read them) this failed
    on the H100 (1,088 non-finite gradient entries), and the fused pre-branch's backward at 32,768 residues
    gave NaN gradients for 188 of them."""
    from model.mhc.kernels import sinkhorn

    count, n = 65536, 4
    g = torch.Generator().manual_seed(51)
    logits = (torch.randn(count, n, n, generator=g) * 2.0).cuda()
    weights = torch.randn(count, n, n, generator=g).cuda()
    b_in = logits.double().requires_grad_()
    (sinkhorn_knopp(b_in, ITERS) * weights.double()).sum().backward()
    for _ in range(3):
        # NaN into the memory the scratch will get (freed at once)
        torch.empty(count, 2 * ITERS, n, dtype=torch.float64, device="cuda").fill_(float("nan"))
        grad = sinkhorn.sinkhorn_vjp(logits.contiguous(), weights, ITERS)
        assert torch.isfinite(grad).all(), int((~torch.isfinite(grad)).sum())
        torch.testing.assert_close(grad.double(), b_in.grad, atol=ATOL_FUSED, rtol=0)
