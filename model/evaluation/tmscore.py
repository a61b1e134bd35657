"""TM-score between CA traces, pairwise matrices, clustering (diversity) and novelty.

Sources: TM-align (Zhang & Skolnick 2005) through the ``tmtools`` bindings; Genie
(Lin & AlQuraishi 2023): diversity as the number of clusters at a TM-score threshold divided by
the number of samples, novelty as the max TM-score of a sample to the training set.

Symbols: N samples, M reference chains, L residues.

Conventions (documented because they change the numbers):
- Sequences are poly-Ala (TM-align's structural alignment ignores residue identity).
- Pairwise TM (diversity) is symmetric: ``max(TM normalised by chain 1, TM normalised by chain 2)``
  i.e. normalised by the shorter chain. NOTE: Genie's scripts normalise by one chain; for chains
  of equal length the two agree.
- Clustering is single linkage: two chains share a cluster when a path of pairs with
  ``TM >= threshold`` joins them (connected components). Single linkage gives the fewest
  clusters of the common choices, so it never flatters diversity.
- Novelty is the TM-score normalised by the sample's length (how much of the sample is covered by
  its best reference match), maxed over the reference set, which is subsampled to
  ``REFERENCE_CAP`` chains (seeded) for speed.

Cost: one TM-align of two chains of L residues takes ~10 ms at L = 64, ~130 ms at 256 and ~1.1 s at
512 on one core (real chains; random walks are slower), so `TMRunner` runs the alignments of a set in
worker processes and caps how many chains of a set are aligned (module `model.evaluation.cli`
options ``--tm-cap``, ``--novelty-cap``, ``--reference-cap``). Jobs are submitted at once and read
later, so alignments run while the GPU samples the next length.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Self

import numpy as np

REFERENCE_CAP = 256


def _tm_align(a: np.ndarray, b: np.ndarray):
    try:
        import tmtools
    except ImportError as err:  # pragma: no cover - tmtools is in the eval / dev extras
        raise ImportError("TM-score needs tmtools: pip install tmtools (or pip install -e '.[eval]')") from err
    return tmtools.tm_align(np.ascontiguousarray(a, dtype=np.float64),
                            np.ascontiguousarray(b, dtype=np.float64), "A" * len(a), "A" * len(b))


def tm_score(a, b) -> tuple[float, float]:
    """TM-score of CA traces ``a [La, 3]``, ``b [Lb, 3]``: (normalised by La, normalised by Lb)."""
    from model.evaluation.metrics import as_numpy_ca

    res = _tm_align(as_numpy_ca(a), as_numpy_ca(b))
    return float(res.tm_norm_chain1), float(res.tm_norm_chain2)


def pairwise_tm(chains) -> np.ndarray:
    """Symmetric matrix ``[N, N]`` of pairwise TM-scores (shorter-chain normalisation), diag 1."""
    from model.evaluation.metrics import as_numpy_ca

    xs = [as_numpy_ca(c) for c in chains]
    n = len(xs)
    tm = np.eye(n)  # [N, N]
    for i in range(n):
        for j in range(i + 1, n):
            tm[i, j] = tm[j, i] = max(tm_score(xs[i], xs[j]))
    return tm


def mean_offdiagonal(tm: np.ndarray) -> float | None:
    """Mean of the off-diagonal entries of ``[N, N]``; None for N < 2."""
    n = tm.shape[0]
    if n < 2:
        return None
    return float((tm.sum() - np.trace(tm)) / (n * (n - 1)))


def jackknife_se_offdiagonal(tm: np.ndarray) -> float | None:
    """Jackknife standard error of `mean_offdiagonal` over the chains (leave one chain, its row and column,
    out); None for N < 3. The pairs share chains, so the chains, not the pairs, are the independent draws."""
    n = tm.shape[0]
    if n < 3:
        return None
    off = tm - np.diag(np.diag(tm))
    total = off.sum()
    loo = (total - off.sum(axis=0) - off.sum(axis=1)) / ((n - 1) * (n - 2))  # [N] the mean without chain i
    return float(np.sqrt((n - 1) / n * np.square(loo - loo.mean()).sum()))


def single_linkage_clusters(tm: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected components of the graph ``tm[i, j] >= threshold`` (``[N, N]``), sorted lists."""
    n = tm.shape[0]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(tm >= threshold, k=1))):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted(groups.values())


