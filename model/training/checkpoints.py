"""Training checkpoints: written atomically, carrying their config, refusing a different architecture.

NOTE (vs Genie, which restarted from weights only): a checkpoint stores the config text under
``CONFIG_KEY``; loading it into a model of another architecture (any key in ``ARCH_KEYS``, or a tensor
of another shape) raises :class:`CheckpointMismatchError` naming the key with both values or the
tensor with both shapes, and one holding NaN / Inf in its weights or optimizer state raises
:class:`CheckpointNotFiniteError` naming where (resuming from it could only stop at the first step).
Writes go through :mod:`model.atomic_io`, so a crash or ``kill -9`` mid-write leaves the previous
checkpoint intact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from model.atomic_io import atomic_write
from model.config import Config, parse_config

__all__ = ["ARCH_KEYS", "CONFIG_KEY", "AtomicCheckpointIO", "CheckpointMismatchError", "CheckpointNotFiniteError",
           "atomic_torch_save", "check_checkpoint", "load_checkpoint_denoiser"]

CONFIG_KEY = "mhcflash_config"  # where a checkpoint stores the config text

# Keys that define the network (parameter shapes or the function it computes). A checkpoint trained
# with other values cannot be resumed; everything else (batchSize, learningRate, kNeighbors, ...)
# may change between runs, which is what the OOM / NaN advice asks users to do.
ARCH_KEYS = (
    "useMHCMode", "useFlashMode", "usePairFree", "singleFeatureDimension", "pairFeatureDimension",
    "positionalEmbeddingDimension", "timestepEmbeddingDimension", "relativePositionK", "templateType",
    "numPairTransformLayers", "includeTriangularMultiplicativeUpdate", "includeTriangularAttention",
    "triangularMultiplicativeHiddenDimension", "triangularAttentionHiddenDimension",
    "triangularAttentionNumHeads", "pairTransitionN", "numStructureLayers", "numStructureBlocks",
    "ipaHiddenDimension", "ipaNumHeads", "ipaNumQkPoints", "ipaNumVPoints",
    "numStructureTransitionLayers", "zFactorRank", "mhcExpansionRate", "mhcReadout", "numTimesteps",
    "schedule", "selfConditioning",
)


class CheckpointMismatchError(ValueError):
    """A checkpoint whose architecture differs from the config it is loaded into."""


class CheckpointNotFiniteError(CheckpointMismatchError):
    """A checkpoint whose weights or optimizer state hold NaN / Inf."""


def _non_finite(checkpoint: dict) -> list[str]:
    """Where ``checkpoint`` holds NaN / Inf: weight names, then optimizer states (parameter index, key)."""
    def not_finite(v) -> bool:
        return torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())

    bad = [f"weight '{k}'" for k, v in checkpoint.get("state_dict", {}).items() if not_finite(v)]
    for i, opt in enumerate(checkpoint.get("optimizer_states", [])):
        for pid, state in opt.get("state", {}).items():
            bad += [f"optimizer {i} state '{key}' of parameter {pid}" for key, v in state.items() if not_finite(v)]
    return bad


def check_checkpoint(checkpoint: dict, config: Config, module_state: dict[str, torch.Tensor],
                     source: str) -> None:
    """Raise CheckpointMismatchError unless ``checkpoint`` was trained with ``config``'s architecture."""
    text = checkpoint.get(CONFIG_KEY)
    if text is None:
        raise CheckpointMismatchError(f"{source} has no stored config ('{CONFIG_KEY}'): not a checkpoint "
                                      f"written by this project's training")
    saved = parse_config(text, source=f"{source} (stored config)")
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r}, config {getattr(config, k)!r}"
             for k in ARCH_KEYS if getattr(saved, k) != getattr(config, k)]
    if diffs:
        raise CheckpointMismatchError(
            f"{source} was trained with a different model (mode {saved.mode!r}, config mode "
            f"{config.mode!r}); mismatched keys: " + "; ".join(diffs)
            + ". Use the checkpoint's own config, or start a new run (another name or logDirectory).")
    state = checkpoint.get("state_dict", {})
    problems = [f"tensor '{k}': checkpoint {tuple(v.shape)}, model {tuple(module_state[k].shape)}"
                for k, v in state.items() if k in module_state and v.shape != module_state[k].shape]
    missing = sorted(set(module_state) - set(state))
    unexpected = sorted(set(state) - set(module_state))
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}")
    if problems:
        raise CheckpointMismatchError(f"{source} does not fit the model built from its config: "
                                      + "; ".join(problems[:8]))
    bad = _non_finite(checkpoint)
    if bad:
        raise CheckpointNotFiniteError(
            f"{source} holds non-finite (NaN/Inf) values in {len(bad)} tensor(s): " + "; ".join(bad[:4])
            + ("; ..." if len(bad) > 4 else "") + ". Resume from an earlier checkpoint (checkpoints/epoch=*.ckpt "
            "of the run) or start a new run (another name or logDirectory).")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that writes ``<dir>/.<name>.*.tmp``, fsyncs, then ``os.replace``s it."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        atomic_torch_save(checkpoint, Path(path))


def atomic_torch_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint_denoiser(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """The denoiser of a training checkpoint (config from the checkpoint itself), eval mode."""
    from model import build_denoiser
    from model.ipa.flash import upgrade_legacy_state

    path = Path(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if CONFIG_KEY not in ckpt:
        raise CheckpointMismatchError(f"{path} has no stored config: not a checkpoint of this project")
    config = parse_config(ckpt[CONFIG_KEY], source=f"{path} (stored config)")
    denoiser = build_denoiser(config)
    state = {k[len("denoiser."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")}
    state = upgrade_legacy_state(state)
    check_checkpoint({CONFIG_KEY: ckpt[CONFIG_KEY], "state_dict": state}, config, denoiser.state_dict(), str(path))
    denoiser.load_state_dict(state)
    return denoiser.to(device).eval()
