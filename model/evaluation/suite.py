"""The per-length evaluation: samples of every length against held-out real chains of that length.

`LengthSuite` is fed the lengths (real chains are matched and their TM-score jobs start at once) and
then each model's samples as they come (their TM-score jobs start while the next length samples);
``finish()`` waits for the alignments, computes every other metric and the designability proxy, and
returns one `SuiteResult` per model. Several models (``--baseline``) share the real chains, their
metrics and the novelty references, so a comparison is like for like.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from model.evaluation import targets as tg
from model.evaluation.metrics import Comparison, fmt, set_metrics
from model.evaluation.real_chains import RealMatch, RealPool, match_length, novelty_references
from model.evaluation.tmscore import TMRunner


@dataclass
class LengthResult:
    length: int
    comparison: Comparison
    real: RealMatch
    seconds: float | None = None  # sampling time of this length (None for --samples)

    @property
    def targets(self) -> list[tg.TargetResult]:
        return self.comparison.target_results()

    def to_dict(self) -> dict:
        return {"length": self.length, "real_chains": self.real.to_dict(), "sampling_seconds": self.seconds,
                **self.comparison.to_dict()}


@dataclass
class SuiteResult:
    """One model's evaluation: per-length results and what was run how (notes)."""

    label: str
    lengths: dict[int, LengthResult]
    notes: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # seed, counts, caps, ... (what a comparison must match)

    def targets_met(self) -> bool:
        return all(tg.met(r.targets) for r in self.lengths.values())

    def to_dict(self) -> dict:
        return {"label": self.label, "notes": self.notes, "settings": self.settings, "targets_met": self.targets_met(),
                "target_table": self.target_table(),
                "lengths": {str(k): v.to_dict() for k, v in self.lengths.items()}}

    def target_table(self) -> dict[str, dict[str, dict]]:
        """{metric: {length: {value, passed, margin}}} for every target."""
        table: dict[str, dict[str, dict]] = {t.metric: {} for t in tg.TARGETS}
        for length, res in self.lengths.items():
            for t in res.targets:
                table[t.metric][str(length)] = {"value": t.value, "passed": t.passed, "margin": t.margin}
        return table

    def targets_markdown(self) -> str:
        """Targets x lengths: value, yes / **no** and the margin in each cell."""
        lengths = list(self.lengths)
        lines = ["| target | " + " | ".join(f"L {n}" for n in lengths) + " |",
                 "|---|" + "---:|" * len(lengths)]
        for t in tg.TARGETS:
            cells = []
            for n in lengths:
                r = next(x for x in self.lengths[n].targets if x.metric == t.metric)
                if r.passed is None:
                    cells.append(f"{fmt(r.value)} (not checked)")
                else:
                    cells.append(f"{fmt(r.value)} {'yes' if r.passed else '**no**'} ({r.margin:+.3f})")
            lines.append(f"| {t.metric} {t.text} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def real_markdown(self) -> str:
        """Which real chains each length was compared with (range, count, the widening note)."""
        return "\n".join(f"- {r.real.note}" for r in self.lengths.values())


class LengthSuite:
    """Collects real chains and samples per length; TM-score jobs run in ``runner`` meanwhile."""

    def __init__(self, pool: RealPool, runner: TMRunner, *, seed: int = 0, real_cap: int | None = 64,
                 tm_cap: int | None = 32, novelty_cap: int | None = 16, reference_cap: int | None = 16,
                 proxy=None):
        self.pool, self.runner, self.seed = pool, runner, seed
        self.real_cap, self.tm_cap, self.novelty_cap, self.reference_cap = real_cap, tm_cap, novelty_cap, reference_cap
        self.proxy = proxy
        self.real: dict[int, RealMatch] = {}
        self.refs: dict[int, list | None] = {}
        self._real_tm: dict[int, object] = {}
        self._samples: dict[str, dict[int, tuple[list[np.ndarray], object, float | None]]] = {}

    def add_length(self, length: int) -> RealMatch:
        if length not in self.real:
            match = match_length(self.pool, length, cap=self.real_cap, seed=self.seed)
            self.real[length] = match
            self.refs[length] = novelty_references(self.pool, length, cap=self.reference_cap, seed=self.seed)
            self._real_tm[length] = self.runner.submit(match.chains, reference=self.refs[length],
                                                       pairwise_cap=self.tm_cap, novelty_cap=self.novelty_cap)
        return self.real[length]

    def add_samples(self, label: str, length: int, samples: list[np.ndarray], seconds: float | None = None) -> None:
        self.add_length(length)
        job = self.runner.submit(samples, reference=self.refs[length], pairwise_cap=self.tm_cap,
                                 novelty_cap=self.novelty_cap)
        self._samples.setdefault(label, {})[length] = (samples, job, seconds)

    def finish(self, notes: list[str] | None = None, settings: dict | None = None) -> dict[str, SuiteResult]:
        """Wait for every alignment; metrics, targets and the proxy per model and length."""
        real_sets = {n: set_metrics(m.chains, label="real", tm=self._real_tm[n]()) for n, m in self.real.items()}
        if self.proxy is not None:
            for n, m in self.real.items():
                real_sets[n].extra["mpnn_nll"] = float(np.mean(self.proxy.score(m.chains, seed=self.seed)))
        results = {}
        for label, by_length in self._samples.items():
            lengths = {}
            for n, (samples, job, seconds) in sorted(by_length.items()):
                sset = set_metrics(samples, label="samples", tm=job())
                if self.proxy is not None:
                    sset.extra["mpnn_nll"] = float(np.mean(self.proxy.score(samples, seed=self.seed)))
                lengths[n] = LengthResult(n, Comparison(sset, real_sets[n]), self.real[n], seconds)
            counts = {str(n): len(v[0]) for n, v in sorted(by_length.items())}
            results[label] = SuiteResult(label, lengths, list(notes or []), {**(settings or {}), "counts": counts})
        return results
