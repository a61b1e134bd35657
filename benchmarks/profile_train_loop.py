"""Where the real training loop's time goes: host time per phase of a Lightning step, and how busy the GPU is.

    python benchmarks/profile_train_loop.py configs/ship_pairfree.txt --chains .gpu_data/chains_pairfree.npz \
        --max-residues 8192 --graph --skip 400 --steps 60 --out DIR [--set KEY=VALUE ...]

The same ``run_training`` as ``mhcflash train`` (Lightning, bucketed batches, CUDA graphs with ``--graph``).
After ``--skip`` batches (shapes captured, Triton compiled), two windows of ``--steps`` batches each:

1. host phases, no profiler: wall time from one hook to the next (``on_train_batch_start`` ->
   ``on_before_backward`` = zero_grad + noise + forward + loss; -> ``on_after_backward`` = backward;
   ``configure_gradient_clipping`` itself; -> ``on_train_batch_end`` = the rest of the optimizer step
   and the LR scheduler; -> the next ``on_train_batch_start`` = logging, data fetch, host-to-device,
   and at an epoch's end validation and checkpoints). Medians per step, plus the mean of the last
   phase (epoch ends are rare but long).
2. the GPU, under ``torch.profiler`` (CUDA activity only): the union of kernel / memcpy intervals over
   the window's span, and GPU time per step. The profiler slows the host, so the busy fraction of the
   loop as it runs is estimated as GPU time per step over window 1's mean step. Well below 100 % with
   host phases summing to the step's wall time: the loop is host-bound; shorten the host phases.

Writes ``train_loop.json`` and prints a table. Without CUDA only the host window runs (a smoke run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from model.config import load_config_with_overrides
from model.data.datamodule import ProteinDataModule
from model.training import TrainOptions, batch_length_multiple, run_training

PHASES = ("forward", "backward", "clip", "optimizer", "between")


class LoopWindows(pl.Callback):
    """Times hook-to-hook host phases over one window, then profiles the GPU over the next, then stops."""

    def __init__(self, skip: int, steps: int, trace_path: Path | None, profile_gpu: bool = True):
        self.skip, self.steps, self.trace_path, self.profile_gpu = skip, steps, trace_path, profile_gpu
        self.batch = -1
        self.marks: list[dict[str, float]] = []
        self.shapes: list[tuple[int, int, int]] = []  # (B, L_padded, real residues)
        self.clip_s: list[float] = []
        self.prof = None
        self.gpu: dict | None = None
        self.trace_window_s: float | None = None

    def _window(self) -> str | None:
        k = self.batch - self.skip
        if 0 <= k < self.steps:
            return "host"
        if self.steps <= k < 2 * self.steps:
            return "gpu"
        return None

    def _mark(self, name: str) -> None:
        if self._window() == "host":
            self.marks[-1][name] = time.perf_counter()

    def setup(self, trainer, pl_module, stage):
        clip = pl_module.configure_gradient_clipping

        def timed_clip(*args, **kwargs):
            t0 = time.perf_counter()
            clip(*args, **kwargs)
            if self._window() == "host":
                self.clip_s.append(time.perf_counter() - t0)

        pl_module.configure_gradient_clipping = timed_clip

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._window() == "host":
            self.marks[-1]["next_start"] = now
        self.batch += 1
        window = self._window()
        if window == "host":
            self.marks.append({"start": now})
            mask = batch["mask"]
            self.shapes.append((int(mask.shape[0]), int(mask.shape[1]), int(batch["lengths"].sum())))
        elif window == "gpu" and self.profile_gpu and self.prof is None:
            torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self.prof.__enter__()
            self._t_trace = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss):
        self._mark("before_backward")

    def on_after_backward(self, trainer, pl_module):
        self._mark("after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self._mark("before_optimizer")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark("end")
        if not self.profile_gpu and self.batch == self.skip + self.steps:
            trainer.should_stop = True
        elif self.batch == self.skip + 2 * self.steps - 1:
            torch.cuda.synchronize()
            self.trace_window_s = time.perf_counter() - self._t_trace
            self.prof.__exit__(None, None, None)
            self.gpu = gpu_busy(self.prof, self.trace_path)
            trainer.should_stop = True

    def host_phases(self) -> dict:
        complete = [m for m in self.marks if {"start", "before_backward", "after_backward", "before_optimizer",
                                                  "end", "next_start"} <= m.keys()]
        per = {
            "forward": [m["before_backward"] - m["start"] for m in complete],
            "backward": [m["after_backward"] - m["before_backward"] for m in complete],
            "optimizer": [m["end"] - m["before_optimizer"] for m in complete],  # clip included
            "between": [m["next_start"] - m["end"] for m in complete],
            "step": [m["next_start"] - m["start"] for m in complete],
        }
        out = {k: {"median_ms": 1e3 * statistics.median(v), "mean_ms": 1e3 * statistics.fmean(v)}
               for k, v in per.items()}
        out["clip"] = {"median_ms": 1e3 * statistics.median(self.clip_s), "mean_ms": 1e3 * statistics.fmean(self.clip_s)}
        out["steps"] = len(complete)
        return out


def gpu_busy(prof, trace_path: Path | None) -> dict:
    """Union of the GPU activity intervals of a finished profiler (kernels, copies, memsets)."""
    path = trace_path or Path("/tmp/train_loop_trace.json")
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    busy, end = 0.0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = spans[-1][1] - spans[0][0] if spans else 0.0
    return {"kernels": len(spans), "busy_us": busy, "span_us": span, "busy_fraction": busy / span if span else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--chains", default=None, help="packed chains (.npz of scripts/pack_chains.py); default: the config's data")
    ap.add_argument("--max-residues", type=int, default=None, help="padded residues per batch cap")
    ap.add_argument("--graph", action="store_true", help="graphTrainingStep True")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--skip", type=int, default=400, help="batches before the windows (captures, compiles)")
    ap.add_argument("--steps", type=int, default=60, help="batches per window")
    ap.add_argument("--name", default="train_loop_profile")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    cfg = load_config_with_overrides(Path(args.config), [f"name={args.name}", *args.overrides])
    if args.graph:
        cfg = cfg.replace(graphTrainingStep=True)
    chains = None
    if args.chains:
        from pack_chains import unpack

        chains = unpack(args.chains)
    dm = ProteinDataModule(cfg, chains=chains, max_residues_per_batch=args.max_residues,
                           pad_to_multiple=batch_length_multiple(cfg, otherwise=8))
    args.out.mkdir(parents=True, exist_ok=True)
    windows = LoopWindows(args.skip, args.steps, args.out / "train_loop_trace.json", profile_gpu=cuda)
    run_training(cfg, TrainOptions(accelerator="gpu" if cuda else "cpu", devices="1", resume="never", progress_bar=False,
                                   export_weights=False), datamodule=dm, callbacks=[windows])
    if windows.steps > len(windows.marks) or (cuda and windows.gpu is None):
        raise SystemExit(f"training stopped before {args.skip + 2 * args.steps} batches (numEpoches too small?)")
    host = windows.host_phases()
    B, L, real = zip(*windows.shapes)
    steps_gpu = args.steps
    result = {
        "config": args.config, "overrides": args.overrides, "graph": cfg.graphTrainingStep,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "host_ms": host,
        "gpu_window": None if not cuda else {
            **windows.gpu, "wall_s": windows.trace_window_s,
            "gpu_ms_per_step": windows.gpu["busy_us"] / 1e3 / steps_gpu,
            "wall_ms_per_step": 1e3 * windows.trace_window_s / steps_gpu,
            # the profiler slows the host, so the busy fraction of the loop as it runs unprofiled is estimated:
            # GPU time per step (profiled window) over the host window's mean step (other batches, same sampler)
            "busy_estimate_unprofiled": windows.gpu["busy_us"] / 1e3 / steps_gpu / host["step"]["mean_ms"]},
        "batches": {"chains_mean": statistics.fmean(B), "padded_residues_mean": statistics.fmean(b * l for b, l in zip(B, L)),
                    "real_residues_mean": statistics.fmean(real), "shapes": len(set(zip(B, L)))},
    }
    (args.out / "train_loop.json").write_text(json.dumps(result, indent=1))
    print(f"{result['gpu']}, {cfg.name}, graph={cfg.graphTrainingStep}, {host['steps']} steps per window")
    print(f"{'phase':<10} {'median ms':>10} {'mean ms':>10}   (optimizer includes clip)")
    for k in (*PHASES, "step"):
        print(f"{k:<10} {host[k]['median_ms']:>10.2f} {host[k]['mean_ms']:>10.2f}")
    g = result["gpu_window"]
    if g:
        print(f"GPU window: busy {100 * g['busy_fraction']:.1f} % of its span, {g['gpu_ms_per_step']:.2f} ms GPU / step, "
              f"{g['wall_ms_per_step']:.2f} ms wall / step (profiled), {g['kernels']} GPU activities")
        print(f"unprofiled loop: GPU busy ~{100 * g['busy_estimate_unprofiled']:.0f} % (GPU ms per step / host window's "
              f"mean step)")
    b = result["batches"]
    print(f"batches: {b['chains_mean']:.1f} chains, {b['padded_residues_mean']:.0f} padded / {b['real_residues_mean']:.0f} "
          f"real residues, {b['shapes']} shapes")


if __name__ == "__main__":
    main()
