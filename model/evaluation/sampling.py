"""Samples for the evaluation: every length in batches, bf16 autocast on CUDA, reproducible seeds.

Sample ``i`` of length ``L`` uses seed ``seed + SEED_STRIDE * L + i``, so a length's samples do not
depend on which other lengths are evaluated, and two weights evaluated with the same ``--seed`` start
from the same noise. Precision follows the service (``MHCFLASH_PRECISION``): ``auto`` is bf16
autocast on CUDA (the weights were trained in bf16-mixed) and float32 on CPU.

The sampler is a seam: any function with `model.diffusion.sample`'s signature (denoiser, lengths,
seeds, noise_scale, device=, max_batch_size=, max_residues=, progress=, return_trajectory=) can be
passed to `sample_lengths` (and ``steps=`` when ``sample_lengths`` is given ``steps``); the default
runs all T steps of the model's schedule.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEED_STRIDE = 100_000
TRAJECTORY_FRAMES = 40  # frames kept per animated trajectory (evenly spaced over T + 1)
PRECISIONS = ("auto", "float32", "bf16")


def seeds_for(length: int, count: int, seed: int) -> list[int]:
    return [seed + SEED_STRIDE * int(length) + i for i in range(count)]


def resolve_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def autocast_dtype(precision: str, device: str):
    """bf16 for ``auto`` / ``bf16`` on CUDA, else None (float32), as the service decides."""
    import torch

    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision in ("auto", "bf16") and str(device).startswith("cuda") else None


def _autocast_module():
    import torch

    class AutocastDenoiser(torch.nn.Module):
        """``denoiser`` run under CUDA autocast (weight-cast cache off, as the service); float32 out."""

        def __init__(self, denoiser: torch.nn.Module, dtype: torch.dtype):
            super().__init__()
            self.inner = denoiser
            self.config = denoiser.config
            self.dtype = dtype
            self.self_conditioning = bool(getattr(denoiser, "self_conditioning", False))

        def forward(self, x, t, mask, *x0_self):  # x0_self: a self-conditioned model's estimate
            with torch.autocast("cuda", dtype=self.dtype, cache_enabled=False):
                return self.inner(x, t, mask, *x0_self).float()  # [B, L, 3]

    return AutocastDenoiser


def load_denoiser(weights: Path, device: str):
    """(denoiser in eval mode on ``device``, description) from a weights dir/file or a ``.ckpt``."""
    if weights.is_file() and weights.suffix == ".ckpt":
        from model.training import load_checkpoint_denoiser

        return load_checkpoint_denoiser(weights, device), f"checkpoint {weights}"
    from model.weights_io import load_weights

    loaded = load_weights(weights, device)
    return loaded.denoiser, f"weights {loaded.name} (sha256 {loaded.sha256[:12]})"


@dataclass
class SampledSet:
    """Samples per length (float64 ``[L, 3]`` each), trajectories (frames ``[L, 3]``), timings."""

    by_length: dict[int, list[np.ndarray]]
    trajectories: list[list[np.ndarray]] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)
    seeds: dict[int, list[int]] = field(default_factory=dict)
    note: str = ""


def sample_lengths(denoiser, counts: dict[int, int], *, seed: int, noise_scale: float, device: str,
                   precision: str = "auto", batch_size: int = 64, max_residues: int | None = 16384,
                   trajectories: int = 0, sampler: Callable | None = None,
                   on_length: Callable[[int, list[np.ndarray], float], None] | None = None,
                   steps: int | None = None) -> SampledSet:
    """Sample ``counts[L]`` backbones of every length ``L`` (one batch per ``batch_size`` samples).

    ``on_length(L, samples, seconds)`` is called as each length finishes (the caller starts its TM-score
    jobs there, so they run while the GPU samples the next length). ``trajectories``: the first
    samples of the first length keep ``TRAJECTORY_FRAMES`` frames of their trajectory. ``steps``:
    sampling steps (None: the model's T; passed to ``sampler`` only when given).
    """
    import torch
    from tqdm import tqdm

    if sampler is None:
        from model.diffusion import sample as sampler
    dtype = autocast_dtype(precision, device)
    net = _autocast_module()(denoiser, dtype) if dtype is not None else denoiser
    out = SampledSet(by_length={})
    given = {} if steps is None else {"steps": steps}
    for k, (length, count) in enumerate(counts.items()):
        seeds = seeds_for(length, count, seed)
        keep_traj = trajectories if k == 0 else 0
        bar = tqdm(total=1, desc=f"sampling L={length} x {count}", unit="step", file=sys.stderr)

        def tick(done: int, total: int, bar=bar) -> None:
            bar.total = total
            bar.update(done - bar.n)

        start = time.perf_counter()
        try:
            res = sampler(net, [length] * count, seeds, noise_scale, device=device, max_batch_size=batch_size,
                          max_residues=max_residues, progress=tick, return_trajectory=keep_traj > 0, **given)
        finally:
            bar.close()
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()
        out.seconds[length] = time.perf_counter() - start
        if keep_traj > 0:  # each [steps + 1, L, 3], x_T .. x_0
            for t in res[:keep_traj]:
                idx = torch.linspace(0, t.shape[0] - 1, TRAJECTORY_FRAMES).round().long()
                out.trajectories.append([f.double().numpy() for f in t[idx]])
            res = [t[-1] for t in res]
        out.by_length[length] = [t.double().numpy() for t in res]
        out.seeds[length] = seeds
        if on_length is not None:
            on_length(length, out.by_length[length], out.seconds[length])
    mode = getattr(getattr(denoiser, "config", None), "mode", "?")
    steps_text = "" if steps is None else f", {steps} steps"
    precision_text = "bf16 autocast" if dtype is not None else "float32"
    out.note = (f"{mode} mode, noise scale {noise_scale}{steps_text}, {precision_text} "
                f"on {device}, seeds {seed} + {SEED_STRIDE} L + i")
    return out


def read_sample_dir(samples_dir: Path) -> dict[int, list[np.ndarray]]:
    """PDB / mmCIF files under a directory (CA atoms), grouped by length, in path order; files named
    ``trajectory*`` (the report's multi-model animations) are left out."""
    from model.evaluation.metrics import as_numpy_ca
    from model.pdb_io import read_ca

    files = sorted(p for p in samples_dir.rglob("*") if p.is_file() and p.suffix in {".pdb", ".cif", ".gz"}
                   and not p.name.startswith("trajectory"))
    if not files:
        raise FileNotFoundError(f"--samples {samples_dir}: no .pdb / .cif files")
    by_length: dict[int, list[np.ndarray]] = {}
    for path in files:
        ca = as_numpy_ca(read_ca(path))
        by_length.setdefault(len(ca), []).append(ca)
    return dict(sorted(by_length.items()))
