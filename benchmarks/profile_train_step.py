"""Profile one training step (fwd + bwd + AdamW) of a config: wall time per step and op counts.

    # GPU (CUDA events, kernels per step, top operators by self CUDA time)
    python benchmarks/profile_train_step.py configs/ship_mhc_flash.txt --batch 56 --length 72 --out DIR
    # CPU (aten op counts per step under bf16 autocast, where the copies come from, step time)
    python benchmarks/profile_train_step.py configs/ship_mhc_flash.txt --device cpu --batch 8 --length 40
    # the cost of mHC with the forward + backward replayed from CUDA graphs (GPU time, not launches)
    python benchmarks/profile_train_step.py configs/ship_pairfree.txt --ab flash,mhc_flash --graph --steps 40
    # ... and where it goes: GPU time per kernel name and step in each mode (eager steps, profiler)
    python benchmarks/profile_train_step.py configs/ship_pairfree.txt --ab flash,mhc_flash --kernels --out DIR

On CPU the op counts are what matters (each aten op is one or more kernels on the GPU, and the GPU
step is bound by their number, not by FLOPs); ``--stacks`` adds the model source lines that issue
the most ``aten::copy_`` (casts) and elementwise ops. ``--mode`` overrides useMHCMode / useFlashMode;
``--ab flash,mhc_flash`` times two modes alternately in one process (the cost of mHC).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

from model import build_denoiser
from model.config import MODES, load_config
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as diffusion_loss

COUNTED = ("aten::copy_", "aten::mul", "aten::add", "aten::sum", "aten::native_layer_norm",
           "aten::native_layer_norm_backward", "aten::sigmoid_backward", "aten::addmm", "aten::bmm",
           "aten::mm", "aten::cat", "aten::where", "aten::fill_", "aten::zero_")


def _setup(args):
    cfg = load_config(args.config)
    if args.mode:
        cfg = cfg.with_mode(args.mode)
    if args.compile:
        cfg = cfg.replace(compileModel=True)
    dev = torch.device(args.device)
    torch.manual_seed(0)
    model = build_denoiser(cfg).to(dev).train()
    fwd = model
    if args.compile:
        from model.network.compile import compile_denoiser

        fwd = compile_denoiser(model)
    if getattr(args, "graph", False):  # the training forward + backward replayed from CUDA graphs
        from model.training.graphed_step import TrainGraphs

        fwd = TrainGraphs(fwd, capture_after=1)
    if getattr(args, "compile_structure", False):  # experiment: each structure layer compiled too
        for layer in model.structure_layers:
            layer.compile(dynamic=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    sched = Schedule.from_config(cfg)
    sched = sched.to(dev) if hasattr(sched, "to") else sched
    B, L = args.batch, args.length
    gen = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.cumsum(torch.randn(B, L, 3, generator=gen) * 2.2, dim=1).to(dev)
    x0 = x0 - x0.mean(1, keepdim=True)
    mask = torch.ones(B, L, device=dev)
    mask[: B // 3, L - L // 5:] = 0
    amp = torch.bfloat16 if args.dtype == "bf16" else None

    def step():
        t = torch.randint(1, cfg.numTimesteps + 1, (B,), device=dev)
        eps = torch.randn_like(x0)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            x_t = q_sample(sched, x0, t, eps, mask)
            out = fwd(x_t, t, mask)
            loss = diffusion_loss(out.float(), eps, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg, step


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_ops(step, device: str, stacks: bool = False, steps: int = 2, table: bool = False) -> dict:
    """aten op counts per step (CPU and CUDA), optionally the source lines of copies / elementwise ops."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=acts, with_stack=stacks) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    events = prof.events()
    counts = Counter(e.name for e in events if e.name.startswith("aten::"))
    res = {"aten_ops_per_step": sum(counts.values()) / steps,
           **{name: counts.get(name, 0) / steps for name in COUNTED}}
    if device.startswith("cuda"):
        res["cuda_kernels_per_step"] = sum(e.count for e in prof.key_averages()
                                           if e.device_type.name == "CUDA") / steps
    if table:
        res["ops"] = {e.key: {"count": e.count / steps, "self_device_us": getattr(e, "self_device_time_total",
                                                                                 getattr(e, "self_cuda_time_total", 0.0)) / steps}
                      for e in prof.key_averages()}
        res["top_ops_table"] = prof.key_averages().table(
            sort_by="cuda_time_total" if device.startswith("cuda") else "cpu_time_total", row_limit=25)
    if stacks:
        where: dict[str, Counter] = {}
        for e in events:
            if e.name in ("aten::copy_", "aten::mul", "aten::sum", "aten::add") and e.stack:
                frame = next((f for f in e.stack if "/model/" in f), e.stack[0])
                where.setdefault(e.name, Counter())[frame] += 1
        res["sources"] = {name: [(f, n / steps) for f, n in c.most_common(12)] for name, c in where.items()}
    return res


