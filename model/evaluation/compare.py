"""Two models side by side: which is better at every length, metric by metric (``--baseline``).

Both models are sampled with the same seeds and compared with the same real chains; B may also be a
finished evaluation (its ``metrics.json``), so an old model is evaluated once and each new one is
compared with it (the real chains used for each length are checked to be the same ids, and a
difference is named in the comparison). Models are compared through their ``metrics.json`` form
(`suite.SuiteResult.to_dict`). Per metric the better one is:

| metric | better |
|---|---|
| ``ca_ca_median`` | closer to 3.8 A |
| ``frac_ca_ca_ok`` | higher |
| ``frac_long_step``, ``clashes_per_residue``, ``mean_pairwise_tm``, ``mpnn_nll`` | lower |
| ``rg_ratio``, ``helix``, ``strand``, ``helix_strand``, ``coil`` | closer to the real chains' value |
| ``novelty``, ``clusters_05`` | not judged (shown only): more novel or more clusters is not better by itself |

Differences smaller than ``TIE`` (half the last digit the tables show) are ties. Verdict per length:
the model meeting more targets wins; with as many targets met, the one that wins more of the
``DECISIVE`` metrics (the targets' metrics and the designability proxy when it ran); else a tie.
"A beats B" overall means A wins at every length: the rule for making new weights the default.
"""

from __future__ import annotations

import json
from pathlib import Path

from model.evaluation import targets as tg
from model.evaluation.metrics import IDEAL_CA_CA, fmt

TIE = 5e-4
LOWER = ("frac_long_step", "clashes_per_residue", "mean_pairwise_tm", "mpnn_nll")
HIGHER = ("frac_ca_ca_ok",)
TO_REAL = ("rg_ratio", "helix", "strand", "helix_strand", "coil")
SHOWN = ("novelty", "clusters_05")
METRICS = ("ca_ca_median", "frac_ca_ca_ok", *LOWER[:2], *TO_REAL, LOWER[2], LOWER[3], *SHOWN)
DECISIVE = (*tg.TARGET_METRICS, "mpnn_nll")
SETTINGS = ("seed", "noise_scale", "steps", "counts", "real_cap", "tm_cap", "novelty_cap", "reference_cap")


def better(metric: str, a: float | None, b: float | None, real: float | None = None) -> str:
    """"A", "B", "tie", or "" (not judged / a value missing) for one metric."""
    if a is None or b is None or metric in SHOWN:
        return ""
    if metric == "ca_ca_median":
        da, db = abs(a - IDEAL_CA_CA), abs(b - IDEAL_CA_CA)
    elif metric in TO_REAL:
        if real is None:
            return ""
        da, db = abs(a - real), abs(b - real)
    elif metric in HIGHER:
        da, db = -a, -b
    elif metric in LOWER:
        da, db = a, b
    else:
        return ""
    if abs(da - db) < TIE:
        return "tie"
    return "A" if da < db else "B"


def _count(targets: list[dict]) -> tuple[int, int]:
    checked = [t for t in targets if t["passed"] is not None]
    return sum(bool(t["passed"]) for t in checked), len(checked)


def compare_length(a: dict, b: dict, length: int) -> dict:
    """Rows (metric, A, B, real, better) and the verdict for one length of two ``metrics.json`` dicts."""
    ra, rb = a["lengths"][str(length)], b["lengths"][str(length)]
    sa, sb, real = ra["samples"], rb["samples"], ra["real"]
    rows = []
    for m in METRICS:
        if m not in sa and m not in sb:
            continue
        rows.append({"metric": m, "A": sa.get(m), "B": sb.get(m), "real": real.get(m),
                     "better": better(m, sa.get(m), sb.get(m), real.get(m))})
    (met_a, checked_a), (met_b, checked_b) = _count(ra["targets"]), _count(rb["targets"])
    wins = {"A": 0, "B": 0}
    for row in rows:
        if row["metric"] in DECISIVE and row["better"] in wins:
            wins[row["better"]] += 1
    if met_a != met_b:
        verdict = "A" if met_a > met_b else "B"
    elif wins["A"] != wins["B"]:
        verdict = "A" if wins["A"] > wins["B"] else "B"
    else:
        verdict = "tie"
    same_real = ra["real_chains"]["ids"] == rb["real_chains"]["ids"]
    return {"length": length, "rows": rows, "targets_met": {"A": f"{met_a}/{checked_a}", "B": f"{met_b}/{checked_b}"},
            "decisive_wins": wins, "verdict": verdict, "same_real_chains": same_real}


