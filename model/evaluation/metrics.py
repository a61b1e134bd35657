"""Offline CA-trace metrics: geometry, secondary structure, and the samples-vs-real summary.

Sources: Genie (Lin & AlQuraishi 2023, Sec. 4 "Evaluation": secondary-structure composition,
diversity by TM-score clustering, novelty by max TM-score to the training set); P-SEA (Labesse
et al. 1997) as implemented CA-only by biotite's ``annotate_sse``; the radius-of-gyration scaling
Rg ~ 2.2 L^0.38 A for folded globular chains (Skolnick et al. 1997). Real chains measured the same
way: CA-CA 3.81 A, 44-55 % helix + strand, Rg / (2.2 L^0.38) 1.08-1.35, no clashes.

Symbols: L residues, N chains. Every CA trace is ``[L, 3]`` Angstrom, numpy or torch.

Definitions (all per chain, then averaged over a set):
- CA-CA: consecutive distances ``|x[i+1] - x[i]|`` ``[L-1]``; ``frac_ca_ca_ok`` = share within
  ``3.8 +- CA_CA_TOLERANCE`` A; ``ca_ca_max`` the longest step; a set's ``frac_long_step`` is the
  share of its chains with a step longer than ``LONG_STEP`` (4.2 A, the data's chain-break rule).
- clashes per residue: pairs ``i < j`` with ``j - i >= 3`` and ``|x_i - x_j| < 3.0`` A, divided by L.
- radius of gyration ``sqrt(mean |x - mean x|^2)``; ratio to ``2.2 * L**0.38``; a set also reports
  the 5 % and 95 % percentiles of the per-chain ratio.
- SSE: P-SEA labels a (helix) / b (strand) / c (coil) per residue; fractions per chain.
NOTE: P-SEA on a CA trace alone gives no hydrogen bonds (unlike DSSP); its fractions on real
chains sit a little below DSSP's. We compare samples with real chains under the same method.
The targets the samples are held to live in `model.evaluation.targets`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

IDEAL_CA_CA = 3.8          # A, trans peptide
CA_CA_TOLERANCE = 0.1      # A, window for frac_ca_ca_ok
LONG_STEP = 4.2            # A, a consecutive CA-CA step longer than this is a chain break
CLASH_DISTANCE = 3.0       # A
CLASH_MIN_SEPARATION = 3   # |i - j| >= 3
RG_PREFACTOR, RG_EXPONENT = 2.2, 0.38
RG_PERCENTILES = (5, 95)


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
    ca_ca_max: float
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
        ca_ca_max=float(d.max()),
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
    TM 0.6 / 0.5 divided by the chains clustered) and ``novelty`` (mean over chains of the max
    TM-score to the reference set; None when no reference was given). The TM-score numbers may
    cover only the first chains of the set (``tm_n``, ``novelty_n``: `model.evaluation.tmscore`).
    ``extra``: further set-level numbers (e.g. the designability proxy), added to the summary.
    """

    label: str
    chains: list[ChainMetrics]
    ca_ca_all: np.ndarray = field(repr=False)          # [sum(L_i - 1)]
    tm_matrix: np.ndarray | None = field(default=None, repr=False)  # [N, N]
    novelty_per_chain: np.ndarray | None = field(default=None, repr=False)  # [N]
    clusters_06: float | None = None
    clusters_05: float | None = None
    extra: dict[str, float | None] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.chains)

    def mean(self, name: str) -> float:
        return float(np.mean([getattr(c, name) for c in self.chains]))

    def rg_range(self) -> tuple[float, float]:
        """(5 %, 95 %) percentiles of the per-chain Rg ratio (linear interpolation)."""
        lo, hi = np.percentile([c.rg_ratio for c in self.chains], RG_PERCENTILES)
        return float(lo), float(hi)

    def standard_errors(self) -> dict[str, float | None]:
        """Standard errors of the set-level numbers that are not means of per-chain values (those have
        their per-chain rows): the pairwise TM-score's, by jackknife over the chains."""
        from model.evaluation.tmscore import jackknife_se_offdiagonal

        return {"mean_pairwise_tm": None if self.tm_matrix is None else jackknife_se_offdiagonal(self.tm_matrix)}

    def summary(self) -> dict[str, float | int | None]:
        """Flat dict of set-level numbers (the rows of the comparison table)."""
        from model.evaluation.tmscore import mean_offdiagonal

        lengths = [c.length for c in self.chains]
        rg_lo, rg_hi = self.rg_range()
        return {
            "n": self.n,
            "length_min": int(min(lengths)),
            "length_max": int(max(lengths)),
            "ca_ca_median": float(np.median(self.ca_ca_all)),
            "ca_ca_mean": float(self.ca_ca_all.mean()),
            "frac_ca_ca_ok": float((np.abs(self.ca_ca_all - IDEAL_CA_CA) <= CA_CA_TOLERANCE).mean()),
            "ca_ca_max": float(self.ca_ca_all.max()),
            "frac_long_step": float(np.mean([c.ca_ca_max > LONG_STEP for c in self.chains])),
            "clashes_per_residue": self.mean("clashes_per_residue"),
            "rg_ratio": self.mean("rg_ratio"),
            "rg_ratio_p05": rg_lo,
            "rg_ratio_p95": rg_hi,
            "helix": self.mean("helix"),
            "strand": self.mean("strand"),
            "coil": self.mean("coil"),
            "helix_strand": self.mean("helix_strand"),
            "mean_pairwise_tm": None if self.tm_matrix is None else mean_offdiagonal(self.tm_matrix),
            "clusters_06": self.clusters_06,
            "clusters_05": self.clusters_05,
            "novelty": None if self.novelty_per_chain is None else float(self.novelty_per_chain.mean()),
            "tm_n": 0 if self.tm_matrix is None else int(self.tm_matrix.shape[0]),
            "novelty_n": 0 if self.novelty_per_chain is None else len(self.novelty_per_chain),
            **self.extra,
        }


