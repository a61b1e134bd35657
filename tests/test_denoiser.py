"""The composed denoiser (model.network.denoiser, model.build_denoiser, model.mhc_flash_denoiser), all modes.

Property tests on tiny configs (dropout off via eval(), parameters perturbed away from the zero
"final" init so outputs are not trivially zero):
- rotation equivariance: eps_hat(R x + t) == R eps_hat(x), absolute max error < ATOL_EQUIVARIANCE (fp32);
- padding invariance and per-sample timesteps: a padded batch equals each chain run alone;
- gradient checkpointing: same loss and gradients with and without;
- Genie-default parameter count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import (
    ATOL_EQUIVARIANCE,
    ATOL_GRAD,
    ATOL_PADDING,
    DENOISER_MODES,
    pad_batch,
    random_ca_trace,
    randomize_parameters,
    tiny_config,
)

from model import build_denoiser
from model.config import Config
from model.geometry import random_rotation
from model.mhc_flash_denoiser import mHCFlashDenoiser
from model.network.denoiser import Denoiser

MODES = DENOISER_MODES
LENGTHS = (23, 17, 13)  # odd, distinct: padding exercised for two of three chains


def _model(overrides: dict, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_denoiser(tiny_config(**overrides))
    return randomize_parameters(model, seed=seed, scale=0.1).eval()


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    chains = [random_ca_trace(1, n, generator=gen)[0] for n in LENGTHS]
    x, mask = pad_batch(chains)
    t = torch.tensor([3, 55, 98])
    return chains, x, t, mask


@pytest.mark.parametrize("overrides", list(MODES.values()), ids=list(MODES))
def test_rotation_equivariance(overrides):
    model = _model(overrides)
    _, x, t, mask = _batch()
    gen = torch.Generator().manual_seed(5)
    rot, shift = random_rotation(gen), torch.randn(3, generator=gen) * 3
    with torch.no_grad():
        eps = model(x, t, mask)
        eps_moved = model((x @ rot.T + shift) * mask[..., None], t, mask)
    real = mask.bool()
    assert eps[real].abs().max() > 0.05, "outputs too small for the test to mean anything"
    err = (eps_moved - eps @ rot.T)[real].abs().max().item()
    assert err < ATOL_EQUIVARIANCE, f"equivariance error {err:.2e}"
    assert torch.equal(eps[~real], torch.zeros_like(eps[~real]))  # zero on padding


@pytest.mark.parametrize("overrides", list(MODES.values()), ids=list(MODES))
def test_padding_invariance_and_per_sample_timesteps(overrides):
    model = _model(overrides)
    chains, x, t, mask = _batch()
    garbage = x + (1 - mask)[..., None] * 50.0  # padded coordinates must not matter either
    with torch.no_grad():
        batched = model(garbage, t, mask)
        for i, chain in enumerate(chains):
            alone = model(chain[None], t[i : i + 1], torch.ones(1, chain.shape[0]))
            err = (alone[0] - batched[i, : chain.shape[0]]).abs().max().item()
            assert err < ATOL_PADDING, f"chain {i}: padded vs unpadded differ by {err:.2e}"
        # timesteps really are per sample: a different t changes that sample only
        t2 = t.clone()
        t2[0] = 80
        other = model(garbage, t2, mask)
    assert (other[0] - batched[0]).abs().max() > 1e-3
    assert torch.equal(other[1:], batched[1:])


def test_real_chains_equivariance_and_padding(real_ca_chains):
    """The same properties on real CA traces (cgdms), every available mode."""
    x, mask = pad_batch(real_ca_chains)
    t = torch.arange(1, len(real_ca_chains) + 1) * 20
    gen = torch.Generator().manual_seed(9)
    rot = random_rotation(gen)
    for overrides in MODES.values():
        model = _model(overrides)
        with torch.no_grad():
            eps = model(x, t, mask)
            eps_rot = model(x @ rot.T, t, mask)
            alone = model(real_ca_chains[0][None], t[:1], torch.ones(1, real_ca_chains[0].shape[0]))
        real = mask.bool()
        assert (eps_rot - eps @ rot.T)[real].abs().max() < ATOL_EQUIVARIANCE, overrides
        assert (alone[0] - eps[0, : real_ca_chains[0].shape[0]]).abs().max() < ATOL_PADDING, overrides


@pytest.mark.parametrize("overrides", list(MODES.values())[:4], ids=list(MODES)[:4])
def test_few_training_steps_reduce_loss_on_real_chains(overrides, real_ca_chains):
    """Genie's loss on one fixed noisy batch of two real chains drops by >= 15% in 12 Adam steps."""
    x0, mask = pad_batch(real_ca_chains[:2])
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=gen) * mask[..., None]
    x_t = 0.8 * x0 + 0.6 * eps  # one fixed forward-noising step (sqrt(a_bar) = 0.8)
    t = torch.tensor([30, 50])
    torch.manual_seed(0)
    model = build_denoiser(tiny_config(ipaDropout=0.0, structureTransitionDropout=0.0,
                                       triangularDropout=0.0, **overrides)).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss = ((model(x_t, t, mask) - eps).norm(dim=-1) * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < 0.85 * losses[0], losses


@pytest.mark.parametrize("overrides", [MODES["standard"], MODES["mhc"], MODES["mhc_flash"]],
                         ids=["standard", "mhc", "mhc_flash"])
def test_gradient_checkpointing_gives_equal_gradients(overrides):
    _, x, t, mask = _batch()
    grads, losses = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_denoiser(tiny_config(useGradientCheckpointing=ckpt, triangularDropout=0.0,
                                           ipaDropout=0.0, structureTransitionDropout=0.0, **overrides))
        randomize_parameters(model, seed=0, scale=0.1).train()
        assert model.checkpointing is ckpt
        loss = (model(x, t, mask) - x).norm(dim=-1).mul(mask).sum() / mask.sum()
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(losses[0], losses[1])
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    worst = max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0])
    assert worst < ATOL_GRAD, worst
    # the pair transform's and the first structure layer's weights do receive gradient
    assert any(n.startswith("structure_layers.0.") and g.abs().sum() > 0 for n, g in grads[0].items())


