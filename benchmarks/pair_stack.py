"""The pair stack (``PairTransformNet``) eager vs ``torch.compile``d per layer, on a GPU, in one run.

The pair stack is where a sampling step of the shipped model spends its time (profile of a B = 64,
L = 128 step: LayerNorm 24 %, layout copies 23 %, mul 18 %, sigmoid 9 %, GEMM 11.5 %: memory-bound
kernels on [B, L, L, C_p] tensors). This script times the shipped weights' pair stack at the given
shapes, four ways, each after warm-up:

  eager          PairTransformNet as written (the reference)
  eager+graph    the same replayed from a CUDA graph (no launch overhead)
  compiled       PairTransformNet.compile_layers() (inductor: fused Triton kernels)
  compiled+graph the compiled stack replayed from a CUDA graph (what the service runs)

Forward shapes run under ``torch.no_grad`` (sampling); ``--train-shapes`` time forward + backward with
parameter gradients (training, eager vs compiled). The variants are timed in turns (round r times
every variant once), the median over ``--rounds`` rounds is reported. Before timing, each compiled
output (and, for training, every parameter gradient) is compared with eager on the same inputs:
max |compiled - eager| / max |eager|; both bf16 variants are also compared with the float32 eager
stack (``rel_err_*_bf16_vs_fp32``: how far each is from what bf16 approximates). A floor per shape is printed: bytes of the [B, L, L, C_p]
tensors every layer must at least read and write once, over the measured copy bandwidth.

    python benchmarks/pair_stack.py [--weights weights/mhc_flash_v1] [--shapes 64x128,16x256,4x512,1x1024] \
        [--train-shapes 64x64,32x128] [--rounds 7] [--iters 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from timing import event_ms

from model.cuda_graphs import capture_graph
from model.weights_io import load_weights


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s]


def make_inputs(batch: int, length: int, c_p: int, device: torch.device, seed: int):
    """p [B, L, L, C_p] ~ N(0, 1); mask [B, L] with the last sample 3/4 long (real zeros)."""
    g = torch.Generator(device).manual_seed(seed)
    p = torch.randn(batch, length, length, c_p, generator=g, device=device)
    mask = torch.ones(batch, length, device=device)
    mask[-1, (3 * length) // 4:] = 0.0
    return p, mask


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-to-device copy rate, bytes/s (read + write counted), 1 GiB buffers."""
    a = torch.empty(2**28, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    ms = min(event_ms(lambda: b.copy_(a), 10) for _ in range(3))
    return 2 * a.numel() * 4 / (ms * 1e-3)


def floor_ms(batch: int, length: int, config, bandwidth: float) -> float:
    """Lower bound from memory traffic: per layer, each tri-mul reads p (fp32) and writes its update,
    its 4 C + C_p projection and x once in bf16; the transition reads p, writes n C_p in bf16 and
    reads it back; p (fp32) is written once per residual update. GEMM time is not included."""
    n = batch * length * length
    c_p, c = config.pairFeatureDimension, config.triangularMultiplicativeHiddenDimension
    tri = (4 * c_p + 2 * (4 * c + c_p) + 2 * 2 * c + 2 * c_p + 4 * c_p) * n  # bytes
    transition = (4 * c_p + 2 * 2 * config.pairTransitionN * c_p + 4 * c_p) * n
    per_layer = (2 * tri if config.includeTriangularMultiplicativeUpdate else 0) + transition
    return 1e3 * config.numPairTransformLayers * per_layer / bandwidth


def bind(fn, *args):
    return lambda: fn(*args)


def train_step(net, p, mask, w):
    """One forward + backward of sum(net(p, mask) * w) under bf16 autocast; returns the output."""
    def fn():
        net.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(p, mask)
        (out.float() * w).sum().backward()
        return out
    return fn


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=str(ROOT / "weights" / "mhc_flash_v1"))
    ap.add_argument("--shapes", default="64x128,16x256,4x512,1x1024", help="forward shapes, comma-separated BxL")
    ap.add_argument("--train-shapes", default="64x64,32x128", help="forward + backward shapes ('' for none)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mode", default=None, help="torch.compile mode (default: inductor default)")
    ap.add_argument("--dynamic", choices=("true", "auto"), default="true",
                    help="true: compile with dynamic shapes from the first call (what compile_denoiser does); "
                         "auto: static first, dynamic after the first new shape (torch's default)")
    ap.add_argument("--profile", default="", metavar="BxL,...",
                    help="also print the top CUDA kernels of 3 forward calls, eager and compiled, at these shapes")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pair_stack.py needs a CUDA device")
    device = torch.device("cuda")
    loaded = load_weights(args.weights, device)
    config = loaded.config
    eager_net = loaded.denoiser.pair_transform_net
    if eager_net is None:
        sys.exit(f"{loaded.name} has no pair stack (pair-free or numPairTransformLayers 0)")
    compiled_net = copy.deepcopy(eager_net)
    compiled_net.compile_layers(dynamic=True if args.dynamic == "true" else None, mode=args.mode)
    c_p = config.pairFeatureDimension
    bandwidth = copy_bandwidth(device)

    def run(net):
        def fn(p, mask):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return net(p, mask)
        return fn

    rows = []
    with torch.no_grad():
        for batch, length in parse_shapes(args.shapes):
            p, mask = make_inputs(batch, length, c_p, device, seed=batch * 7919 + length)
            eager_net.eval(), compiled_net.eval()
            ref = run(eager_net)(p, mask)
            ref32 = eager_net(p, mask)  # float32, no autocast: what both bf16 variants approximate
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = run(compiled_net)(p, mask)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            err = rel_err(out, ref)
            errs32 = {"rel_err_eager_bf16_vs_fp32": rel_err(ref, ref32),
                      "rel_err_compiled_bf16_vs_fp32": rel_err(out, ref32)}
            del out, ref, ref32
            fns = {"eager": bind(run(eager_net), p, mask), "compiled": bind(run(compiled_net), p, mask)}
            pool = torch.cuda.graph_pool_handle()  # the sampling step's capture: side-stream warm-up, one pool
            replay_e, _ = capture_graph(bind(run(eager_net), p, mask), device, pool)
            replay_c, _ = capture_graph(bind(run(compiled_net), p, mask), device, pool)
            fns["eager+graph"], fns["compiled+graph"] = replay_e, replay_c
            times = {k: [] for k in fns}
            for _ in range(args.rounds):
                for k, fn in fns.items():
                    times[k].append(event_ms(fn, args.iters))
            med = {k: statistics.median(v) for k, v in times.items()}
            row = {"kind": "forward", "batch": batch, "length": length, "compile_s": compile_s,
                   "rel_err": err, **errs32, "floor_ms": floor_ms(batch, length, config, bandwidth),
                   **{f"{k}_ms": v for k, v in med.items()},
                   "speedup_graphed": med["eager+graph"] / med["compiled+graph"],
                   "speedup_eager": med["eager"] / med["compiled"]}
            rows.append(row)
            del fns, replay_e, replay_c, pool
            print(f"done forward {batch}x{length}", file=sys.stderr, flush=True)

    for batch, length in parse_shapes(args.train_shapes):
        eager_net.train(), compiled_net.train()
        for net in (eager_net, compiled_net):  # dropout off: the same function in both
            for m in net.modules():
                if hasattr(m, "p") and isinstance(m.p, float):
                    m.p = 0.0
        p, mask = make_inputs(batch, length, c_p, device, seed=batch * 7919 + length)
        w = torch.randn(batch, length, length, c_p, device=device, generator=torch.Generator(device).manual_seed(3))

        eager_net.zero_grad(set_to_none=True)
        (eager_net(p, mask) * w).sum().backward()  # float32, no autocast
        grads32 = {n: q.grad.clone() for n, q in eager_net.named_parameters() if q.grad is not None}
        ref = train_step(eager_net, p, mask, w)().detach()
        ref_grads = {n: q.grad.clone() for n, q in eager_net.named_parameters() if q.grad is not None}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = train_step(compiled_net, p, mask, w)().detach()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        grads = dict(compiled_net.named_parameters())
        grad_err = max(rel_err(grads[n].grad, g) for n, g in ref_grads.items())
        errs32 = {"grad_rel_err_eager_bf16_vs_fp32": max(rel_err(g, grads32[n]) for n, g in ref_grads.items()),
                  "grad_rel_err_compiled_bf16_vs_fp32": max(rel_err(grads[n].grad, grads32[n]) for n in grads32)}
        fns = {"eager": train_step(eager_net, p, mask, w), "compiled": train_step(compiled_net, p, mask, w)}
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                times[k].append(event_ms(fn, max(1, args.iters // 2)))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"kind": "train", "batch": batch, "length": length, "compile_s": compile_s,
                     "rel_err": rel_err(out, ref), "grad_rel_err": grad_err, **errs32,
                     **{f"{k}_ms": v for k, v in med.items()}, "speedup_eager": med["eager"] / med["compiled"]})
        print(f"done train {batch}x{length}", file=sys.stderr, flush=True)

    profiles = {}
    for batch, length in parse_shapes(args.profile):
        from torch.profiler import ProfilerActivity, profile

        p, mask = make_inputs(batch, length, c_p, device, seed=0)
        eager_net.eval(), compiled_net.eval()
        for name, net in (("eager", eager_net), ("compiled", compiled_net)):
            with torch.no_grad():
                run(net)(p, mask)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        run(net)(p, mask)
                    torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=90)
            profiles[f"{name} {batch}x{length}"] = table
            print(f"profile {name} {batch}x{length} (3 forward calls):\n{table}")

    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "weights": loaded.name,
              "compile_mode": args.mode, "dynamic": args.dynamic, "copy_bandwidth_GBps": bandwidth / 1e9, "rounds": args.rounds,
              "iters": args.iters, "max_memory_allocated_GiB": torch.cuda.max_memory_allocated(device) / 2**30,
              "rows": rows, "profiles": profiles}
    print(f"{result['device']}, {loaded.name} pair stack ({config.numPairTransformLayers} layers, C_p = {c_p}), "
          f"bf16 autocast, copy bandwidth {bandwidth / 1e9:.0f} GB/s")
    print(f"{'kind':>7} {'B':>4} {'L':>5} {'eager':>8} {'e+graph':>8} {'compiled':>9} {'c+graph':>8} "
          f"{'x graph':>7} {'floor':>7} {'rel err':>8} {'compile s':>9}")
    for r in rows:
        print(f"{r['kind']:>7} {r['batch']:>4} {r['length']:>5} {r['eager_ms']:>8.2f} "
              f"{r.get('eager+graph_ms', float('nan')):>8.2f} {r['compiled_ms']:>9.2f} "
              f"{r.get('compiled+graph_ms', float('nan')):>8.2f} {r.get('speedup_graphed', r['speedup_eager']):>7.2f} "
              f"{r.get('floor_ms', float('nan')):>7.2f} {max(r['rel_err'], r.get('grad_rel_err', 0)):>8.1e} "
              f"{r['compile_s']:>9.1f}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
