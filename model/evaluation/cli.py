"""``mhcflash evaluate``: sample from weights (or read PDB files), compare with real held-out chains,
write the report.

Mounted by ``model/cli.py`` as ``app.command("evaluate")(evaluate)``; ``evaluate_app`` is the same
command as a standalone typer app (``python -m model.evaluation.cli``, tests).

Source: issue 7 ("the evaluation CLI reproduces the card's numbers from the shipped weights").
Real chains: with ``--index`` (the committed training-set index, ``split`` column) the real set is
drawn from the chains marked ``val`` and novelty is measured against those marked ``train``;
without it every chain of ``--real`` is a candidate and novelty is not computed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

evaluate_app = typer.Typer(help="Evaluate sampled backbones against real chains; write an HTML report.",
                           add_completion=False, rich_markup_mode=None)
TRAJECTORY_FRAMES = 40  # frames kept per animated trajectory (evenly spaced over T + 1)


def _load_samples(weights: Path, lengths: list[int], count: int, seed: int, noise_scale: float, device: str,
                  batch_size: int, trajectories: int):
    """Sample ``count`` of each of ``lengths`` from a weights dir / .ckpt -> (samples [L, 3] list, trajectories, note).

    The flags are checked as the service checks a request (``model.limits``); a violation exits 2.
    """
    import torch

    from model.diffusion import sample as run_sample

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if weights.is_file() and weights.suffix == ".ckpt":
        from model.training import load_checkpoint_denoiser

        denoiser, note = load_checkpoint_denoiser(weights, dev), f"checkpoint {weights}"
    else:
        from model.weights_io import load_weights

        loaded = load_weights(weights, dev)
        denoiser, note = loaded.denoiser, f"weights {loaded.name} (sha256 {loaded.sha256[:12]})"
    from model.limits import as_flags, check_sampling

    violations = check_sampling(denoiser.config, lengths, count, seed, noise_scale)  # the service's checks
    if violations:
        typer.echo(f"error: {as_flags(violations)} ({weights})", err=True)
        raise typer.Exit(2)
    lengths = [L for L in lengths for _ in range(count)]
    seeds = [seed + i for i in range(len(lengths))]
    from tqdm import tqdm

    bar = tqdm(total=1, desc="sampling", unit="step", file=sys.stderr)

    def tick(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        out = run_sample(denoiser, lengths, seeds, noise_scale, device=dev, max_batch_size=batch_size,
                         progress=tick, return_trajectory=trajectories > 0)
    finally:
        bar.close()
    if trajectories > 0:  # each [T + 1, L, 3], x_T .. x_0
        keep = [torch.linspace(0, t.shape[0] - 1, TRAJECTORY_FRAMES).round().long() for t in out[:trajectories]]
        trajs = [[f.numpy() for f in t[k]] for t, k in zip(out[:trajectories], keep)]
        samples = [t[-1].numpy() for t in out]
    else:
        trajs, samples = [], [t.numpy() for t in out]
    note += f", {denoiser.config.mode} mode, noise scale {noise_scale}, seeds {seeds[0]}..{seeds[-1]}"
    return samples, trajs, note


def _real_pools(real: list[str], index: Path | None):
    """(held-out pool [L, 3] list, training reference list or None, note)."""
    from model.data.build import build_dataset

    chains, _ = build_dataset(real, verbose=False)
    if index is None:
        return [c.ca for c in chains], None, f"real chains: all {len(chains)} of {', '.join(real)} (no index)"
    from model.data.split import read_index

    split = {row["id"]: row["split"] for row in read_index(index)}
    val = [c.ca for c in chains if split.get(c.id) == "val"]
    train = [c.ca for c in chains if split.get(c.id) == "train"]
    if not val:
        raise typer.BadParameter(f"no chain of {real} is marked 'val' in {index}")
    return val, train or None, f"real chains: {len(val)} held-out ('val' in {index.name}), {len(train)} train"


def evaluate(
    weights: Annotated[Path | None, typer.Argument(help="Weights directory or training checkpoint (.ckpt) "
                                                      "to sample from. Omit with --samples.")] = None,
    samples_dir: Annotated[Path | None, typer.Option("--samples", help="Evaluate these PDB files instead "
                                                        "of sampling (CA atoms are read).")] = None,
    length: Annotated[list[int] | None, typer.Option("--length", "-l", metavar="<int>", help="Residues per "
                                                        "sample (repeatable; default 64 and 100).")] = None,
    count: Annotated[int, typer.Option("--count", "-n", help="Samples per length.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the first sample; sample i uses seed + i.")] = 0,
    noise_scale: Annotated[float, typer.Option(help="Genie's sampling noise scale.")] = 0.6,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 16,
    real: Annotated[list[str] | None, typer.Option("--real", metavar="<source>", help="Sources of real "
                                                      "chains: 'cgdms' or PDB/mmCIF directories (repeatable).")] = None,
    index: Annotated[Path | None, typer.Option(help="Training-set index (CSV/JSON with a split column): "
                                                  "real = 'val' chains, novelty against 'train'.")] = None,
    reference_cap: Annotated[int, typer.Option(help="Training chains used for novelty (seeded subsample).")] = 256,
    trajectories: Annotated[int, typer.Option(help="Samples whose sampling trajectory is animated.")] = 1,
    design: Annotated[bool, typer.Option(show_default=False, help="Also run ProteinMPNN + ESMFold "
                                         "designability (off by default; needs their weights, see "
                                         "model/evaluation/designability.py).")] = False,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/eval"),
) -> None:
    """Metrics of sampled backbones next to real held-out chains of the same lengths; HTML + Markdown report."""
    from model.evaluation.metrics import as_numpy_ca, compare, pick_real_like
    from model.evaluation.report import write_report

    if (weights is None) == (samples_dir is None):
        raise typer.BadParameter("give either WEIGHTS or --samples DIR")
    if samples_dir is not None:
        from model.pdb_io import read_ca

        files = sorted(p for p in samples_dir.iterdir() if p.suffix in {".pdb", ".cif", ".gz"})
        if not files:
            raise typer.BadParameter(f"no .pdb / .cif files in {samples_dir}")
        samples, trajs, note = [as_numpy_ca(read_ca(p)) for p in files], [], f"{len(files)} files in {samples_dir}"
    else:
        samples, trajs, note = _load_samples(weights, length or [64, 100], count, seed, noise_scale, device,
                                             batch_size, trajectories)
    pool, reference, real_note = _real_pools(real or ["cgdms"], index)
    real_chains = pick_real_like(pool, [len(s) for s in samples], seed=seed)
    typer.echo(f"computing metrics ({len(samples)} samples, {len(real_chains)} real, "
               f"{'no' if reference is None else min(reference_cap, len(reference))} references) ...", err=True)
    comparison = compare(samples, real_chains, reference=reference, reference_cap=reference_cap, seed=seed)
    design_summary = None
    if design:
        from model.evaluation.designability import (
            MissingDesignabilityDependency,
            evaluate_designability,
            summarize_designability,
        )

        try:
            design_summary = summarize_designability(evaluate_designability(samples, seed=seed))
        except MissingDesignabilityDependency as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(2) from None
    path = write_report(out, comparison, samples, trajectories=trajs, notes=f"{note}; {real_note}.",
                        design_summary=design_summary)
    typer.echo(comparison.to_markdown())
    typer.echo(json.dumps({"report": str(path), "targets_met": comparison.passed()}))


evaluate_app.command()(evaluate)

if __name__ == "__main__":  # pragma: no cover
    evaluate_app()
