"""Real chains to compare samples with: the held-out examples of a training-set index, matched by length.

The index (``training_index.csv`` written by `model.data.split.write_index`, CSV or JSON) lists
every training example with ``id``, ``source``, ``length`` and ``split`` (``train`` / ``val``); the
coordinates come from building the same sources (`model.data.build.build_dataset`, cached).

The sources are built as whole parsed chains where the builder can (``chain_breaks=None``) and each
index id is cut from them as the data pipeline cuts examples (`model.data.segments`):
- ``<chain id>/seg<k>``: segment k (counted from 0 in chain order) of a chain cut at every
  consecutive CA-CA step longer than 4.2 A (an unbroken chain has no segments: it keeps its id);
- a plain id: that chain's longest unbroken segment (ties: the first), i.e. the whole chain when
  it is unbroken;
- optional columns ``start`` and ``end`` (or ``stop``): residues ``start:end`` (0-based, end
  exclusive) of the parent chain (column ``parent``, else the id without its ``/seg<k>``);
- any other columns are ignored. An id the build returns as such (a builder that cuts) is used.
An example is used only if its coordinates have the length the index gives; ids that cannot be
resolved are counted and named in the note, never silently dropped.

Matching (`match_length`): the held-out examples within ``tolerance`` (10 %) of the length; when
fewer than ``min_count`` (10) are, the ``min_count`` nearest lengths instead, and the note says so
with the length range and count actually used.
"""

from __future__ import annotations

import inspect
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.evaluation.metrics import LONG_STEP, as_numpy_ca

MIN_REAL = 10          # fewer held-out chains than this within the tolerance: take the nearest lengths
LENGTH_TOLERANCE = 0.1
_SEGMENT = re.compile(r"^(?P<parent>.+)/seg(?P<k>\d+)$")


class RealChainsError(ValueError):
    """The index or the sources cannot give real chains; the message names the file and what to do."""


@dataclass
class RealPool:
    """Held-out chains (``val``) with ids, and the training chains (``train``, novelty references)."""

    val: list[np.ndarray]
    val_ids: list[str]
    train: list[np.ndarray] | None
    note: str
    unresolved: list[str] = field(default_factory=list)

    @property
    def val_lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.val], dtype=np.int64)


@dataclass
class RealMatch:
    """The real chains used for one evaluated length."""

    length: int
    chains: list[np.ndarray]
    ids: list[str]
    within_tolerance: int   # held-out chains within the tolerance of the length
    widened: bool           # True: fewer than min_count within it, nearest lengths taken
    available: int          # chains matched before the cap
    note: str

    @property
    def length_range(self) -> tuple[int, int]:
        lengths = [len(c) for c in self.chains]
        return min(lengths), max(lengths)

    def to_dict(self) -> dict:
        lo, hi = self.length_range
        return {"length": self.length, "count": len(self.chains), "length_min": lo, "length_max": hi,
                "within_tolerance": self.within_tolerance, "widened": self.widened,
                "available": self.available, "note": self.note, "ids": self.ids}


