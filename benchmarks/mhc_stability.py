"""Evidence for mHC: plain vs mHC denoiser on the same real data, seed and steps.

Trains a tiny Genie-style denoiser twice per learning rate (``useMHCMode`` False / True), at a
normal and at a deliberately too-high learning rate, on real CA traces from the ``cgdms`` package,
with a plain PyTorch loop (AdamW, no warm-up, no clipping: instability must be visible). Records per
step: loss, total gradient norm, and for mHC the H_res diagnostics of ``model.mhc.mhc_diagnostics``
(row / column sum errors, composite Amax gain). Then times a training step (forward + backward +
AdamW) of plain vs mHC at n = ``--n`` on the chosen device, interleaved A/B so that load from
other processes hits both alike.

Writes ``mhc_stability.json`` (settings, curves, summaries, timings) and ``mhc_stability.png`` into
``--out``. Usage (a few CPU minutes)::

    python benchmarks/mhc_stability.py --out runs/bench_mhc --steps 150

Summary numbers per run: final loss (mean of the last 20 steps), max gradient norm, gradient-norm
spikes (steps whose norm exceeds ``SPIKE_FACTOR`` x the median of the previous ``SPIKE_WINDOW``
steps), loss spikes (same rule on the loss), first non-finite step, and for mHC the max Amax gain.
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from model import build_denoiser
from model.config import Config
from model.data.parse import parse_cgdms_file
from model.data.sources import cgdms_chain_dir
from model.diffusion import Schedule, q_sample
from model.diffusion import loss as diffusion_loss
from model.mhc import mhc_diagnostics

SPIKE_FACTOR = 5.0
SPIKE_WINDOW = 20

# A tiny model that trains in CPU minutes; dropout off so the two variants see identical noise.
TINY = {
    "singleFeatureDimension": 32,
    "pairFeatureDimension": 16,
    "positionalEmbeddingDimension": 16,
    "timestepEmbeddingDimension": 16,
    "relativePositionK": 8,
    "numPairTransformLayers": 1,
    "triangularMultiplicativeHiddenDimension": 16,
    "includeTriangularAttention": False,
    "triangularDropout": 0.0,
    "pairTransitionN": 2,
    "numStructureLayers": 4,
    "numStructureBlocks": 1,
    "ipaHiddenDimension": 8,
    "ipaNumHeads": 4,
    "ipaNumQkPoints": 4,
    "ipaNumVPoints": 4,
    "ipaDropout": 0.0,
    "numStructureTransitionLayers": 1,
    "structureTransitionDropout": 0.0,
    "numTimesteps": 1000,
}


def cgdms_chains(max_len: int, min_len: int, limit: int) -> list[torch.Tensor]:
    """Centred CA traces [L_i, 3] from the cgdms chains, read by ``model.data`` (cgdms not imported)."""
    root = cgdms_chain_dir()
    if root is None:
        raise SystemExit("cgdms is not installed (pip install cgdms): it provides the real training chains")
    chains = []
    for path in sorted(root.glob("*.txt")):
        ca = torch.as_tensor(parse_cgdms_file(path).ca, dtype=torch.float32)  # [L, 3]
        if not (min_len <= ca.shape[0] <= max_len):
            continue
        chains.append(ca - ca.mean(dim=0))
        if len(chains) == limit:
            break
    if len(chains) < 8:
        raise SystemExit(f"only {len(chains)} cgdms chains of {min_len}-{max_len} residues in {root}")
    return chains


def make_batches(chains: list[torch.Tensor], steps: int, batch: int, num_timesteps: int, seed: int):
    """The same list of (x0 [B, L, 3], mask [B, L], t [B], noise [B, L, 3]) for every variant."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(len(chains), (batch,), generator=g).tolist()
        length = max(chains[i].shape[0] for i in idx)
        x0 = torch.zeros(batch, length, 3)
        mask = torch.zeros(batch, length)
        for b, i in enumerate(idx):
            x0[b, : chains[i].shape[0]] = chains[i]
            mask[b, : chains[i].shape[0]] = 1.0
        t = torch.randint(1, num_timesteps + 1, (batch,), generator=g)
        noise = torch.randn(batch, length, 3, generator=g) * mask.unsqueeze(-1)
        out.append((x0, mask, t, noise))
    return out


def count_spikes(values: list[float]) -> int:
    spikes = 0
    for i in range(SPIKE_WINDOW, len(values)):
        ref = statistics.median(values[i - SPIKE_WINDOW:i])
        if math.isfinite(values[i]) and ref > 0 and values[i] > SPIKE_FACTOR * ref:
            spikes += 1
    return spikes


