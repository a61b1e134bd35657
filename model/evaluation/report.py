"""The evaluation report a person looks at: HTML (per-length tables, PNG plots, 3Dmol.js views).

Sources: 3Dmol.js (Rego & Koes 2015, BSD-3-Clause) vendored as ``assets/3Dmol-min.js`` v2.5.5 with
its licence ``assets/3Dmol-LICENSE.txt`` (from the npm package ``3dmol``; no CDN: the report works
offline and from ``file://``).

Layout of ``out_dir`` after ``write_report``::

    report.html  summary.md  metrics.json  3Dmol-min.js  3Dmol-LICENSE.txt
    ca_ca_hist.png  rg_vs_length.png  sse_by_length.png  tm_heatmap.png
    pdb/L0064/sample_000.pdb ...  (pdb/trajectory_000.pdb: multi-model, when trajectories are given)
    comparison.md  comparison.json  (with a baseline model)

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

from model.evaluation.metrics import as_numpy_ca, fmt

ASSETS = Path(__file__).parent / "assets"
JS_NAME, JS_LICENCE = "3Dmol-min.js", "3Dmol-LICENSE.txt"
MAX_VIEWERS = 6  # WebGL contexts per page are limited (~16); six small views read well


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
.viewers { display: grid; grid-template-columns: repeat(2, 1fr); gap: 10px; }
.viewers.three { grid-template-columns: repeat(3, 1fr); }
details { margin: 6px 0; } summary { cursor: pointer; font-size: 14px; }
.view { position: relative; width: 100%; height: 215px; border: 1px solid #ccc; border-radius: 4px; overflow: hidden; }
.label { font-size: 12px; color: #444; margin-top: 2px; }
"""


def _cell(v) -> str:
    return html.escape(fmt(v))


