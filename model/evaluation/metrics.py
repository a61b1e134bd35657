"""Offline CA-trace metrics: geometry, secondary structure, and the samples-vs-real summary.

Sources: Genie (Lin & AlQuraishi 2023, Sec. 4 "Evaluation": secondary-structure composition,
diversity by TM-score clustering, novelty by max TM-score to the training set); issue 7 (the
reference numbers on real chains: CA-CA 3.81 A, 44-55 % helix + strand, Rg / (2.2 L^0.38)
1.08-1.35, no clashes); P-SEA (Labesse et al. 1997) as implemented CA-only by biotite's
``annotate_sse``; the radius-of-gyration scaling Rg ~ 2.2 L^0.38 A for folded globular chains
(Skolnick et al. 1997).

Symbols: L residues, N chains. Every CA trace is ``[L, 3]`` Angstrom, numpy or torch.

Definitions (all per chain, then averaged over a set):
- CA-CA: consecutive distances ``|x[i+1] - x[i]|`` ``[L-1]``; ``frac_ca_ca_ok`` = share within
  ``3.8 +- CA_CA_TOLERANCE`` A.
- clashes per residue: pairs ``i < j`` with ``j - i >= 3`` and ``|x_i - x_j| < 3.0`` A, divided by L.
- radius of gyration ``sqrt(mean |x - mean x|^2)``; ratio to ``2.2 * L**0.38``.
- SSE: P-SEA labels a (helix) / b (strand) / c (coil) per residue; fractions per chain.
NOTE: P-SEA on a CA trace alone gives no hydrogen bonds (unlike DSSP); its fractions on real
chains sit a little below DSSP's. We compare samples with real chains under the same method.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IDEAL_CA_CA = 3.8          # A, trans peptide
CA_CA_TOLERANCE = 0.1      # A, window for frac_ca_ca_ok
CLASH_DISTANCE = 3.0       # A
CLASH_MIN_SEPARATION = 3   # |i - j| >= 3
RG_PREFACTOR, RG_EXPONENT = 2.2, 0.38

# Issue 7's "done when" targets for samples (metric -> (comparison, value)).
TARGETS = {
    "ca_ca_median": ("within", (IDEAL_CA_CA, 0.1)),
    "helix_strand": (">=", 0.4),
    "rg_ratio": ("<=", 1.3),
    "clashes_per_residue": ("<", 0.01),
}


def as_numpy_ca(ca) -> np.ndarray:
    """A CA trace (numpy, torch, or nested list) -> float64 numpy ``[L, 3]``; fails on NaN."""
    if hasattr(ca, "detach"):
        ca = ca.detach().cpu().double().numpy()
    arr = np.asarray(ca, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"expected a CA trace [L, 3], got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("CA trace contains NaN or inf coordinates")
    return arr


def ca_ca_distances(ca) -> np.ndarray:
    """Consecutive CA-CA distances ``[L-1]``."""
    x = as_numpy_ca(ca)  # [L, 3]
    return np.linalg.norm(x[1:] - x[:-1], axis=-1)  # [L-1]


def clash_count(ca, *, distance: float = CLASH_DISTANCE, min_separation: int = CLASH_MIN_SEPARATION) -> int:
    """Number of residue pairs ``i < j``, ``j - i >= min_separation``, closer than ``distance`` A."""
    x = as_numpy_ca(ca)  # [L, 3]
    d = np.linalg.norm(x[:, None, :] - x[None, :, :], axis=-1)  # [L, L]
    i, j = np.triu_indices(len(x), k=min_separation)
    return int((d[i, j] < distance).sum())


def radius_of_gyration(ca) -> float:
    """``sqrt(mean_i |x_i - centroid|^2)`` in A."""
    x = as_numpy_ca(ca)  # [L, 3]
    return float(np.sqrt(((x - x.mean(axis=0)) ** 2).sum(axis=-1).mean()))


def expected_rg(length: int | np.ndarray) -> float | np.ndarray:
    """Rg of a folded globular chain of ``length`` residues: ``2.2 * L**0.38`` A."""
    return RG_PREFACTOR * np.asarray(length, dtype=np.float64) ** RG_EXPONENT


def sse_labels(ca) -> np.ndarray:
    """P-SEA labels per residue ``[L]`` of 'a' (helix), 'b' (strand), 'c' (coil), CA only.

    Builds a biotite AtomArray of poly-Ala CA atoms, one chain, residues numbered 1..L.
    """
    import biotite.structure as struc

    x = as_numpy_ca(ca)  # [L, 3]
    atoms = struc.AtomArray(len(x))
    atoms.coord = x.astype(np.float32)
    atoms.chain_id[:] = "A"
    atoms.res_id[:] = np.arange(1, len(x) + 1)
    atoms.res_name[:] = "ALA"
    atoms.atom_name[:] = "CA"
    atoms.element[:] = "C"
    return np.asarray(struc.annotate_sse(atoms))  # [L]


@dataclass(frozen=True)
class ChainMetrics:
    """Per-chain numbers (see the module docstring for definitions)."""

    length: int
    ca_ca_median: float
    ca_ca_mean: float
    frac_ca_ca_ok: float
    clashes_per_residue: float
    rg: float
    rg_ratio: float
    helix: float
    strand: float
    coil: float

    @property
    def helix_strand(self) -> float:
        return self.helix + self.strand


def chain_metrics(ca) -> ChainMetrics:
    """All single-chain metrics of one CA trace ``[L, 3]`` (L >= 4 for P-SEA)."""
    x = as_numpy_ca(ca)  # [L, 3]
    length = len(x)
    if length < 4:
        raise ValueError(f"need at least 4 residues for chain metrics, got {length}")
    d = ca_ca_distances(x)  # [L-1]
    rg = radius_of_gyration(x)
    sse = sse_labels(x)  # [L]
    return ChainMetrics(
        length=length,
        ca_ca_median=float(np.median(d)),
        ca_ca_mean=float(d.mean()),
        frac_ca_ca_ok=float((np.abs(d - IDEAL_CA_CA) <= CA_CA_TOLERANCE).mean()),
        clashes_per_residue=clash_count(x) / length,
        rg=rg,
        rg_ratio=float(rg / expected_rg(length)),
        helix=float((sse == "a").mean()),
        strand=float((sse == "b").mean()),
        coil=float((sse == "c").mean()),
    )


@dataclass
class SetMetrics:
    """Metrics of one set of chains (samples or real): per-chain values plus set-level numbers.

    Set-level: means of the per-chain numbers (``ca_ca_median`` is the median over all CA-CA
    distances of the set), ``mean_pairwise_tm``, ``clusters_06`` / ``clusters_05`` (clusters at
    TM 0.6 / 0.5 divided by N) and ``novelty`` (mean over chains of the max TM-score to the
    reference set; None when no reference was given).
    """

    label: str
    chains: list[ChainMetrics]
    ca_ca_all: np.ndarray = field(repr=False)          # [sum(L_i - 1)]
    tm_matrix: np.ndarray | None = field(default=None, repr=False)  # [N, N]
    novelty_per_chain: np.ndarray | None = field(default=None, repr=False)  # [N]
    clusters_06: float | None = None
    clusters_05: float | None = None

    @property
    def n(self) -> int:
        return len(self.chains)

    def mean(self, name: str) -> float:
        return float(np.mean([getattr(c, name) for c in self.chains]))

    def summary(self) -> dict[str, float | int | None]:
        """Flat dict of set-level numbers (the rows of the comparison table)."""
        from model.evaluation.tmscore import mean_offdiagonal

        lengths = [c.length for c in self.chains]
        return {
            "n": self.n,
            "length_min": int(min(lengths)),
            "length_max": int(max(lengths)),
            "ca_ca_median": float(np.median(self.ca_ca_all)),
            "ca_ca_mean": float(self.ca_ca_all.mean()),
            "frac_ca_ca_ok": float((np.abs(self.ca_ca_all - IDEAL_CA_CA) <= CA_CA_TOLERANCE).mean()),
            "clashes_per_residue": self.mean("clashes_per_residue"),
            "rg_ratio": self.mean("rg_ratio"),
            "helix": self.mean("helix"),
            "strand": self.mean("strand"),
            "coil": self.mean("coil"),
            "helix_strand": self.mean("helix_strand"),
            "mean_pairwise_tm": None if self.tm_matrix is None else mean_offdiagonal(self.tm_matrix),
            "clusters_06": self.clusters_06,
            "clusters_05": self.clusters_05,
            "novelty": None if self.novelty_per_chain is None else float(self.novelty_per_chain.mean()),
        }


def set_metrics(chains, *, label: str, reference=None, pairwise: bool = True,
                reference_cap: int | None = None, seed: int = 0) -> SetMetrics:
    """Metrics of a list of CA traces ``[L_i, 3]``; TM-score parts need ``tmtools``.

    ``reference`` (list of ``[L, 3]``, e.g. the training set) gives novelty; it is subsampled to
    ``reference_cap`` chains (default ``tmscore.REFERENCE_CAP``) with ``seed``.
    """
    from model.evaluation import tmscore

    xs = [as_numpy_ca(c) for c in chains]
    if not xs:
        raise ValueError(f"{label}: empty set of chains")
    per_chain = [chain_metrics(x) for x in xs]
    ca_ca_all = np.concatenate([ca_ca_distances(x) for x in xs])
    out = SetMetrics(label=label, chains=per_chain, ca_ca_all=ca_ca_all)
    if pairwise and len(xs) > 1:
        out.tm_matrix = tmscore.pairwise_tm(xs)  # [N, N]
        out.clusters_06 = len(tmscore.single_linkage_clusters(out.tm_matrix, 0.6)) / len(xs)
        out.clusters_05 = len(tmscore.single_linkage_clusters(out.tm_matrix, 0.5)) / len(xs)
    if reference is not None:
        cap = tmscore.REFERENCE_CAP if reference_cap is None else reference_cap
        ref = tmscore.subsample(reference, cap, seed=seed)
        out.novelty_per_chain = tmscore.max_tm_to_reference(xs, ref)  # [N]
    return out


def check_target(name: str, value: float | None) -> bool | None:
    """Issue 7's target for ``name`` (``TARGETS``): True / False, None when no target or value."""
    if name not in TARGETS or value is None:
        return None
    op, target = TARGETS[name]
    if op == "within":
        centre, tol = target
        return abs(value - centre) <= tol
    return {">=": value >= target, "<=": value <= target, "<": value < target}[op]


