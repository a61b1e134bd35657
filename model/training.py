"""Training: a LightningModule for Genie's noise-prediction objective, and a Trainer built from the config.

Sources: Genie (aqlaboratory/genie ``genie/diffusion/diffusion.py``: random timestep per sample,
forward noising, loss on the predicted noise, Adam at ``learningRate``); PyTorch Lightning 2 for the
loop, DDP, precision, logging and checkpoints.

Deliberate differences from Genie, each asked for by users of it:
NOTE: AdamW with a linear warm-up over ``warmupEpoches`` (converted to optimizer steps with the
    dataloader length) and gradient-norm clipping at ``gradientClipVal``; Genie has neither.
NOTE: resume restores weights, optimizer, LR scheduler, epoch and step (``Trainer.fit(ckpt_path)``);
    Genie restarted from weights only. Checkpoints carry the config text and refuse to load into a
    different architecture, naming the key (both values) or the tensor (both shapes).
NOTE: checkpoints are written atomically (temporary file, fsync, ``os.replace``), so a crash or
    ``kill -9`` mid-write leaves the previous checkpoint intact.
NOTE: the troubleshooting contract of the user's document: CUDA OOM -> checkpoint, non-zero exit and
    the OOM knobs with their values; NaN/Inf -> stop with the last good state or skip the step.

Non-finite steps are skipped without a host sync: the gradient norm (computed anyway for clipping)
feeds the fused AdamW's ``found_inf`` flag (the mechanism ``torch.amp.GradScaler`` uses), so a step
with a NaN/Inf loss or gradient leaves weights and optimizer state untouched. The host reads the
non-finite counter only every ``NAN_CHECK_EVERY_CUDA`` steps on GPU (every step on CPU, where a
read is free) and at log intervals; other scalars are read once per ``logEverySteps``.

Symbols: B batch, L residues, T timesteps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_warn

from model.checkpoints import (
    ARCH_KEYS,
    CONFIG_KEY,
    AtomicCheckpointIO,
    CheckpointMismatchError,
    CheckpointNotFiniteError,
    atomic_torch_save,
    check_checkpoint,
    load_checkpoint_denoiser,
)
from model.config import Config
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as genie_loss
from model.ipa.flash import has_legacy_layout

__all__ = [
    "ARCH_KEYS",
    "AtomicCheckpointIO",
    "CheckpointMismatchError",
    "CheckpointNotFiniteError",
    "DiffusionModule",
    "FaultInjection",
    "TrainOptions",
    "TrainResult",
    "TrainingStopped",
    "batch_length_multiple",
    "build_trainer",
    "check_checkpoint",
    "debug_config",
    "load_checkpoint_denoiser",
    "resolve_precision",
    "run_training",
]

GRAPH_LENGTH_MULTIPLE = 16  # graphTrainingStep: batch lengths padded to a multiple of this (fewer shapes)
NAN_CHECK_EVERY_CUDA = 25  # host reads of the non-finite counter on GPU (steps); CPU: every step
EXIT_NAN, EXIT_OOM = 3, 4  # process exit codes of the CLI for the two stops

OOM_KNOBS = ("batchSize", "zFactorRank", "kNeighbors", "mhcExpansionRate", "useGradientCheckpointing")
NAN_KNOBS = ("mhcSinkhornIters", "learningRate", "warmupEpoches", "gradientClipVal")
_ADVICE = {"batchSize": "lower it", "zFactorRank": "try 1", "kNeighbors": "try 8",
           "mhcExpansionRate": "try 2", "useGradientCheckpointing": "set True",
           "mhcSinkhornIters": "try 30", "learningRate": "lower it, e.g. 1e-4 or less",
           "warmupEpoches": "lengthen it, e.g. 200", "gradientClipVal": "try 0.5"}


class TrainingStopped(RuntimeError):
    """Training ended early on purpose (NaN/Inf, OOM); ``exit_code`` is what the CLI returns."""

    def __init__(self, message: str, exit_code: int, checkpoint: Path | None = None):
        super().__init__(message)
        self.exit_code, self.checkpoint = exit_code, checkpoint


def knob_text(config: Config, keys: tuple[str, ...]) -> str:
    return "\n".join(f"  {k} {getattr(config, k)}   ({_ADVICE[k]})" for k in keys)


@dataclass(frozen=True)
class FaultInjection:
    """Test / debug hook: make step ``step`` fail for real ('nan' loss or a CUDA 'oom' error)."""

    kind: str
    step: int

    @classmethod
    def parse(cls, text: str) -> FaultInjection:
        kind, _, step = text.partition("@")
        if kind not in ("nan", "oom") or not step.isdigit():
            raise ValueError(f"fault injection must look like 'nan@3' or 'oom@0', got {text!r}")
        return cls(kind, int(step))


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
        self.train_graphs = None
        if config.graphTrainingStep:  # GPU only; calls it cannot graph run eagerly (model/train_graphs.py)
            from model.train_graphs import TrainGraphs

            self.train_graphs = TrainGraphs(self.denoiser)
        self.schedule = Schedule.from_config(config)
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
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, 3], [B], [B, L] -> eps_hat [B, L, 3]."""
        if self.train_graphs is not None and self.training and torch.is_grad_enabled():
            return self.train_graphs(x_t, t, mask)
        return self.denoiser(x_t, t, mask)

    def _loss(self, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x0, mask = batch["x0"].float(), batch["mask"].float()  # [B, L, 3], [B, L]
        B = x0.shape[0]
        T = self.schedule.num_timesteps
        t = torch.randint(1, T + 1, (B,), device=x0.device, generator=generator)  # [B]
        eps = torch.randn(x0.shape, device=x0.device, generator=generator) * mask.unsqueeze(-1)  # [B, L, 3]
        x_t = q_sample(self.schedule, x0, t, eps, mask)
        return genie_loss(self(x_t, t, mask), eps, mask)

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


class IntervalProgressBar(TQDMProgressBar):
    """Lightning's progress bar plus the module's ``progress_metrics`` (the loss as read at the last log
    interval): the training loss is not a ``prog_bar`` metric, which would cost a host sync per step."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        return {**super().get_metrics(trainer, pl_module), **getattr(pl_module, "progress_metrics", {})}


class EpochCheckpoint(pl.Callback):
    """``epoch=E-step=S.ckpt`` every ``every`` epochs; ``last.ckpt`` at an epoch's end once ``last_minutes``
    have passed since it was last written (0: every epoch), and always at the end of training.

    NOTE: on small data sets an epoch is about a second of GPU time, and writing (fsyncing) last.ckpt
    after each one is a measurable share of it (BENCHMARKS.md): hence ``lastCheckpointEveryMinutes``.
    """

    def __init__(self, dirpath: Path, every: int, last_minutes: float = 0.0):
        self.dirpath, self.every, self.last_seconds = Path(dirpath), int(every), 60.0 * float(last_minutes)
        self._last_written: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        self._last_written = time.monotonic()  # a resumed run starts from a checkpoint just read

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        if pl_module.stop_reason is not None or trainer.sanity_checking:
            return  # a NaN stop already wrote the last good state
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every == 0:
            trainer.save_checkpoint(self.dirpath / f"epoch={epoch:05d}-step={trainer.global_step:08d}.ckpt")
        now = time.monotonic()
        due = self._last_written is None or now - self._last_written >= self.last_seconds
        if self.last_seconds > 0:  # DDP: saving is collective; every rank follows rank 0's clock
            due = trainer.strategy.broadcast(due, src=0)
        if due:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            self._last_written = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: DiffusionModule) -> None:
        # A stop inside an epoch (max_time / max_steps) still leaves a resumable last.ckpt.
        if pl_module.stop_reason is None and trainer.global_step > 0:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")


class StretchTimeLimit(pl.Callback):
    """Stop after ``minutes`` of wall time in THIS process (``train --max-minutes``).

    NOTE: Lightning's own ``max_time`` restores its elapsed time from the checkpoint, so a resumed
    run stops at once; a stretch of limited GPU time needs the time since this fit started.
    NOTE (DDP): ranks must stop after the same batch, or the others wait forever in the next
    gradient all-reduce. With several processes the decision is taken every ``sync_every`` batches,
    on all ranks at once, and reduced (any rank over time stops all): one tiny collective per
    ``sync_every`` steps instead of a host sync per step.
    """

    def __init__(self, minutes: float, sync_every: int = 10):
        self.seconds, self.start, self.sync_every, self.batches = 60.0 * minutes, None, int(sync_every), 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start, self.batches = time.monotonic(), 0

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if self.start is None:
            return
        self.batches += 1
        distributed = trainer.world_size > 1
        if distributed and self.batches % self.sync_every:
            return
        over = time.monotonic() - self.start >= self.seconds
        if distributed:
            over = trainer.strategy.reduce_boolean_decision(over, all=False)
        if over:
            trainer.should_stop = True


class OOMHandler(pl.Callback):
    """On CUDA out-of-memory: free what we hold, write ``last.ckpt`` and record the knobs message."""

    def __init__(self, dirpath: Path):
        self.dirpath = Path(dirpath)

    def on_exception(self, trainer: pl.Trainer, pl_module: DiffusionModule, exception: BaseException) -> None:
        if not isinstance(exception, torch.cuda.OutOfMemoryError):
            return
        pl_module.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        path = self.dirpath / ("last.ckpt" if trainer.global_rank == 0 else f"last-rank{trainer.global_rank}.ckpt")
        try:  # dump + write on this rank alone: no collective, safe when only one DDP rank ran out
            atomic_torch_save(trainer._checkpoint_connector.dump_checkpoint(weights_only=False), path)
            saved = f"A checkpoint was saved to {path}; rerun the same command to resume from it."
        except Exception as exc:  # noqa: BLE001 - report, never mask the OOM itself
            path, saved = None, f"Saving a checkpoint failed too ({type(exc).__name__}: {exc})."
        pl_module.stop_checkpoint = path
        pl_module.stop_reason = (
            f"CUDA out of memory during training (step {trainer.global_step}). {saved}\n"
            f"Reduce memory with these config keys (current values):\n"
            f"{knob_text(pl_module.config, OOM_KNOBS)}\n"
            f"zFactorRank and mhcExpansionRate change the network: a run with new values must start "
            f"fresh (another name); batchSize, kNeighbors and useGradientCheckpointing resume.")


@dataclass
class TrainOptions:
    """Command-line side of a run (the rest comes from the config)."""

    devices: str = "auto"  # "auto", a count ("2") or a list of GPU ids ("0,1")
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu | cuda
    resume: str = "auto"  # "auto" (last.ckpt of the run dir, if any), "never", or a checkpoint path
    debug: bool = False
    max_steps: int = -1
    max_minutes: float | None = None  # wall-clock limit (Lightning max_time): stop, write last.ckpt, export
    progress_bar: bool = True
    fault: FaultInjection | None = None
    export_weights: bool = True
    profiler: str | None = None  # Lightning's "simple" / "advanced": per-hook host times -> <run>/fit-profile.txt


@dataclass
class TrainResult:
    run_dir: Path
    last_checkpoint: Path | None
    weights_dir: Path | None
    global_step: int
    resumed_from: Path | None


def debug_config(config: Config) -> Config:
    """A tiny, fast variant of ``config`` (same mode): for ``train --debug`` and smoke tests."""
    return config.replace(
        name=f"{config.name}-debug", singleFeatureDimension=32, pairFeatureDimension=16,
        positionalEmbeddingDimension=16, timestepEmbeddingDimension=16, relativePositionK=8,
        numPairTransformLayers=1, triangularMultiplicativeHiddenDimension=16, numStructureLayers=2,
        ipaHiddenDimension=8, ipaNumHeads=4, ipaNumQkPoints=4, ipaNumVPoints=4, numTimesteps=100,
        mhcExpansionRate=min(config.mhcExpansionRate, 2), numEpoches=2, batchSize=min(config.batchSize, 4),
        logEverySteps=1, checkpointEveryEpoches=1, numDataWorkers=0, compileModel=False,
        maximumNumResidues=min(config.maximumNumResidues, 64),
        minimumNumResidues=min(config.minimumNumResidues, 20), datasetSize=min(config.datasetSize or 64, 64))


def resolve_accelerator(name: str) -> str:
    if name in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return {"gpu": "cuda"}.get(name, name)


def resolve_precision(precision: str, accelerator: str) -> str:
    """config.precision -> a Lightning precision string; 'auto' = bf16-mixed on CUDA, else 32."""
    if precision == "auto":
        return "bf16-mixed" if accelerator == "cuda" else "32-true"
    return {"32": "32-true"}.get(precision, precision)


def _device_count(devices: str, accelerator: str) -> int:
    if devices == "auto":
        return max(1, torch.cuda.device_count()) if accelerator == "cuda" else 1
    if "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    return int(devices)


def _devices_arg(devices: str):
    if devices == "auto" or "," in devices:
        return devices if devices == "auto" else [int(d) for d in devices.split(",") if d.strip()]
    return int(devices)


def build_trainer(config: Config, options: TrainOptions, run_dir: Path) -> pl.Trainer:
    """A Lightning Trainer for ``config``: devices / DDP, precision, loggers, checkpoints, progress bar."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    accelerator = resolve_accelerator(options.accelerator)
    n_dev = _device_count(options.devices, accelerator)
    distributed = n_dev > 1 or options.num_nodes > 1
    ckpt_dir = run_dir / "checkpoints"
    loggers = [] if options.debug else [TensorBoardLogger(str(run_dir), name="tensorboard"),
                                        CSVLogger(str(run_dir), name="csv")]
    callbacks = [EpochCheckpoint(ckpt_dir, config.checkpointEveryEpoches, config.lastCheckpointEveryMinutes),
                 OOMHandler(ckpt_dir)]
    if options.max_minutes:
        callbacks.append(StretchTimeLimit(options.max_minutes))
    if options.progress_bar:
        callbacks.append(IntervalProgressBar(refresh_rate=max(1, min(config.logEverySteps, 10))))
    extra = {"limit_train_batches": 4, "limit_val_batches": 2} if options.debug else {}
    if config.validationEverySteps:  # every N training batches, counted across epochs
        extra.update(check_val_every_n_epoch=None, val_check_interval=config.validationEverySteps)
    if options.profiler:
        extra["profiler"] = build_profiler(options.profiler, run_dir)
    return pl.Trainer(
        accelerator=accelerator, devices=_devices_arg(options.devices), num_nodes=options.num_nodes,
        strategy="ddp" if distributed else "auto",
        precision=resolve_precision(config.precision, accelerator),
        max_epochs=config.numEpoches, max_steps=options.max_steps,
        gradient_clip_val=config.gradientClipVal or None, gradient_clip_algorithm="norm",
        log_every_n_steps=config.logEverySteps, logger=loggers or False, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], enable_checkpointing=False,
        enable_progress_bar=options.progress_bar, enable_model_summary=not options.debug,
        num_sanity_val_steps=0, default_root_dir=str(run_dir), **extra)


