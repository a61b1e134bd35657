"""Why training stops early and what the user is told: NaN / Inf steps and CUDA out-of-memory.

NOTE (vs Genie, which has no such handling): the troubleshooting contract of the README: CUDA OOM ->
checkpoint, non-zero exit and the OOM knobs with their values; NaN/Inf -> stop with the last good state
or skip the step. The exit codes are what the ``mhcflash train`` command returns; each knob's advice is
printed with its current value.

``FaultInjection`` makes a chosen step fail for real (``train --inject-fault``), so both stops can be
exercised on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from model.config import Config

__all__ = ["EXIT_NAN", "EXIT_OOM", "NAN_KNOBS", "OOM_KNOBS", "FaultInjection", "TrainingStopped", "knob_text"]

EXIT_NAN, EXIT_OOM = 3, 4  # process exit codes of the CLI for the two stops

OOM_KNOBS = ("batchSize", "zFactorRank", "kNeighbors", "mhcExpansionRate", "useGradientCheckpointing")
NAN_KNOBS = ("mhcSinkhornIters", "mhcResLogitCap", "learningRate", "warmupEpoches", "gradientClipVal")
_ADVICE = {"batchSize": "lower it", "zFactorRank": "try 1", "kNeighbors": "try 8",
           "mhcExpansionRate": "try 2", "useGradientCheckpointing": "set True",
           "mhcSinkhornIters": "try 30", "mhcResLogitCap": "try 5 if mhc/col_sum_err_max grows; 0 = no cap",
           "learningRate": "lower it, e.g. 1e-4 or less",
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

