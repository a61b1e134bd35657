"""DDP scaling of real training (Lightning, the shipped configuration, our data): samples/s on 1 and N GPUs.

Each run trains for --minutes through ``model.training.run_training`` (the same path as ``mhcflash
train``: length-bucketed DDP sampler, bf16, clipping, AdamW) on chains packed by scripts/pack_chains.py,
from a fresh start, and reads the logged ``train/samples_per_s`` (per rank, measured between log
intervals; the first --skip intervals are warm-up). Global throughput = per-rank median x ranks
(every rank draws the same number of batches per epoch from the bucketed sampler).

    python benchmarks/ddp_scaling.py configs/ship_mhc_flash.txt --chains .gpu_data/chains.npz \
        --devices 1 --minutes 2 --out DIR
    python benchmarks/ddp_scaling.py configs/ship_mhc_flash.txt --chains ... --devices 2 --minutes 2 --out DIR
    python benchmarks/ddp_scaling.py --summarize DIR        # efficiency = thr(N) / (N thr(1))

Lightning's DDP launcher re-runs this script once per extra rank; only rank 0 writes results.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))


def summarize(out: Path) -> None:
    runs = {r["devices"]: r for r in (json.loads(p.read_text()) for p in sorted(out.glob("ddp_*.json")))}
    if 1 not in runs:
        sys.exit(f"no 1-device run in {out}")
    base = runs[1]["global_samples_per_s"]
    print(f"{'GPUs':>5} {'samples/s':>10} {'per GPU':>9} {'efficiency':>11}")
    rows = []
    for n, r in sorted(runs.items()):
        eff = r["global_samples_per_s"] / (n * base)
        rows.append({"devices": n, "global_samples_per_s": r["global_samples_per_s"], "efficiency": eff})
        print(f"{n:>5} {r['global_samples_per_s']:>10.1f} {r['per_rank_samples_per_s']:>9.1f} {eff:>11.1%}")
    (out / "ddp_summary.json").write_text(json.dumps({"rows": rows, "gpu": runs[1].get("gpu")}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", nargs="?")
    ap.add_argument("--chains", type=Path)
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--max-residues", type=int, default=4096, help="padded residues per batch cap")
    ap.add_argument("--max-pair-elements", type=int, default=None,
                    help="padded pair entries per batch cap, B * L_max^2 (bounds the pair stack's memory)")
    ap.add_argument("--skip", type=int, default=3, help="warm-up log intervals to drop")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", action="store_true", help="only print / write the efficiency table")
    args = ap.parse_args()
    if args.summarize:
        summarize(args.out)
        return
    if not args.config or not args.chains:
        ap.error("config and --chains are required for a run")

    import torch
    from pack_chains import unpack

    from model.config import load_config
    from model.data.datamodule import ProteinDataModule
    from model.training import TrainOptions, run_training

    log_root = Path(os.environ.get("MHCFLASH_BENCH_LOGS", tempfile.gettempdir())) / "ddp_scaling"
    cfg = load_config(args.config).replace(name=f"ddp_{args.devices}", logDirectory=str(log_root),
                                           logEverySteps=10)
    dm = ProteinDataModule(cfg, chains=unpack(args.chains), max_residues_per_batch=args.max_residues,
                           max_pair_elements_per_batch=args.max_pair_elements,
                           pad_to_multiple=8)
    t0 = time.time()
    result = run_training(cfg, TrainOptions(accelerator="gpu", devices=str(args.devices), resume="never",
                                            max_minutes=args.minutes, progress_bar=False,
                                            export_weights=False), datamodule=dm)
    wall = time.time() - t0
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        return
    metrics = max((result.run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    with metrics.open() as f:
        rates = [float(r["train/samples_per_s"]) for r in csv.DictReader(f) if r.get("train/samples_per_s")]
    kept = rates[args.skip:] or rates
    per_rank = statistics.median(kept)
    res = {"devices": args.devices, "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "config": args.config, "minutes": args.minutes, "wall_s": wall, "global_step": result.global_step,
           "intervals": len(rates), "per_rank_samples_per_s": per_rank,
           "global_samples_per_s": per_rank * args.devices}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"ddp_{args.devices}.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
