"""Pack a config's training chains into one small .npz (ids, split, CA traces) for a GPU machine
that has neither the cgdms package, the PDB files nor biotite.

    python scripts/pack_chains.py configs/ship_mhc_flash.txt .gpu_data/chains.npz [--index FILE.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from model.config import load_config
from model.data.parse import Chain
from model.data.split import training_set, write_index


def pack(chains: list[Chain], assignment: dict[str, str], path: Path) -> None:
    lengths = np.array([len(c) for c in chains], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, ids=np.array([c.id for c in chains]), sequences=np.array([c.sequence for c in chains]),
        sources=np.array([c.source for c in chains]), lengths=lengths,
        split=np.array([assignment[c.id] for c in chains]),
        ca=np.concatenate([c.ca for c in chains]).astype(np.float32),
        residue_index=np.concatenate([c.residue_index for c in chains]).astype(np.int32))


def unpack(path: str | Path) -> list[Chain]:
    z = np.load(path)
    ends = np.cumsum(z["lengths"])
    starts = ends - z["lengths"]
    return [Chain(id=str(i), sequence=str(s), ca=z["ca"][a:b], residue_index=z["residue_index"][a:b],
                  source=str(src)) for i, s, src, a, b in zip(z["ids"], z["sequences"], z["sources"], starts, ends)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("out", type=Path)
    ap.add_argument("--index", type=Path, help="also write the training-set index (CSV) here")
    args = ap.parse_args()
    cfg = load_config(args.config)
    chains, assignment, _ = training_set(cfg)
    pack(chains, assignment, args.out)
    if args.index:
        write_index(args.index, chains, assignment)
    n_val = sum(v == "val" for v in assignment.values())
    print(f"packed {len(chains)} chains ({len(chains) - n_val} train, {n_val} val) -> {args.out}")


if __name__ == "__main__":
    main()
