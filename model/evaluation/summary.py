"""The report's text twins: ``summary.md`` (for a model card or a pull request), ``metrics.json``, and
``comparison.md`` / ``comparison.json`` when a baseline model was evaluated beside it.

``metrics.json``: ``label``, ``notes``, ``targets_met`` (every length), ``target_table``
({target: {length: {value, passed, margin}}}), ``lengths`` ({L: {real_chains (count, length range,
widened, note, ids), sampling_seconds, samples, real (set summaries), targets, real_targets,
targets_met, per_chain}}), ``design`` (ESMFold pipeline summary or null), ``comparison`` (or null).
"""

from __future__ import annotations

import json
from pathlib import Path

from model.evaluation.metrics import fmt


def markdown_summary(result, *, title: str, plots=(), design_summary: dict | None = None,
                     comparison: dict | None = None) -> str:
    """Targets x lengths, the real chains used, one samples-vs-real table per length, the comparison."""
    from model.evaluation.compare import summary_table

    lines = [f"# {title}", "", f"Model: {result.label}", ""]
    lines += [f"- {x}" for x in result.notes] + [""]
    verdict = "met at every length" if result.targets_met() else "**not met at every length**"
    lines += [f"Targets {verdict} (value, yes / **no**, margin: how far inside the target).", "",
              result.targets_markdown(), "", "Real chains compared with:", "", result.real_markdown(), ""]
    if comparison is not None:
        won = ("**A beats B at every length.**" if comparison["a_beats_b_everywhere"] else
               "**A does not beat B at every length** (not won at L "
               + ", ".join(map(str, comparison["lengths_not_won_by_A"])) + ").")
        lines += ["## Against the baseline", "", f"A = {comparison['A'].removeprefix('A: ')}",
                  f"B = {comparison['B'].removeprefix('B: ')}", "",
                  summary_table(comparison), "", won, "", "Per metric: comparison.md.", ""]
    for n, res in result.lengths.items():
        secs = "" if res.seconds is None else f", sampled in {res.seconds:.1f} s"
        lines += [f"## L {n}", "", f"{res.comparison.samples.n} samples{secs}; {res.real.note}.", "",
                  res.comparison.to_markdown(), ""]
    if design_summary:
        lines += ["## Designability (ProteinMPNN + ESMFold)", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in design_summary.items()] + [""]
    lines += [f"![{cap}]({name})" for name, cap in plots]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, result, *, title: str, plots=(), design_summary: dict | None = None,
                  comparison: dict | None = None) -> None:
    """``summary.md`` and ``metrics.json`` (+ ``comparison.md`` / ``.json``) into ``out``."""
    from model.evaluation.compare import to_markdown

    out = Path(out)
    (out / "summary.md").write_text(markdown_summary(result, title=title, plots=plots,
                                                     design_summary=design_summary, comparison=comparison))
    data = {**result.to_dict(), "design": design_summary, "comparison": comparison}
    (out / "metrics.json").write_text(json.dumps(data, indent=1, default=float))
    if comparison is not None:
        (out / "comparison.md").write_text(to_markdown(comparison))
        (out / "comparison.json").write_text(json.dumps(comparison, indent=1, default=float))
