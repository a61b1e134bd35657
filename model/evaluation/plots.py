"""The report's PNG plots (matplotlib, Agg): samples against real chains over every evaluated length.

Files: ``ca_ca_hist.png`` (CA-CA distances, all lengths), ``rg_vs_length.png`` (Rg per chain with the
folded-chain curve and the real chains' 5-95 % band per length), ``sse_by_length.png`` (helix and
strand fractions per length), ``tm_heatmap.png`` (pairwise TM-score matrices, one column per length).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.evaluation.metrics import RG_EXPONENT, RG_PREFACTOR, expected_rg

COLORS = {"samples": "#d1495b", "real": "#00798c"}


def write_plots(out: Path, lengths: dict) -> list[tuple[str, str]]:
    """``lengths``: {L: LengthResult}. Writes the PNGs into ``out``; returns (file name, caption)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comps = {n: r.comparison for n, r in lengths.items()}
    made = []

    def save(fig, name: str, caption: str, *, tight: bool = True) -> None:
        if tight:
            fig.tight_layout()
        fig.savefig(out / name)
        plt.close(fig)
        made.append((name, caption))

    def sets(which: str):
        return [getattr(c, which) for c in comps.values()]

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    bins = np.linspace(2.5, 5.0, 51)
    for name in ("samples", "real"):
        d = np.concatenate([s.ca_ca_all for s in sets(name)])
        ax.hist(np.clip(d, bins[0], bins[-1]), bins=bins, alpha=0.55, density=True, color=COLORS[name],
                label=f"{name} (median {np.median(d):.2f} A)")
    ax.axvline(3.8, color="k", lw=1, ls="--", label="3.8 A")
    ax.axvline(4.2, color="k", lw=1, ls=":", label="4.2 A (break)")
    ax.set(xlabel="consecutive CA-CA distance (A)", ylabel="density", title="CA-CA distances")
    ax.legend(fontsize=8)
    save(fig, "ca_ca_hist.png", "Consecutive CA-CA distances of every length (clipped to 2.5-5 A).")

    fig, ax = plt.subplots(figsize=(5.6, 3.8), dpi=110)
    all_len = np.array([c.length for name in ("samples", "real") for s in sets(name) for c in s.chains])
    grid = np.linspace(max(all_len.min() - 5, 5), all_len.max() + 5, 200)
    ax.plot(grid, expected_rg(grid), "k-", lw=1, label=f"{RG_PREFACTOR} L^{RG_EXPONENT}")
    for k, (n, comp) in enumerate(comps.items()):
        lo, hi = comp.real.rg_range()
        ax.plot([n, n], [lo * expected_rg(n), hi * expected_rg(n)], color="0.55", lw=6, alpha=0.5,
                label="real 5-95 %" if k == 0 else None, solid_capstyle="butt")
    for name in ("samples", "real"):
        xs = [c.length for s in sets(name) for c in s.chains]
        ys = [c.rg for s in sets(name) for c in s.chains]
        ax.scatter(xs, ys, s=10, alpha=0.6, color=COLORS[name], label=name)
    ax.set(xlabel="length L (residues)", ylabel="radius of gyration (A)", title="Rg vs length")
    ax.legend(fontsize=8)
    save(fig, "rg_vs_length.png", "Radius of gyration per chain; grey bars: the real chains' 5-95 % range.")

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4), dpi=110, sharey=True)
    ns = list(comps)
    for ax, part, floor in ((axes[0], "helix_strand", 0.40), (axes[1], "strand", 0.10)):
        for name in ("samples", "real"):
            vals = [getattr(c, name).summary()[part] for c in comps.values()]
            ax.plot(ns, vals, "o-", color=COLORS[name], label=name)
        ax.axhline(floor, color="k", lw=1, ls="--", label=f"target >= {floor:.2f}")
        ax.set(xlabel="length L", title=f"{part.replace('_', ' + ')} (CA-only P-SEA)", ylim=(0, 1))
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of residues")
    save(fig, "sse_by_length.png", "Secondary structure per length: samples against real chains.")

    mats = [(n, name, getattr(c, name).tm_matrix) for n, c in comps.items() for name in ("samples", "real")]
    mats = [m for m in mats if m[2] is not None]
    if mats:
        cols = len(comps)
        fig, axes = plt.subplots(2, cols, figsize=(2.1 * cols + 1.0, 4.4), dpi=110, squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        im = None
        for n, name, m in mats:
            ax = axes[0 if name == "samples" else 1][list(comps).index(n)]
            ax.axis("on")
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{name} L {n}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.85)
        save(fig, "tm_heatmap.png", "Pairwise TM-score (normalised by the shorter chain) per length.", tight=False)
    return made
