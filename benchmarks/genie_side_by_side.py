"""Genie's original code and ours side by side, in one process on one device, steps timed in turns.

Genie (Lin & AlQuraishi 2023, github.com/aqlaboratory/genie) is not a dependency and is never
committed: keep a checkout of its public code in an ignored folder and point ``--genie-dir`` at it
(the folder that holds the ``genie`` package), e.g.

    git clone https://github.com/aqlaboratory/genie .genie      # .genie/ is git-ignored
    python benchmarks/genie_side_by_side.py --genie-dir .genie --json OUT.json
    python benchmarks/genie_side_by_side.py --genie-dir .genie --device cpu --quick   # smoke run

Genie runs through its own code: ``genie.diffusion.genie.Genie`` built from its default ``Config()``
(c_s = c_p = 128, 5 pair-transform layers with triangle multiplications, 5 IPA structure layers), its
own ``transform`` / ``sample_timesteps`` / ``q`` / ``loss_fn`` for a training step (+ backward + Adam,
as its ``configure_optimizers``) and its own ``p`` for a sampling step. Ours: ``--config`` (the shipped
configuration) for training (``benchmarks/profile_train_step.py``'s step: bf16 autocast, clipping,
fused AdamW, ``compileModel`` on CUDA) and the shipped weights for sampling (the service's step:
CUDA graph + compiled pair stack + bf16 on CUDA). Rows (each timed ``--rounds`` times, Genie and ours
alternating, median reported):

  train 32 x 128   Genie fp32 (its anchor: 74 samples/s on an H100) vs ours at the same shape
  train 56 x 72    ours at the typical bucket of our data (length-bucketed batches, no padding to 128)
  train 1 x 512    Genie bf16 autocast vs ours
  sample 5 x 128   one reverse step, Genie's sample.py batch (fp32) vs ours
  sample 64 x 128  one reverse step at a serving batch
  sample 256 x 128 one reverse step at the pair-free model's serving batch (32,768 residues)

samples/s = B / step; for sampling, backbones/s = B / (T x step) with T = 1000. Weights do not
change the time of a step (Genie's are random here).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from graph_step import make_inputs
from profile_train_step import _setup as build_our_train_step
from timing import time_ms

from model.diffusion import Schedule
from model.sampling_step import SamplingStep, eager_step
from model.weights_io import load_weights

FULL = {"train": [(32, 128, "fp32"), (56, 72, None), (1, 512, "bf16")], "sample": [(5, 128), (64, 128), (256, 128)]}
QUICK = {"train": [(2, 16, "fp32"), (1, 24, "bf16")], "sample": [(2, 16)]}


def chain_coords(batch: int, length: int, device: torch.device, seed: int = 0):
    """Random-walk backbones as Genie's data pipeline gives them: coords [B, 3 L, 3] (N, CA, C per
    residue; Genie reads CA = coords[:, 1::3]) and mask [B, L]."""
    g = torch.Generator().manual_seed(seed)
    ca = torch.cumsum(torch.randn(batch, length, 3, generator=g) * 2.2, dim=1)  # [B, L, 3]
    coords = ca.repeat_interleave(3, dim=1) + 0.5 * torch.randn(batch, 3 * length, 3, generator=g)
    coords[:, 1::3] = ca
    return coords.to(device), torch.ones(batch, length, device=device)


def genie_model(genie_dir: Path, device: torch.device):
    sys.path.insert(0, str(genie_dir.resolve()))
    try:
        import pytorch_lightning  # noqa: F401  (Genie imports the pre-2.0 package name)
    except ImportError:  # Lightning 2 installs the same code as lightning.pytorch
        import lightning.pytorch
        import lightning.pytorch.core

        sys.modules["pytorch_lightning"] = lightning.pytorch
        sys.modules["pytorch_lightning.core"] = lightning.pytorch.core
    try:
        from genie.config import Config
        from genie.diffusion.genie import Genie
    except ImportError as exc:
        sys.exit(f"cannot import Genie from {genie_dir} ({exc}); clone github.com/aqlaboratory/genie there "
                 "(the folder must hold the 'genie' package; it needs numpy, scipy, tqdm, pytorch_lightning)")
    torch.manual_seed(0)
    genie = Genie(Config()).to(device)
    genie.setup_schedule()
    genie.setup = True
    return genie


def genie_train_step(genie, batch: int, length: int, precision: str, device: torch.device):
    coords, mask = chain_coords(batch, length, device)
    opt = torch.optim.Adam(genie.model.parameters(), lr=genie.config.optimization["lr"])
    amp = precision == "bf16"

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            t0, m = genie.transform((coords, mask))
            s = genie.sample_timesteps(t0.shape[0])
            ts, tnoise = genie.q(t0, s, m)
            loss = genie.loss_fn(tnoise, ts, s, m)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def genie_sample_step(genie, batch: int, length: int, device: torch.device):
    mask = torch.ones(batch, length, device=device)
    torch.manual_seed(1)
    ts = genie.sample_frames(mask)
    s = torch.full((batch,), 500, dtype=torch.long, device=device)

    def step():
        with torch.no_grad():
            genie.p(ts, s, mask, 1.0)

    return step


def our_sample_step(loaded, batch: int, length: int, device: torch.device):
    schedule = Schedule.from_config(loaded.config)
    x, t, mask, noise, scale = make_inputs(batch, length, schedule.num_timesteps, device)  # graph_step's inputs
    if device.type == "cuda":
        runner = SamplingStep(loaded.denoiser, schedule, device=device, autocast_dtype=torch.bfloat16, graphed=True)
        return lambda: runner(x, t, mask, noise, scale)
    return lambda: eager_step(loaded.denoiser, schedule, x, t, mask, noise, scale)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def measure(name: str, fns: dict, rounds: int, iters: int, device: torch.device) -> dict:
    """Warm up each function, then time them in turns ``rounds`` times; medians in ms and peak memory."""
    peaks = {}
    for who, fn in fns.items():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            fn()
        peaks[who] = peak_gib(device)
    times = {who: [] for who in fns}
    for _ in range(rounds):
        for who, fn in fns.items():
            times[who].append(time_ms(fn, iters, device))
    print(f"done {name}", file=sys.stderr, flush=True)
    return {who: {"ms": statistics.median(t), "peak_GiB": peaks[who]} for who, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--genie-dir", type=Path, default=ROOT / ".genie")
    ap.add_argument("--config", default=str(ROOT / "configs" / "ship_mhc_flash.txt"))
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mhc_flash_v1"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (a CPU smoke run of the harness)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = QUICK if args.quick else FULL
    genie = genie_model(args.genie_dir, device)
    compile_ours = device.type == "cuda"
    rows = []
    for batch, length, genie_precision in shapes["train"]:
        ours_args = Namespace(config=args.config, mode=None, compile=compile_ours, device=args.device,
                              batch=batch, length=length, dtype="bf16" if device.type == "cuda" else "fp32")
        fns = {"ours": build_our_train_step(ours_args)[1]}
        if genie_precision is not None:
            fns["genie"] = genie_train_step(genie, batch, length, genie_precision, device)
        res = measure(f"train {batch}x{length}", fns, args.rounds, max(1, args.iters // 2), device)
        rows.append({"kind": "train", "batch": batch, "length": length, "genie_precision": genie_precision, **res})
    loaded = load_weights(args.weights, device)
    if compile_ours:
        from model.network.compile import compile_denoiser

        compile_denoiser(loaded.denoiser)
    for batch, length in shapes["sample"]:
        fns = {"ours": our_sample_step(loaded, batch, length, device),
               "genie": genie_sample_step(genie, batch, length, device)}
        res = measure(f"sample {batch}x{length}", fns, args.rounds, args.iters, device)
        rows.append({"kind": "sample", "batch": batch, "length": length, "genie_precision": "fp32", **res})

    T = 1000
    print(f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"{'what':>7} {'B x L':>9} {'Genie ms':>9} {'ours ms':>8} {'Genie /s':>9} {'ours /s':>8} {'x':>6} "
          f"{'Genie GiB':>9} {'ours GiB':>8}")
    for r in rows:
        per = T if r["kind"] == "sample" else 1  # backbones/s for sampling, samples/s for training
        ours, genie_r = r["ours"], r.get("genie")
        r["ours"]["per_s"] = r["batch"] / (per * ours["ms"] * 1e-3)
        if genie_r:
            genie_r["per_s"] = r["batch"] / (per * genie_r["ms"] * 1e-3)
            r["speedup"] = genie_r["ms"] / ours["ms"]
        g_ms = f"{genie_r['ms']:.1f}" if genie_r else "-"
        g_ps = f"{genie_r['per_s']:.3g}" if genie_r else "-"
        g_mem = f"{genie_r['peak_GiB']:.2f}" if genie_r and genie_r["peak_GiB"] is not None else "-"
        o_mem = f"{ours['peak_GiB']:.2f}" if ours["peak_GiB"] is not None else "-"
        print(f"{r['kind']:>7} {r['batch']:>4}x{r['length']:<4} {g_ms:>9} {ours['ms']:>8.1f} {g_ps:>9} "
              f"{ours['per_s']:>8.3g} {r.get('speedup', float('nan')):>6.2f} {g_mem:>9} {o_mem:>8}")
    result = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "torch": torch.__version__, "genie_dir": str(args.genie_dir), "config": args.config,
              "weights": args.weights, "rounds": args.rounds, "iters": args.iters, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
