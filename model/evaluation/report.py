"""The evaluation report a person looks at: HTML (table, matplotlib PNGs, 3Dmol.js views) + Markdown.

Sources: issue 7 (what the report shows); 3Dmol.js (Rego & Koes 2015, BSD-3-Clause) vendored as
``assets/3Dmol-min.js`` v2.5.5 with its licence ``assets/3Dmol-LICENSE.txt`` (from the npm package
``3dmol``; no CDN: the report works offline and from ``file://``).

Layout of ``out_dir`` after ``write_report``::

    report.html  summary.md  metrics.json  3Dmol-min.js  3Dmol-LICENSE.txt
    ca_ca_hist.png  rg_vs_length.png  sse_composition.png  tm_heatmap.png
    pdb/sample_000.pdb ...  (pdb/trajectory_000.pdb: multi-model, when trajectories are given)

The page's script sets ``<body data-viewer-status="ready" data-viewers="N">`` once 3Dmol has
rendered N viewers (``"error: ..."`` otherwise), so a headless browser test can check it.
NOTE: PDB texts are embedded in the page as JSON (browsers block ``fetch`` of ``file://`` URLs).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np

from model.evaluation.metrics import RG_EXPONENT, RG_PREFACTOR, Comparison, as_numpy_ca, expected_rg, fmt

ASSETS = Path(__file__).parent / "assets"
JS_NAME, JS_LICENCE = "3Dmol-min.js", "3Dmol-LICENSE.txt"
MAX_VIEWERS = 6  # WebGL contexts per page are limited (~16); six small views read well
COLORS = {"samples": "#d1495b", "real": "#00798c"}


def _plots(out: Path, comp: Comparison) -> list[tuple[str, str]]:
    """Write the four PNGs; returns (file name, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = {"samples": comp.samples, "real": comp.real}
    made = []

    def save(fig, name: str, caption: str, *, tight: bool = True) -> None:
        if tight:
            fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        made.append((name, caption))

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    bins = np.linspace(2.5, 5.0, 51)
    for name, s in sets.items():
        ax.hist(np.clip(s.ca_ca_all, bins[0], bins[-1]), bins=bins, alpha=0.55, density=True,
                color=COLORS[name], label=f"{name} (median {np.median(s.ca_ca_all):.2f} A)")
    ax.axvline(3.8, color="k", lw=1, ls="--", label="3.8 A")
    ax.set(xlabel="consecutive CA-CA distance (A)", ylabel="density", title="CA-CA distances")
    ax.legend(fontsize=8)
    save(fig, "ca_ca_hist.png", "Consecutive CA-CA distances (clipped to 2.5-5 A).")

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    lengths = np.array([c.length for s in sets.values() for c in s.chains])
    grid = np.linspace(max(lengths.min() - 5, 5), lengths.max() + 5, 100)
    ax.plot(grid, expected_rg(grid), "k-", lw=1, label=f"{RG_PREFACTOR} L^{RG_EXPONENT}")
    ax.fill_between(grid, 1.08 * expected_rg(grid), 1.35 * expected_rg(grid), color="0.85",
                    label="real band x1.08-1.35")
    for name, s in sets.items():
        ax.scatter([c.length for c in s.chains], [c.rg for c in s.chains], s=18, alpha=0.8,
                   color=COLORS[name], label=name)
    ax.set(xlabel="length L (residues)", ylabel="radius of gyration (A)", title="Rg vs length")
    ax.legend(fontsize=8)
    save(fig, "rg_vs_length.png", "Radius of gyration against length with the folded-chain curve.")

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    names = list(sets)
    bottom = np.zeros(len(names))
    for part, color in (("helix", "#e76f51"), ("strand", "#2a9d8f"), ("coil", "#bdbdbd")):
        vals = np.array([s.mean(part) for s in sets.values()])
        ax.bar(names, vals, bottom=bottom, color=color, label=part, width=0.55)
        for k, v in enumerate(vals):
            if v > 0.04:
                ax.text(k, bottom[k] + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=8)
        bottom += vals
    ax.set(ylim=(0, 1), ylabel="fraction of residues", title="Secondary structure (CA-only P-SEA)")
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.32, 1.0))
    save(fig, "sse_composition.png", "Mean helix / strand / coil fractions per chain.")

    mats = [(name, s.tm_matrix) for name, s in sets.items() if s.tm_matrix is not None]
    if mats:
        fig, axes = plt.subplots(1, len(mats), figsize=(3.2 * len(mats) + 1.0, 3.6), dpi=110, squeeze=False)
        for ax, (name, m) in zip(axes[0], mats):
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set(title=f"pairwise TM-score: {name}", xlabel="chain", ylabel="chain")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.85)
        save(fig, "tm_heatmap.png", "Pairwise TM-score (normalised by the shorter chain).", tight=False)
    return made


