"""Long-chain training per mode on one GPU: for each mode at L = 512 and 1024, with gradient
checkpointing and bf16: batch 1, then the largest batch of --batches that fits (predicted from batch 1's
peak memory, stepping down on out-of-memory), each with its step time and peak memory.

    python benchmarks/long_chain_modes.py --out DIR [--lengths 512 1024] [--budget-s 200]

Modes: standard, mhc, flash, mhc_flash (Genie widths, the reference configuration's settings), and mhc_flash with
usePairFree. Time-bounded: stops starting new runs after --budget-s seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_train_step import _setup

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mhc_flash.txt"
RUNS = [("standard", False), ("mhc", False), ("flash", False), ("mhc_flash", False), ("mhc_flash", True)]


def measure(mode: str, pair_free: bool, batch: int, length: int, steps: int = 3, device: str = "cuda") -> dict:
    args = SimpleNamespace(config=str(CONFIG), mode=mode, compile=False, device=device, batch=batch,
                           length=length, dtype="bf16")
    model_cfg = {"useGradientCheckpointing": True, "usePairFree": pair_free, "maximumNumResidues": 4096}
    import profile_train_step as pts  # same step as the profiler, config overridden

    orig = pts.load_config
    pts.load_config = lambda p: orig(p).replace(**model_cfg)
    try:
        _, step = _setup(args)
    finally:
        pts.load_config = orig
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return {"step_ms": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--budget-s", type=float, default=200.0)
    args = ap.parse_args()
    t0, rows = time.monotonic(), []
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    for length in args.lengths:
        for mode, pair_free in RUNS:
            if time.monotonic() - t0 > args.budget_s:
                break
            name = mode + ("+pairfree" if pair_free else "")
            tried = {}
            # B = 1 first; its peak predicts the largest batch (activations ~ linear in B), which is
            # measured next, stepping down through --batches on an out-of-memory error.
            candidates = [1] + sorted((b for b in args.batches if b > 1), reverse=True)
            for batch in candidates:
                if batch > 1:
                    one = tried.get(1)
                    if one is None or one["peak_gib"] * batch > 0.92 * total_gib:
                        continue
                    if time.monotonic() - t0 > args.budget_s:
                        break
                try:
                    tried[batch] = measure(mode, pair_free, batch, length)
                except torch.cuda.OutOfMemoryError:
                    tried[batch] = None
                    if batch == 1:
                        break
                    continue
                finally:
                    torch.cuda.empty_cache()
                if batch > 1:
                    break  # the largest predicted batch that fits
            for batch, r in sorted(tried.items()):
                if r is None:
                    continue
                row = dict(mode=name, L=length, batch=batch, **r, samples_per_s=batch / r["step_ms"] * 1e3,
                           largest_fitting=batch == max(b for b, v in tried.items() if v is not None))
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not any(tried.values()):
                rows.append({"mode": name, "L": length, "batch": 1, "note": "out of memory at batch 1"})
                print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "long_chain_modes.json").write_text(json.dumps(
        {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"{'mode':<20}{'L':>6}{'max B':>7}{'step ms':>10}{'peak GiB':>10}{'samples/s':>11}")
    for r in rows:
        if "step_ms" not in r:
            print(f"{r['mode']:<20}{r['L']:>6}{'-':>7}  {r['note']}")
            continue
        print(f"{r['mode']:<20}{r['L']:>6}{r['batch']:>7}{r['step_ms']:>10.1f}{r['peak_gib']:>10.2f}{r['samples_per_s']:>11.2f}")


if __name__ == "__main__":
    main()
