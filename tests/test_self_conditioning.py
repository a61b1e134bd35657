"""Self-conditioning (``selfConditioning``): the denoiser's x0_self input, its training forward, and sample().

- off: no new state-dict keys, the shipped weights sample exactly as before (a fixture recorded before
  the feature existed: tests/fixtures/shipped_samples.json);
- on at initialisation: the same eps as the model without it on the same weights (zero-initialised
  projections), in every mode; with the new parameters perturbed, x0_self changes eps (zeros and None
  do not); rotation equivariance / invariance and padding invariance with an estimate;
- training: the per-sample coins come after t and eps from the step's generator, the gradient reaches
  the new parameters, and the graphed step's computation (``_ShapeCall``) equals the eager one;
- sample(): deterministic under seeds, different from sampling without estimates.

Sizes: the shared tiny config (tests/conftest.py); tolerances from there, exact (0) where the same
computation runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import (
    ATOL_EQUIVARIANCE,
    ATOL_PADDING,
    DENOISER_MODES,
    pad_batch,
    random_ca_trace,
    randomize_parameters,
    tiny_config,
)

from model import build_denoiser
from model.config import Config, parse_config
from model.diffusion import Schedule, predict_x0, q_sample, sample
from model.geometry import random_rotation

MODES = {name: mode for name, mode in DENOISER_MODES.items() if name != "flash_pair_free"}
PAIR_FREE = MODES["mhc_flash_pair_free"]
LENGTHS = (23, 17, 13)  # odd, distinct: two of three chains padded
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "shipped_samples.json"
SHIPPED_ATOL = 5e-4  # Angstrom: the fixture's 5 decimals and CPU kernel numerics of other hosts (1.6e-4 seen)


def _models(overrides: dict, *, perturb_new: bool = True):
    """(off, on): the same perturbed weights; ``on`` also has the self-conditioning parts (perturbed, or
    at their initialisation)."""
    torch.manual_seed(0)
    off = randomize_parameters(build_denoiser(tiny_config(**overrides)), seed=1).eval()
    torch.manual_seed(0)
    on = build_denoiser(tiny_config(selfConditioning=True, **overrides)).eval()
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("self_condition.") for k in missing)
    if perturb_new:
        randomize_parameters(on.self_condition, seed=2)
    return off, on


def _batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x, mask = pad_batch([random_ca_trace(1, n, generator=gen)[0] for n in LENGTHS])  # [3, 23, 3], [3, 23]
    x0_self, _ = pad_batch([random_ca_trace(1, n, generator=gen)[0] for n in LENGTHS])
    return x, torch.tensor([3, 55, 98]), mask, x0_self


# ------------------------------------------------------------------------------------------- off
def test_the_key_is_off_by_default_and_round_trips():
    assert Config().selfConditioning is False
    cfg = Config().replace(selfConditioning=True)
    assert parse_config(cfg.to_text()) == cfg
    from model.training.checkpoints import ARCH_KEYS

    assert "selfConditioning" in ARCH_KEYS  # a checkpoint of the other setting cannot resume


@pytest.mark.parametrize("mode", list(MODES))
def test_only_new_keys_and_the_shared_ones_draw_the_same_init(mode):
    """Off: the model has no self-conditioning parameter (tests/test_state_dict.py pins the rest). On:
    the same keys plus ``self_condition.*``, and a seeded build draws the same values for the shared ones
    (the parts are built last)."""
    torch.manual_seed(0)
    off = build_denoiser(tiny_config(**MODES[mode])).state_dict()
    torch.manual_seed(0)
    on = build_denoiser(tiny_config(selfConditioning=True, **MODES[mode])).state_dict()
    assert not any(k.startswith("self_condition") for k in off)
    assert [k for k in on if k not in off] and all(k.startswith("self_condition.") for k in on if k not in off)
    assert all(torch.equal(on[k], v) for k, v in off.items())


@pytest.mark.parametrize("name", sorted(p.parent.name for p in WEIGHTS.glob("*/model.safetensors")))
def test_shipped_weights_load_and_sample_as_before(name):
    from model.weights_io import load_weights

    loaded = load_weights(WEIGHTS / name)
    assert not loaded.config.selfConditioning and not loaded.denoiser.self_conditioning
    got = sample(loaded.denoiser, [22, 17], [1, 2], 0.6, steps=5)
    want = json.loads(FIXTURE.read_text())[name]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, torch.tensor(w), rtol=0, atol=SHIPPED_ATOL)


def test_x0_self_is_refused_by_a_model_without_it():
    off, _ = _models(PAIR_FREE)
    x, t, mask, x0_self = _batch()
    with pytest.raises(ValueError, match="without selfConditioning"):
        off(x, t, mask, x0_self)
    _, on = _models(PAIR_FREE)
    with pytest.raises(ValueError, match=r"x0_self must be \[B, L, 3\]"):
        on(x, t, mask, x0_self[:, :5])


# -------------------------------------------------------------------------------------------- on
@pytest.mark.parametrize("mode", list(MODES))
def test_at_initialisation_the_estimate_changes_nothing(mode):
    off, on = _models(MODES[mode], perturb_new=False)
    x, t, mask, x0_self = _batch()
    with torch.no_grad():
        want = off(x, t, mask)
        for got in (on(x, t, mask), on(x, t, mask, x0_self), on(x, t, mask, torch.zeros_like(x0_self))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", list(MODES))
def test_trained_projections_make_eps_depend_on_the_estimate(mode):
    off, on = _models(MODES[mode])
    x, t, mask, x0_self = _batch()
    with torch.no_grad():
        want = off(x, t, mask)
        torch.testing.assert_close(on(x, t, mask), want, rtol=0, atol=0)  # None: no estimate
        torch.testing.assert_close(on(x, t, mask, torch.zeros_like(x0_self)), want, rtol=0, atol=0)
        with_estimate = on(x, t, mask, x0_self)
        other = on(x, t, mask, x0_self.flip(1) * mask[..., None])
    real = mask.bool()
    assert (with_estimate - want)[real].abs().max() > 1e-3
    assert (with_estimate - other)[real].abs().max() > 1e-3
    assert with_estimate[~real].abs().max() == 0  # padding stays zero
    # a sample without an estimate in a batch with one: exactly its eps without self-conditioning
    partial = x0_self.clone()
    partial[1] = 0
    with torch.no_grad():
        mixed = on(x, t, mask, partial)
    torch.testing.assert_close(mixed[1], want[1], rtol=0, atol=0)
    torch.testing.assert_close(mixed[0], with_estimate[0], rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["mhc_flash", "mhc_flash_pair_free"])
def test_rotation_equivariance_and_estimate_invariance(mode):
    """eps(R x + a, R x0 + b) = R eps(x, x0); rotating the estimate alone changes nothing (its features are
    its own distances and frames)."""
    _, on = _models(MODES[mode])
    x, t, mask, x0_self = _batch()
    rot = random_rotation(torch.Generator().manual_seed(4))
    m = mask[..., None]
    with torch.no_grad():
        ref = on(x, t, mask, x0_self)
        moved = on((x @ rot.T + torch.tensor([1.0, -2.0, 3.0])) * m, t, mask,
                   (x0_self @ rot.T + torch.tensor([-4.0, 0.5, 2.0])) * m)
        estimate_only = on(x, t, mask, (x0_self @ rot.T) * m)
    assert (moved - ref @ rot.T).abs().max() < ATOL_EQUIVARIANCE
    assert (estimate_only - ref).abs().max() < ATOL_EQUIVARIANCE


@pytest.mark.parametrize("mode", ["standard", "mhc_flash_pair_free"])
def test_padding_invariance_with_an_estimate(mode):
    _, on = _models(MODES[mode])
    x, t, mask, x0_self = _batch()
    garbage = x0_self + 50.0 * (1 - mask[..., None])  # whatever sits on padding must not matter
    with torch.no_grad():
        batched = on(x, t, mask, garbage)
        for b, n in enumerate(LENGTHS):
            alone = on(x[b:b + 1, :n], t[b:b + 1], mask[b:b + 1, :n], x0_self[b:b + 1, :n])
            assert (batched[b, :n] - alone[0]).abs().max() < ATOL_PADDING


def test_predict_x0_inverts_q_sample():
    schedule = Schedule.cosine(100)
    x, t, mask, _ = _batch()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * mask[..., None]
    x_t = q_sample(schedule, x, t, eps, mask)
    x0 = predict_x0(schedule, x_t, eps, t, mask)
    centre = (x * mask[..., None]).sum(1, keepdim=True) / mask.sum(1)[:, None, None]
    assert ((x0 - (x - centre) * mask[..., None]).abs().max()) < 1e-3
    assert x0[~mask.bool()].abs().max() == 0


# -------------------------------------------------------------------------------------- training
def _module(**kw):
    from model.training import DiffusionModule

    cfg = tiny_config(selfConditioning=True, ipaDropout=0.0, structureTransitionDropout=0.0,
                      triangularDropout=0.0, **PAIR_FREE, **kw)
    torch.manual_seed(0)
    module = DiffusionModule(cfg)
    randomize_parameters(module.denoiser, seed=1)
    return module.train()


def _train_batch():
    x, _, mask, _ = _batch()
    return {"x0": x, "mask": mask}


def test_coins_come_after_t_and_eps_from_the_steps_generator(monkeypatch):
    """With it on, t and eps are the draws of the model without it (same generator); the coins follow,
    and the same generator seed gives the same loss."""
    from model.training import self_conditioning as sc

    module, seen = _module(), {}
    real = sc.draw_keep

    def spy(batch, device, generator=None):
        seen["keep"] = real(batch, device, generator)
        seen["next"] = torch.rand(1, generator=generator)  # the stream position after the coins
        return seen["keep"]

    monkeypatch.setattr("model.training.diffusion_module.draw_keep", spy)
    a = module._loss(_train_batch(), generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    torch.randint(1, module.schedule.num_timesteps + 1, (3,), generator=g)
    torch.randn(_train_batch()["x0"].shape, generator=g)
    want_keep = (torch.rand(3, generator=g) < sc.SELF_CONDITION_RATE).float()
    assert torch.equal(seen["keep"], want_keep)
    assert seen["next"].item() == torch.rand(1, generator=g).item()
    assert a.item() == module._loss(_train_batch(), generator=torch.Generator().manual_seed(5)).item()


def test_a_training_step_reaches_the_new_parameters():
    module = _module()
    keep = torch.tensor([1.0, 0.0, 1.0])  # [B]
    x, t, mask, _ = _batch()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    x_t = q_sample(module.schedule, x, t, eps, mask)
    from model.diffusion import loss

    loss(module(x_t, t, mask, keep), eps, mask).backward()
    grads = {n: p.grad for n, p in module.denoiser.named_parameters()}
    new = {n: g for n, g in grads.items() if n.startswith("self_condition.")}
    assert new and all(g is not None and torch.isfinite(g).all() for g in new.values())
    assert all(g.abs().sum() > 0 for n, g in new.items() if n.startswith("self_condition.out_"))
    assert sum(float(g.abs().sum()) for g in new.values()) > 0
    # no coin: no gradient reaches the new parameters (the estimate is all zeros)
    module.zero_grad(set_to_none=True)
    loss(module(x_t, t, mask, torch.zeros(3)), eps, mask).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0
               for n, p in module.denoiser.named_parameters() if n.startswith("self_condition."))


def test_the_graphed_steps_computation_equals_the_eager_step(monkeypatch):
    """TrainGraphs captures ``_ShapeCall`` (CPU: not captured, run as is; then a simulated capture that
    returns the module it was given): its loss and gradients equal the eager step's for the same batch
    and coins, and the coins are a static input of the capture and part of the graph key."""
    from model.diffusion import loss
    from model.training.graphed_step import TrainGraphs, _ShapeCall

    captured = []

    def fake_capture(module, static, **kwargs):
        captured.append(len(static))
        return module

    module = _module()
    simulated = TrainGraphs(module.denoiser, schedule=module.schedule, capture_after=1)
    x, t, mask, _ = _batch()
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)) * mask[..., None]
    x_t, keep = q_sample(module.schedule, x, t, eps, mask), torch.tensor([1.0, 0.0, 1.0])
    results = []
    calls = (module, _ShapeCall(module.denoiser, module.schedule),
             TrainGraphs(module.denoiser, schedule=module.schedule), simulated)
    for call in calls:
        if call is simulated:  # as if on a GPU: every call may be graphed
            monkeypatch.setattr(TrainGraphs, "unsupported_reason", lambda self, x: None)
            monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: 0)
            monkeypatch.setattr(torch.cuda, "make_graphed_callables", fake_capture)
        module.zero_grad(set_to_none=True)
        value = loss(call(x_t, t, mask, keep), eps, mask)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in module.denoiser.parameters()]))
    for value, grads in results[1:]:
        assert value.item() == results[0][0].item()
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1], strict=True))
    assert captured == [4] and simulated.stats.captures == 1 and simulated.stats.replays == 1
    graphs = TrainGraphs(module.denoiser, schedule=module.schedule)
    assert graphs._key(x_t, t, mask) != graphs._key(x_t, t, mask, keep)
    with pytest.raises(ValueError, match="schedule"):
        _ShapeCall(module.denoiser)(x_t, t, mask, keep)


def test_lightning_training_with_self_conditioning_runs(tmp_path):
    from conftest import cgdms_data_dir

    from model.data.datamodule import ProteinDataModule
    from model.data.parse import parse_cgdms_file
    from model.training import TrainOptions, run_training

    root = cgdms_data_dir()
    if root is None:
        pytest.skip("cgdms is not installed")
    chains = [c for c in (parse_cgdms_file(f) for f in sorted(root.glob("*.txt"))[:40]) if 20 <= len(c) <= 45][:4]
    cfg = tiny_config(selfConditioning=True, **PAIR_FREE, logDirectory=str(tmp_path), name="sc", batchSize=2,
                      numEpoches=2, validationFraction=0.0, minimumNumResidues=20, maximumNumResidues=60,
                      logEverySteps=1, warmupEpoches=0)
    result = run_training(cfg, TrainOptions(progress_bar=False, accelerator="cpu", devices="1"),
                          datamodule=ProteinDataModule(cfg, chains=chains, verbose=False))
    assert result.global_step == 4
    from model.weights_io import load_weights

    loaded = load_weights(result.weights_dir)
    assert loaded.config.selfConditioning and loaded.denoiser.self_conditioning


# -------------------------------------------------------------------------------------- sampling
def test_sample_carries_the_estimate_deterministically():
    _, on = _models(PAIR_FREE)
    lengths, seeds = [22, 17], [5, 6]
    a = sample(on, lengths, seeds, 0.6, steps=8)
    b = sample(on, lengths, seeds, 0.6, steps=8)
    without = sample(on, lengths, seeds, 0.6, steps=8, self_condition=False)
    for x, y, z in zip(a, b, without, strict=True):
        assert torch.equal(x, y)
        assert (x - z).abs().max() > 1e-2
    off, _ = _models(PAIR_FREE)  # no estimate at any step: the model without self-conditioning
    for z, w in zip(without, sample(off, lengths, seeds, 0.6, steps=8), strict=True):
        assert torch.equal(z, w)


def test_the_evaluation_autocast_wrapper_passes_the_estimate_on():
    """``mhcflash evaluate`` wraps the model for bf16 autocast on CUDA: the wrapper must say it is
    self-conditioned (sample() asks) and hand x0_self through (on the CPU autocast is off: exact)."""
    import warnings

    from model.evaluation.sampling import _autocast_module

    _, on = _models(PAIR_FREE)
    wrapped = _autocast_module()(on, torch.bfloat16)
    assert wrapped.self_conditioning
    x, t, mask, x0_self = _batch()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling autocast"
        torch.testing.assert_close(wrapped(x, t, mask, x0_self), on(x, t, mask, x0_self), rtol=0, atol=0)


@pytest.mark.gpu
def test_gpu_graphed_self_conditioned_training_matches_eager():
    """Real captures (``graphTrainingStep``) of the self-conditioned step over two alternating shapes: the
    loss and every gradient equal the eager step's, with the coins as a graph input (fp32)."""
    import copy

    from model.diffusion import loss
    from model.training.graphed_step import TrainGraphs

    dev = torch.device("cuda")
    module = _module().to(dev)
    eager, graphed = module.denoiser, copy.deepcopy(module.denoiser)
    graphs = TrainGraphs(graphed, schedule=module.schedule, capture_after=2)
    gen = torch.Generator().manual_seed(7)
    for step in range(6):
        length = (24, 40)[step % 2]
        x, mask = pad_batch([random_ca_trace(1, n, generator=gen)[0] for n in (length, length - 5, length - 9)])
        t = torch.randint(1, 60, (3,), generator=gen)
        eps = torch.randn(x.shape, generator=gen) * mask[..., None]
        keep = (torch.rand(3, generator=gen) < 0.5).float()
        x_t = q_sample(module.schedule, x, t, eps, mask)
        x_t, t, mask, eps, keep = (v.to(dev) for v in (x_t, t, mask, eps, keep))
        values = []
        for call in (lambda *a: module(*a), graphs):
            value = loss(call(x_t, t, mask, keep), eps, mask)
            value.backward()
            values.append(value.detach())
        torch.testing.assert_close(values[1], values[0], rtol=1e-4, atol=1e-5)
        for pe, pg in zip(eager.parameters(), graphed.parameters(), strict=True):
            assert (pe.grad is None) == (pg.grad is None)
            if pe.grad is not None:
                torch.testing.assert_close(pg.grad, pe.grad, rtol=1e-3, atol=1e-4)
            pe.grad = pg.grad = None
    assert graphs.stats.captures == 2 and graphs.stats.replays == 4