PROFILERS = ("simple", "advanced")


def build_profiler(name: str, run_dir: Path):
    """Lightning's host-side profiler ``name``, writing its report to ``<run_dir>/fit-profile.txt``.

    ``simple``: total and mean wall time per hook (data fetch, training step, optimizer step, validation,
    checkpoint callbacks); ``advanced``: cProfile of each hook. Host times: a hook that waits for the GPU
    (a ``.item()``, a checkpoint's device-to-host copy) absorbs the queued GPU work.
    """
    from lightning.pytorch.profilers import AdvancedProfiler, SimpleProfiler

    if name not in PROFILERS:
        raise ValueError(f"profiler {name!r}: choose one of {', '.join(PROFILERS)}")
    cls = SimpleProfiler if name == "simple" else AdvancedProfiler
    return cls(dirpath=str(run_dir), filename="profile")


def _resume_path(options: TrainOptions, ckpt_dir: Path) -> Path | None:
    if options.resume == "never":
        return None
    if options.resume == "auto":
        last = ckpt_dir / "last.ckpt"
        return last if last.is_file() else None
    path = Path(options.resume)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such checkpoint file")
    return path


def batch_length_multiple(config, otherwise: int = 1) -> int:
    """The multiple batch lengths are padded to: GRAPH_LENGTH_MULTIPLE with ``graphTrainingStep`` (one
    CUDA graph per batch shape: padding keeps the shapes few), else ``otherwise``."""
    return GRAPH_LENGTH_MULTIPLE if config.graphTrainingStep else otherwise


