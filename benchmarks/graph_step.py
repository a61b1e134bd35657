"""One sampling step, eager vs CUDA graph (`model.sampling_step`), with the shipped weights on a GPU.

For each (B, L) it times, after warm-up, the mean wall time per step (CUDA synchronised around
`--iters` steps):
  core   : `eager_step` vs a graphed `SamplingStep` on ready batch tensors (denoiser + reverse step);
  engine : `SamplingEngine._forward` on B samples at steady state (the group's last output is its
           next input; each sample's own noise draw; non-blocking uploads), cuda_graphs off vs on;
plus the one-off capture time of the (B, L) graph, the max |graphed - eager| of one step on the same
inputs, and what the step time means for a request of T steps (B = 1) and for throughput
(B / (T * step) backbones/s). Prints a table and JSON (also written to --json if given).

    python benchmarks/graph_step.py [--weights weights/mhc_flash_v1] [--precision bf16] \
        [--shapes 1x128,16x128,64x128,8x256] [--iters 20] [--json out.json] [--mode flash] [--profile 64x128] \
        [--compile-pair] [--config configs/ship_pairfree.txt]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from model.config import MODES
from model.diffusion import Schedule
from model.mhc import find_mhc_modules
from model.network.compile import compile_denoiser
from model.sampling_step import SamplingStep, batch_bucket, eager_step
from model.weights_io import load_weights
from service.engine import SamplingEngine
from service.jobs import Job, Slot


def timed(fn, iters: int, device: torch.device) -> float:
    """Mean seconds per call of ``fn`` over ``iters`` calls (synchronised before and after)."""
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def make_inputs(batch: int, length: int, T: int, device: torch.device, seed: int = 0):
    """x [B, L, 3] (noise-scale coordinates), t [B] in [2, T], mask [B, L] (full), noise, scale [B]."""
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(batch, length, 3, generator=g, device=device) * 10.0
    x = x - x.mean(1, keepdim=True)
    t = torch.randint(2, T + 1, (batch,), generator=g, device=device)
    mask = torch.ones(batch, length, device=device)
    noise = torch.randn(batch, length, 3, generator=g, device=device)
    scale = torch.full((batch,), 0.6, device=device)
    return x, t, mask, noise, scale


def make_slots(batch: int, length: int, T: int, device: torch.device) -> list[Slot]:
    job = Job(id="bench", length=length, count=batch, seeds=list(range(batch)), noise_scale=0.6, loop=None,
              future=None)
    slots = []
    for i in range(batch):
        gen = torch.Generator(device).manual_seed(i)
        x = torch.randn(length, 3, generator=gen, device=device) * 10.0  # [L, 3]
        slots.append(Slot(job=job, index=i, seed=i, length=length, t=2 + (i * 37) % (T - 1), x=x, gen=gen))
    return slots


def engine_step_fn(engine: SamplingEngine, slots: list[Slot]):
    """The engine's step as its loop runs it at steady state: same members as the last step (so the
    last output is the next input), a fresh noise draw per sample (t is not advanced)."""
    def fn():
        engine.inputs.new_iteration()
        for s in slots:
            s.noise = None
        out, x0 = engine._forward(slots)  # x0: the self-conditioned model's estimate, else None
        engine.inputs.remember(slots, out, x0)
        for b, s in enumerate(slots):
            s.x = out[b, : s.length]
        return out

    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mhc_flash_v1"))
    ap.add_argument("--precision", choices=("bf16", "float32"), default="bf16")
    ap.add_argument("--shapes", default="1x128,16x128,64x128,8x256", help="comma-separated BxL")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--mode", choices=tuple(MODES), default=None,
                    help="time a randomly initialised denoiser of the weights' config in this mode instead "
                         "(e.g. flash vs the shipped mhc_flash: the sampling cost of mHC)")
    ap.add_argument("--config", default=None,
                    help="time a randomly initialised denoiser of this config file instead of the weights "
                         "(e.g. configs/ship_pairfree.txt before its weights exist)")
    ap.add_argument("--compile-pair", action="store_true",
                    help="torch.compile the pair-transform layers first (model.network.compile.compile_denoiser, as the service)")
    ap.add_argument("--profile", default=None, metavar="BxL",
                    help="also profile eager steps at this shape: top CUDA kernels by total time")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("graph_step.py needs a CUDA device")
    device = torch.device("cuda")
    autocast = torch.bfloat16 if args.precision == "bf16" else None
    if args.config is not None:
        from model import build_denoiser
        from model.config import load_config

        config = load_config(args.config)
        torch.manual_seed(0)
        denoiser, weights_name = build_denoiser(config).to(device).eval(), f"random init of {args.config}"
    else:
        loaded = load_weights(args.weights, device)
        denoiser, config, weights_name = loaded.denoiser.eval(), loaded.config, loaded.name
    if args.mode is not None:
        from model import build_denoiser

        config = config.with_mode(args.mode)
        torch.manual_seed(0)
        denoiser = build_denoiser(config).to(device).eval()
    if args.compile_pair:
        compile_denoiser(denoiser)
    schedule = Schedule.from_config(config)
    T = schedule.num_timesteps
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]

    for module in find_mhc_modules(denoiser):  # as model.sampler.Sampler serves it: no mHC diagnostics kept
        module.record, module.last_h_res = False, None
    runner = SamplingStep(denoiser, schedule, device=device, autocast_dtype=autocast, graphed=True)
    engines = {graphed: SamplingEngine(SamplingStep(denoiser, schedule, device=device, autocast_dtype=autocast,
                                                    graphed=graphed),
                                       num_timesteps=T, device=device, residue_budget=1 << 20, queue_max_samples=1,
                                       to_pdb=lambda ca: "")
               for graphed in (False, True)}
    rows = []
    for batch, length in shapes:
        inputs = make_inputs(batch, length, T, device)
        with torch.no_grad():
            for _ in range(2):  # eager warm-up (backend choice, lazy tables, allocator)
                ref = eager_step(denoiser, schedule, *inputs, autocast_dtype=autocast)
            eager_s = timed(lambda i=inputs: eager_step(denoiser, schedule, *i, autocast_dtype=autocast), args.iters, device)
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            out = runner(*inputs)  # captures (warm-up + capture + first replay)
            torch.cuda.synchronize(device)
            capture_s = time.perf_counter() - t0
            max_diff = (out - ref).abs().max().item()
            graph_s = timed(lambda i=inputs: runner(*i), args.iters, device)

            slots = make_slots(batch, length, T, device)
            eng_times = {}
            for graphed, eng in engines.items():
                fn = engine_step_fn(eng, slots)
                fn()  # warm-up / capture
                eng_times[graphed] = timed(fn, args.iters, device)
        row = {
            "batch": batch, "length": length, "batch_bucket": batch_bucket(batch),
            "eager_ms": 1e3 * eager_s, "graph_ms": 1e3 * graph_s, "speedup": eager_s / graph_s,
            "engine_eager_ms": 1e3 * eng_times[False], "engine_graph_ms": 1e3 * eng_times[True],
            "engine_speedup": eng_times[False] / eng_times[True],
            "capture_s": capture_s, "max_abs_diff_A": max_diff,
            "request_s_graph": T * eng_times[True], "backbones_per_s_graph": batch / (T * eng_times[True]),
            "request_s_eager": T * eng_times[False], "backbones_per_s_eager": batch / (T * eng_times[False]),
        }
        rows.append(row)
        print(f"done {batch}x{length}", file=sys.stderr, flush=True)

    profile = None
    if args.profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        batch, length = (int(v) for v in args.profile.lower().split("x"))
        inputs = make_inputs(batch, length, T, device)
        with torch.no_grad():
            eager_step(denoiser, schedule, *inputs, autocast_dtype=autocast)
            torch.cuda.synchronize(device)
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
                for _ in range(3):
                    eager_step(denoiser, schedule, *inputs, autocast_dtype=autocast)
                torch.cuda.synchronize(device)
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
        # the same by input shapes: which concatenation / copy / matmul the time belongs to
        by_shape = prof.key_averages(group_by_input_shape=True).table(sort_by="cuda_time_total", row_limit=40)
        print(f"profile {batch}x{length} (3 eager steps):\n{table}\nby input shape:\n{by_shape}")
        profile = {"shape": args.profile, "table": table, "by_input_shape": by_shape}

    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "weights": weights_name,
        "random_init_mode": args.mode, "compile_pair": args.compile_pair,
        "mode": config.mode, "precision": args.precision, "timesteps": T, "iters": args.iters,
        "graphs": {"captures": runner.stats.captures, "disabled_reason": runner.stats.disabled_reason},
        "max_memory_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
        "memory_reserved_GiB": torch.cuda.memory_reserved(device) / 2**30,
        "rows": rows, "profile": profile,
    }
    head = (f"{'B':>4} {'L':>4} {'eager ms':>9} {'graph ms':>9} {'x':>5} {'eng eager':>10} {'eng graph':>10} "
            f"{'x':>5} {'capture s':>9} {'|diff| A':>9} {'req s':>7} {'bb/s':>7}")
    print(f"{result['device']}, {weights_name} ({config.mode}), {args.precision}, T = {T}")
    print(head)
    for r in rows:
        print(f"{r['batch']:>4} {r['length']:>4} {r['eager_ms']:>9.2f} {r['graph_ms']:>9.2f} {r['speedup']:>5.1f} "
              f"{r['engine_eager_ms']:>10.2f} {r['engine_graph_ms']:>10.2f} {r['engine_speedup']:>5.1f} "
              f"{r['capture_s']:>9.2f} {r['max_abs_diff_A']:>9.1e} {r['request_s_graph']:>7.1f} "
              f"{r['backbones_per_s_graph']:>7.2f}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