def target_text(name: str) -> str:
    if name not in TARGETS:
        return ""
    op, target = TARGETS[name]
    return f"{target[0]} +- {target[1]}" if op == "within" else f"{op} {target}"


@dataclass
class Comparison:
    """Samples next to real held-out chains: ``rows()`` is the table, ``to_dict()`` for JSON."""

    samples: SetMetrics
    real: SetMetrics

    def rows(self) -> list[dict]:
        """One row per metric: name, samples, real, target text, pass (True / False / None)."""
        s, r = self.samples.summary(), self.real.summary()
        return [
            {"metric": k, "samples": s[k], "real": r[k], "target": target_text(k),
             "pass": check_target(k, s[k])}
            for k in s
        ]

    def passed(self) -> bool:
        """All issue-7 targets met by the samples."""
        return all(row["pass"] for row in self.rows() if row["pass"] is not None)

    def to_dict(self) -> dict:
        return {
            "samples": self.samples.summary(),
            "real": self.real.summary(),
            "targets_met": self.passed(),
            "per_chain": {
                "samples": [asdict(c) for c in self.samples.chains],
                "real": [asdict(c) for c in self.real.chains],
            },
        }

    def to_markdown(self) -> str:
        lines = ["| metric | samples | real | target | met |", "|---|---:|---:|---|:---:|"]
        for row in self.rows():
            met = {True: "yes", False: "**no**", None: ""}[row["pass"]]
            lines.append(f"| {row['metric']} | {fmt(row['samples'])} | {fmt(row['real'])} | "
                         f"{row['target']} | {met} |")
        return "\n".join(lines)


