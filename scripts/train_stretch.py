"""One stretch of training on a remote GPU machine reached by file transfer: resume from checkpoint parts,
train for N minutes, hand the checkpoint back in parts of at most 15 MB (for transfers of <= 16 MB a file).
The examples come packed (`scripts/pack_chains.py`), so that machine needs neither the sources nor biotite.

    python scripts/train_stretch.py configs/ship_mhc_flash.txt --chains .gpu_data/chains.npz \
        --state .gpu_state --minutes 8 --out "$OUT"

The run directory (runs/<name>/) is reused when the machine still holds it; otherwise the checkpoint
is rebuilt from <state>/last.ckpt.part*. Weights are exported afterwards on the workstation
(`model.training.checkpoints.load_checkpoint_denoiser`, then `model.weights_io.save_weights`), so nothing large
but the checkpoint comes back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import lightning.pytorch as pl

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pack_chains import unpack

from model.atomic_io import atomic_write
from model.config import load_config_with_overrides
from model.data.datamodule import ProteinDataModule
from model.training import PROFILERS, TrainOptions, batch_length_multiple, run_training
from model.training.stops import FaultInjection, TrainingStopped

PART = 15 * 2**20


def join_parts(state: Path, target: Path) -> bool:
    parts = sorted(state.glob("last.ckpt.part*"))
    if not parts or target.is_file():
        return False
    atomic_write(target, lambda f: [f.write(p.read_bytes()) for p in parts])
    return True


def split_parts(src: Path, out: Path) -> list[Path]:
    data, paths = src.read_bytes(), []
    for i in range(0, len(data), PART):
        p = out / f"last.ckpt.part{i // PART:02d}"
        p.write_bytes(data[i:i + PART])
        paths.append(p)
    return paths


class GraphStatsAtEnd(pl.Callback):
    """Keeps what ``graphTrainingStep``'s TrainGraphs did (captures, replays, eager calls, evictions, shapes
    held, why capturing stopped if it did) at the end of training; None without it."""

    def __init__(self) -> None:
        self.stats: dict | None = None

    def on_train_end(self, trainer, module) -> None:
        graphs = getattr(module, "train_graphs", None)
        if graphs is not None:
            self.stats = {**asdict(graphs.stats), "shapes_held": len(graphs), "failed": graphs.failed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--chains", required=True)
    ap.add_argument("--state", type=Path, default=Path(".gpu_state"))
    ap.add_argument("--minutes", type=float, default=8.0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--accelerator", default="gpu")
    ap.add_argument("--max-residues", type=int, default=None, help="padded residues per batch cap")
    ap.add_argument("--max-pair-elements", type=int, default=None,
                    help="padded pair entries per batch cap, B * L_max^2 (bounds the pair stack's memory)")
    ap.add_argument("--graph", action="store_true",
                    help="graphTrainingStep True (forward + backward replayed from CUDA graphs, lengths padded to 16), whatever the config says")
    ap.add_argument("--name", default=None, help="run name (default: the config's); a new name starts fresh")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, as `mhcflash train --set` (repeatable)")
    ap.add_argument("--profiler", choices=PROFILERS, default=None,
                    help="Lightning's per-hook host times, copied to <out>/fit-profile.txt")
    ap.add_argument("--fault", default=None, help="test hook: make a step fail for real, e.g. nan@3 (FaultInjection)")
    args = ap.parse_args()
    cfg = load_config_with_overrides(Path(args.config), args.overrides)
    if args.graph:
        cfg = cfg.replace(graphTrainingStep=True)
    if args.name:
        cfg = cfg.replace(name=args.name)
    run_dir = Path(cfg.logDirectory) / cfg.name
    last = run_dir / "checkpoints" / "last.ckpt"
    rebuilt = join_parts(args.state, last)
    print(f"resume: {'rebuilt from parts' if rebuilt else ('warm run dir' if last.is_file() else 'fresh start')}")
    dm = ProteinDataModule(cfg, chains=unpack(args.chains), max_residues_per_batch=args.max_residues,
                           max_pair_elements_per_batch=args.max_pair_elements,
                           pad_to_multiple=batch_length_multiple(cfg, otherwise=8))
    graphs = GraphStatsAtEnd()
    t0 = time.time()
    stopped = None
    try:
        result = run_training(cfg, TrainOptions(accelerator=args.accelerator, devices="1", max_minutes=args.minutes,
                                                progress_bar=False, export_weights=False, profiler=args.profiler,
                                                fault=FaultInjection.parse(args.fault) if args.fault else None),
                              datamodule=dm, callbacks=[graphs])
        last_ckpt, info = result.last_checkpoint, {"global_step": result.global_step,
                                                   "resumed_from": str(result.resumed_from) if result.resumed_from else None}
    except TrainingStopped as stop:  # NaN / OOM stop: keep its last good state and the metrics all the same
        stopped = stop
        last_ckpt = stop.checkpoint if stop.checkpoint is not None else last
        info = {"stopped": str(stop), "exit_code": stop.exit_code}
    wall = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    parts = split_parts(last_ckpt, args.out) if last_ckpt is not None and Path(last_ckpt).is_file() else []
    csvs = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if csvs:
        shutil.copy(csvs[-1], args.out / "metrics.csv")
    if (run_dir / "fit-profile.txt").is_file():
        shutil.copy(run_dir / "fit-profile.txt", args.out / "fit-profile.txt")
    info.update({"wall_s": wall, "parts": [p.name for p in parts], "train_graphs": graphs.stats})
    (args.out / "stretch.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    if stopped is not None:
        sys.exit(stopped.exit_code)


if __name__ == "__main__":
    main()
