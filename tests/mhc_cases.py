"""Shared cases of the mHC tests (tests/test_mhc_*.py): a small branch, residual and mixing inputs, the
comparison of a fused residual with its reference twin, and running a check under Triton's CPU
interpreter. Sizes are small and odd where the kernels allow (they need powers of two: n = 4, C = 32)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model.mhc import MHCResidual, expand

B, L, C = 2, 11, 13  # odd sizes for the reference tests, so broadcasting bugs cannot hide
ITERS = 20  # the paper's t_max and our default mhcSinkhornIters
ALPHA = 0.01  # the paper's alpha initialisation and our default mhcAlphaInit
MAPS = {"alpha_init": ALPHA, "sinkhorn_iters": ITERS}  # MHCResidual's mapping arguments in the tests
ATOL_RESIDUAL = 1e-5  # whole MHCResidual (two calls) fused vs reference: output and gradients, float32
RTOL_RESIDUAL = 1e-4
# the same under bf16 autocast, |a - b| / |b| per tensor: the branch rounds x to bf16, where mixing-order
# differences can flip a rounding (measured <= 3e-7 on the CPU)
REL_RESIDUAL_BF16 = 1e-3


class Branch(nn.Module):
    """A small residual branch y = f(x, mask) [B, L, C]: per-residue MLP + masked mean over residues.

    The masked mean makes residues interact (like attention) while staying padding invariant.
    """

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            mask = torch.ones(x.shape[:-1], dtype=x.dtype, device=x.device)
        m = mask.to(x.dtype).unsqueeze(-1)  # [B, L, 1]
        pooled = (x * m).sum(-3, keepdim=True) / m.sum(-3, keepdim=True).clamp_min(1.0)  # [B, 1, C]
        return (self.mlp(x) + self.mix(pooled)) * m  # [B, L, C]


def randomize(block: MHCResidual, seed: int) -> None:
    """Move the mapping parameters away from the init so every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m = block.mappings
        for a in (m.alpha_pre, m.alpha_post, m.alpha_res):
            a.fill_(0.7)
        for bias in (m.b_pre, m.b_post, m.b_res):
            bias.copy_(torch.randn(bias.shape, generator=g))


def residual_case(seed: int, device: str, fused: bool | None = None):
    """One MHCResidual (n = 4, C = 32, ``Branch``, mappings moved off the init, ``fused``) on ``device``,
    single features s [2, 5, 32] that require a gradient (10 residues: not a multiple of the kernels'
    blocks), a mask with padding, output weights w [2, 5, 4, 32], and the generator for further draws."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    block = MHCResidual(Branch(32), 32, n=4, **MAPS, fused=fused)
    randomize(block, seed)
    block.to(device)
    s = torch.randn(2, 5, 32, generator=g).to(device).requires_grad_()
    mask = torch.ones(2, 5, device=device)
    mask[1, 3:] = 0
    w = torch.randn(2, 5, 4, 32, generator=g).to(device)
    return block, s, mask, w, g


def twin(block: MHCResidual, fused: bool | None) -> MHCResidual:
    """A copy of ``residual_case``'s block (same parameters, same device) built with another ``fused``."""
    other = MHCResidual(Branch(32), 32, n=4, **MAPS, fused=fused)
    other.load_state_dict(block.state_dict())
    return other.to(block.mappings.phi.device)


def residual_runs(block: MHCResidual, s: torch.Tensor, mask: torch.Tensor, w: torch.Tensor,
                  autocast: bool) -> list[tuple[str, torch.Tensor]]:
    """Two applications of ``block`` (the first on ``expand``'s stride-0 streams), under bf16 autocast if
    ``autocast``, and the backward of sum(out * w): [(name, tensor)] for the output, the recorded H_res,
    the gradient of s and of every parameter."""
    block.zero_grad(set_to_none=True)
    s.grad = None
    with torch.autocast(device_type=s.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = block(block(expand(s, 4), mask), mask)  # [2, 5, 4, 32]
    assert out.dtype == torch.float32
    h_res = block.last_h_res
    (out * w).sum().backward()
    grads = [(k, p.grad) for k, p in block.named_parameters()]
    return [("out", out.detach()), ("h_res", h_res), ("s", s.grad), *grads]


def assert_runs_match(fast: list, ref: list, autocast: bool) -> None:
    """Two runs of (name, tensor) pairs of a residual (output, gradients) agree: float32 within
    ATOL_RESIDUAL / RTOL_RESIDUAL, under bf16 autocast within REL_RESIDUAL_BF16 per tensor."""
    for (name, a), (_, b) in zip(fast, ref, strict=True):
        assert a is not None and b is not None and a.dtype == b.dtype == torch.float32, name
        if autocast:
            rel = float((a - b).norm() / b.norm())
            assert rel <= REL_RESIDUAL_BF16, (name, rel)
        else:
            torch.testing.assert_close(a, b, atol=ATOL_RESIDUAL, rtol=RTOL_RESIDUAL,
                                       msg=lambda m, k=name: f"{k}: {m}")


def mix_inputs(n: int, c: int, lead: tuple[int, ...], g: torch.Generator) -> list[torch.Tensor]:
    """float64 (h_pre, h_post, h_res, streams, y): h_pre in (0, 1), h_post in (0, 2), h_res a row softmax
    of N(0, 1) logits (far from the identity), streams [*lead, n, c] and y [*lead, c] ~ N(0, 1)."""
    f64 = {"generator": g, "dtype": torch.float64}
    return [torch.rand(*lead, n, **f64), 2 * torch.rand(*lead, n, **f64),
            torch.softmax(torch.randn(*lead, n, n, **f64), -1), torch.randn(*lead, n, c, **f64),
            torch.randn(*lead, c, **f64)]


def in_triton_interpreter(check: str, module: str) -> None:
    """Run ``<module>.<check>('cpu')`` (a module of tests/) under Triton's CPU interpreter (a subprocess,
    because TRITON_INTERPRET is read when the kernels are defined). Skips where Triton is not installed."""
    pytest.importorskip("triton")
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    code = f"import {module}; {module}.{check}('cpu'); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]
