"""``compileModel True``: ``model.denoiser.compile_denoiser`` (torch.compile, dynamic shapes) agrees with eager.

Slow (inductor compiles C++ on the CPU: minutes on 2 cores), so marked ``slow``. Tolerances: forward
max abs error <= ATOL_COMPILE (fp32; inductor reorders sums) on a padded batch, again on a second
batch of another size and length (dynamic shapes: no per-length specialisation needed for
correctness), and parameter gradients: max abs error over all parameters <= RTOL_COMPILE_GRAD x the largest
gradient entry.
"""

from __future__ import annotations

import pytest
import torch
from conftest import pad_batch, random_ca_trace, randomize_parameters, tiny_config

from model import build_denoiser
from model.denoiser import compile_denoiser

ATOL_COMPILE = 1e-4
RTOL_COMPILE_GRAD = 1e-3


@pytest.mark.slow
def test_compiled_denoiser_matches_eager_forward_and_grad():
    torch.manual_seed(0)
    model = build_denoiser(tiny_config(useMHCMode=True, useFlashMode=True))
    model = randomize_parameters(model, seed=0, scale=0.1).eval()
    compiled = compile_denoiser(model)
    gen = torch.Generator().manual_seed(1)
    for lengths, t in (((23, 17, 13), [3, 55, 98]), ((19, 11), [7, 400])):
        x, mask = pad_batch([random_ca_trace(1, n, generator=gen)[0] for n in lengths])
        t = torch.tensor(t)
        ref = model(x, t, mask)  # [B, L, 3]
        ref_grads = torch.autograd.grad(ref.pow(2).sum(), list(model.parameters()), allow_unused=True)
        out = compiled(x, t, mask)  # [B, L, 3]
        assert (out - ref).abs().max() <= ATOL_COMPILE
        assert bool((out[mask == 0] == 0).all())
        grads = torch.autograd.grad(out.pow(2).sum(), list(model.parameters()), allow_unused=True)
        pairs = [(g, g_ref) for g, g_ref in zip(grads, ref_grads) if g_ref is not None]
        scale = max(float(g_ref.abs().max()) for _, g_ref in pairs)  # the largest gradient entry
        err = max(float((g - g_ref).abs().max()) for g, g_ref in pairs)
        assert err <= RTOL_COMPILE_GRAD * scale
