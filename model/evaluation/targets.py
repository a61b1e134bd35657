"""Quality targets for sampled backbones, checked at every evaluated length, with their margins.

Each target reads one number of the samples' summary (`model.evaluation.metrics.SetMetrics.summary`)
and, for the radius of gyration, the held-out real chains of the same length. A target's ``margin``
is signed: how far the value is inside the target (>= 0 passes, except for the strict ``<``, where 0
fails), in the metric's own unit, so "missed by 0.03" reads directly off the table.

| target | passes when |
|---|---|
| ``ca_ca_median`` | ``|median CA-CA - 3.8| <= 0.1`` A |
| ``clashes_per_residue`` | ``< 0.01`` (pairs closer than 3 A, ``|i - j| >= 3``, per residue) |
| ``frac_long_step`` | ``== 0``: no sample has a consecutive CA-CA step over 4.2 A |
| ``helix_strand`` | ``>= 0.40`` (CA-only P-SEA) |
| ``strand`` | ``>= 0.10`` |
| ``rg_ratio`` | the samples' mean Rg / (2.2 L^0.38) inside the 5-95 % range of the real chains' |
| ``mean_pairwise_tm`` | ``<= 0.45`` |

A target whose number was not measured (pairwise TM of a single sample, an Rg range without real
chains) is reported as not checked (``passed`` None) and does not count as met or missed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

IDEAL_CA_CA = 3.8
EPS = 1e-9  # float slack on the inclusive bounds: 3.9 - 3.8 is 0.10000000000000009 in binary


@dataclass(frozen=True)
class Target:
    metric: str   # key of SetMetrics.summary()
    op: str       # "within" | ">=" | "<=" | "<" | "==0" | "range"
    value: float | tuple[float, float] | None  # threshold; (centre, tolerance) for "within"; None for "range"
    text: str     # how the table shows it


TARGETS: tuple[Target, ...] = (
    Target("ca_ca_median", "within", (IDEAL_CA_CA, 0.1), "3.8 +- 0.1 A"),
    Target("clashes_per_residue", "<", 0.01, "< 0.01"),
    Target("frac_long_step", "==0", 0.0, "0 (no step > 4.2 A)"),
    Target("helix_strand", ">=", 0.40, ">= 0.40"),
    Target("strand", ">=", 0.10, ">= 0.10"),
    Target("rg_ratio", "range", None, "in real 5-95 %"),
    Target("mean_pairwise_tm", "<=", 0.45, "<= 0.45"),
)
TARGET_METRICS = tuple(t.metric for t in TARGETS)


@dataclass(frozen=True)
class TargetResult:
    metric: str
    value: float | None
    target: str      # the target as text (the Rg range with its numbers)
    passed: bool | None
    margin: float | None  # signed distance inside the target (module doc)

    def to_dict(self) -> dict:
        return asdict(self)


def check(target: Target, value: float | None, real_range: tuple[float, float] | None = None) -> TargetResult:
    """One target on one value; ``real_range`` (p05, p95) is needed by the "range" target."""
    text = target.text
    if target.op == "range" and real_range is not None:
        text = f"in real 5-95 % [{real_range[0]:.3f}, {real_range[1]:.3f}]"
    if value is None or (target.op == "range" and real_range is None):
        return TargetResult(target.metric, value, text, None, None)
    v = float(value)
    if target.op == "within":
        centre, tol = target.value
        margin = tol - abs(v - centre)
        passed = margin >= -EPS
    elif target.op == ">=":
        margin = v - target.value
        passed = margin >= -EPS
    elif target.op == "<=":
        margin = target.value - v
        passed = margin >= -EPS
    elif target.op == "<":
        margin = target.value - v
        passed = margin > EPS
    elif target.op == "==0":
        margin = 0.0 - v  # 0.0, not -0.0, when met
        passed = v == 0
    elif target.op == "range":
        lo, hi = real_range
        margin = min(v - lo, hi - v)
        passed = margin >= -EPS
    else:  # pragma: no cover - TARGETS is fixed above
        raise ValueError(f"unknown target op {target.op!r}")
    return TargetResult(target.metric, v, text, bool(passed), float(margin))


def check_all(summary: dict, real_range: tuple[float, float] | None) -> list[TargetResult]:
    """Every target on one set's ``summary`` (samples or real) of one length."""
    return [check(t, summary.get(t.metric), real_range) for t in TARGETS]


def met(results: list[TargetResult]) -> bool:
    """All checked targets passed (targets not checked are ignored)."""
    return all(r.passed for r in results if r.passed is not None)


def count_met(results: list[TargetResult]) -> tuple[int, int]:
    """(passed, checked)."""
    checked = [r for r in results if r.passed is not None]
    return sum(bool(r.passed) for r in checked), len(checked)


def target_text(metric: str) -> str:
    for t in TARGETS:
        if t.metric == metric:
            return t.text
    return ""