def train(config: Config, batches, lr: float, seed: int, device: str, diag_every: int) -> dict:
    torch.manual_seed(seed)
    model = build_denoiser(config).to(device).train()
    schedule = Schedule.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses, grad_norms, diags = [], [], []
    first_nonfinite = None
    for step, (x0, mask, t, noise) in enumerate(batches):
        x0, mask, t, noise = x0.to(device), mask.to(device), t.to(device), noise.to(device)
        x_t = q_sample(schedule, x0, t, noise, mask)
        eps_hat = model(x_t, t, mask)
        loss = diffusion_loss(eps_hat, noise, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")))
        losses.append(loss.item())
        grad_norms.append(gnorm)
        if config.useMHCMode and (step % diag_every == 0 or step == len(batches) - 1):
            d = mhc_diagnostics(model, mask)
            diags.append({"step": step, **d})
        if not (math.isfinite(losses[-1]) and math.isfinite(gnorm)):
            first_nonfinite = step
            break
        opt.step()
    tail = [v for v in losses[-20:] if math.isfinite(v)]
    summary = {
        "final_loss": statistics.fmean(tail) if tail else None,
        "min_loss": min((v for v in losses if math.isfinite(v)), default=None),
        "max_grad_norm": max((v for v in grad_norms if math.isfinite(v)), default=None),
        "median_grad_norm": statistics.median(grad_norms) if grad_norms else None,
        "grad_norm_spikes": count_spikes(grad_norms),
        "loss_spikes": count_spikes(losses),
        "first_nonfinite_step": first_nonfinite,
        "steps_run": len(losses),
    }
    if diags:
        summary["amax_gain_max"] = max(d["amax_gain"] for d in diags)
        summary["amax_gain_worst_max"] = max(d["amax_gain_worst"] for d in diags)
        summary["amax_gain_final"] = diags[-1]["amax_gain"]
        summary["col_sum_err_max"] = max(d["col_sum_err_max"] for d in diags)
    return {"loss": losses, "grad_norm": grad_norms, "diagnostics": diags, "summary": summary}


def time_steps(configs: dict[str, Config], batch, device: str, repeats: int, seed: int) -> dict:
    """Median wall time of one training step per variant, A/B interleaved after 3 warm-up steps."""
    models, opts = {}, {}
    for name, cfg in configs.items():
        torch.manual_seed(seed)
        models[name] = build_denoiser(cfg).to(device).train()
        opts[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    schedule = Schedule.from_config(next(iter(configs.values())))
    x0, mask, t, noise = (v.to(device) for v in batch)
    x_t = q_sample(schedule, x0, t, noise, mask)

    def step(name: str) -> float:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        start = time.perf_counter()
        loss = diffusion_loss(models[name](x_t, t, mask), noise, mask)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()
        sync()
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(3):
        for name in configs:
            step(name)
    for _ in range(repeats):
        for name in configs:
            times[name].append(step(name))
    out = {name: {"median_s": statistics.median(v), "min_s": min(v), "all_s": v} for name, v in times.items()}
    out["overhead_pct_median"] = 100.0 * (out["mhc"]["median_s"] / out["plain"]["median_s"] - 1.0)
    out["overhead_pct_min"] = 100.0 * (out["mhc"]["min_s"] / out["plain"]["min_s"] - 1.0)
    out["params"] = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    return out


def _moving_average(values: list[float], window: int) -> list[float]:
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if math.isfinite(v)]
        out.append(statistics.fmean(chunk) if chunk else float("nan"))
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = list(results["runs"].keys())
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = {"plain": "tab:blue", "mhc": "tab:orange"}
    for col, lr in enumerate(lrs[:2]):
        for name, run in results["runs"][lr].items():
            axes[0, col].plot(run["loss"], color=colors[name], lw=0.6, alpha=0.35)
            axes[0, col].plot(_moving_average(run["loss"], 10), color=colors[name], lw=1.5,
                              label=f"{name} (10-step mean)")
            axes[1, 0].plot(run["grad_norm"], color=colors[name], lw=1,
                            ls="-" if col == 0 else "--", label=f"{name} lr={lr}")
        axes[0, col].set_title(f"training loss, lr = {lr}")
        axes[0, col].set_xlabel("step")
        axes[0, col].legend()
    axes[1, 0].set_yscale("log")
    axes[1, 0].set_title("total gradient norm")
    axes[1, 0].set_xlabel("step")
    axes[1, 0].legend(fontsize=8)
    for lr in lrs:
        diags = results["runs"][lr]["mhc"]["diagnostics"]
        if diags:
            axes[1, 1].plot([d["step"] for d in diags], [d["amax_gain"] for d in diags], label=f"mean, lr={lr}")
            axes[1, 1].plot([d["step"] for d in diags], [d["amax_gain_worst"] for d in diags], ls=":",
                            label=f"worst residue, lr={lr}")
    axes[1, 1].set_title("mHC composite Amax gain (paper: ~1.6 mHC, ~3000 HC)")
    axes[1, 1].set_xlabel("step")
    axes[1, 1].legend(fontsize=8)
    timing = results.get("timing", {})
    if timing:
        parts = [f"{size} {tm['overhead_pct_median']:+.1f}%" for size, tm in timing.items()]
        fig.suptitle(f"mHC n={results['settings']['n']}: step-time overhead vs plain (median, "
                     f"{results['settings']['device']}): " + ", ".join(parts))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="output directory (JSON + PNG)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--min-len", type=int, default=20)
    ap.add_argument("--num-chains", type=int, default=400)
    ap.add_argument("--lr", type=float, default=1e-3, help="normal learning rate (tiny model)")
    ap.add_argument("--high-lr", type=float, default=3e-2, help="deliberately too-high learning rate")
    ap.add_argument("--n", type=int, default=4, help="mhcExpansionRate")
    ap.add_argument("--layers", type=int, default=4, help="numStructureLayers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--diag-every", type=int, default=5)
    ap.add_argument("--timing-repeats", type=int, default=10, help="0: skip the step-time comparison")
    ap.add_argument("--timing-batch", type=int, default=8)
    ap.add_argument("--timing-genie-size", action="store_true",
                    help="also time plain vs mHC at Genie's default sizes (C_s = C_p = 128, 5 layers)")
    ap.add_argument("--skip-training", action="store_true", help="only the step-time comparison")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    base = Config().replace(**{**TINY, "numStructureLayers": args.layers, "mhcExpansionRate": args.n})
    configs = {"plain": base.replace(useMHCMode=False), "mhc": base.replace(useMHCMode=True)}
    chains = cgdms_chains(args.max_len, args.min_len, args.num_chains)
    results: dict = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                  "num_chains_loaded": len(chains), "torch": torch.__version__,
                                  "threads": torch.get_num_threads(),
                                  "spike_rule": f"> {SPIKE_FACTOR} x median of previous {SPIKE_WINDOW}",
                                  "config": base.to_text() if hasattr(base, "to_text") else repr(base)},
                     "runs": {}}
    if not args.skip_training:
        batches = make_batches(chains, args.steps, args.batch, base.numTimesteps, args.seed)
        for lr in (args.lr, args.high_lr):
            results["runs"][str(lr)] = {}
            for name, cfg in configs.items():
                start = time.perf_counter()
                run = train(cfg, batches, lr, args.seed, args.device, args.diag_every)
                run["summary"]["wall_s"] = time.perf_counter() - start
                results["runs"][str(lr)][name] = run
                print(f"lr={lr:g} {name:5s} " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in run["summary"].items()),
                    flush=True)
    # timing batch: the longest chains (the most realistic per-step work this data allows)
    longest = sorted(chains, key=lambda c: -c.shape[0])[: args.timing_batch]
    tb = make_batches(longest, 1, args.timing_batch, base.numTimesteps, args.seed + 1)[0]
    sizes = {"tiny": configs}
    if args.timing_genie_size:  # Genie's default widths and depths (Config() defaults)
        genie = Config().replace(mhcExpansionRate=args.n, ipaDropout=0.0, structureTransitionDropout=0.0,
                                 triangularDropout=0.0)
        sizes["genie"] = {"plain": genie.replace(useMHCMode=False), "mhc": genie.replace(useMHCMode=True)}
    results["timing"] = {}
    for size, cfgs in (sizes.items() if args.timing_repeats > 0 else ()):
        tm = time_steps(cfgs, tb, args.device, args.timing_repeats, args.seed)
        tm["batch"], tm["length"] = args.timing_batch, int(tb[0].shape[1])
        results["timing"][size] = tm
        print(f"step time [{size}] ({args.device}, {torch.get_num_threads()} threads, batch "
              f"{args.timing_batch}, L={tm['length']}, params {tm['params']}): plain "
              f"{tm['plain']['median_s'] * 1e3:.1f} ms, mhc {tm['mhc']['median_s'] * 1e3:.1f} ms, overhead "
              f"{tm['overhead_pct_median']:+.1f}% (median), {tm['overhead_pct_min']:+.1f}% (min)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mhc_stability.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    if results["runs"]:
        plot(results, args.out / "mhc_stability.png")
    print(f"wrote {args.out / 'mhc_stability.json'}" + ("" if not results["runs"] else
                                                        f" and {args.out / 'mhc_stability.png'}"))
    return results


if __name__ == "__main__":
    main()