def principal_axes(ca: np.ndarray) -> np.ndarray:
    """Proper rotation ``[3, 3]`` taking the centred trace's principal axes (largest first) to x, y, z.

    3Dmol looks down z: a chain turned this way shows its longest extent across the screen
    (a straight helix would otherwise be seen end-on).
    """
    c = ca - ca.mean(axis=0)  # [L, 3]
    _, vecs = np.linalg.eigh(c.T @ c)  # ascending eigenvalues
    rot = vecs[:, ::-1].T  # rows = axes, largest first  [3, 3]
    if np.linalg.det(rot) < 0:
        rot[2] *= -1
    return rot


def _viewer_pdb(frames: list[np.ndarray]) -> str:
    """CA traces ``[L, 3]`` (one, or frames of an animation) -> PDB text for 3Dmol.

    Consecutive CA atoms get CONECT records inside each model so the trace is drawn as sticks at
    any CA-CA distance (3Dmol's own bonding and cartoon break a trace whose CA-CA is off 3.8 A,
    which is what an undertrained model makes). Frames use the last frame's orientation.
    """
    from model.pdb_io import ca_to_pdb

    rot = principal_axes(frames[-1])
    blocks = []
    for k, frame in enumerate(frames):
        moved = (frame - frame.mean(axis=0)) @ rot.T  # [L, 3]
        body = [ln for ln in ca_to_pdb(moved).splitlines() if ln.startswith("ATOM")]
        body += [f"CONECT{i:5d}{i + 1:5d}" for i in range(1, len(frame))]
        if len(frames) > 1:
            body = [f"MODEL     {k + 1:4d}", *body, "ENDMDL"]
        blocks.append("\n".join(body))
    return "\n".join(blocks) + "\nEND\n"


def _multimodel_pdb(frames) -> str:
    """Frames ``[L, 3]`` each -> one PDB text with MODEL / ENDMDL blocks (a file viewers animate)."""
    from model.pdb_io import ca_to_pdb

    blocks = []
    for k, frame in enumerate(frames):
        body = [ln for ln in ca_to_pdb(frame).splitlines() if ln.startswith(("ATOM", "TER"))]
        blocks.append("\n".join([f"MODEL     {k + 1:4d}", *body, "ENDMDL"]))
    return "\n".join(blocks) + "\nEND\n"


