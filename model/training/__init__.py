"""Training: Genie's noise-prediction objective in PyTorch Lightning, its checkpoints and graphed step.

Sources: Genie (aqlaboratory/genie ``genie/diffusion/diffusion.py``: random timestep per sample,
forward noising, loss on the predicted noise, Adam at ``learningRate``); PyTorch Lightning 2 for the
loop, DDP, precision, logging and checkpoints.

Deliberate differences from Genie, each asked for by users of it (each module's ``NOTE:`` says more):
NOTE: AdamW with a linear warm-up and gradient-norm clipping (``diffusion_module``).
NOTE: resume restores weights, optimizer, LR scheduler, epoch and step (``trainer``); checkpoints carry
    the config text and refuse to load into a different architecture, naming the key (both values) or
    the tensor (both shapes), and are written atomically (``checkpoints``).
NOTE: CUDA OOM -> checkpoint, non-zero exit and the OOM knobs with their values; NaN/Inf -> stop with the
    last good state or skip the step (``stops``, ``callbacks``).

Modules:
    diffusion_module.py  DiffusionModule (LightningModule): loss, AdamW + warm-up, clipping, non-finite
                         steps skipped without a host sync, logging, the NaN stop
    callbacks.py         IntervalProgressBar, EpochCheckpoint, StretchTimeLimit, OOMHandler
    stops.py             TrainingStopped, the CLI's exit codes, the OOM / NaN knobs, FaultInjection
    checkpoints.py       atomic checkpoint writes, the stored config, architecture-mismatch and
                         non-finite-state errors, load_checkpoint_denoiser
    graphed_step.py      TrainGraphs: the forward + backward replayed from per-shape CUDA graphs
                         (``graphTrainingStep``; the graph cache is ``model.cuda_graphs``)
    self_conditioning.py the self-conditioned forward (``selfConditioning``): per-sample coins, a no-grad
                         pass for the x0 estimate, the gradient pass on it (eager and graphed steps)
    trainer.py           TrainOptions, build_trainer, run_training, debug_config

The names below are the package's public surface, each imported from its module on first use (so
``import model.training.graphed_step`` alone does not import Lightning).

Symbols: B batch, L residues, T timesteps.
"""

from __future__ import annotations

import importlib

_MODULE_OF = {
    "DiffusionModule": "diffusion_module",
    "EXIT_NAN": "stops", "EXIT_OOM": "stops", "FaultInjection": "stops", "TrainingStopped": "stops",
    "ARCH_KEYS": "checkpoints", "AtomicCheckpointIO": "checkpoints", "CheckpointMismatchError": "checkpoints",
    "CheckpointNotFiniteError": "checkpoints", "check_checkpoint": "checkpoints",
    "load_checkpoint_denoiser": "checkpoints",
    "PROFILERS": "trainer", "TrainOptions": "trainer", "TrainResult": "trainer",
    "batch_length_multiple": "trainer", "build_trainer": "trainer", "debug_config": "trainer",
    "resolve_precision": "trainer", "run_training": "trainer",
}


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'model.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"model.training.{module}"), name)


__all__ = [
    "ARCH_KEYS",
    "EXIT_NAN",
    "EXIT_OOM",
    "PROFILERS",
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