def segment_bounds(ca: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of every unbroken piece of ``ca [L, 3]`` (cut at steps > 4.2 A), in chain order."""
    step = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)  # [L-1]
    edges = [0, *(np.nonzero(step > LONG_STEP)[0] + 1).tolist(), len(ca)]
    return list(itertools.pairwise(edges))


def _int_or_none(value) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    return int(value)


def resolve(row: dict, by_id: dict[str, np.ndarray]) -> np.ndarray | None:
    """The CA trace ``[L, 3]`` of one index row (module doc), or None when it cannot be found."""
    ex_id = str(row["id"])
    start, end = _int_or_none(row.get("start")), _int_or_none(row.get("end", row.get("stop")))
    match = _SEGMENT.match(ex_id)
    parent_id = str(row.get("parent") or (match["parent"] if match else ex_id))
    if start is not None and end is not None:
        whole = by_id.get(parent_id)
        ca = whole[start:end] if whole is not None and len(whole) >= end else by_id.get(ex_id)
    elif match is not None:
        ca = by_id.get(ex_id)  # the build returned segments under their own ids
        whole = by_id.get(parent_id)
        if ca is None and whole is not None:
            bounds = segment_bounds(whole)
            k = int(match["k"])
            if len(bounds) >= 2 and k < len(bounds):  # an unbroken chain keeps its own id
                ca = whole[bounds[k][0]:bounds[k][1]]
    else:
        ca = by_id.get(ex_id)
        if ca is not None:  # a whole parsed chain: its longest unbroken segment (ties: the first)
            bounds = segment_bounds(ca)
            lo, hi = max(bounds, key=lambda b: b[1] - b[0])
            ca = ca[lo:hi]
    want = _int_or_none(row.get("length"))
    return ca if ca is not None and (want is None or len(ca) == want) else None


def read_rows(index: Path) -> list[dict]:
    """Index rows (CSV or JSON) with at least ``id`` and ``split``; one-line errors name the file."""
    from model.data.split import read_index

    if not Path(index).is_file():
        raise RealChainsError(f"--index {index}: no such file (a training_index.csv from the weights directory)")
    try:
        rows = read_index(index)
    except (ValueError, KeyError, OSError) as err:
        raise RealChainsError(f"--index {index}: cannot read it as a training-set index ({err})") from None
    if not rows:
        raise RealChainsError(f"--index {index}: no rows")
    missing = {"id", "split"} - set(rows[0])
    if missing:
        raise RealChainsError(f"--index {index}: missing column(s) {', '.join(sorted(missing))} "
                              f"(columns: {', '.join(rows[0])})")
    return rows


def pool_from_chains(chains: dict[str, np.ndarray], rows: list[dict] | None, *, label: str) -> RealPool:
    """`RealPool` from built chains ``{id: ca}`` and index rows (None: every chain is held out)."""
    if rows is None:
        ids = sorted(chains)
        return RealPool([as_numpy_ca(chains[i]) for i in ids], ids, None,
                        f"real chains: all {len(ids)} of {label} (no index)")
    val, val_ids, train, unresolved = [], [], [], []
    for row in rows:
        split = str(row["split"]).strip()
        if split not in ("val", "train"):
            continue
        ca = resolve(row, chains)
        if ca is None:
            unresolved.append(str(row["id"]))
        elif split == "val":
            val.append(as_numpy_ca(ca))
            val_ids.append(str(row["id"]))
        else:
            train.append(as_numpy_ca(ca))
    note = f"real chains: {len(val)} held-out ('val'), {len(train)} train, from {label}"
    if unresolved:
        shown = ", ".join(unresolved[:3]) + (", ..." if len(unresolved) > 3 else "")
        note += f"; {len(unresolved)} index ids not found in the sources ({shown})"
    if not val:
        raise RealChainsError(f"no chain marked 'val' in the index was found in {label}"
                              + (f" ({len(unresolved)} ids unresolved, e.g. {unresolved[0]}); pass the "
                                 "training sources with --real" if unresolved else ""))
    return RealPool(val, val_ids, train or None, note, unresolved)


def load_pool(sources: list[str], index: Path | None) -> RealPool:
    """Build ``sources`` (cached) and split them by ``index`` (None: every chain is held out)."""
    from model.data.build import build_dataset

    rows = read_rows(index) if index is not None else None
    kwargs = {"verbose": False}
    if "chain_breaks" in inspect.signature(build_dataset).parameters:
        kwargs["chain_breaks"] = None  # whole parsed chains: every index id is cut from them
    try:
        built, _ = build_dataset(sources, **kwargs)
    except FileNotFoundError as err:
        raise RealChainsError(f"--real: {err}") from None
    chains = {c.id: c.ca for c in built}  # float32 as stored: breaks found as the data pipeline finds them
    label = ", ".join(str(s) for s in sources) + (f" split by {Path(index).name}" if index is not None else "")
    return pool_from_chains(chains, rows, label=label)


def match_length(pool: RealPool, length: int, *, cap: int | None = 64, seed: int = 0,
                 tolerance: float = LENGTH_TOLERANCE, min_count: int = MIN_REAL) -> RealMatch:
    """Held-out chains for samples of ``length`` residues (module doc); at most ``cap``, seeded."""
    lengths = pool.val_lengths
    if not len(lengths):
        raise RealChainsError("no held-out real chains to compare with")
    dist = np.abs(lengths - length)
    within = np.flatnonzero(dist <= tolerance * length + 1e-9)
    widened = len(within) < min_count
    if widened:  # the min_count nearest (ties: shorter first, then index order)
        order = np.lexsort((np.arange(len(lengths)), lengths, dist))
        chosen = np.sort(order[:min_count])
    else:
        chosen = within
    available = len(chosen)
    if cap is not None and len(chosen) > cap:
        chosen = np.sort(np.random.default_rng(seed + length).choice(chosen, size=cap, replace=False))
    chains = [pool.val[i] for i in chosen]
    lo, hi = min(len(c) for c in chains), max(len(c) for c in chains)
    lo_ok, hi_ok = int(np.ceil(length * (1 - tolerance))), int(np.floor(length * (1 + tolerance)))
    if widened:
        note = (f"L {length}: only {len(within)} held-out chains within {tolerance:.0%} ({lo_ok}-{hi_ok}); "
                f"using the {len(chains)} nearest lengths, {lo}-{hi} residues")
    else:
        note = f"L {length}: {len(chains)} held-out chains of {lo}-{hi} residues (within {tolerance:.0%})"
        if available > len(chains):
            note += f", a seeded {len(chains)} of {available}"
    return RealMatch(length, chains, [pool.val_ids[i] for i in chosen], len(within), widened, available, note)


def novelty_references(pool: RealPool, length: int, *, cap: int | None, seed: int = 0) -> list[np.ndarray] | None:
    """Training chains of 0.5-2x ``length`` for novelty (at most ``cap``, seeded); None without any.

    NOTE: a reference shorter than half the sample covers at most about half of it (TM-score
    normalised by the sample's length), so leaving those out changes a novelty near 0.5 or above
    (where it matters) very little, and keeps the alignments of long samples affordable.
    """
    from model.evaluation.tmscore import subsample

    if pool.train is None:
        return None
    refs = [x for x in pool.train if 0.5 * length <= len(x) <= 2 * length] or list(pool.train)
    return subsample(refs, cap, seed=seed + length)