def kernel_times(step, steps: int = 3) -> dict[str, dict[str, float]]:
    """GPU time (us) and launches per step of every CUDA kernel name, from the profiler, eager steps.

    Kernel time does not depend on launch overhead, so the difference of two modes' totals is the GPU
    work one adds, which is what a CUDA-graphed step pays (plus ~1 us of gap per kernel)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    out: dict[str, dict[str, float]] = {}
    for e in prof.key_averages():
        if e.device_type.name != "CUDA":
            continue
        us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0))
        out[e.key] = {"us": us / steps, "count": e.count / steps}
    return out


def kernel_diff_table(times: dict[str, dict[str, dict[str, float]]], names: list[str], rows: int = 40) -> str:
    """The kernels whose GPU time per step differs most between two modes (B - A), and the totals."""
    a, b = (times[n] for n in names)
    keys = sorted(set(a) | set(b), key=lambda k: -abs(b.get(k, {}).get("us", 0.0) - a.get(k, {}).get("us", 0.0)))
    zero = {"us": 0.0, "count": 0.0}
    lines = [f"{'B - A us':>9} {names[0] + ' us':>10} {names[1] + ' us':>12} {'launches A/B':>13}  kernel"]
    for k in keys[:rows]:
        ka, kb = a.get(k, zero), b.get(k, zero)
        lines.append(f"{kb['us'] - ka['us']:9.1f} {ka['us']:10.1f} {kb['us']:12.1f} "
                     f"{ka['count']:6.0f}/{kb['count']:<6.0f}  {k[:110]}")
    ta, tb = (sum(v["us"] for v in t.values()) for t in (a, b))
    na, nb = (sum(v["count"] for v in t.values()) for t in (a, b))
    lines.append(f"{tb - ta:9.1f} {ta:10.1f} {tb:12.1f} {na:6.0f}/{nb:<6.0f}  TOTAL kernel time and launches per step")
    return "\n".join(lines)


def ab_compare(args) -> None:
    """Two modes in one process, steps alternated A, B, A, B, ... so clock / load drift hits both."""
    import copy

    names = args.ab.split(",")
    if len(names) < 2 or len(set(names)) < len(names) or any(n not in MODES for n in names):
        raise SystemExit(f"--ab takes two or more different modes, each one of {sorted(MODES)}, "
                         f"e.g. flash,mhc_flash")
    steps = {}
    for name in names:
        a = copy.copy(args)
        a.mode = name
        steps[name] = _setup(a)[1]
        for _ in range(1 if args.device == "cpu" else 5):
            steps[name]()
    times = {name: [] for name in names}
    for _ in range(args.steps):
        for name in names:
            _sync(args.device)
            t0 = time.perf_counter()
            steps[name]()
            _sync(args.device)
            times[name].append((time.perf_counter() - t0) * 1e3)
    med = {name: statistics.median(t) for name, t in times.items()}
    kernels = {name: kernel_times(steps[name]) for name in names} if args.kernels else None
    res = {"config": args.config, "device": args.device, "batch": args.batch, "length": args.length,
           "steps": args.steps, "graphed": args.graph, "compiled": args.compile, "step_ms_median": med,
           "overhead": med[names[1]] / med[names[0]] - 1.0,
           "overhead_vs_first": {n: med[n] / med[names[0]] - 1.0 for n in names[1:]},
           "step_ms_quartiles": {n: statistics.quantiles(t, n=4) for n, t in times.items()}}
    if args.device.startswith("cuda"):
        res["gpu"] = torch.cuda.get_device_name()
    if kernels is not None:
        res["kernels_per_step"] = kernels
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ab.json").write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "kernels_per_step"}, indent=1))
    if kernels is not None:
        table = kernel_diff_table(kernels, names[:2])
        print(table)
        if args.out is not None:
            (args.out / "kernels.txt").write_text(table + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--mode", choices=sorted(MODES), default=None)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="autocast dtype")
    ap.add_argument("--batch", type=int, default=56)
    ap.add_argument("--length", type=int, default=72)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--stacks", action="store_true", help="source lines of copies / elementwise ops")
    ap.add_argument("--table", action="store_true", help="print the top operators by (CUDA) time")
    ap.add_argument("--compile", action="store_true", help="model.compile_denoiser (torch.compile)")
    ap.add_argument("--graph", action="store_true",
                    help="replay the forward + backward from CUDA graphs (model.training.graphed_step, "
                         "graphTrainingStep)")
    ap.add_argument("--compile-structure", action="store_true",
                    help="also torch.compile each structure layer (an experiment; not what compileModel does)")
    ap.add_argument("--kernels", action="store_true",
                    help="with --ab on a GPU: GPU time per kernel name and step in both modes (eager steps, "
                         "profiler), the largest differences as a table (kernels.txt) and all in ab.json")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--ab", default=None, metavar="MODE_A,MODE_B[,...]",
                    help="A/B: build each mode, time their steps alternately (--steps each), report the "
                         "medians and each / A - 1 (e.g. flash,mhc_flash: the training cost of mHC)")
    args = ap.parse_args()
    if args.ab:
        ab_compare(args)
        return
    cfg, step = _setup(args)

    for _ in range(1 if args.device == "cpu" else 5):
        step()
    _sync(args.device)
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        times.append((time.perf_counter() - t0) * 1e3)
    ops = profile_ops(step, args.device, stacks=args.stacks, steps=1 if args.device == "cpu" else 2,
                      table=args.table)
    res = dict(config=args.config, mode=cfg.mode, device=args.device, dtype=args.dtype, batch=args.batch,
               length=args.length, compiled=args.compile, graphed=args.graph, step_ms_median=statistics.median(times),
               samples_per_s=args.batch / statistics.median(times) * 1e3, **ops)
    if args.device.startswith("cuda"):
        res.update(peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30, gpu=torch.cuda.get_device_name())
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile.json").write_text(json.dumps(res, indent=1))
    table = res.pop("top_ops_table", None)
    print(json.dumps(res, indent=1))
    if table:
        print(table)


if __name__ == "__main__":
    main()