def _table_html(comp: Comparison) -> str:
    rows = []
    for row in comp.rows():
        met = {True: '<td class="ok">yes</td>', False: '<td class="bad">no</td>', None: "<td></td>"}[row["pass"]]
        rows.append(f"<tr><td>{row['metric']}</td><td>{fmt(row['samples'])}</td><td>{fmt(row['real'])}</td>"
                    f"<td>{html.escape(row['target'])}</td>{met}</tr>")
    return ("<table><thead><tr><th>metric</th><th>samples</th><th>real</th><th>target</th>"
            "<th>met</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


_SCRIPT = """
(function () {
  const data = JSON.parse(document.getElementById('structures').textContent);
  let made = 0;
  try {
    if (typeof $3Dmol === 'undefined') { throw new Error('3Dmol.js did not load'); }
    data.views.forEach(function (v) {
      const viewer = $3Dmol.createViewer(document.getElementById(v.id), {backgroundColor: 'white'});
      const colors = {prop: 'resi', gradient: 'roygb', min: 1, max: v.length};
      const style = {stick: {radius: 0.35, colorscheme: colors}, sphere: {radius: 0.6, colorscheme: colors}};
      if (v.frames > 1) {
        viewer.addModelsAsFrames(v.pdb, 'pdb');
        viewer.setStyle({}, style);
        viewer.zoomTo();
        viewer.animate({loop: 'forward', interval: 120});
      } else {
        viewer.addModel(v.pdb, 'pdb');
        viewer.setStyle({}, style);
        viewer.zoomTo();
      }
      viewer.render();
      made += 1;
    });
    document.body.dataset.viewerStatus = 'ready';
  } catch (err) {
    document.body.dataset.viewerStatus = 'error: ' + err.message;
  }
  document.body.dataset.viewers = String(made);
})();
"""

_CSS = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1150px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 17px; margin-top: 26px; }
.meta { color: #666; font-size: 13px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 10px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
td.ok { color: #1b7f3b; font-weight: 600; } td.bad { color: #b3261e; font-weight: 600; }
.plots { display: grid; grid-template-columns: repeat(2, 1fr); gap: 12px; }
.plots figure { margin: 0; } .plots img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #555; }
.top { display: grid; grid-template-columns: 430px 1fr; gap: 28px; }
.viewers { display: grid; grid-template-columns: repeat(2, 1fr); gap: 10px; }
.view { position: relative; width: 100%; height: 215px; border: 1px solid #ccc; border-radius: 4px; overflow: hidden; }
.label { font-size: 12px; color: #444; margin-top: 2px; }
"""


def write_report(out_dir, comparison: Comparison, samples, *, title: str = "Backbone evaluation",
                 trajectories=None, notes: str = "", design_summary: dict | None = None,
                 inline_js: bool = False) -> Path:
    """Write the report into ``out_dir``; returns the path of ``report.html``.

    samples: CA traces ``[L_i, 3]`` (the same list that produced ``comparison.samples``); the
    first ``MAX_VIEWERS`` get a 3D view and every one a PDB file. trajectories: optional list of
    frame lists (each frame ``[L, 3]``, noisy to clean) shown as 3Dmol animations. notes: Markdown /
    plain text placed under the title (e.g. weights name, hash, sampling settings).
    inline_js: put 3Dmol.js inside the HTML (one self-contained file) instead of beside it.
    """
    from model.pdb_io import ca_to_pdb

    out = Path(out_dir)
    (out / "pdb").mkdir(parents=True, exist_ok=True)
    samples = [as_numpy_ca(s) for s in samples]
    plots = _plots(out, comparison)

    views = []
    for k, ca in enumerate(samples):
        (out / "pdb" / f"sample_{k:03d}.pdb").write_text(ca_to_pdb(ca - ca.mean(axis=0)))
        if k < MAX_VIEWERS:
            views.append({"id": f"view_s{k}", "pdb": _viewer_pdb([ca]), "frames": 1, "length": len(ca),
                          "label": f"sample {k} (L = {len(ca)})"})
    for k, frames in enumerate(trajectories or []):
        frames = [as_numpy_ca(f) for f in frames]
        (out / "pdb" / f"trajectory_{k:03d}.pdb").write_text(_multimodel_pdb([f - f.mean(axis=0) for f in frames]))
        if k < 3:
            views.append({"id": f"view_t{k}", "pdb": _viewer_pdb(frames), "frames": len(frames),
                          "length": len(frames[0]),
                          "label": f"trajectory {k}: {len(frames)} frames, L = {len(frames[0])}"})

    licence = (ASSETS / JS_LICENCE).read_text()
    if inline_js:
        js_tag = "<script>" + (ASSETS / JS_NAME).read_text() + "</script>"
    else:
        shutil.copyfile(ASSETS / JS_NAME, out / JS_NAME)
        js_tag = f'<script src="{JS_NAME}"></script>'
    (out / JS_LICENCE).write_text(licence)

    def grid(prefix: str) -> str:
        return "".join(f'<div><div class="view" id="{v["id"]}"></div><div class="label">{html.escape(v["label"])}'
                       f"</div></div>" for v in views if v["id"].startswith(prefix))

    design_html = ""
    if design_summary:
        design_html = "<h2>Designability (ProteinMPNN + ESMFold)</h2><table><tbody>" + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{fmt(v)}</td></tr>" for k, v in design_summary.items()
        ) + "</tbody></table>"
    traj_html = f"<h2>Sampling trajectories</h2><div class='viewers'>{grid('view_t')}</div>" if trajectories else ""
    verdict = "meet" if comparison.passed() else "do not meet"
    views_json = json.dumps({"views": views}).replace("</", "<\\/")  # no "</script>" inside
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>{js_tag}</head>
<body data-viewer-status="pending" data-viewers="0">
<h1>{html.escape(title)}</h1>
<div class="meta">{comparison.samples.n} samples vs {comparison.real.n} real held-out chains of similar
lengths; the samples {verdict} issue 7's targets. {html.escape(notes)}</div>
<div class="top"><div><h2>Metrics</h2>{_table_html(comparison)}</div>
<div><h2>Samples in 3D</h2><div class="viewers">{grid('view_s')}</div></div></div>
<h2>Plots</h2><div class="plots">{"".join(
        f'<figure><img src="{name}" alt="{name}"><figcaption>{html.escape(cap)}</figcaption></figure>'
        for name, cap in plots)}</div>
{design_html}
{traj_html}
<p class="meta">3D views: 3Dmol.js (BSD-3-Clause, see {JS_LICENCE}); drag to rotate, scroll to zoom.
PDB files are in pdb/.</p>
<script type="application/json" id="structures">{views_json}</script>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = out / "report.html"
    path.write_text(page)
    (out / "summary.md").write_text(markdown_summary(comparison, title=title, notes=notes,
                                                     plots=plots, design_summary=design_summary))
    (out / "metrics.json").write_text(json.dumps({**comparison.to_dict(), "design": design_summary},
                                                 indent=1, default=float))
    return path


def markdown_summary(comparison: Comparison, *, title: str, notes: str = "", plots=(),
                     design_summary: dict | None = None) -> str:
    """The Markdown twin of the report (table, verdict, plot links) for a model card or a PR."""
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [(f"{comparison.samples.n} samples vs {comparison.real.n} real held-out chains. Targets (issue 7) "
              f"{'met' if comparison.passed() else '**not met**'}."), "", comparison.to_markdown(), ""]
    if design_summary:
        lines += ["## Designability", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {fmt(v)} |" for k, v in design_summary.items()] + [""]
    lines += [f"![{cap}]({name})" for name, cap in plots]
    return "\n".join(lines) + "\n"
