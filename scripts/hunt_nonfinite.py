"""Find where a non-finite training step comes from: train until the first step whose loss or gradient
is not finite, keep that step's exact inputs, then replay them through the model's variants.

    python scripts/hunt_nonfinite.py configs/ship_pairfree.txt --chains .gpu_data/chains.npz \
        --max-residues 8192 --graph --minutes 6 --out OUT [--state DIR]

``--state DIR`` starts from a train_stretch.py checkpoint (its last.ckpt.part* files) instead of step 0.

Phase 1 trains with ``nanPolicy skip`` and checks every step (one host sync per step); at the first bad
step it writes ``OUT/nonfinite_step.pt``: the denoiser's weights before that step (a bad step is never
applied), the batch (x0, mask), the timesteps and the noise. ``--replay FILE`` skips phase 1.
Phase 2 runs forward + backward on those inputs eagerly under bf16 autocast and in float32, with the
fused kernels and with the references, three times each, and reports per variant: loss, gradient
norm, the first module whose output is not finite, the first parameters with non-finite gradients,
and which samples of the batch carry the non-finite values. ``OUT/replay.json`` has it all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_chains import unpack

from model import build_denoiser, training
from model.config import load_config_with_overrides, parse_config
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as genie_loss


class _Recorder:
    """Keeps the last training step's inputs (references only)."""

    last: dict | None = None


def _recording_loss(self, batch, generator=None):
    x0, mask = batch["x0"].float(), batch["mask"].float()
    B, T = x0.shape[0], self.schedule.num_timesteps
    t = torch.randint(1, T + 1, (B,), device=x0.device, generator=generator)
    eps = torch.randn(x0.shape, device=x0.device, generator=generator) * mask.unsqueeze(-1)
    if self.training:
        _Recorder.last = {"x0": x0, "mask": mask, "t": t, "eps": eps}
    x_t = q_sample(self.schedule, x0, t, eps, mask)
    return genie_loss(self(x_t, t, mask), eps, mask)


class CatchFirstNonfinite(pl.Callback):
    def __init__(self, out: Path):
        self.out, self.found, self.steps = out, None, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.steps = trainer.global_step
        if module._nonfinite is None or int(module._nonfinite.item()) == 0:
            return
        rec = _Recorder.last
        dump = {k: v.detach().cpu() for k, v in rec.items()}
        dump["state_dict"] = {k: v.detach().cpu() for k, v in module.denoiser.state_dict().items()}
        dump["config"] = module.config.to_text()
        dump["step"] = trainer.global_step - 1
        dump["grad_norm"] = float(module._grad_norm)
        torch.save(dump, self.out / "nonfinite_step.pt")
        self.found = dump["step"]
        print(f"first non-finite step {self.found}: grad norm {dump['grad_norm']}, lengths "
              f"{rec['mask'].sum(1).int().tolist()}, t {rec['t'].tolist()}", flush=True)
        trainer.should_stop = True


@contextlib.contextmanager
def reference_mhc(den: torch.nn.Module, on: bool):
    """on: every mHC residual of ``den`` on the PyTorch reference (its ``fused=None`` policy finds the
    fused kernels unavailable); restored after."""
    from model.mhc.kernels import pre

    available = pre.available
    if on:
        pre.available = lambda *a, **k: False
    try:
        yield
    finally:
        pre.available = available


def _anomaly(den, dump) -> str:
    """The backward op that first produced a non-finite value (bf16), with its forward traceback."""
    import warnings

    with warnings.catch_warnings(record=True) as caught, torch.autograd.detect_anomaly(check_nan=True):
        warnings.simplefilter("always")
        try:
            _step(den, dump, "bf16")
            return "no anomaly"
        except RuntimeError as e:
            return str(e) + "\n" + "\n".join(str(w.message) for w in caught if "Traceback" in str(w.message))


@contextlib.contextmanager
def _forced_backend(den: torch.nn.Module, name: str | None):
    from model.ipa import flash as flash_ipa
    from model.ipa.backends import BackendChoice

    saved = flash_ipa.resolve_backend
    layers = [m for m in den.modules() if hasattr(m, "_choices")]
    if name is not None:
        flash_ipa.resolve_backend = lambda *a, **k: BackendChoice(name, None, "forced")
    for m in layers:
        m._choices = {}
    try:
        yield
    finally:
        flash_ipa.resolve_backend = saved
        for m in layers:
            m._choices = {}


def _step(den, dump, dtype, call=None, backend=None):
    with _forced_backend(den, backend):
        return _step_inner(den, dump, dtype, call)