def fmt(value) -> str:
    """Table formatting: ints as is, floats with 3 decimals, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.3f}"


def compare(samples, real, *, reference=None, reference_cap: int | None = None, seed: int = 0,
            pairwise: bool = True) -> Comparison:
    """Every metric for ``samples`` and for ``real`` held-out chains of the same lengths.

    Both are lists of CA traces ``[L_i, 3]``; ``reference`` (the training set) gives novelty for
    both sets (for real held-out chains it shows how close the split's nearest neighbours are).
    """
    kw = {"reference": reference, "reference_cap": reference_cap, "seed": seed, "pairwise": pairwise}
    return Comparison(samples=set_metrics(samples, label="samples", **kw),
                      real=set_metrics(real, label="real", **kw))


def pick_real_like(pool, lengths, *, seed: int = 0, tolerance: float = 0.1) -> list[np.ndarray]:
    """For each target length, one chain of ``pool`` with ``|L - target| <= tolerance * target``.

    Chosen at random (``seed``) without replacement among the matches; when none match, the
    chain of closest length still unused. Returns CA traces ``[L_i, 3]``.
    """
    rng = np.random.default_rng(seed)
    xs = [as_numpy_ca(c) for c in pool]
    pool_len = np.array([len(x) for x in xs])
    used = np.zeros(len(xs), dtype=bool)
    picked = []
    for target in lengths:
        ok = np.flatnonzero((np.abs(pool_len - target) <= tolerance * target) & ~used)
        if len(ok):
            k = int(rng.choice(ok))
        else:
            free = np.flatnonzero(~used)
            if not len(free):
                raise ValueError("pick_real_like: pool has fewer chains than requested lengths")
            k = int(free[np.argmin(np.abs(pool_len[free] - target))])
        used[k] = True
        picked.append(xs[k])
    return picked