def _length_table(res) -> str:
    rows = []
    for row in res.comparison.rows():
        met = {True: '<td class="ok">yes</td>', False: '<td class="bad">no</td>', None: "<td></td>"}[row["pass"]]
        margin = "" if row["margin"] is None else f"{row['margin']:+.3f}"
        rows.append(f"<tr><td>{row['metric']}</td><td>{_cell(row['samples'])}</td><td>{_cell(row['real'])}</td>"
                    f"<td>{html.escape(row['target'])}</td>{met}<td>{margin}</td></tr>")
    return ("<table><thead><tr><th>metric</th><th>samples</th><th>real</th><th>target</th><th>met</th>"
            "<th>margin</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _targets_html(result) -> str:
    from model.evaluation.targets import TARGETS

    lengths = list(result.lengths)
    head = "".join(f"<th>L {n}</th>" for n in lengths)
    body = []
    for t in TARGETS:
        cells = []
        for n in lengths:
            r = next(x for x in result.lengths[n].targets if x.metric == t.metric)
            cls = {True: "ok", False: "bad", None: ""}[r.passed]
            extra = "" if r.margin is None else f" ({r.margin:+.3f})"
            cells.append(f'<td class="{cls}">{_cell(r.value)}{extra}</td>')
        body.append(f"<tr><td>{t.metric} {html.escape(t.text)}</td>{''.join(cells)}</tr>")
    return f"<table><thead><tr><th>target</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _comparison_html(cmp: dict) -> str:
    from model.evaluation.compare import verdict_text

    parts = [f"<p class='meta'>A = {html.escape(cmp['A'].removeprefix('A: '))}<br>B = {html.escape(cmp['B'].removeprefix('B: '))}</p>"]
    verdict = ("A beats B at every length" if cmp["a_beats_b_everywhere"] else
               "A does not beat B at every length (not won at L "
               + ", ".join(map(str, cmp["lengths_not_won_by_A"])) + ")")
    parts.append(f"<p><b>{html.escape(verdict)}.</b></p>")
    for x in cmp["lengths"]:
        rows = "".join(f"<tr><td>{r['metric']}</td><td>{_cell(r['A'])}</td><td>{_cell(r['B'])}</td>"
                       f"<td>{_cell(r['real'])}</td><td>{r['better']}</td></tr>" for r in x["rows"])
        parts.append(f"<details><summary>L {x['length']}: {html.escape(verdict_text(x))}</summary><table><thead>"
                     "<tr><th>metric</th><th>A</th><th>B</th><th>real</th><th>better</th></tr></thead>"
                     f"<tbody>{rows}</tbody></table></details>")
    return "<h2>Comparison with the baseline</h2>" + "".join(parts)


def write_sample_pdbs(out: Path, samples_by_length: dict) -> None:
    """``out/pdb/L0064/sample_000.pdb`` ... (centred CA traces): what ``--samples out/pdb`` reads back."""
    from model.pdb_io import ca_to_pdb

    for n, samples in samples_by_length.items():
        folder = Path(out) / "pdb" / f"L{n:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for k, ca in enumerate(as_numpy_ca(s) for s in samples):
            (folder / f"sample_{k:03d}.pdb").write_text(ca_to_pdb(ca - ca.mean(axis=0)))


def write_report(out_dir, result, samples_by_length: dict, *, title: str = "Backbone evaluation",
                 trajectories=None, design_summary: dict | None = None, comparison: dict | None = None,
                 inline_js: bool = False) -> Path:
    """Write the report of a `suite.SuiteResult` into ``out_dir``; returns the path of ``report.html``.

    samples_by_length: {L: CA traces ``[L, 3]``} (the samples that produced ``result``); every one
    gets a PDB file, the first of each length a 3D view (at most ``MAX_VIEWERS``). trajectories:
    optional frame lists (each frame ``[L, 3]``, noisy to clean) shown as 3Dmol animations.
    comparison: `compare.compare_suites` of this model (A) against a baseline (B).
    inline_js: put 3Dmol.js inside the HTML (one self-contained file) instead of beside it.
    """
    from model.evaluation.plots import write_plots
    from model.evaluation.summary import write_summary

    out = Path(out_dir)
    (out / "pdb").mkdir(parents=True, exist_ok=True)
    plots = write_plots(out, result.lengths)
    write_sample_pdbs(out, samples_by_length)
    views = []
    for n, samples in samples_by_length.items():
        if samples and len(views) < MAX_VIEWERS:
            ca = as_numpy_ca(samples[0])
            views.append({"id": f"view_s{len(views)}", "pdb": _viewer_pdb([ca]), "frames": 1, "length": len(ca),
                          "label": f"L {n}, sample 0"})
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
            f"<tr><td>{html.escape(k)}</td><td>{_cell(v)}</td></tr>" for k, v in design_summary.items()
        ) + "</tbody></table>"
    traj_html = f"<h2>Sampling trajectories</h2><div class='viewers'>{grid('view_t')}</div>" if trajectories else ""
    per_length = "".join(
        f"<details{' open' if i == 0 else ''}><summary>L {n}: {r.comparison.samples.n} samples vs "
        f"{r.comparison.real.n} real ({html.escape(r.real.note)})</summary>{_length_table(r)}</details>"
        for i, (n, r) in enumerate(result.lengths.items()))
    verdict = "meet" if result.targets_met() else "do not meet"
    notes = "".join(f"<li>{html.escape(x)}</li>" for x in result.notes)
    views_json = json.dumps({"views": views}).replace("</", "<\\/")  # no "</script>" inside
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>{js_tag}</head>
<body data-viewer-status="pending" data-viewers="0">
<h1>{html.escape(title)}</h1>
<div class="meta">{html.escape(result.label)}: the samples {verdict} the targets at every length
({", ".join(map(str, result.lengths))}).<ul>{notes}</ul></div>
<h2>Targets per length (value, margin)</h2>{_targets_html(result)}
<h2>Samples in 3D</h2><div class="viewers three">{grid('view_s')}</div>
<h2>Samples vs real chains, per length</h2>{per_length}
{_comparison_html(comparison) if comparison else ""}
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
    write_summary(out, result, title=title, plots=plots, design_summary=design_summary, comparison=comparison)
    return path
