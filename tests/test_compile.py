"""``compileModel True``: ``model.denoiser.compile_denoiser`` compiles the pair-transform layers in place.

The numerics of the compiled layers against eager (forward, gradients, a second shape with dynamic
shapes) are tested in tests/test_pair_transform.py (CPU, slow) and on the GPU in bf16.
"""

from __future__ import annotations

from conftest import tiny_config

from model import build_denoiser
from model.denoiser import compile_denoiser
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
