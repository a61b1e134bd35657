"""Quality against sampling steps (`model.evaluation.steps_curve`, ``mhcflash steps-curve``): the rule that
picks a fewer-step default, its errors, and the command's files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from model.evaluation.steps_curve import CurveError, build_curve, parse_runs

LENGTHS = (64, 512)
BASE = {"ca_ca_median": 3.79, "frac_long_step": 0.0, "clashes_per_residue": 0.002, "rg_ratio": 1.0, "helix": 0.5,
        "strand": 0.05, "helix_strand": 0.55, "mean_pairwise_tm": 0.33, "novelty": 0.6}


def report(label: str, changes: dict | None = None, *, n: int = 64, ids=("a", "b")) -> dict:
    """A metrics.json-like dict: the same samples at every length except ``changes`` {(metric, L): value}."""
    changes = changes or {}
    lengths = {}
    for L in LENGTHS:
        samples = {m: changes.get((m, L), v) for m, v in BASE.items()}
        lengths[str(L)] = {"samples": {**samples, "n": n}, "real": {**BASE, "strand": 0.15},
                           "real_chains": {"ids": list(ids)}}
    return {"label": label, "lengths": lengths}


def full_pair() -> list[tuple[int, dict]]:
    return [(1000, report("seed 0", {("helix", 64): 0.50})), (1000, report("seed 1", {("helix", 64): 0.52}))]


def test_the_fewest_steps_within_the_full_runs_spread_is_proposed():
    runs = [*full_pair(),
            (250, report("250", {("helix", 64): 0.53})),   # 0.02 from the centre 0.51: within the spread 0.02
            (100, report("100", {("helix", 64): 0.54})),   # 0.03 from it: out
            (50, report("50", {("strand", 512): 0.02}))]   # helix at 64 is 0.50 (in), strand is out
    curve = build_curve(runs)
    assert curve["steps"] == [250, 100, 50]
    assert curve["table"]["helix"]["250"]["64"]["passed"] is True
    assert curve["table"]["helix"]["250"]["64"]["inside"] is False  # outside [0.50, 0.52], strictly
    assert curve["table"]["helix"]["100"]["64"]["passed"] is False
    assert curve["passing_steps"] == [250]
    assert curve["proposed_default"] == 250
    assert curve["failures"]["100"] == ["helix at L 64"] and curve["failures"]["50"] == ["strand at L 512"]
    assert curve["better_out_of_spread"]["50"] == []
    assert curve["table"]["novelty"]["250"]["64"]["passed"] is None  # shown, not judged


def test_cells_out_of_the_spread_but_better_than_the_full_sampler_are_told_apart():
    runs = [*full_pair(),
            (250, report("250", {("strand", 512): 0.08})),    # closer to the real 0.15 than 0.05: better
            (100, report("100", {("strand", 512): 0.02}))]    # farther: worse
    curve = build_curve(runs)
    cell250, cell100 = (curve["table"]["strand"][s]["512"] for s in ("250", "100"))
    assert cell250["passed"] is False and cell250["better"] is True
    assert cell100["passed"] is False and cell100["better"] is False
    assert curve["passing_steps"] == [] and curve["passing_or_better_steps"] == [250]
    from model.evaluation.steps_curve import to_markdown

    text = to_markdown(curve)
    assert "0.080 better" in text and "0.020 **out**" in text and "as passing: 250." in text
    assert "- 250 steps: worse at 0 cells; better out of the spread at 1" in text
    assert "- 100 steps: worse at 1 cells: strand at L 512; better out of the spread at 0" in text


def test_a_spread_of_zero_allows_one_sample_of_long_steps_and_nothing_more():
    one, two = 1 / 32, 2 / 32
    runs = [*full_pair(), (250, report("250", {("frac_long_step", 512): one}, n=32)),
            (100, report("100", {("frac_long_step", 512): two}, n=32))]
    runs[0] = (1000, report("seed 0", n=32))
    runs[1] = (1000, report("seed 1", n=32))
    curve = build_curve(runs)
    assert curve["spread"]["frac_long_step"]["512"]["spread"] == 0.0
    assert curve["table"]["frac_long_step"]["250"]["512"]["passed"] is True
    assert curve["table"]["frac_long_step"]["100"]["512"]["passed"] is False
    assert curve["proposed_default"] == 250


def test_the_seed_noise_of_the_samples_widens_a_narrow_two_run_spread():
    """Two full-step runs with the same mean (spread 0): the per-chain helix values (sd 0.1, 64 chains)
    give 2 standard errors of the difference of means ~0.031, so 0.52 passes and 0.55 does not."""
    def with_chains(rep):
        for res in rep["lengths"].values():
            res["per_chain"] = {"samples": [{"ca_ca_median": 3.8, "ca_ca_max": 3.9, "clashes_per_residue": 0.0,
                                             "rg_ratio": 1.0, "helix": 0.4 + 0.2 * (k % 2), "strand": 0.05}
                                            for k in range(64)]}
        return rep

    runs = [(1000, with_chains(report("seed 0"))), (1000, with_chains(report("seed 1"))),
            (250, with_chains(report("250", {("helix", 64): 0.52}))),
            (100, with_chains(report("100", {("helix", 64): 0.55})))]
    curve = build_curve(runs)
    assert curve["spread"]["helix"]["64"]["spread"] == 0.0
    se = 0.1 * (64 / 63) ** 0.5 / 8  # one run's standard error of the mean
    cell = curve["table"]["helix"]["250"]["64"]
    assert cell["tolerance"] == pytest.approx(2 * (se ** 2 + se ** 2 / 2) ** 0.5)
    assert cell["passed"] is True and curve["table"]["helix"]["100"]["64"]["passed"] is False
    assert curve["table"]["mean_pairwise_tm"]["250"]["64"]["tolerance"] == pytest.approx(5e-4)  # no TM estimate
    for _, rep in runs:  # the report's own jackknife of the pairwise TM-score, where it wrote one
        rep["lengths"]["64"]["samples_se"] = {"mean_pairwise_tm": 0.004}
    tm_cell = build_curve(runs)["table"]["mean_pairwise_tm"]["250"]["64"]
    assert tm_cell["tolerance"] == pytest.approx(2 * (0.004 ** 2 + 0.004 ** 2 / 2) ** 0.5)


def test_no_fewer_step_run_passing_proposes_none():
    runs = [*full_pair(), (100, report("100", {("clashes_per_residue", 64): 0.05}))]
    curve = build_curve(runs)
    assert curve["passing_steps"] == [] and curve["proposed_default"] is None


@pytest.mark.parametrize("runs, message", [
    ([(1000, report("seed 0")), (250, report("250"))], "needs two full-step runs"),
    ([*full_pair(), (250, report("250", ids=("a", "c")))], "other real chains at L [64, 512]"),
])
def test_curves_that_would_mislead_are_refused(runs, message):
    with pytest.raises(CurveError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_curve(runs)


def test_two_runs_of_one_fewer_step_count_are_refused():
    with pytest.raises(CurveError, match="two 250-step runs"):
        build_curve([*full_pair(), (250, report("250 a")), (250, report("250 b"))])


def test_a_run_missing_a_length_is_refused():
    short = report("250")
    del short["lengths"]["512"]
    with pytest.raises(CurveError, match=r"lacks lengths \[512\]"):
        build_curve([*full_pair(), (250, short)])


@pytest.mark.parametrize("spec", ["250", "x=dir", "0=dir", "250="])
def test_bad_run_specs_name_the_spec(spec):
    with pytest.raises(CurveError, match="give STEPS=REPORT"):
        parse_runs([spec])


def test_command_writes_table_plot_and_json(tmp_path):
    from model.cli import app

    paths = []
    for k, (steps, rep) in enumerate([*full_pair(), (250, report("250", {("helix", 64): 0.51}))]):
        d = tmp_path / f"r{k}"
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps(rep))
        paths.append(f"{steps}={d}")
    out = tmp_path / "curve"
    res = CliRunner().invoke(app, ["steps-curve", *paths, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["proposed_default"] == 250
    assert (out / "steps_curve.png").stat().st_size > 10_000
    text = (out / "steps_curve.md").read_text()
    assert "### helix" in text and "| 1000 (each run) | 0.500 / 0.520 |" in text and "0.510 ok" in text
    assert json.loads((out / "steps_curve.json").read_text())["passing_steps"] == [250]

    res = CliRunner().invoke(app, ["steps-curve", "1000=" + str(tmp_path / "nowhere"), paths[1], "--out", str(out)])
    assert res.exit_code == 2 and "1000=" in res.output and "nowhere" in res.output
