"""Flash-IPA vs dense IPA: time and peak memory, forward + backward, and the pair-free path.

Compares, at Genie's default IPA sizes (C_s 128, 12 heads, C 16, 4 / 8 points, C_p 128, rank 2):
- ``flash``: model/ipa/flash.py FlashIPA on given factors (the attention backend chosen once);
- ``dense_ref``: the same module's dense reference (materialised L x L logits and pair values);
- ``ipa``: the standard dense IPA of model/ipa/dense.py on a dense pair tensor z [B, L, L, C_p];
- ``flash_graphed`` / ``ipa_graphed`` (``--graphed``): the same two layers, forward and backward
  replayed from CUDA graphs, i.e. without the Python / launch overhead that dominates below L ~ 1024;
- ``pairfree``: PairFreeFactorizer (k-NN, no L x L tensor) + FlashIPA, up to L = 16384.
Plus the attention core alone: achieved FLOP/s (2 B H L^2 (D_qk + D_v) forward) against a bf16
matmul rate measured in the same run.

Timing: CUDA events, warm-up, median over repeats, inputs rotated among 3 pre-built sets (no cached
outputs). Up to --h2h-max, flash and standard IPA are also timed head to head, alternating calls
(--h2h-repeats each), because below L ~ 1024 both are launch-bound at ~1-9 ms and run-to-run drift
between separately timed variants is as large as their difference. Peak memory = max_memory_allocated during the step minus what was allocated before.
Correctness is checked against the dense reference before anything is timed.

Usage (GPU): python benchmarks/bench_ipa.py --out bench_out
Smoke test (CPU, tiny sizes): python benchmarks/bench_ipa.py --smoke --out /tmp/bench_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.config import Config
from model.geometry import Frames, frenet_serret_frames
from model.ipa.attention import attention
from model.ipa.backends import describe
from model.ipa.factorizer import PairFactors, PairFreeFactorizer
from model.network.builder import build_ipa


def chain(batch: int, length: int, device, generator) -> torch.Tensor:
    """Random-walk CA trace [B, L, 3] with 3.8 A steps, centred."""
    d = torch.randn(batch, length, 3, generator=generator)
    d = d + 0.8 * torch.roll(d, 1, 1)
    x = torch.cumsum(3.8 * d / d.norm(dim=-1, keepdim=True), 1)
    return (x - x.mean(1, keepdim=True)).to(device)


def time_call(fn, i: int, device) -> float:
    """ms of one call ``fn(i)``: CUDA events on GPU (synchronised after), wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(i)
    return 1e3 * (time.perf_counter() - t0)


class Timer:
    """Median wall time of ``fn`` (CUDA events on GPU) and its peak extra memory."""

    def __init__(self, device, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn, n_inputs: int) -> tuple[float, float]:
        cuda = self.device.type == "cuda"
        for i in range(self.warmup):
            fn(i % n_inputs)
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        times = [time_call(fn, i % n_inputs, self.device) for i in range(self.repeats)]
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else float("nan")
        return statistics.median(times), peak


def interleaved(fn_a, fn_b, n_inputs: int, repeats: int, device) -> tuple[float, float]:
    """Median ms of fn_a and fn_b timed alternately (a, b, a, b, ...), so that clock and load drift
    hit both alike: the head-to-head figure for the launch-bound small lengths."""
    times = ([], [])
    for i in range(repeats):
        for fn, out in ((fn_a, times[0]), (fn_b, times[1])):
            out.append(time_call(fn, i % n_inputs, device))
    return statistics.median(times[0]), statistics.median(times[1])


def is_oom(err: Exception) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


class TensorArgs(torch.nn.Module):
    """A layer called with plain tensors (what make_graphed_callables needs): frames and factors rebuilt."""

    def __init__(self, layer, flash: bool):
        super().__init__()
        self.layer, self.flash = layer, flash

    def forward(self, x, pair_a, pair_b, rots, trans, mask):
        pair = PairFactors(pair_a, pair_b) if self.flash else pair_a
        return self.layer(x, pair, Frames(rots, trans), mask)


