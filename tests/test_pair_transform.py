"""The pair transform (``model.network.pair_transform``): triangle multiplication against AF2 Algorithms 11 / 12
written out with einsum (float64, forward and gradients), padding and permutation properties of a whole
layer, and ``PairTransformNet.compile_layers`` (torch.compile) against eager.

Tolerances: float64 path vs float64 reference ATOL_F64 = 1e-10 (only summation order differs); a
whole layer ATOL_LAYER = 1e-6 (its triangle attention takes float32 logits even for float64 input);
compiled vs eager in float32 ATOL_COMPILE = 1e-4 on outputs of magnitude ~1, gradients within
RTOL_COMPILE_GRAD x the largest gradient entry (inductor reorders sums); bf16 on the GPU: fused and
unfused kernels round at different points, so compiled-bf16 and eager-bf16 are both measured against
float32 eager and the compiled error may be at most BF16_ERR_RATIO = 2 x the eager error (+ 1e-3).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_parameters
from torch.nn import functional as F

from model.network.pair_transform import (
    PairTransformLayer,
    PairTransformNet,
    TriangleMultiplication,
    linear_relu,
)

ATOL_F64 = 1e-10
ATOL_LAYER = 1e-6  # a whole layer in float64: triangle attention computes its logits in float32 by design
ATOL_COMPILE = 1e-4
RTOL_COMPILE_GRAD = 1e-3
BF16_ERR_RATIO = 2.0
C_P, C_HIDDEN = 8, 6


def reference_triangle_multiplication(mod: TriangleMultiplication, p: torch.Tensor,
                                      pair_mask: torch.Tensor) -> torch.Tensor:
    """AF2 Algorithm 11 (outgoing) / 12 (incoming) with the module's parameters, one Linear at a time."""
    def ln(norm, x):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)

    z = ln(mod.layer_norm_in, p)
    m = pair_mask[..., None]
    a = m * torch.sigmoid(mod.linear_a_g(z)) * mod.linear_a_p(z)
    b = m * torch.sigmoid(mod.linear_b_g(z)) * mod.linear_b_p(z)
    g = torch.sigmoid(mod.linear_g(z))
    equation = "bikc,bjkc->bijc" if mod.outgoing else "bkic,bkjc->bijc"
    return g * mod.linear_z(ln(mod.layer_norm_out, torch.einsum(equation, a, b)))


def padded_inputs(lengths, L, seed=0, dtype=torch.float64):
    """p [B, L, L, C_P] (junk in the padding too), pair_mask [B, L, L] with real zeros, mask [B, L]."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(len(lengths), L, L, C_P, generator=gen, dtype=dtype)
    mask = torch.zeros(len(lengths), L, dtype=dtype)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return p, mask[:, :, None] * mask[:, None, :], mask


@pytest.mark.parametrize("outgoing", [True, False])
def test_triangle_multiplication_matches_algorithm_forward_and_grad(outgoing):
    torch.manual_seed(0)
    mod = randomize_parameters(TriangleMultiplication(c_p=C_P, c_hidden=C_HIDDEN, outgoing=outgoing),
                               seed=1, scale=0.3).double()
    p, pair_mask, _ = padded_inputs((9, 6), 9)
    p.requires_grad_(True)
    out = mod(p, pair_mask)
    ref = reference_triangle_multiplication(mod, p, pair_mask)
    assert float(ref.abs().max()) > 1e-2  # not trivially zero
    assert (out - ref).abs().max() <= ATOL_F64
    w = torch.randn_like(out)
    params = [p, *mod.parameters()]
    grads = torch.autograd.grad((out * w).sum(), params)
    ref_grads = torch.autograd.grad((ref * w).sum(), params)
    for g, g_ref in zip(grads, ref_grads):
        assert (g - g_ref).abs().max() <= ATOL_F64


def test_linear_relu_matches_relu_of_linear():
    """The fused bias + ReLU GEMM (no-grad path) against torch.relu(lin(x)): float64 to ATOL_F64 (zeros of
    the ReLU present); under CPU bf16 autocast the same dtype and values as the autocast Linear + ReLU;
    with gradients on, the same values and the gradients of the reference."""
    lin = torch.nn.Linear(C_P, 3 * C_P).double()
    x = torch.randn(2, 5, 5, C_P, dtype=torch.float64)
    with torch.no_grad():
        out, ref = linear_relu(lin, x), torch.relu(lin(x))
    assert out.shape == ref.shape and bool((ref == 0).any()) and bool((ref > 0).any())
    assert (out - ref).abs().max() <= ATOL_F64
    lin32, x32 = lin.float(), x.float()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out16, ref16 = linear_relu(lin32, x32), torch.relu(lin32(x32))
    assert out16.dtype == ref16.dtype == torch.bfloat16
    assert (out16.float() - ref16.float()).abs().max() <= 1e-2 * ref16.float().abs().max()
    x.requires_grad_(True)
    lin = lin.double()
    out = linear_relu(lin, x)  # the differentiable path
    assert (out - torch.relu(lin(x))).abs().max() <= ATOL_F64
    (g,) = torch.autograd.grad(out.sum(), [x])
    assert (g - (lin(x) > 0).double() @ lin.weight).abs().max() <= ATOL_F64


def test_outgoing_and_incoming_are_transposes_of_each_other():
    """Algorithm 12 on p is Algorithm 11 on p^T, transposed back, with the a and b projections swapped:
    out^T_ji = g_ij Z(sum_k a'_jk b'_ik) and a'_jk = a(p_kj), so the roles of a and b trade places."""
    out_mod = randomize_parameters(TriangleMultiplication(c_p=C_P, c_hidden=C_HIDDEN, outgoing=True),
                                   seed=2, scale=0.3).double()
    in_mod = TriangleMultiplication(c_p=C_P, c_hidden=C_HIDDEN, outgoing=False).double()
    swap = {"linear_a_": "linear_b_", "linear_b_": "linear_a_"}
    in_mod.load_state_dict({next((k.replace(s, d) for s, d in swap.items() if k.startswith(s)), k): v
                            for k, v in out_mod.state_dict().items()})
    p, pair_mask, _ = padded_inputs((7, 5), 7, seed=3)
    via_transpose = out_mod(p.transpose(1, 2), pair_mask.transpose(1, 2)).transpose(1, 2)
    assert (in_mod(p, pair_mask) - via_transpose).abs().max() <= ATOL_F64


