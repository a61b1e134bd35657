"""``compileModel True``: ``model.network.compile.compile_denoiser`` compiles the pair-transform layers in place.

The numerics of the compiled layers against eager (forward, gradients, a second shape with dynamic
shapes) are tested in tests/test_pair_transform.py (CPU, slow) and on the GPU in bf16.
"""

from __future__ import annotations

import torch
from conftest import tiny_config, tiny_pair_free_denoiser

from model import build_denoiser
from model.network.compile import compile_denoiser
from model.training import DiffusionModule


def _compiled_layers(denoiser) -> list[bool]:
    return [layer._compiled_call_impl is not None for layer in denoiser.pair_transform_net.layers]


def test_compile_denoiser_compiles_pair_layers_in_place_and_keeps_state_names():
    model = build_denoiser(tiny_config(numPairTransformLayers=2))
    names = list(model.state_dict())
    assert _compiled_layers(model) == [False, False]
    assert compile_denoiser(model) is model
    assert _compiled_layers(model) == [True, True]
    assert list(model.state_dict()) == names  # checkpoints and weights files are unchanged


def test_compile_denoiser_leaves_a_pair_free_model_unchanged():
    model = build_denoiser(tiny_config(useFlashMode=True, usePairFree=True))
    assert model.pair_transform_net is None
    assert compile_denoiser(model) is model


def test_training_module_compiles_when_compile_model_is_set():
    assert _compiled_layers(DiffusionModule(tiny_config(compileModel=True)).denoiser) == [True]
    assert _compiled_layers(DiffusionModule(tiny_config()).denoiser) == [False]


def test_point_rotation_elementwise_equals_the_matmul_reference():
    """model.geometry.rotate_points_elementwise (what compile_denoiser compiles into Flash-IPA) is the
    reference batched matmul, forward and gradients, both directions; float64, real rotations."""
    from model.geometry import random_rotation, rotate_points, rotate_points_elementwise

    g = torch.Generator().manual_seed(0)
    rots = torch.stack([random_rotation(g, dtype=torch.float64) for _ in range(10)]).view(2, 5, 3, 3)
    rots.requires_grad_(True)  # [2, 5, 3, 3]
    pts = torch.randn(2, 5, 7, 3, generator=g, dtype=torch.float64, requires_grad=True)  # [2, 5, 7, 3]
    for inverse in (False, True):
        ref = rotate_points(pts, rots, inverse=inverse)
        out = rotate_points_elementwise(pts, rots, inverse=inverse)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        # R p for each row (inverse: R^T p), written out per point
        want = torch.einsum("blij,blmj->blmi", rots.transpose(-1, -2) if inverse else rots, pts)
        torch.testing.assert_close(ref, want, rtol=0, atol=1e-12)
        w = torch.randn(ref.shape, generator=g, dtype=torch.float64)
        ga = torch.autograd.grad((ref * w).sum(), (pts, rots))
        gb = torch.autograd.grad((out * w).sum(), (pts, rots))
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-12)


def _tiny_pair_free(extra_keys: str = ""):
    """A small pair-free mHC + Flash-IPA denoiser with non-zero final layers (so the IPA output reaches
    eps_hat), and inputs x [2, 11, 3], t [2], mask [2, 11] whose second chain has 3 padded residues."""
    den = tiny_pair_free_denoiser(extra_keys)
    x = torch.randn(2, 11, 3) * 5
    t = torch.tensor([3, 17])
    mask = torch.ones(2, 11)
    mask[1, 8:] = 0
    return den, x, t, mask


def test_compile_denoiser_fuses_flash_ipa_point_rotations_and_uncompile_restores_them():
    """A pair-free model has no pair stack: compile_denoiser compiles its point rotations (inductor on
    CPU here), the output matches the eager model, and uncompile_denoiser puts the reference back."""
    from model.geometry import rotate_points
    from model.network.compile import compiled_parts, uncompile_denoiser

    den, x, t, mask = _tiny_pair_free()
    den.eval()
    with torch.no_grad():
        ref = den(x, t, mask)
        assert compiled_parts(den) == []
        compile_denoiser(den)
        assert compiled_parts(den) == ["point_rotations"]
        out = den(x, t, mask)
        uncompile_denoiser(den)
        assert compiled_parts(den) == []
        assert all(m.rotate is rotate_points for m in den.modules() if hasattr(m, "rotate"))
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_compiled_point_rotations_train_like_eager_with_checkpointing():
    """compileModel True in training: the compiled rotations inside gradient-checkpointed structure
    layers give the eager forward and parameter gradients (float32, CPU inductor)."""
    den, x, t, mask = _tiny_pair_free("useGradientCheckpointing True\nipaDropout 0.0\nstructureTransitionDropout 0.0\n")
    den.train()
    params = [p for p in den.parameters() if p.requires_grad]

    def run():
        out = den(x, t, mask)
        return out.detach(), torch.autograd.grad(out.square().sum(), params, allow_unused=True)

    ref, ref_grads = run()
    compile_denoiser(den)
    out, grads = run()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    scale = max(g.abs().max() for g in ref_grads if g is not None)
    assert scale > 1.0
    for a, b in zip(grads, ref_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(scale))
