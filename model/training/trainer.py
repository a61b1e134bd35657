"""A training run: the Lightning Trainer built from the config, resume, and the run itself.

``run_training(config, options)`` seeds, writes ``<logDirectory>/<name>/config.txt``, finds the checkpoint
to resume from, builds the ``DiffusionModule`` and the Trainer (``build_trainer``: devices / DDP,
precision, loggers, the callbacks of ``callbacks``, atomic checkpoint writes), fits, and exports the
weights directory; an early stop raises ``TrainingStopped`` with the user-facing message.

NOTE (vs Genie, which restarted from weights only): resume restores weights, optimizer, LR scheduler,
epoch and step (``Trainer.fit(ckpt_path)``); ``checkpoints`` refuses one of a different architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from model.config import Config
from model.training.callbacks import EpochCheckpoint, IntervalProgressBar, OOMHandler, StretchTimeLimit
from model.training.checkpoints import AtomicCheckpointIO
from model.training.diffusion_module import DiffusionModule
from model.training.stops import EXIT_NAN, EXIT_OOM, FaultInjection, TrainingStopped

__all__ = ["GRAPH_LENGTH_MULTIPLE", "PROFILERS", "TrainOptions", "TrainResult", "batch_length_multiple",
           "build_profiler", "build_trainer", "debug_config", "resolve_accelerator", "resolve_precision",
           "run_training"]

GRAPH_LENGTH_MULTIPLE = 16  # graphTrainingStep: batch lengths padded to a multiple of this (fewer shapes)


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