def _layer(seed=0):
    layer = PairTransformLayer(c_p=C_P, include_mul_update=True, include_tri_att=True, c_hidden_mul=C_HIDDEN,
                               c_hidden_att=5, num_heads_att=2, dropout=0.25, transition_n=2)
    return randomize_parameters(layer, seed=seed, scale=0.3).double().eval()


def test_layer_ignores_padding_and_zeroes_padded_pairs():
    """A chain padded with junk gives, on its real pairs, exactly what it gives alone; padded pairs are 0."""
    layer = _layer()
    p, pair_mask, _ = padded_inputs((10, 6), 10, seed=4)
    out = layer(p, pair_mask)  # [2, 10, 10, C_P]
    alone = layer(p[1:, :6, :6], pair_mask[1:, :6, :6])
    assert (out[1, :6, :6] - alone[0]).abs().max() <= ATOL_LAYER
    assert bool((out[1, 6:] == 0).all()) and bool((out[1, :, 6:] == 0).all())
    assert float(out[1, :6, :6].abs().max()) > 1e-2


def test_layer_is_permutation_equivariant():
    """Relabelling residues (p_ij -> p_pi(i)pi(j)) relabels the output the same way."""
    layer = _layer(seed=5)
    p, pair_mask, _ = padded_inputs((8,), 8, seed=6)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    out = layer(p, pair_mask)
    out_perm = layer(p[:, perm][:, :, perm], pair_mask[:, perm][:, :, perm])
    assert (out_perm - out[:, perm][:, :, perm]).abs().max() <= ATOL_LAYER


def _net(num_layers=2, seed=0):
    net = PairTransformNet(c_p=C_P, num_layers=num_layers, include_mul_update=True, include_tri_att=False,
                           c_hidden_mul=C_HIDDEN, c_hidden_att=5, num_heads_att=2, dropout=0.0, transition_n=2)
    return randomize_parameters(net, seed=seed, scale=0.3)


@pytest.mark.slow
def test_compiled_layers_match_eager_forward_and_grad():
    """compile_layers (inductor, C++ on the CPU) vs eager in float32, on two shapes (the second
    recompiles with dynamic shapes), with parameter gradients."""
    eager = _net()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers()
    for lengths, L in (((9, 6), 9), ((11, 8, 5), 11)):
        p, _, mask = padded_inputs(lengths, L, seed=L, dtype=torch.float32)
        ref = eager(p, mask)
        out = compiled(p, mask)
        assert float(ref.abs().max()) > 1e-1
        assert (out - ref).abs().max() <= ATOL_COMPILE
        w = torch.randn_like(ref)
        ref_grads = torch.autograd.grad((ref * w).sum(), list(eager.parameters()))
        grads = torch.autograd.grad((out * w).sum(), list(compiled.parameters()))
        scale = max(float(g.abs().max()) for g in ref_grads)
        assert max(float((g - g_ref).abs().max()) for g, g_ref in zip(grads, ref_grads)) <= RTOL_COMPILE_GRAD * scale
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # saving is unchanged


@pytest.mark.gpu
def test_gpu_compiled_layers_are_as_accurate_as_eager_in_bf16():
    """Under bf16 autocast, compiled and eager round at different points, so both are compared with
    the float32 eager stack: the compiled error may be at most BF16_ERR_RATIO x eager's (+ 1e-3)."""
    device = torch.device("cuda")
    eager = _net(num_layers=3).to(device).eval()
    compiled = copy.deepcopy(eager)
    compiled.compile_layers(dynamic=True)
    for lengths, L in (((64, 40), 64), ((96, 50, 17), 96)):
        p, _, mask = padded_inputs(lengths, L, seed=L, dtype=torch.float32)
        p, mask = p.to(device), mask.to(device)
        with torch.no_grad():
            ref = eager(p, mask)  # float32
            with torch.autocast("cuda", dtype=torch.bfloat16):
                e16, c16 = eager(p, mask), compiled(p, mask)
        scale = ref.abs().max()
        err_eager, err_compiled = float((e16 - ref).abs().max() / scale), float((c16 - ref).abs().max() / scale)
        assert err_compiled <= BF16_ERR_RATIO * err_eager + 1e-3, (err_compiled, err_eager)
        assert bool((c16[-1, lengths[-1]:] == 0).all())
