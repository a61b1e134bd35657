"""The LightningModule of training: Genie's noise-prediction objective around ``model.build_denoiser``.

Source: Genie (aqlaboratory/genie ``genie/diffusion/diffusion.py``: random timestep per sample, forward
noising, loss on the predicted noise, Adam at ``learningRate``).

NOTE: AdamW with a linear warm-up over ``warmupEpoches`` (converted to optimizer steps with the
    dataloader length) and gradient-norm clipping at ``gradientClipVal``; Genie has neither.
NOTE: with ``selfConditioning`` each sample's coin (``model.training.self_conditioning``) is drawn
    after its timestep and noise from the same generator, and the forward runs a no-grad pass first.
NOTE: a checkpoint carries the config text and is checked against the model before it loads
    (``checkpoints``); one of the Flash-IPA layout before the fused projections cannot resume.

Non-finite steps are skipped without a host sync: the gradient norm (computed anyway for clipping)
feeds the fused AdamW's ``found_inf`` flag (the mechanism ``torch.amp.GradScaler`` uses), so a step
with a NaN/Inf loss or gradient leaves weights and optimizer state untouched. The host reads the
non-finite counter only every ``NAN_CHECK_EVERY_CUDA`` steps on GPU (every step on CPU, where a
read is free) and at log intervals; other scalars are read once per ``logEverySteps``. With
``nanPolicy stop`` the module writes ``last.ckpt`` and asks the trainer to stop (``stops``).

Symbols: B batch, L residues, T timesteps.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from model.config import Config
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as genie_loss
from model.ipa.flash import has_legacy_layout
from model.training.checkpoints import CONFIG_KEY, CheckpointMismatchError, check_checkpoint
from model.training.self_conditioning import draw_keep, self_conditioned_eps
from model.training.stops import NAN_KNOBS, FaultInjection, knob_text

__all__ = ["NAN_CHECK_EVERY_CUDA", "DiffusionModule"]

NAN_CHECK_EVERY_CUDA = 25  # host reads of the non-finite counter on GPU (steps); CPU: every step


class DiffusionModule(pl.LightningModule):
    """Genie's objective around ``model.build_denoiser(config)``.

    Batches are dicts with ``x0`` [B, L, 3] (centred CA) and ``mask`` [B, L] (``model.data``).
    """

    def __init__(self, config: Config, *, fault: FaultInjection | None = None):
        super().__init__()
        from model import build_denoiser

        self.config = config
        self.denoiser = build_denoiser(config)
        if config.compileModel:  # in place: parameter names, checkpoints and DDP see the same module tree
            from model.network.compile import compile_denoiser

            compile_denoiser(self.denoiser)
        self.schedule = Schedule.from_config(config)
        self.train_graphs = None
        if config.graphTrainingStep:  # GPU only; calls it cannot graph run eagerly (graphed_step.py)
            from model.training.graphed_step import TrainGraphs

            self.train_graphs = TrainGraphs(self.denoiser, schedule=self.schedule)
        self.fault = fault
        self.stop_reason: str | None = None
        self.stop_checkpoint: Path | None = None
        self.checkpoint_dir: Path | None = None  # set by run_training / build_trainer
        self._nonfinite = None  # device counter of skipped (non-finite) steps
        # device copies of the step index and of the first non-finite step's (-1: none): no host sync per step
        self._step_index = None
        self._first_nonfinite = None
        self._grad_norm = None
        self._last_loss = None  # device scalar; read (host sync) only at log intervals
        self.progress_metrics: dict[str, float] = {}  # what IntervalProgressBar shows, refreshed at log intervals
        self._residues = None
        self._samples = 0
        self._t_last = None

    # -- forward -----------------------------------------------------------------------------------
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor,
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L, 3], [B], [B, L] -> eps_hat [B, L, 3]; ``keep`` [B]: self-conditioned, with these
        samples' estimates (``model.training.self_conditioning``)."""
        if self.train_graphs is not None and self.training and torch.is_grad_enabled():
            return self.train_graphs(x_t, t, mask, keep)
        if keep is not None:
            return self_conditioned_eps(self.denoiser, self.schedule, x_t, t, mask, keep)
        return self.denoiser(x_t, t, mask)

    def _loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, mask = batch["x0"].float(), batch["mask"].float()  # [B, L, 3], [B, L]
        B = x0.shape[0]
        T = self.schedule.num_timesteps
        t = torch.randint(1, T + 1, (B,), device=x0.device, generator=generator)  # [B]
        eps = torch.randn(x0.shape, device=x0.device, generator=generator) * mask.unsqueeze(-1)  # [B, L, 3]
        x_t = q_sample(self.schedule, x0, t, eps, mask)
        keep = draw_keep(B, x0.device, generator) if self.config.selfConditioning else None  # [B]
        return genie_loss(self(x_t, t, mask, keep), eps, mask)

    # -- training ----------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        fault = self.fault
        if fault is not None and fault.kind == "oom" and self.global_step == fault.step and self.stop_reason is None:
            raise torch.cuda.OutOfMemoryError(
                f"CUDA out of memory (injected at step {self.global_step} by --inject-fault)")
        value = self._loss(batch)
        if self.fault is not None and self.fault.kind == "nan" and self.global_step == self.fault.step:
            value = value * float("nan")
        mask = batch["mask"]
        B = mask.shape[0]
        residues = mask.detach().sum()
        self._residues = residues if self._residues is None else self._residues + residues
        self._samples += B
        # NOTE: not prog_bar=True: Lightning turns progress-bar values into Python numbers after every batch
        # (a host sync per step, measured at ~2 ms of a ~19 ms step on the H100); IntervalProgressBar shows the
        # loss read at log intervals instead
        self.log("train/loss", value, on_step=True, on_epoch=True, batch_size=B)
        self._last_loss = value.detach()
        return value

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # Fixed timesteps and noise per batch index, so validation curves are comparable.
        gen = torch.Generator(device=batch["x0"].device).manual_seed(self.config.seed * 7919 + batch_idx)
        value = self._loss(batch, generator=gen)
        self.log("val/loss", value, on_epoch=True, prog_bar=True, batch_size=batch["mask"].shape[0],
                 sync_dist=True)
        return value

    def configure_optimizers(self):
        fused = all(p.device.type in ("cuda", "cpu") and p.dtype == torch.float32 for p in self.parameters())
        opt = torch.optim.AdamW(self.parameters(), lr=self.config.learningRate, fused=fused)
        warmup_steps = self.config.warmupEpoches * self._steps_per_epoch()

        def ramp(step: int) -> float:  # linear warm-up, then constant (Genie's constant rate)
            return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, ramp)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _steps_per_epoch(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 1
        _ = trainer.estimated_stepping_batches  # makes Lightning set up the train dataloader
        batches = trainer.num_training_batches
        if not math.isfinite(batches):
            return 1
        return max(1, math.ceil(batches / trainer.accumulate_grad_batches))

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        params = [p for p in self.parameters() if p.grad is not None]
        if not params:
            return
        max_norm = float(gradient_clip_val) if gradient_clip_val else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # pre-clip total norm
        bad = (~torch.isfinite(norm)).float()  # [] 1.0 skips the step (identical on all DDP ranks)
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.param_groups[0].get("fused"):
            inner.found_inf = bad
        else:  # NOTE: unfused fallback (non-fp32 params): zero the update's input instead
            for p in params:
                p.grad.nan_to_num_(0.0, 0.0, 0.0)
        self._grad_norm = norm.detach()
        self._nonfinite = bad if self._nonfinite is None else self._nonfinite + bad
        if self._step_index is None:  # one host-to-device copy per run (a resumed run starts at its step)
            self._step_index = torch.tensor(self.global_step, device=norm.device)
            self._first_nonfinite = torch.full((), -1, dtype=self._step_index.dtype, device=norm.device)
        first = self._first_nonfinite
        self._first_nonfinite = torch.where((bad > 0) & (first < 0), self._step_index, first)
        self._step_index += 1

    def on_train_start(self) -> None:
        self._t_last = time.perf_counter()
        if self.train_graphs is not None and self.trainer.accumulate_grad_batches > 1:
            # a graph's gradient buffer becomes .grad; a second backward of the same shape would overwrite it
            rank_zero_warn("graphTrainingStep is off: gradient accumulation over several batches is on")
            self.train_graphs = None

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step  # optimizer steps taken, this one included
        check_every = NAN_CHECK_EVERY_CUDA if self.device.type == "cuda" else 1
        log_now = step % self.config.logEverySteps == 0
        if self._nonfinite is not None and (step % check_every == 0 or log_now):
            bad = int(self._nonfinite.item())
            if bad and self.config.nanPolicy == "stop":
                self._stop_on_nan(step, bad)
                return
        if log_now:
            self._log_interval(step)

    def _log_interval(self, step: int) -> None:
        now = time.perf_counter()
        metrics: dict[str, float] = {"train/lr": float(self.optimizers().param_groups[0]["lr"])}
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = float(self._grad_norm)
        if self._nonfinite is not None:
            metrics["train/nonfinite_steps"] = float(self._nonfinite)
        if self._t_last is not None and now > self._t_last and self._residues is not None:
            dt = now - self._t_last
            metrics["train/samples_per_s"] = self._samples / dt
            metrics["train/residues_per_s"] = float(self._residues) / dt
        self._t_last, self._samples, self._residues = now, 0, None
        if self._last_loss is not None:
            self.progress_metrics = {"loss": float(self._last_loss)}
        if self.config.useMHCMode:
            from model.mhc import mhc_diagnostics

            metrics.update({f"mhc/{k}": float(v) for k, v in mhc_diagnostics(self.denoiser).items()})
        for lg in self.loggers:  # step - 1: the step index Lightning's own logging uses for this batch
            lg.log_metrics(metrics, step=step - 1)

    def _stop_on_nan(self, step: int, count: int) -> None:
        path = None
        if self.checkpoint_dir is not None:
            path = self.checkpoint_dir / "last.ckpt"
            self.trainer.save_checkpoint(path)
        self.stop_checkpoint = path
        where = f"saved to {path}" if path else "not saved (no checkpoint directory)"
        first = int(self._first_nonfinite) if self._first_nonfinite is not None else -1
        self.stop_reason = (
            f"Training stopped: non-finite (NaN/Inf) loss or gradient in {count} step(s), the first in optimizer "
            f"step {first} (counting from 0), detected at step {step} (nanPolicy stop). Those steps were not "
            f"applied; the last good state is {where}.\n"
            f"To stabilise training, change these config keys (current values):\n"
            f"{knob_text(self.config, NAN_KNOBS)}\n"
            f"or set 'nanPolicy skip' to skip such steps and go on. Rerun the same command to resume.")
        self.trainer.should_stop = True

    # -- checkpoints -------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CONFIG_KEY] = self.config.to_text()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        source = str(getattr(getattr(self, "_trainer", None), "ckpt_path", None) or "checkpoint")
        if has_legacy_layout(checkpoint.get("state_dict", {})):
            raise CheckpointMismatchError(
                f"{source} predates the fused Flash-IPA projections: its weights still load for sampling "
                "and serving (they are converted), but its optimizer state cannot resume training. Start a "
                "new run (another name or logDirectory).")
        check_checkpoint(checkpoint, self.config, self.state_dict(), source)