def set_metrics(chains, *, label: str, tm=None) -> SetMetrics:
    """Metrics of a list of CA traces ``[L_i, 3]``; ``tm``: a `tmscore.TMSet` (pairwise matrix,
    novelty) computed for these chains, or None (no TM-score numbers)."""
    from model.evaluation import tmscore

    xs = [as_numpy_ca(c) for c in chains]
    if not xs:
        raise ValueError(f"{label}: empty set of chains")
    per_chain = [chain_metrics(x) for x in xs]
    ca_ca_all = np.concatenate([ca_ca_distances(x) for x in xs])
    out = SetMetrics(label=label, chains=per_chain, ca_ca_all=ca_ca_all)
    if tm is not None and tm.matrix is not None:
        out.tm_matrix = tm.matrix  # [n, n]
        n = tm.matrix.shape[0]
        out.clusters_06 = len(tmscore.single_linkage_clusters(tm.matrix, 0.6)) / n
        out.clusters_05 = len(tmscore.single_linkage_clusters(tm.matrix, 0.5)) / n
    if tm is not None and tm.novelty is not None:
        out.novelty_per_chain = tm.novelty  # [m]
    return out


@dataclass
class Comparison:
    """Samples next to real held-out chains of one length: ``rows()`` is the table, with the
    targets of `model.evaluation.targets` checked on the samples (the Rg range from the real set)."""

    samples: SetMetrics
    real: SetMetrics

    def target_results(self, which: str = "samples"):
        from model.evaluation.targets import check_all

        s = (self.samples if which == "samples" else self.real).summary()
        return check_all(s, self.real.rg_range())

    def rows(self) -> list[dict]:
        """One row per metric: name, samples, real, target text, pass (True / False / None), margin."""
        s, r = self.samples.summary(), self.real.summary()
        checked = {t.metric: t for t in self.target_results()}
        rows = []
        for k in s:
            t = checked.get(k)
            rows.append({"metric": k, "samples": s[k], "real": r.get(k), "target": t.target if t else "",
                         "pass": t.passed if t else None, "margin": t.margin if t else None})
        return rows

    def passed(self) -> bool:
        """All checked targets met by the samples."""
        from model.evaluation.targets import met

        return met(self.target_results())

    def to_dict(self) -> dict:
        return {
            "samples": self.samples.summary(),
            "real": self.real.summary(),
            "targets": [t.to_dict() for t in self.target_results()],
            "real_targets": [t.to_dict() for t in self.target_results("real")],
            "targets_met": self.passed(),
            "samples_se": self.samples.standard_errors(),
            "per_chain": {
                "samples": [asdict(c) for c in self.samples.chains],
                "real": [asdict(c) for c in self.real.chains],
            },
        }

    def to_markdown(self) -> str:
        lines = ["| metric | samples | real | target | met | margin |", "|---|---:|---:|---|:---:|---:|"]
        for row in self.rows():
            met = {True: "yes", False: "**no**", None: ""}[row["pass"]]
            margin = "" if row["margin"] is None else f"{row['margin']:+.3f}"
            lines.append(f"| {row['metric']} | {fmt(row['samples'])} | {fmt(row['real'])} | "
                         f"{row['target']} | {met} | {margin} |")
        return "\n".join(lines)


def fmt(value) -> str:
    """Table formatting: ints as is, floats with 3 decimals, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return f"{value:.3f}"


def compare(samples, real, *, reference=None, reference_cap: int | None = None, seed: int = 0,
            pairwise: bool = True, tm_cap: int | None = None, runner=None) -> Comparison:
    """Every metric for ``samples`` and for ``real`` held-out chains of the same lengths, inline.

    Both are lists of CA traces ``[L_i, 3]``; ``reference`` (the training set, subsampled to
    ``reference_cap`` with ``seed``) gives novelty for both sets (for real held-out chains it shows
    how close the split's nearest neighbours are). ``runner``: a `tmscore.TMRunner` (default inline).
    """
    from model.evaluation import tmscore

    ref = None
    if reference is not None:
        ref = tmscore.subsample(reference, tmscore.REFERENCE_CAP if reference_cap is None else reference_cap,
                                seed=seed)
    own = runner is None
    runner = runner or tmscore.TMRunner(1)
    try:
        cap = tm_cap if pairwise else 0
        jobs = [runner.submit(xs, reference=ref, pairwise_cap=cap, novelty_cap=tm_cap) for xs in (samples, real)]
        s_tm, r_tm = (job() for job in jobs)
    finally:
        if own:
            runner.close()
    return Comparison(samples=set_metrics(samples, label="samples", tm=s_tm),
                      real=set_metrics(real, label="real", tm=r_tm))