def test_gradient_checkpointing_with_dropout_in_training_mode():
    """Dropout masks are replayed in the recomputation (RNG state preserved)."""
    _, x, t, mask = _batch()
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_denoiser(tiny_config(useGradientCheckpointing=ckpt))
        randomize_parameters(model, seed=0, scale=0.1).train()
        torch.manual_seed(123)
        model(x, t, mask).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert (grads[0] - grads[1]).abs().max() < ATOL_GRAD


def test_build_denoiser_modes_and_mhc_flash_name():
    for overrides, mode in (({}, "standard"), ({"useMHCMode": True}, "mhc")):
        model = build_denoiser(tiny_config(**overrides))
        assert type(model) is Denoiser and model.config.mode == mode
    model = build_denoiser(tiny_config(useMHCMode=True, useFlashMode=True))
    assert isinstance(model, mHCFlashDenoiser) and model.config.mode == "mhc_flash"
    forced = mHCFlashDenoiser(tiny_config())
    assert forced.config.useMHCMode and forced.config.useFlashMode
    mhc_model = build_denoiser(tiny_config(useMHCMode=True))
    from model.mhc import MHCResidual

    assert all(isinstance(layer.residual, MHCResidual) for layer in mhc_model.structure_layers)


def test_denoiser_input_validation():
    model = build_denoiser(tiny_config()).eval()
    x = torch.zeros(2, 7, 3)
    with pytest.raises(ValueError, match="one timestep per sample"):
        model(x, torch.tensor([1]), torch.ones(2, 7))
    with pytest.raises(ValueError, match="mask"):
        model(x, torch.tensor([1, 2]), torch.ones(2, 6))
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(0, 7, 3), torch.zeros(0, dtype=torch.long), torch.ones(0, 7))
    out = model(x, torch.tensor([1, 2]), torch.ones(2, 7, dtype=torch.bool))  # bool mask accepted
    assert out.shape == (2, 7, 3)


def test_parameter_count_at_genie_defaults():
    """Genie: 4.09M total, pair transform 1.66M, structure 2.36M (Genie's default widths). Exact counts pinned."""
    model = build_denoiser(Config())
    count = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    total = sum(p.numel() for p in model.parameters())
    assert count["pair_transform_net"] == 1_655_680  # == Genie's (1.66M)
    # Genie's 2,357,270 + LayerNorm before each backbone update (5 * 2 * 128)
    assert count["structure_layers"] == 2_358_550
    # Genie's 41,600 + 38 * 128 for the 39 template distance bins (Genie: one raw distance channel)
    assert count["pair_feature_net"] == 46_592
    assert count["single_feature_net"] == 32_896
    assert total == 4_093_718 and abs(total / 4.09e6 - 1) < 0.005


@pytest.mark.parametrize("overrides", list(MODES.values()), ids=list(MODES))
def test_bf16_autocast_runs_and_stays_close(overrides):
    """Under CPU bf16 autocast the geometry stays fp32: eps_hat within 5% (of its max) of fp32."""
    model = _model(overrides)
    _, x, t, mask = _batch()
    with torch.no_grad():
        ref = model(x, t, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t, mask)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 0.05, rel


def test_only_the_builder_reads_config():
    """The layers of model/ipa, model/mhc and model/network take plain keyword arguments: no module
    there but model/network/builder.py reads a config key (``config.someKey``) or imports model.config."""
    root = Path(__file__).resolve().parents[1] / "model"
    readers = []
    for path in sorted([*root.glob("ipa/**/*.py"), *root.glob("mhc/**/*.py"), *root.glob("network/*.py")]):
        if path.name == "builder.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            reads_key = (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                         and node.value.id in ("config", "cfg") and node.attr[:1].islower())
            imports_config = isinstance(node, ast.ImportFrom) and node.module == "model.config"
            if reads_key or imports_config:
                readers.append(f"{path.relative_to(root.parent)}:{node.lineno}")
    assert not readers, readers
