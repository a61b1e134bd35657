"""Pack a config's training examples into one small .npz (ids, split, CA traces) for a GPU machine
that has neither the cgdms package, the PDB files nor biotite.

    python scripts/pack_chains.py configs/ship_pairfree_v2.txt .gpu_data/chains.npz [--index FILE.csv] \
        [--set dataDirectory=/path/to/data]

The sources are the config's ``datasetNames`` under its ``dataDirectory`` (``--set`` changes a key, as
``mhcflash train --set``).

The examples are packed as the recipe made them (cut at chain breaks, length-filtered, split by
band); `unpack` gives them back as `Chain`s and ``ProteinDataModule(config, chains=unpack(path))``
runs the same recipe on them (cutting and the split are deterministic and idempotent), so crops and
band-balanced batches come out as they would from the sources. Prints the build summary, the
examples per source and length band, and what the config's batch sampler makes of them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from model.config import ConfigError, key_location, load_config_with_overrides
from model.data.parse import Chain
from model.data.split import TRAIN, VAL, split_table, training_set, write_index


def pack(chains: list[Chain], assignment: dict[str, str], path: Path) -> None:
    lengths = np.array([len(c) for c in chains], dtype=np.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, ids=np.array([c.id for c in chains]), sequences=np.array([c.sequence for c in chains]),
        sources=np.array([c.source for c in chains]), paths=np.array([c.path for c in chains]), lengths=lengths,
        num_breaks=np.array([c.num_breaks for c in chains], dtype=np.int64),
        split=np.array([assignment[c.id] for c in chains]),
        ca=np.concatenate([c.ca for c in chains]).astype(np.float32),
        residue_index=np.concatenate([c.residue_index for c in chains]).astype(np.int32))


def unpack(path: str | Path) -> list[Chain]:
    with np.load(path) as z:
        z = {key: z[key] for key in z.files}  # NpzFile re-reads an array on every z[key]: read each once
    ends = np.cumsum(z["lengths"])
    starts = ends - z["lengths"]
    n = len(ends)
    paths = z.get("paths", [""] * n)
    breaks = z.get("num_breaks", [0] * n)
    ca, index = z["ca"], z["residue_index"]
    return [Chain(id=str(i), sequence=str(s), ca=ca[a:b], residue_index=index[a:b], source=str(src),
                  path=str(p), num_breaks=int(k))
            for i, s, src, p, k, a, b in zip(z["ids"], z["sequences"], z["sources"], paths, breaks, starts, ends)]


def unpack_split(path: str | Path) -> dict[str, str]:
    """The packed assignment, id -> "train" | "val"."""
    with np.load(path) as z:
        return {str(i): str(s) for i, s in zip(z["ids"], z["split"])}


def describe_training_batches(cfg, chains: list[Chain], assignment: dict[str, str]) -> str:
    """What the config's band-balanced sampler does with the training examples (one GPU)."""
    from model.data.bands import parse_band_weights
    from model.data.sampling import BandBalancedBatchSampler
    from model.training import batch_length_multiple

    if cfg.lengthBandWeights is None:
        return "batches: every training example once per epoch (no lengthBandWeights)"
    sampler = BandBalancedBatchSampler(
        [len(c) for c in chains if assignment[c.id] == TRAIN], band_weights=parse_band_weights(cfg.lengthBandWeights),
        batch_size=cfg.batchSize, batches_per_epoch=cfg.batchesPerEpoch, seed=cfg.seed,
        max_residues=cfg.maxResiduesPerBatch, crop_length=cfg.cropLength,
        pad_to_multiple=batch_length_multiple(cfg, otherwise=8))
    return sampler.describe()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("out", type=Path)
    ap.add_argument("--index", type=Path, help="also write the training-set index (CSV) here")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key, e.g. --set dataDirectory=/path/to/data (repeatable)")
    args = ap.parse_args()
    from model.data.sources import sources_from_config

    try:
        cfg = load_config_with_overrides(args.config, args.overrides)
        sources = sources_from_config(cfg, where=key_location(args.config, "datasetNames", args.overrides))
    except ConfigError as err:
        ap.exit(2, f"error: {err}\n")
    chains, assignment, _ = training_set(cfg, sources=sources)
    pack(chains, assignment, args.out)
    if args.index:
        write_index(args.index, chains, assignment)
    print(split_table(chains, assignment))
    print(describe_training_batches(cfg, chains, assignment))
    n_val = sum(v == VAL for v in assignment.values())
    print(f"packed {len(chains)} examples ({len(chains) - n_val} train, {n_val} val) -> {args.out}")


if __name__ == "__main__":
    main()