def _step_inner(den, dump, dtype, call=None):
    """One forward + backward (``call`` replaces ``den``'s forward, e.g. a TrainGraphs): what is
    non-finite, where."""
    dev = next(den.parameters()).device
    x0, mask, t, eps = (dump[k].to(dev) for k in ("x0", "mask", "t", "eps"))
    schedule = Schedule.from_config(parse_config(dump["config"]))
    bad_modules: list[str] = []
    hooks = []
    for name, m in den.named_modules():
        def hook(mod, args, out, name=name):
            outs = out if isinstance(out, (tuple, list)) else (out,)
            for o in outs:
                if torch.is_tensor(o) and o.is_floating_point() and not torch.isfinite(o).all():
                    bad_modules.append(name)
                    break
        hooks.append(m.register_forward_hook(hook))
    den.zero_grad(set_to_none=True)
    x_t = q_sample(schedule, x0, t, eps, mask)
    ctx = torch.autocast(dev.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with ctx:
        eps_hat = (call or den)(x_t, t, mask)
    per_sample = ((eps_hat.float() - eps) ** 2).sum(-1).add(1e-10).sqrt().mul(mask).sum(1)  # [B]
    loss = genie_loss(eps_hat, eps, mask)
    loss.backward()
    for h in hooks:
        h.remove()
    bad_params = [n for n, p in den.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    grads = [p.grad.float().norm() for p in den.parameters() if p.grad is not None]
    gnorm = torch.stack(grads).norm().item() if grads else float("nan")
    return {"loss": loss.item(), "grad_norm": gnorm, "first_bad_modules": bad_modules[:6],
            "bad_params": bad_params[:8], "n_bad_params": len(bad_params),
            "nonfinite_eps_hat_samples": (~torch.isfinite(eps_hat.float()).all(-1).all(-1)).nonzero().flatten().tolist(),
            "nonfinite_per_sample_loss": (~torch.isfinite(per_sample)).nonzero().flatten().tolist()}


def replay(path: Path, out: Path) -> dict:
    dump = torch.load(path, weights_only=False)
    cfg = parse_config(dump["config"])
    den = build_denoiser(cfg).to("cuda" if torch.cuda.is_available() else "cpu").train()
    den.load_state_dict(dump["state_dict"])
    mask, t, x0 = dump["mask"], dump["t"], dump["x0"]
    lengths = mask.sum(1).int()
    gaps = (x0[:, 1:] - x0[:, :-1]).norm(dim=-1) * (mask[:, 1:] * mask[:, :-1])
    info = {"step": dump.get("step"), "grad_norm_in_training": dump.get("grad_norm"),
            "batch": list(mask.shape), "lengths": lengths.tolist(), "t": t.tolist(),
            "max_ca_gap": gaps.max(1).values.tolist(),
            "min_ca_gap": torch.where(gaps > 0, gaps, torch.full_like(gaps, 99)).min(1).values.tolist()}
    results = {}
    for dtype in ("bf16", "fp32"):
        for fused in (True, False):
            key = f"{dtype}_{'fused' if fused else 'reference'}"
            runs = []
            with reference_mhc(den, on=not fused):
                for _ in range(3):
                    runs.append(_step(den, dump, dtype))
            results[key] = runs
            print(key, [(r["loss"], r["grad_norm"], r["first_bad_modules"][:2], r["bad_params"][:2]) for r in runs],
                  flush=True)
    if torch.cuda.is_available():  # the training path: forward + backward replayed from CUDA graphs
        from model.training.graphed_step import TrainGraphs

        graphs = TrainGraphs(den, capture_after=1)
        results["bf16_graphed"] = [_step(den, dump, "bf16", call=graphs) for _ in range(4)]
        print("bf16_graphed", [(r["loss"], r["grad_norm"]) for r in results["bf16_graphed"]], flush=True)
    info["variants"] = results
    info["attention_backends_bf16"] = {}
    for name in ("sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "math"):
        try:
            info["attention_backends_bf16"][name] = _step(den, dump, "bf16", backend=name)
        except RuntimeError as e:  # a kernel that does not take these widths / this device
            info["attention_backends_bf16"][name] = {"loss": None, "grad_norm": None, "error": str(e)[:200]}
    print("attention backends (bf16):", {k: (v["loss"], v["grad_norm"]) for k, v in info["attention_backends_bf16"].items()},
          flush=True)
    info["anomaly_bf16"] = _anomaly(den, dump)
    print("anomaly (bf16):", info["anomaly_bf16"][:3000], flush=True)
    (out / "replay.json").write_text(json.dumps(info, indent=1))
    return info


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--chains")
    ap.add_argument("--minutes", type=float, default=6.0)
    ap.add_argument("--max-residues", type=int, default=None)
    ap.add_argument("--graph", action="store_true")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--replay", type=Path, default=None, help="skip training: replay this dump")
    ap.add_argument("--state", type=Path, default=None,
                    help="start from this folder's last.ckpt.part* (a train_stretch.py checkpoint) instead of step 0")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.replay is None:
        from model.data.datamodule import ProteinDataModule

        cfg = load_config_with_overrides(Path(args.config), [*args.overrides, "nanPolicy=skip"])
        if args.graph:
            cfg = cfg.replace(graphTrainingStep=True)
        cfg = cfg.replace(name=cfg.name + "_hunt")
        if args.state is not None:
            from train_stretch import join_parts

            last = Path(cfg.logDirectory) / cfg.name / "checkpoints" / "last.ckpt"
            last.parent.mkdir(parents=True, exist_ok=True)
            print(f"start: {'from the parts in ' + str(args.state) if join_parts(args.state, last) else 'step 0'}")
        training.DiffusionModule._loss = _recording_loss
        dm = ProteinDataModule(cfg, chains=unpack(args.chains), max_residues_per_batch=args.max_residues,
                               pad_to_multiple=training.batch_length_multiple(cfg, otherwise=8))
        catch = CatchFirstNonfinite(args.out)
        t0 = time.time()
        training.run_training(cfg, training.TrainOptions(accelerator="gpu", devices="1", max_minutes=args.minutes,
                                                         progress_bar=False, export_weights=False),
                              datamodule=dm, callbacks=[catch])
        print(json.dumps({"steps": catch.steps, "first_nonfinite": catch.found, "wall_s": time.time() - t0}),
              flush=True)
        if catch.found is None:
            return
        args.replay = args.out / "nonfinite_step.pt"
    replay(args.replay, args.out)


if __name__ == "__main__":
    main()
