"""Plot training curves (loss, validation loss, grad norm, mHC Amax gain) from Lightning CSV logs.

    python scripts/plot_training.py weights/mhc_flash_v1/training_log/*.csv --out curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

SERIES = [("train/loss_step", "training loss"), ("val/loss", "validation loss"),
          ("train/grad_norm", "gradient norm"), ("mhc/amax_gain", "mHC composite Amax gain")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    data: dict[str, dict[int, float]] = {k: {} for k, _ in SERIES}
    for path in args.csv:
        for row in csv.DictReader(path.open()):
            for key, _ in SERIES:
                if row.get(key):
                    data[key][int(row["step"])] = float(row[key])
    fig, axes = plt.subplots(1, len(SERIES), figsize=(4.2 * len(SERIES), 3.4))
    for ax, (key, title) in zip(axes, SERIES):
        steps = sorted(data[key])
        ax.plot(steps, [data[key][s] for s in steps], lw=1)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