def run_training(config: Config, options: TrainOptions | None = None, datamodule=None,
                 callbacks: list | None = None) -> TrainResult:
    """Train ``config`` (resuming if asked / found), export weights, return where things went.

    Raises TrainingStopped (NaN/Inf stop, OOM) with the user-facing message and exit code.
    """
    options = options or TrainOptions()
    if options.debug:
        config = debug_config(config)
    pl.seed_everything(config.seed, workers=True, verbose=False)
    run_dir = Path(config.logDirectory) / config.name
    ckpt_dir = run_dir / "checkpoints"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.txt").write_text(config.to_text())
    resume = _resume_path(options, ckpt_dir)
    if datamodule is None:
        from model.data.datamodule import ProteinDataModule

        datamodule = ProteinDataModule(config, pad_to_multiple=batch_length_multiple(config))
    module = DiffusionModule(config, fault=options.fault)
    module.checkpoint_dir = ckpt_dir
    trainer = build_trainer(config, options, run_dir)
    trainer.callbacks.extend(callbacks or [])
    if resume is not None and trainer.is_global_zero:
        print(f"Resuming from {resume}")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume) if resume else None)
    except torch.cuda.OutOfMemoryError:
        raise TrainingStopped(module.stop_reason or "CUDA out of memory", EXIT_OOM,
                              module.stop_checkpoint) from None
    if module.stop_reason is not None:
        raise TrainingStopped(module.stop_reason, EXIT_NAN, module.stop_checkpoint)
    weights_dir = None
    if options.export_weights and trainer.is_global_zero:
        from model.weights_io import save_weights

        weights_dir = save_weights(run_dir / "weights", module.denoiser)
    last = ckpt_dir / "last.ckpt"
    return TrainResult(run_dir, last if last.is_file() else None, weights_dir, trainer.global_step, resume)