def subsample(chains, cap: int | None, *, seed: int = 0) -> list:
    """At most ``cap`` chains chosen uniformly without replacement (``seed``), original order."""
    chains = list(chains)
    if cap is None or len(chains) <= cap:
        return chains
    keep = np.sort(np.random.default_rng(seed).choice(len(chains), size=cap, replace=False))
    return [chains[i] for i in keep]


def max_tm_to_reference(samples, reference) -> np.ndarray:
    """For each sample ``[L, 3]``: max over reference chains of TM normalised by the sample. ``[N]``."""
    from model.evaluation.metrics import as_numpy_ca

    refs = [as_numpy_ca(r) for r in reference]
    if not refs:
        raise ValueError("novelty needs a non-empty reference set")
    out = np.zeros(len(samples))
    for i, s in enumerate(samples):
        out[i] = max(tm_score(s, r)[0] for r in refs)
    return out


# ------------------------------------------------------------------------------- parallel runner
def _lower_priority() -> None:
    """Worker start-up: nice 10, so the process launching the sampler's GPU kernels keeps its core."""
    import os

    os.nice(10)


def _tm_pair(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Worker job: (TM normalised by a, by b) of two float64 CA traces."""
    res = _tm_align(a, b)
    return float(res.tm_norm_chain1), float(res.tm_norm_chain2)


@dataclass
class TMSet:
    """TM-score results of one set: ``matrix`` ``[n, n]`` over its first ``n`` chains (pairwise
    subset), ``novelty`` ``[m]`` over its first ``m`` chains; None where not computed."""

    matrix: np.ndarray | None = None
    novelty: np.ndarray | None = None


class TMRunner:
    """TM-align jobs run inline (``workers <= 1``) or in a process pool; ``submit`` returns a
    callable that gives the `TMSet` (waiting for the workers when called)."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))
        self._pool: Executor | None = None
        if self.workers > 1:  # forkserver: workers never inherit the parent's CUDA context
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("forkserver"),
                                             initializer=_lower_priority)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def _map(self, pairs: list[tuple[np.ndarray, np.ndarray]]) -> Callable[[], list[tuple[float, float]]]:
        if not pairs:
            return list
        if self._pool is None:
            return lambda: [_tm_pair(a, b) for a, b in pairs]
        chunk = max(1, len(pairs) // (self.workers * 8))
        it = self._pool.map(_tm_pair, [a for a, _ in pairs], [b for _, b in pairs], chunksize=chunk)
        return lambda: list(it)

    def submit(self, chains, *, reference=None, pairwise_cap: int | None = None,
               novelty_cap: int | None = None) -> Callable[[], TMSet]:
        """Pairwise TM over the first ``pairwise_cap`` chains (None: all; fewer than 2: skipped) and
        novelty of the first ``novelty_cap`` chains against every ``reference`` chain (None: skipped)."""
        from model.evaluation.metrics import as_numpy_ca

        xs = [as_numpy_ca(c) for c in chains]
        n = len(xs) if pairwise_cap is None else min(len(xs), pairwise_cap)
        ij = [(i, j) for i in range(n) for j in range(i + 1, n)] if n >= 2 else []
        pair_job = self._map([(xs[i], xs[j]) for i, j in ij])
        refs = None if reference is None else [as_numpy_ca(r) for r in reference]
        if refs is not None and not refs:
            raise ValueError("novelty needs a non-empty reference set")
        m = 0 if refs is None else (len(xs) if novelty_cap is None else min(len(xs), novelty_cap))
        nov_job = self._map([(xs[i], r) for i in range(m) for r in refs]) if m else list

        def result() -> TMSet:
            out = TMSet()
            if ij:
                tm = np.eye(n)  # [n, n]
                for (i, j), pair in zip(ij, pair_job()):
                    tm[i, j] = tm[j, i] = max(pair)
                out.matrix = tm
            if m:
                scores = np.array([p[0] for p in nov_job()]).reshape(m, len(refs))  # [m, R]
                out.novelty = scores.max(axis=1)  # [m]
            return out

        return result
