"""Train / validation split by sequence group, subsampling, and the committed training-set index.

Source: issue 7 (no identical sequences across the split; the index of ids and lengths is
committed so novelty can be computed later without shipping structures).

Rule: chains are grouped by identical sequence (homo-oligomer copies, the same chain in two
sources). Groups are ranked by ``sha256(f"{seed}:{sequence}")`` and the lowest-ranked groups go to
validation until it holds at least ``round(fraction * N)`` chains. The result depends only on the
seed and the set of sequences, not on file order, and adding data moves few existing chains.
NOTE: a simple greedy; with a few huge groups validation may overshoot the fraction a little.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import defaultdict
from pathlib import Path

from model.atomic_io import atomic_write_bytes
from model.data.build import BuildSummary, build_dataset
from model.data.parse import Chain

TRAIN, VAL = "train", "val"


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_by_sequence(chains: list[Chain], *, fraction: float, seed: int) -> dict[str, str]:
    """chain id -> "train" | "val"; identical sequences never straddle the split.

    With fraction > 0 and at least two sequence groups, each side gets at least one group.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for chain in chains:
        groups[chain.sequence].append(chain.id)
    ordered = sorted(groups, key=lambda seq: _rank(seed, seq))
    target = round(fraction * len(chains))
    if fraction > 0 and len(groups) >= 2:
        target = max(target, 1)
    assignment = {chain.id: TRAIN for chain in chains}
    n_val = 0
    for k, sequence in enumerate(ordered):
        if n_val >= target or k == len(ordered) - 1:  # the last group always stays in train
            break
        for chain_id in groups[sequence]:
            assignment[chain_id] = VAL
        n_val += len(groups[sequence])
    return assignment


def limit_chains(chains: list[Chain], size: int | None, *, seed: int) -> list[Chain]:
    """At most ``size`` chains (config.datasetSize), chosen by seeded hash of the id; keeps order."""
    if size is None or size >= len(chains):
        return list(chains)
    chosen = set(sorted((c.id for c in chains), key=lambda i: _rank(seed, i))[:size])
    return [c for c in chains if c.id in chosen]


def index_rows(chains: list[Chain], assignment: dict[str, str]) -> list[dict]:
    """One dict per chain: id, source, path, length, split, num_breaks, sequence_sha1."""
    return [
        {
            "id": c.id,
            "source": c.source,
            "path": c.path,
            "length": len(c),
            "split": assignment.get(c.id, TRAIN),
            "num_breaks": c.num_breaks,
            "sequence_sha1": hashlib.sha1(c.sequence.encode()).hexdigest()[:16],
        }
        for c in sorted(chains, key=lambda c: c.id)
    ]


def write_index(path: str | Path, chains: list[Chain], assignment: dict[str, str]) -> Path:
    """Write the training-set index as CSV (``.csv``) or JSON (``.json``), atomically.

    Columns: id, source, path, length, split, num_breaks, sequence_sha1 (no coordinates, no
    sequences: identical-sequence groups stay checkable through the hash).
    """
    path = Path(path)
    rows = index_rows(chains, assignment)
    if path.suffix.lower() == ".json":
        data = json.dumps(rows, indent=1).encode()
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["id"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = buffer.getvalue().encode()
    atomic_write_bytes(path, data)
    return path


def read_index(path: str | Path) -> list[dict]:
    """Rows written by `write_index` (CSV values come back as strings except ``length``)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return json.loads(path.read_text())
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    for row in rows:
        row["length"] = int(row["length"])
    return rows


def training_set(
    config, *, sources=None, cache_dir=None, chains: list[Chain] | None = None, verbose: bool = True
) -> tuple[list[Chain], dict[str, str], BuildSummary | None]:
    """The whole data recipe from a Config: build (or take ``chains``), length filter,
    datasetSize, split. -> (chains, {id: "train" | "val"}, summary or None).

    Keys: datasetNames, dataDirectory, minimumNumResidues, maximumNumResidues, datasetSize,
    validationFraction, seed.
    """
    from model.data.build import filter_by_length
    from model.data.sources import sources_from_config

    summary = None
    if chains is None:
        chains, summary = build_dataset(
            sources if sources is not None else sources_from_config(config),
            cache_dir=cache_dir,
            min_length=config.minimumNumResidues,
            max_length=config.maximumNumResidues,
            verbose=verbose,
        )
    else:
        chains, _ = filter_by_length(
            chains, min_length=config.minimumNumResidues, max_length=config.maximumNumResidues
        )
    chains = limit_chains(chains, config.datasetSize, seed=config.seed)
    assignment = split_by_sequence(chains, fraction=config.validationFraction, seed=config.seed)
    return chains, assignment, summary


def write_training_index(config, path: str | Path, *, sources=None, cache_dir=None) -> Path:
    """Run `training_set` and write its index (ids, lengths, source, split) to ``path``."""
    chains, assignment, _ = training_set(config, sources=sources, cache_dir=cache_dir)
    return write_index(path, chains, assignment)