def graphed_step(layer, flash: bool, sets, dtype):
    """fwd + bwd of ``layer`` replayed from CUDA graphs (torch.cuda.make_graphed_callables), per input set.

    Inputs are copied into the graph's static tensors before each replay (part of the timed step).
    """
    wrapper = TensorArgs(layer, flash)
    first = sets[0]
    static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in first)
    with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
        graphed = torch.cuda.make_graphed_callables(wrapper, static, num_warmup_iters=3)

    def step(i):
        for dst, src in zip(static, sets[i]):
            dst.data.copy_(src)
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False):
            y = graphed(*static)
        y.float().square().mean().backward()
    return step


def layer_step(model, x, pair, frames, mask, dtype, **kw):
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        y = model(x, pair, frames, mask, **kw)
    y.float().square().mean().backward()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, runs on CPU in seconds")
    ap.add_argument("--lengths", type=int, nargs="*", default=[128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--pair-free-lengths", type=int, nargs="*", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--rank", type=int, default=2)
    ap.add_argument("--core-batches", type=int, nargs="*", default=None,
                    help="batch sizes for the attention-core FLOP/s section (default: --batch)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dense-max", type=int, default=4096, help="skip dense layers above this length")
    ap.add_argument("--h2h-max", type=int, default=1024,
                    help="up to this L, also time flash vs standard IPA interleaved (eager and graphed)")
    ap.add_argument("--h2h-repeats", type=int, default=200)
    ap.add_argument("--graphed", action="store_true",
                    help="also time flash and standard IPA replayed from CUDA graphs (GPU only)")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = Config().replace(useFlashMode=True, zFactorRank=args.rank)
    if args.smoke:
        config = config.replace(singleFeatureDimension=32, pairFeatureDimension=16, ipaNumHeads=4,
                                ipaHiddenDimension=8, kNeighbors=6)
        args.lengths, args.pair_free_lengths = [32, 64], [64, 128]
        args.repeats, args.warmup, args.dense_max, args.h2h_repeats = 2, 1, 64, 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    graphed = args.graphed and device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    flash = build_ipa(config).to(device)
    torch.nn.init.normal_(flash.linear_out.weight, std=0.02)
    dense = build_ipa(config.replace(useFlashMode=False)).to(device)
    torch.nn.init.normal_(dense.linear_out.weight, std=0.02)
    pair_free = PairFreeFactorizer(single_dim=config.singleFeatureDimension, rank=config.zFactorRank,
                                   channels=config.pairFeatureDimension, k=config.kNeighbors,
                                   max_offset=config.relativePositionK).to(device)
    timer = Timer(device, args.warmup, args.repeats)
    b, cs, cp, r = args.batch, config.singleFeatureDimension, config.pairFeatureDimension, config.zFactorRank
    choice = flash.backend(device, dtype)
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": str(dtype), "backend": describe(choice),
            "head_dims": flash.head_dims(dtype), "config": {k: getattr(config, k) for k in (
                "singleFeatureDimension", "pairFeatureDimension", "ipaNumHeads", "ipaHiddenDimension",
                "ipaNumQkPoints", "ipaNumVPoints", "zFactorRank", "kNeighbors")}, "batch": b}
    print(f"# {info['device']}  torch {info['torch']}  {dtype}  backend: {info['backend']}")

    def inputs(length, n=3):
        sets = []
        for _ in range(n):
            ca = chain(b, length, device, gen)
            mask = torch.ones(b, length, device=device)
            mask[-1, length - length // 7:] = 0  # a real padding tail
            frames = frenet_serret_frames(ca * mask[..., None], mask)
            x = torch.randn(b, length, cs, generator=gen).to(device).requires_grad_()
            fac = PairFactors(torch.randn(b, length, r, cp, generator=gen).to(device).requires_grad_(),
                              torch.randn(b, length, r, cp, generator=gen).to(device).requires_grad_())
            sets.append((x, fac, frames, mask))
        return sets

    # ---- correctness first (fp32 and the timed dtype), on the device
    x, fac, frames, mask = inputs(min(args.lengths), 1)[0]
    with torch.no_grad():
        ref = flash(x.float(), fac, frames, mask, reference=True)
        err32 = (flash(x, fac, frames, mask) - ref).abs().max().item()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            errlow = (flash(x, fac, frames, mask).float() - ref).abs().max().item()
    info["check"] = {"length": min(args.lengths), "max_abs_err_fp32": err32, f"max_abs_err_{dtype}": errlow,
                     "ref_max_abs": ref.abs().max().item()}
    print(f"# check vs dense reference: fp32 {err32:.2e}, {dtype} {errlow:.2e} (|y| max {ref.abs().max():.2f})")
    if err32 > 1e-3:
        raise SystemExit("flash path disagrees with the dense reference; not timing")

    rows, h2h = [], []
    for length in args.lengths:
        sets = inputs(length)
        zs = None
        kept = {}  # name -> timed fn, kept for the head-to-head below (L <= --h2h-max)
        names = ("flash", "dense_ref", "ipa") + (("flash_graphed", "ipa_graphed") if graphed else ())
        for name in names:
            if name not in ("flash", "flash_graphed") and length > args.dense_max:
                rows.append({"layer": name, "L": length, "ms": None, "peak_mib": None, "note": "skipped"})
                continue
            try:
                if name == "ipa":
                    zs = [torch.randn(b, length, length, cp, device=device, dtype=dtype) for _ in range(1)]
                    # NOTE: late binding on purpose (B023): `zs = None` below frees the L x L tensor
                    fn = lambda i: layer_step(dense, sets[i][0], zs[0], sets[i][2], sets[i][3], dtype)  # noqa: B023
                elif name == "flash_graphed":
                    flat = [(x, f.left, f.right, fr.rots, fr.trans, m) for x, f, fr, m in sets]
                    fn = graphed_step(flash, True, flat, dtype)
                elif name == "ipa_graphed":
                    z = torch.randn(b, length, length, cp, device=device, dtype=dtype)
                    unused = torch.zeros(1, device=device)
                    flat = [(x, z, unused, fr.rots, fr.trans, m) for x, f, fr, m in sets]
                    fn = graphed_step(dense, False, flat, dtype)
                else:
                    ref_flag = name == "dense_ref"
                    fn = lambda i, f=ref_flag: layer_step(flash, *sets[i], dtype, reference=f)  # noqa: B023 (this L's sets)
                ms, peak = timer(fn, len(sets))
                rows.append({"layer": name, "L": length, "ms": ms, "peak_mib": peak, "note": ""})
                if length <= args.h2h_max and name != "dense_ref":
                    kept[name] = fn
            except Exception as err:
                if not is_oom(err):
                    raise
                rows.append({"layer": name, "L": length, "ms": None, "peak_mib": None, "note": "OOM"})
            finally:
                if length > args.h2h_max:
                    zs = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(rows[-1])
        for a, b_name in (("flash", "ipa"), ("flash_graphed", "ipa_graphed")):
            if a in kept and b_name in kept:
                ms_a, ms_b = interleaved(kept[a], kept[b_name], len(sets), args.h2h_repeats, device)
                h2h.append({"L": length, "pair": f"{a} vs {b_name}", "ms_a": ms_a, "ms_b": ms_b, "ratio": ms_a / ms_b})
                print(h2h[-1])
        kept.clear()
        zs = None

    for length in args.pair_free_lengths:
        sets = inputs(length)

        def step(i, sets=sets):
            x, _, frames, mask = sets[i]
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                factors = pair_free(x, None, frames, mask)
                y = flash(x, factors, frames, mask)
            y.float().square().mean().backward()
        try:
            ms, peak = timer(step, len(sets))
            rows.append({"layer": "pairfree", "L": length, "ms": ms, "peak_mib": peak, "note": ""})
        except Exception as err:
            if not is_oom(err):
                raise
            rows.append({"layer": "pairfree", "L": length, "ms": None, "peak_mib": None, "note": "OOM"})
        print(rows[-1])

    # ---- attention core FLOP/s vs a measured matmul rate
    dqk, dv = flash.head_dims(dtype)
    h = config.ipaNumHeads
    n = 512 if args.smoke else 8192
    a_m = torch.randn(n, n, device=device, dtype=dtype)
    ms_mm, _ = timer(lambda i: a_m @ a_m, 1)
    mm_tflops = 2 * n**3 / (ms_mm * 1e-3) / 1e12
    core = []
    for cb in args.core_batches or [b]:
        for length in args.lengths:
            q = torch.randn(cb, length, h, dqk, device=device, dtype=dtype)
            k = torch.randn(cb, length, h, dqk, device=device, dtype=dtype)
            v = torch.randn(cb, length, h, dv, device=device, dtype=dtype)
            mask = torch.ones(cb, length, device=device)
            ms, _ = timer(lambda i, q=q, k=k, v=v, mask=mask: attention(q, k, v, mask, backend=choice, scale=1.0), 1)
            flops = 2 * cb * h * length * length * (dqk + dv)
            core.append({"B": cb, "L": length, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
                             "fraction_of_matmul": flops / (ms * 1e-3) / 1e12 / mm_tflops})
            print(f"core B={cb} L={length}: {ms:.3f} ms, {core[-1]['tflops']:.1f} TFLOP/s "
                  f"({100 * core[-1]['tflops'] / mm_tflops:.0f}% of matmul {mm_tflops:.0f})")

    print("\n| layer | L | fwd+bwd ms | peak MiB | note |\n|---|---|---|---|---|")
    for row in rows:
        ms = f"{row['ms']:.2f}" if row["ms"] is not None else "-"
        mem = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None and row["peak_mib"] == row["peak_mib"] else "-"
        print(f"| {row['layer']} | {row['L']} | {ms} | {mem} | {row['note']} |")

    if h2h:
        print("\n| L | head-to-head (interleaved) | ms | ms | ratio |\n|---|---|---|---|---|")
        for r in h2h:
            print(f"| {r['L']} | {r['pair']} | {r['ms_a']:.3f} | {r['ms_b']:.3f} | {r['ratio']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"info": info, "rows": rows, "head_to_head": h2h, "core": core, "matmul_tflops": mm_tflops, "command": " ".join(sys.argv)}
    (args.out / "bench_ipa.json").write_text(json.dumps(result, indent=2))
    plot(rows, core, mm_tflops, info, args.out / "bench_ipa.png")
    print(f"wrote {args.out / 'bench_ipa.json'} and {args.out / 'bench_ipa.png'}")


def plot(rows, core, mm_tflops, info, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in ("flash", "dense_ref", "ipa", "flash_graphed", "ipa_graphed", "pairfree"):
        pts = [(r["L"], r["ms"], r["peak_mib"]) for r in rows if r["layer"] == name and r["ms"] is not None]
        if not pts:
            continue
        ls, ms, mem = zip(*pts)
        axes[0].plot(ls, ms, "o-", label=name)
        if not any(math.isnan(m) for m in mem):  # no peak memory on CPU (NaN)
            axes[1].plot(ls, mem, "o-", label=name)
    if core:
        for cb in sorted({c.get("B", 1) for c in core}):
            pts = [c for c in core if c.get("B", 1) == cb]
            axes[2].plot([c["L"] for c in pts], [c["tflops"] for c in pts], "o-", label=f"attention core, B = {cb}")
        axes[2].axhline(mm_tflops, ls="--", color="gray", label="bf16 matmul")
    for ax, title in zip(axes, ("fwd+bwd time (ms)", "peak extra memory (MiB)", "core TFLOP/s")):
        ax.set_xscale("log", base=2)
        if ax.has_data():
            ax.set_yscale("log")
            ax.legend()
        ax.set_xlabel("L (residues)")
        ax.set_title(title)
    fig.suptitle(f"{info['device']} | {info['dtype']} | {info['backend'][:90]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
