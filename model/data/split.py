"""Train / validation split by sequence group, subsampling, and the committed training-set index.

Rule: chains are grouped by identical sequence (homo-oligomer copies, the same chain in two
sources). With ``validationByLengthBand`` (the default) groups also join segments of one broken
chain (`model.data.segments`) and chains sharing a run of ``SHARED_RUN`` identical residues
(point mutants, constructs of different extent, a segment and its whole chain elsewhere), so no
sequence and no chain straddles the split. Groups are ranked by
``sha256(f"{seed}:{sequence}")`` (a group of several sequences: the sorted sequences joined by
newlines) and the lowest-ranked groups go to validation until it holds at least
``round(fraction * N)`` chains. With ``validationByLengthBand`` this runs separately in every
length band (`model.data.bands`; a group belongs to the band of its longest member), so
every band with at least two groups has validation chains. The result depends only on the seed and
the set of sequences and ids, not on file order, and adding data moves few existing chains.
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
from model.data.bands import NUM_BANDS, band_of
from model.data.build import BuildSummary, build_dataset
from model.data.parse import Chain
from model.data.segments import cut_chains, parent_id

TRAIN, VAL = "train", "val"
SHARED_RUN = 30  # residues: two chains with this many identical consecutive residues are one group


def _rank(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def split_by_sequence(chains: list[Chain], *, fraction: float, seed: int) -> dict[str, str]:
    """chain id -> "train" | "val"; identical sequences never straddle the split (one stratum).

    With fraction > 0 and at least two sequence groups, each side gets at least one group.
    """
    groups: dict[str, list[Chain]] = defaultdict(list)
    for chain in chains:
        groups[chain.sequence].append(chain)
    assignment = {chain.id: TRAIN for chain in chains}
    _greedy(sorted(groups.values(), key=lambda g: _group_rank(seed, g)), fraction, assignment)
    return assignment


def _greedy(ordered: list[list[Chain]], fraction: float, assignment: dict[str, str]) -> None:
    """Lowest-ranked groups to validation until it holds round(fraction * N) chains (the last
    group always stays in train; with fraction > 0 and two groups or more, validation gets one)."""
    total = sum(len(g) for g in ordered)
    target = round(fraction * total)
    if fraction > 0 and len(ordered) >= 2:
        target = max(target, 1)
    n_val = 0
    for k, group in enumerate(ordered):
        if n_val >= target or k == len(ordered) - 1:
            break
        for chain in group:
            assignment[chain.id] = VAL
        n_val += len(group)


def sequence_groups(chains: list[Chain]) -> list[list[Chain]]:
    """Chains joined (union-find) by identical sequence, a common parent chain, or a shared run of
    ``SHARED_RUN`` identical residues (without ``X``); groups in input order."""
    root: dict[tuple[str, str], tuple[str, str]] = {}

    def find(key):
        root.setdefault(key, key)
        while root[key] != key:
            root[key] = root[root[key]]
            key = root[key]
        return key

    def union(a, b):
        a, b = find(a), find(b)
        if a != b:
            root[b] = a

    for chain in chains:
        key, seq = ("seq", chain.sequence), chain.sequence
        union(key, ("chain", parent_id(chain.id)))
        for i in range(len(seq) - SHARED_RUN + 1):
            run = seq[i : i + SHARED_RUN]
            if "X" not in run:
                union(key, ("run", run))
    groups: dict[tuple[str, str], list[Chain]] = defaultdict(list)
    for chain in chains:
        groups[find(("seq", chain.sequence))].append(chain)
    return list(groups.values())


def _group_rank(seed: int, group: list[Chain]) -> str:
    return _rank(seed, "\n".join(sorted({c.sequence for c in group})))


def split_by_band(chains: list[Chain], *, fraction: float, seed: int) -> dict[str, str]:
    """chain id -> "train" | "val", the sequence-group split run in every length band (module doc)."""
    assignment = {chain.id: TRAIN for chain in chains}
    by_band: list[list[list[Chain]]] = [[] for _ in range(NUM_BANDS)]
    for group in sequence_groups(chains):
        by_band[int(band_of([max(len(c) for c in group)])[0])].append(group)
    for groups in by_band:
        _greedy(sorted(groups, key=lambda g: _group_rank(seed, g)), fraction, assignment)
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

    Keys: datasetNames, dataDirectory, chainBreaks, minimumSegmentLength, minimumNumResidues,
    maximumNumResidues, datasetSize, validationFraction, validationByLengthBand, seed. Given
    ``chains`` (parsed or already cut: cutting is idempotent) are cut and filtered the same way.
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
            chain_breaks=config.chainBreaks,
            min_segment_length=config.minimumSegmentLength,
            verbose=verbose,
        )
    else:
        chains, _ = cut_chains(chains, mode=config.chainBreaks, min_segment_length=config.minimumSegmentLength)
        chains, _ = filter_by_length(
            chains, min_length=config.minimumNumResidues, max_length=config.maximumNumResidues
        )
    chains = limit_chains(chains, config.datasetSize, seed=config.seed)
    split = split_by_band if config.validationByLengthBand else split_by_sequence
    assignment = split(chains, fraction=config.validationFraction, seed=config.seed)
    return chains, assignment, summary


def write_training_index(config, path: str | Path, *, sources=None, cache_dir=None) -> Path:
    """Run `training_set` and write its index (ids, lengths, source, split) to ``path``."""
    chains, assignment, _ = training_set(config, sources=sources, cache_dir=cache_dir)
    return write_index(path, chains, assignment)


def split_table(chains: list[Chain], assignment: dict[str, str]) -> str:
    """Examples (train / val) and residues per source and length band, as aligned text."""
    from model.data.bands import BAND_NAMES

    sources = sorted({c.source for c in chains})
    cells: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])  # train, val, residues
    for chain in chains:
        band = int(band_of([len(chain)])[0])
        for key in ((chain.source, band), (chain.source, NUM_BANDS), ("all", band), ("all", NUM_BANDS)):
            cell = cells[key]
            cell[assignment.get(chain.id, TRAIN) == VAL] += 1
            cell[2] += len(chain)
    header = ["source", *BAND_NAMES, "all"]
    rows = [[name, *(f"{cells[name, b][0]}/{cells[name, b][1]} ({cells[name, b][2]:,} res)"
                     for b in range(NUM_BANDS + 1))] for name in [*sources, "all"]]
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
    lines = ["examples train/val (residues) by source and length band:"]
    lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)
