"""The Lightning callbacks of a training run: progress bar, checkpoint cadence, time limit, OOM stop.

- ``IntervalProgressBar``: the loss as read at log intervals (no host sync per step).
- ``EpochCheckpoint``: ``epoch=E-step=S.ckpt`` every N epochs and a resumable ``last.ckpt``.
- ``StretchTimeLimit``: ``train --max-minutes``, wall time of this process, the same batch on every rank.
- ``OOMHandler``: on CUDA out-of-memory, ``last.ckpt`` and the knobs message (``stops``).

NOTE: none of them keeps state, so a checkpoint's ``callbacks`` entry is empty: checkpoints depend neither
on these classes' names nor on their module (Lightning files a callback's state under its class name).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from model.training.checkpoints import atomic_torch_save
from model.training.stops import OOM_KNOBS, knob_text

if TYPE_CHECKING:
    from model.training.diffusion_module import DiffusionModule

__all__ = ["EpochCheckpoint", "IntervalProgressBar", "OOMHandler", "StretchTimeLimit"]


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