def compare_suites(a, b) -> dict:
    """Every common length of A and B (`SuiteResult` or ``metrics.json`` dicts); ``a_beats_b_everywhere``
    is the default-weights rule; lengths only one of them has are listed, not judged."""
    a = a if isinstance(a, dict) else a.to_dict()
    b = b if isinstance(b, dict) else b.to_dict()
    lengths = [int(n) for n in a["lengths"] if n in b["lengths"]]
    per_length = [compare_length(a, b, n) for n in lengths]
    only = sorted({int(n) for n in a["lengths"]} ^ {int(n) for n in b["lengths"]})
    sa, sb = a.get("settings", {}), b.get("settings", {})
    differ = sorted(k for k in set(sa) | set(sb) if k in SETTINGS and sa.get(k) != sb.get(k))
    return {"A": a["label"], "B": b["label"], "lengths": per_length, "lengths_not_in_both": only,
            "settings_differ": {k: [sa.get(k), sb.get(k)] for k in differ},
            "a_beats_b_everywhere": bool(per_length) and not only and all(x["verdict"] == "A" for x in per_length),
            "lengths_not_won_by_A": [x["length"] for x in per_length if x["verdict"] != "A"] + only,
            "real_chains_differ_at": [x["length"] for x in per_length if not x["same_real_chains"]]}


def load_report(path: Path) -> dict:
    """A finished evaluation: ``metrics.json`` or the report directory holding it."""
    path = Path(path)
    path = path / "metrics.json" if path.is_dir() else path
    data = json.loads(path.read_text())
    if "lengths" not in data or "label" not in data:
        raise ValueError(f"{path} is not a per-length evaluation (no 'lengths' / 'label'): re-run mhcflash evaluate")
    return data


def to_markdown(cmp: dict) -> str:
    """Per-length tables "A vs B, which is better per metric" and the overall verdict."""
    lines = [f"A = {cmp['A'].removeprefix('A: ')}", f"B = {cmp['B'].removeprefix('B: ')}", ""]
    for x in cmp["lengths"]:
        lines += [f"### L {x['length']}: {verdict_text(x)}", "",
                  "| metric | A | B | real | better |", "|---|---:|---:|---:|:---:|"]
        lines += [f"| {r['metric']} | {fmt(r['A'])} | {fmt(r['B'])} | {fmt(r['real'])} | {r['better']} |"
                  for r in x["rows"]]
        lines.append("")
    if cmp["real_chains_differ_at"]:
        lines += [(f"NOTE: A and B were compared with different real chains at L "
                  f"{', '.join(map(str, cmp['real_chains_differ_at']))} (different index or caps)."), ""]
    if cmp["settings_differ"]:
        lines += ["NOTE: settings differ (A, B): " + "; ".join(f"{k} {v[0]} vs {v[1]}" for k, v in
                                                            cmp["settings_differ"].items()), ""]
    if cmp["lengths_not_in_both"]:
        lines += [(f"Lengths evaluated for only one model (counted as not won by A): "
                  f"{', '.join(map(str, cmp['lengths_not_in_both']))}."), ""]
    if cmp["a_beats_b_everywhere"]:
        lines.append("**A beats B at every length.**")
    else:
        lines.append(f"**A does not beat B at every length** (not won at L {', '.join(map(str, cmp['lengths_not_won_by_A']))}).")
    return "\n".join(lines) + "\n"


def verdict_text(x: dict) -> str:
    who = {"A": "A better", "B": "B better", "tie": "tie"}[x["verdict"]]
    return (f"{who} (targets met A {x['targets_met']['A']}, B {x['targets_met']['B']}; decisive metrics won "
            f"A {x['decisive_wins']['A']}, B {x['decisive_wins']['B']})")


def summary_table(cmp: dict) -> str:
    """One line per length: verdict, targets met, decisive wins (the overview)."""
    lines = ["| length | targets met A | targets met B | decisive wins A : B | better |", "|---:|---:|---:|:---:|:---:|"]
    for x in cmp["lengths"]:
        lines.append(f"| {x['length']} | {x['targets_met']['A']} | {x['targets_met']['B']} | "
                     f"{x['decisive_wins']['A']} : {x['decisive_wins']['B']} | {x['verdict']} |")
    return "\n".join(lines)
