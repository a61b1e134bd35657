"""The evaluation report: files, no CDN, PDB round trip, and a headless-Chromium render.

The browser test needs Debian's ``chromium`` (``apt-get install -y chromium``) and skips cleanly
without it. It checks the screenshot (size, not blank) and the DOM after 3Dmol.js ran (status
attribute set by the page's script, one WebGL canvas per viewer).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from model.evaluation import metrics, report
from model.evaluation.real_chains import pool_from_chains
from model.evaluation.suite import LengthSuite
from model.evaluation.tmscore import TMRunner

pytest.importorskip("tmtools")

WINDOW = (1200, 1600)        # screenshot width, height (px)
MIN_PIXEL_STD = 0.05         # grey-level std of a page with plots and 3D views (0..1 scale); blank ~0
MIN_COLOURED = 0.005        # share of saturated pixels in the 3D panel (drawn ~0.03, 3Dmol missing 0.0)
BROWSER_TIMEOUT_S = 90
ATOL_PDB = 1e-3              # PDB columns keep 3 decimals


def helix(length: int, phase: float = 0.0) -> np.ndarray:
    k = np.arange(length)
    t = np.deg2rad(100.0) * k + phase
    return np.stack([2.3 * np.cos(t), 2.3 * np.sin(t), 1.5 * k], axis=-1)  # [L, 3]


@pytest.fixture(scope="module")
def built(tmp_path_factory, real_ca_chains):
    rng = np.random.default_rng(0)
    real = [c.numpy().astype(np.float64) for c in real_ca_chains]  # 2-4 real chains of 20-60 residues
    by_length = {len(c): [helix(len(c), phase=k) + rng.normal(scale=0.6, size=(len(c), 3)) for k in range(2)]
                 for c in real}
    by_length[len(real[0])].append(real[0] + rng.normal(scale=0.2, size=real[0].shape))
    pool = pool_from_chains({f"r{k}": c for k, c in enumerate(real)}, None, label="test chains")
    with TMRunner(1) as runner:
        suite = LengthSuite(pool, runner, real_cap=None, tm_cap=None, novelty_cap=None)
        for n, xs in by_length.items():
            suite.add_samples("test run: weights none", n, xs)
        result = suite.finish(["a note"])["test run: weights none"]
    samples = [x for xs in by_length.values() for x in xs]
    frames = [samples[0] * s + rng.normal(scale=1 - s, size=samples[0].shape) * 6 for s in np.linspace(0, 1, 9)]
    out = tmp_path_factory.mktemp("report")
    path = report.write_report(out, result, by_length, trajectories=[frames])
    return path, result, by_length


def test_report_files_and_no_cdn(built):
    from model.pdb_io import read_ca

    path, result, by_length = built
    out = path.parent
    page = path.read_text()
    for name in ("summary.md", "metrics.json", "ca_ca_hist.png", "rg_vs_length.png", "sse_by_length.png",
                 "tm_heatmap.png", report.JS_NAME, report.JS_LICENCE):
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
        if name.endswith(".png"):
            assert name in page
    assert (out / report.JS_NAME).read_bytes() == (report.ASSETS / report.JS_NAME).read_bytes()
    assert "BSD" in (out / report.JS_LICENCE).read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page), "external resource in the report"
    assert f'<script src="{report.JS_NAME}">' in page
    # every length's table shows its comparison's numbers; the targets table has a column per length
    for n, res in result.lengths.items():
        s = res.comparison.samples.summary()
        assert f"<td>rg_ratio</td><td>{metrics.fmt(s['rg_ratio'])}</td>" in page
        assert f"<th>L {n}</th>" in page
    md = (out / "summary.md").read_text()
    first = next(iter(result.lengths.values()))
    assert first.comparison.to_markdown() in md and "![" in md and result.targets_markdown() in md
    data = json.loads((out / "metrics.json").read_text())
    for n, res in result.lengths.items():
        got = data["lengths"][str(n)]
        assert got["samples"]["n"] == len(by_length[n])
        assert got["real"]["helix_strand"] == res.comparison.real.summary()["helix_strand"]
        assert got["real_chains"]["count"] == res.real.to_dict()["count"]
    assert set(data["target_table"]["strand"]) == {str(k) for k in result.lengths}
    # PDB files round-trip (centred), trajectory is multi-model
    for n, samples in by_length.items():
        for k, ca in enumerate(samples):
            back = read_ca(out / "pdb" / f"L{n:04d}" / f"sample_{k:03d}.pdb")
            assert np.abs(back - (ca - ca.mean(axis=0))).max() < ATOL_PDB
    traj = (out / "pdb" / "trajectory_000.pdb").read_text()
    assert traj.count("MODEL ") == 9 and traj.count("ENDMDL") == 9


def test_inline_js_is_self_contained(built, tmp_path):
    _, result, by_length = built
    path = report.write_report(tmp_path, result, by_length, inline_js=True)
    page = path.read_text()
    assert "<script src=" not in page and "$3Dmol" in page and len(page) > 500_000
    assert not (tmp_path / report.JS_NAME).exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install -y chromium)")
def test_headless_chromium_renders_report(built, tmp_path):
    from PIL import Image

    path, _, by_length = built
    shot = tmp_path / "report.png"
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
           f"--window-size={WINDOW[0]},{WINDOW[1]}", "--dump-dom", path.as_uri()]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=BROWSER_TIMEOUT_S)
    assert res.returncode == 0, res.stderr[-2000:]
    img = Image.open(shot)
    assert img.size == WINDOW
    grey = np.asarray(img.convert("L"), dtype=np.float64) / 255.0  # [H, W]
    assert grey.std() > MIN_PIXEL_STD, f"screenshot looks blank (std {grey.std():.3f})"
    body = re.search(r"<body[^>]*>", res.stdout).group(0)
    views = min(len(by_length), report.MAX_VIEWERS) + 1  # one per length + one trajectory
    assert 'data-viewer-status="ready"' in body, body
    assert f'data-viewers="{views}"' in body, body
    assert res.stdout.count("<canvas") >= views
    # the 3D panel (upper right) holds coloured (spectrum) traces; the page around it is grey / white
    rgb = np.asarray(img.convert("RGB"), dtype=np.float64)[150:700, 500:1180] / 255.0  # [h, w, 3]
    saturation = rgb.max(axis=-1) - rgb.min(axis=-1)
    assert (saturation > 0.3).mean() > MIN_COLOURED, "3D panel has no coloured pixels: viewers not drawn"


def test_evaluate_cli_on_pdb_files(real_ca_chains, tmp_path):
    """``mhcflash evaluate --samples DIR --real DIR`` writes the report and prints the targets."""
    from typer.testing import CliRunner

    from model.evaluation.cli import evaluate_app
    from model.pdb_io import ca_to_pdb

    chains = [c.numpy() for c in real_ca_chains]
    real_dir = tmp_path / "real"
    real_dir.mkdir()
    for k, ca in enumerate(chains):  # the "real" set = the samples: every number must agree
        (real_dir / f"r{k}.pdb").write_text(ca_to_pdb(ca))
    res = CliRunner().invoke(evaluate_app, ["--samples", str(real_dir), "--real", str(real_dir), "--no-proxy",
                                            "--workers", "1", "--out", str(tmp_path / "rep")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert sorted(map(int, data["lengths"])) == sorted(len(c) for c in chains)
    for ca in chains:
        got = data["lengths"][str(len(ca))]
        want = metrics.chain_metrics(ca)
        for key in ("rg_ratio", "helix_strand", "strand"):
            assert abs(got["samples"][key] - getattr(want, key)) < 1e-3, key
        # fewer than 10 real chains in all: every length takes the nearest lengths and says so
        assert got["real_chains"]["widened"] and got["real_chains"]["count"] == len(chains)
        assert "nearest lengths" in got["real_chains"]["note"]
    assert "| ca_ca_median 3.8 +- 0.1 A |" in res.output and (tmp_path / "rep" / "report.html").is_file()
    res = CliRunner().invoke(evaluate_app, ["--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "WEIGHTS or --samples" in res.output
