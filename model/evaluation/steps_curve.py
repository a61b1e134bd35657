"""Quality against sampling steps: which fewer-step sampler is as good as the full one (``mhcflash steps-curve``).

Input: finished evaluations (``metrics.json`` of `mhcflash evaluate`) of one model sampled with
different step counts, at least two of them with the full schedule (T steps, different seeds), all
compared with the same real chains. Output: a per-metric table (steps x lengths), a plot of every
metric against steps per length, and JSON.

The rule (what "within the spread of two full-step runs" means here): for a metric ``m`` at length
``L`` the full-step runs give a centre ``c`` (their mean) and a spread ``d`` (their largest minus
smallest value). A step count passes ``(L, m)`` when ``|value - c| <= max(d, Z * se, floor_m)``: it
is no farther from the full sampler than seeds of the full sampler fall from each other. Two runs
give one draw of that spread, so the seed-to-seed noise is also estimated from the samples
themselves: ``se`` is the standard error of ``value - c``, from the per-chain values (for
``ca_ca_median`` the per-chain medians stand in for the set's) or, for ``mean_pairwise_tm``, the
report's jackknife over the chains (``samples_se``; reports written before it have none); ``Z`` = 2.
``floor_m`` keeps a spread of zero from failing everything: one sample's share (``1 / n``) for
``frac_long_step`` (a fraction of samples), else `compare.TIE` (the tables' last digit). The strict
reading (the value inside ``[min, max]`` of the full-step runs) is reported beside it, as ``inside``;
so is ``better``: out of the spread but better than the full sampler's mean by
`model.evaluation.compare`'s rule (closer to the real chains, fewer clashes, ...). The default step
count proposed is the fewest steps that pass every judged metric at every length; None when no
fewer-step run does (``passing_or_better_steps`` also lets cells that are better pass).

Judged: ``JUDGED`` (the targets' metrics, the secondary structure the targets leave out, the
diversity and, where it ran, the designability proxy). ``novelty`` is shown, not judged (more
novel is not better by itself; `model.evaluation.compare`).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from model.evaluation.compare import TIE, better, load_report
from model.evaluation.metrics import LONG_STEP, fmt

JUDGED = ("ca_ca_median", "frac_long_step", "clashes_per_residue", "rg_ratio", "helix", "strand",
          "helix_strand", "mean_pairwise_tm", "mpnn_nll")
SHOWN = ("novelty",)
Z = 2.0  # standard errors of the seed-to-seed noise a fewer-step run may differ by
PER_CHAIN = {  # metric -> its per-chain value in a report's ``per_chain`` rows (the set's value is their mean)
    "ca_ca_median": lambda c: c["ca_ca_median"],  # NOTE: the set's is the median of all steps, close to this
    "frac_long_step": lambda c: float(c["ca_ca_max"] > LONG_STEP),
    "clashes_per_residue": lambda c: c["clashes_per_residue"],
    "rg_ratio": lambda c: c["rg_ratio"],
    "helix": lambda c: c["helix"],
    "strand": lambda c: c["strand"],
    "helix_strand": lambda c: c["helix"] + c["strand"],
}


def standard_error(length_result: dict, metric: str) -> float | None:
    """Standard error of a set's ``metric``: from its per-chain values, or the report's own estimate
    (``samples_se``: the pairwise TM-score's jackknife); None where neither is kept."""
    rows = length_result.get("per_chain", {}).get("samples")
    if metric not in PER_CHAIN or not rows or len(rows) < 2:
        return length_result.get("samples_se", {}).get(metric)
    return statistics.stdev(PER_CHAIN[metric](c) for c in rows) / len(rows) ** 0.5


class CurveError(ValueError):
    """The reports cannot form a curve (too few full-step runs, different real chains, ...)."""


@dataclass
class Cell:
    value: float | None
    passed: bool | None  # None: not judged (shown metric, or a value missing)
    inside: bool | None
    better: bool | None  # better than the full-step mean (compare.better), whether in the spread or not
    distance: float | None  # |value - centre| / tolerance (<= 1 passes)
    tolerance: float | None  # max(the full runs' spread, Z standard errors, the floor)


def parse_runs(specs: list[str]) -> list[tuple[int, Path]]:
    """``STEPS=REPORT`` strings -> [(steps, path)]; raises CurveError naming the bad one."""
    runs = []
    for spec in specs:
        steps, sep, path = spec.partition("=")
        if not sep or not steps.strip().isdigit() or int(steps) < 1 or not path:
            raise CurveError(f"{spec!r}: give STEPS=REPORT, e.g. 250=reports/steps250 (a report dir or metrics.json)")
        runs.append((int(steps), Path(path)))
    return runs


def build_curve(runs: list[tuple[int, dict]], full_steps: int | None = None) -> dict:
    """``runs``: [(steps, metrics.json dict)]. ``full_steps``: the model's T (default: the largest
    step count given). Returns the curve as a JSON-ready dict (see `to_markdown`)."""
    full_steps = full_steps or max(s for s, _ in runs)
    full = [r for s, r in runs if s == full_steps]
    if len(full) < 2:
        raise CurveError(f"{len(full)} run(s) with {full_steps} steps: the spread needs two full-step runs "
                         "(different seeds)")
    lengths = sorted({int(n) for _, r in runs for n in r["lengths"]})
    for s, r in runs:
        missing = [n for n in lengths if str(n) not in r["lengths"]]
        if missing:
            raise CurveError(f"the {s}-step run ({r['label']}) lacks lengths {missing}: evaluate every run at the "
                             "same lengths")
    ref_ids = {n: full[0]["lengths"][str(n)]["real_chains"]["ids"] for n in lengths}
    for s, r in runs:
        differ = [n for n in lengths if r["lengths"][str(n)]["real_chains"]["ids"] != ref_ids[n]]
        if differ:
            raise CurveError(f"the {s}-step run ({r['label']}) was compared with other real chains at L {differ}: "
                             "use the same --real / --index for every run")
    metrics = [m for m in (*JUDGED, *SHOWN)
               if any(r["lengths"][str(n)]["samples"].get(m) is not None for _, r in runs for n in lengths)]
    fewer = {}  # steps -> its run, one per step count below the full schedule
    for s, r in runs:
        if s != full_steps and fewer.setdefault(s, r) is not r:
            raise CurveError(f"two {s}-step runs ({fewer[s]['label']}, {r['label']}): give one run per step count "
                             f"below {full_steps}")
    steps_list = sorted(fewer, reverse=True)
    spread, table = {}, {}
    for m in metrics:
        spread[m], table[m] = {}, {}
        for n in lengths:
            vals = [r["lengths"][str(n)]["samples"].get(m) for r in full]
            real = full[0]["lengths"][str(n)]["real"].get(m)
            if any(v is None for v in vals):
                spread[m][str(n)] = {"full": vals, "real": real}
                continue
            count = full[0]["lengths"][str(n)]["samples"].get("n") or 1
            floor = 1.0 / count if m == "frac_long_step" else TIE
            centre, width = sum(vals) / len(vals), max(vals) - min(vals)
            ses = [standard_error(r["lengths"][str(n)], m) for r in full]
            se_centre = None if None in ses else (sum(x * x for x in ses) ** 0.5) / len(ses)
            spread[m][str(n)] = {"full": vals, "centre": centre, "spread": width, "floor": floor,
                                 "se_centre": se_centre, "real": real}
        for s in steps_list:
            row = {}
            for n in lengths:
                res = fewer[s]["lengths"][str(n)]
                v = res["samples"].get(m)
                sp = spread[m][str(n)]
                if v is None or "centre" not in sp:
                    row[str(n)] = Cell(v, None, None, None, None, None).__dict__
                    continue
                se_v = standard_error(res, m)
                noise = 0.0 if se_v is None or sp["se_centre"] is None else Z * (se_v ** 2 + sp["se_centre"] ** 2) ** 0.5
                tol = max(sp["spread"], noise, sp["floor"])
                dist = abs(v - sp["centre"]) / tol  # <= 1 (+ float slack) passes
                judged = m in JUDGED
                row[str(n)] = Cell(v, dist <= 1.0 + 1e-9 if judged else None, min(sp["full"]) <= v <= max(sp["full"]),
                                   judged and better(m, v, sp["centre"], sp["real"]) == "A", dist, tol).__dict__
            table[m][str(s)] = row
    passing = [s for s in steps_list
               if all(c["passed"] is not False for m in metrics for c in table[m][str(s)].values())]
    passing_or_better = [s for s in steps_list
                         if all(c["passed"] is not False or c["better"] for m in metrics
                                for c in table[m][str(s)].values())]
    failures = {str(s): [f"{m} at L {n}" for m in metrics for n, c in table[m][str(s)].items()
                         if c["passed"] is False and not c["better"]] for s in steps_list}
    improved = {str(s): [f"{m} at L {n}" for m in metrics for n, c in table[m][str(s)].items()
                         if c["passed"] is False and c["better"]] for s in steps_list}
    return {"full_steps": full_steps, "full_runs": [r["label"] for r in full], "lengths": lengths,
            "steps": steps_list, "metrics": metrics, "spread": spread, "table": table,
            "passing_steps": passing, "proposed_default": min(passing) if passing else None,
            "passing_or_better_steps": passing_or_better,
            "failures": failures, "better_out_of_spread": improved}


def to_markdown(curve: dict) -> str:
    """Per metric: the full-step runs' values, then one row per step count ('ok' / '**out**' per cell)."""
    lengths = curve["lengths"]
    head = "| steps | " + " | ".join(f"L {n}" for n in lengths) + " |"
    rule = "|---|" + "---:|" * len(lengths)
    lines = [(f"Full sampler: {curve['full_steps']} steps, {len(curve['full_runs'])} runs. A cell passes when its "
              "distance from the full-step runs' mean is at most their spread or 2 standard errors of the "
              "seed-to-seed noise (`model.evaluation.steps_curve`)."), ""]
    for m in curve["metrics"]:
        judged = m in JUDGED
        lines += [f"### {m}{'' if judged else ' (shown, not judged)'}", "", head, rule]
        full_cells = [" / ".join(fmt(v) for v in curve["spread"][m][str(n)]["full"]) for n in lengths]
        lines.append(f"| {curve['full_steps']} (each run) | " + " | ".join(full_cells) + " |")
        for s in curve["steps"]:
            cells = []
            for n in lengths:
                c = curve["table"][m][str(s)][str(n)]
                mark = "" if c["passed"] is None else (" ok" if c["passed"] else " better" if c["better"] else " **out**")
                cells.append(f"{fmt(c['value'])}{mark}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        reals = [fmt(curve["spread"][m][str(n)]["real"]) for n in lengths]
        lines += ["| real chains | " + " | ".join(reals) + " |", ""]
    verdict = (f"Fewest steps passing every judged metric at every length: **{curve['proposed_default']}**."
               if curve["proposed_default"] else "No fewer-step run passes every judged metric at every length.")
    lines.append(verdict)
    if curve["passing_or_better_steps"] != curve["passing_steps"]:
        lines.append(f"Counting cells out of the spread but better than the full sampler ('better') as passing: "
                     f"{', '.join(map(str, curve['passing_or_better_steps'])) or 'none'}.")
    for s in curve["steps"]:
        worse, improved = curve["failures"][str(s)], curve["better_out_of_spread"][str(s)]
        lines.append(f"- {s} steps: worse at {len(worse)} cells{': ' + ', '.join(worse) if worse else ''}; "
                     f"better out of the spread at {len(improved)}")
    return "\n".join(lines) + "\n"


def plot(curve: dict, path: Path) -> None:
    """One panel per metric: value against steps (log axis), a line per length; the full-step runs'
    range as a bar at T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = curve["metrics"]
    cols = 3
    rows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), dpi=110, squeeze=False)
    colors = plt.cm.viridis([i / max(1, len(curve["lengths"]) - 1) for i in range(len(curve["lengths"]))])
    T = curve["full_steps"]
    for ax, m in zip(axes.flat, metrics, strict=False):
        for color, n in zip(colors, curve["lengths"], strict=True):
            sp = curve["spread"][m][str(n)]
            xs = [s for s in curve["steps"] if curve["table"][m][str(s)][str(n)]["value"] is not None]
            ys = [curve["table"][m][str(s)][str(n)]["value"] for s in xs]
            if "centre" in sp:
                xs, ys = [T, *xs], [sp["centre"], *ys]
                ax.plot([T, T], [min(sp["full"]), max(sp["full"])], color=color, lw=5, alpha=0.45)
            ax.plot(xs, ys, "o-", color=color, ms=3, lw=1.2, label=f"L {n}")
        ax.set_xscale("log")
        ax.set(title=m, xlabel="sampling steps")
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_curve(runs: list[tuple[int, Path]], out: Path, full_steps: int | None = None) -> dict:
    """Read the reports, build the curve and write ``steps_curve.{json,md,png}`` into ``out``."""
    loaded = []
    for steps, path in runs:
        try:
            loaded.append((steps, load_report(path)))
        except (OSError, ValueError) as err:
            raise CurveError(f"{steps}={path}: {err}") from err
    curve = build_curve(loaded, full_steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "steps_curve.json").write_text(json.dumps(curve, indent=1))
    (out / "steps_curve.md").write_text(to_markdown(curve))
    plot(curve, out / "steps_curve.png")
    return curve
