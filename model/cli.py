"""``mhcflash``: the one command-line tool for the offline workflow (typer).

    mhcflash data build   sources -> cache -> summary, and the training-set index
    mhcflash train        train from a Genie config file (resumes automatically)
    mhcflash sample       weights directory or checkpoint -> CA-only poly-Ala PDB files
    mhcflash selfcheck    torch / CUDA / GPU, attention backends, can the combined denoiser run
    mhcflash evaluate     samples against held-out real chains per length; HTML + Markdown + JSON report

The console command ``mhcflash`` is ``service.cli:app``: this app plus ``serve`` and ``client``, which
live with the service (model code never imports the service).

Errors a user can fix (bad config, missing file, mismatched checkpoint) print one message and exit
with status 2, without a traceback. Training stops: NaN/Inf -> 3, CUDA out of memory -> 4.

Source: Genie's ``train.py`` / ``sample.py`` scripts, gathered into one command.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="mhcflash",
    help="Genie-style protein backbone diffusion with mHC and Flash-IPA: build data, train, sample, "
         "check the machine, serve over HTTP. Start with `mhcflash selfcheck`, then "
         "`mhcflash data build`, `mhcflash train configs/tiny_cpu.txt`, "
         "`mhcflash sample runs/<name>/weights --length 64`.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    # NOTE: plain click help, not Rich panels: Rich's panels (typer 0.29) show every flag with a
    # `<bool>` type, `--help` included, and keep a docstring's line breaks inside a paragraph.
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Build the training set (PDB/mmCIF directories, cgdms chains).",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")

EXIT_USAGE = 2


def _fail(message: str, code: int = EXIT_USAGE) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _user_errors(fn):
    """Turn the errors a user can fix into one clean message and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not _fixable(exc):
                raise
            _fail(str(exc))

    return wrapper


def _fixable(exc: Exception) -> bool:
    """Whether `exc` is an error a user can fix (bad config, limits, path, weights or checkpoint).

    NOTE: the checkpoint and weights errors are looked up only in modules already imported (an error
    of a module cannot be raised before the module is loaded), so that a command that never touches
    Lightning does not pay for importing it.
    """
    from model.config import ConfigError
    from model.limits import LimitsError

    kinds: list[type] = [ConfigError, LimitsError, FileNotFoundError, NotADirectoryError]
    for module, name in (("model.training.checkpoints", "CheckpointMismatchError"), ("model.weights_io", "WeightsError")):
        if module in sys.modules:
            kinds.append(getattr(sys.modules[module], name))
    return isinstance(exc, tuple(kinds))


def _load(config_path: Path | None, overrides: list[str]):
    from model.config import load_config_with_overrides

    return load_config_with_overrides(config_path, overrides)


def _check_sources(cfg, config_path: Path | None, overrides: list[str]) -> None:
    """Every folder in datasetNames exists under dataDirectory, before any work starts; else one message
    naming the file, line and key, and ``--set dataDirectory=/path/to/data``."""
    from model.config import key_location
    from model.data.sources import sources_from_config

    sources_from_config(cfg, where=key_location(config_path, "datasetNames", overrides))


ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Genie-style config file "
                                                   "(`key value` lines). Default: built-in defaults.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", metavar="<key=value>", help="Override a config "
                                                     "key, e.g. --set batchSize=8 (repeatable).")]


# ------------------------------------------------------------------------------------------- data
@data_app.command("build")
@_user_errors
def data_build(
    sources: Annotated[list[str] | None, typer.Argument(help="Directories of PDB/mmCIF files (plain or "
                                                           ".gz), or 'cgdms'. Default: datasetNames "
                                                           "under dataDirectory.")] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache directory (default $MHCFLASH_CACHE or "
                                                      "~/.cache/mhcflash/data).")] = None,
    index: Annotated[Path | None, typer.Option(help="Write the training-set index (.csv or .json) here. "
                                                  "Default: <logDirectory>/<name>/training_index.csv.")] = None,
) -> None:
    """Parse the sources into the cache (bad files are skipped and reported), split train / val, write the index."""
    from collections import Counter

    from model.data.split import TRAIN, VAL, training_set, write_index

    cfg = _load(config, overrides or [])
    if not sources:
        _check_sources(cfg, config, overrides or [])
    chains, assignment, _ = training_set(cfg, sources=sources or None, cache_dir=cache_dir, verbose=True)
    counts = Counter(assignment.values())
    typer.echo(f"split (validationFraction {cfg.validationFraction}, seed {cfg.seed}): "
               f"train {counts[TRAIN]}, val {counts[VAL]}")
    if not chains:
        _fail(f"no chains of {cfg.minimumNumResidues}-{cfg.maximumNumResidues} residues in the sources")
    path = index or Path(cfg.logDirectory) / cfg.name / "training_index.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    typer.echo(f"index written to {write_index(path, chains, assignment)}")


# ------------------------------------------------------------------------------------------ train
@app.command()
@_user_errors
def train(
    config: Annotated[Path, typer.Argument(help="Genie-style config file, e.g. configs/tiny_cpu.txt.")],
    overrides: SetOpt = None,
    devices: Annotated[str, typer.Option(help="'auto', a count (2) or GPU ids (0,1). More than one -> DDP.")] = "auto",
    num_nodes: Annotated[int, typer.Option(help="Machines (Lightning DDP; launch one process per node).")] = 1,
    accelerator: Annotated[str, typer.Option(help="auto | cpu | gpu")] = "auto",
    resume: Annotated[str, typer.Option(help="'auto' (the run's checkpoints/last.ckpt if present), 'never', "
                                        "or a checkpoint path.")] = "auto",
    debug: Annotated[bool, typer.Option(help="Tiny model, few steps, no workers, no loggers: a smoke run.")] = False,
    max_steps: Annotated[int, typer.Option(help="Stop after this many optimizer steps (-1: numEpoches).")] = -1,
    max_minutes: Annotated[float, typer.Option(
        help="Stop after this many minutes of training (0: no limit), writing last.ckpt and the weights; "
             "rerun to continue. For stretches of limited GPU time.")] = 0.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    profiler: Annotated[str | None, typer.Option(
        help="'simple' or 'advanced': Lightning's per-hook host times, written to <run>/fit-profile.txt "
             "(where a step's time goes: data, step, optimizer, validation, checkpoints).")] = None,
    inject_fault: Annotated[str | None, typer.Option(hidden=True, help="Testing: 'nan@STEP' or 'oom@STEP'.")] = None,
) -> None:
    """Train the denoiser. Logs, checkpoints and the exported weights go to <logDirectory>/<name>/.

    Stops cleanly on a NaN/Inf loss (exit 3) or CUDA out-of-memory (exit 4), saving a checkpoint and
    naming the config keys to change; rerun the same command to resume.
    """
    from model.training import PROFILERS, FaultInjection, TrainingStopped, TrainOptions, run_training

    cfg = _load(config, overrides or [])
    if profiler is not None and profiler not in PROFILERS:
        _fail(f"--profiler {profiler!r}: choose one of {', '.join(PROFILERS)}")
    _check_sources(cfg, config, overrides or [])
    try:
        fault = FaultInjection.parse(inject_fault) if inject_fault else None
    except ValueError as exc:
        _fail(str(exc))
    options = TrainOptions(devices=devices, num_nodes=num_nodes, accelerator=accelerator, resume=resume,
                           debug=debug, max_steps=max_steps, max_minutes=max_minutes or None,
                           progress_bar=progress, fault=fault, profiler=profiler)
    try:
        result = run_training(cfg, options)
    except TrainingStopped as stop:
        typer.echo(str(stop), err=True)
        raise typer.Exit(stop.exit_code) from None
    typer.echo(f"run directory: {result.run_dir}\nlast checkpoint: {result.last_checkpoint}\n"
               f"weights: {result.weights_dir}\nsteps: {result.global_step}")


# ----------------------------------------------------------------------------------------- sample
def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


@app.command()
@_user_errors
def sample(
    weights: Annotated[Path, typer.Argument(help="Weights directory (config.txt + model.safetensors), a "
                                            "weights root, or a training checkpoint (.ckpt).")],
    length: Annotated[list[int], typer.Option("--length", "-l", metavar="<int>",
                                              help="Residues per sample (repeatable).")],
    count: Annotated[int, typer.Option("--count", "-n", help="Samples per length.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the first sample; sample i uses seed + i.")] = 0,
    noise_scale: Annotated[float, typer.Option(help="Genie's sampling noise scale.")] = 0.6,
    steps: Annotated[int | None, typer.Option(help="Sampling steps, 1 .. the model's T (default: T, Genie's "
                                              "sampler; fewer: evenly spaced timesteps, respaced DDPM).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for the PDB files.")] = Path("samples"),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Samples per batch.")] = 16,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Sample backbones and write CA-only poly-Ala PDB files (one per sample).

    Lengths, seeds, the noise scale and steps are checked as the service checks a request: lengths
    within the model's minimumNumResidues-maximumNumResidues, steps within 1 .. numTimesteps.
    """
    from model.diffusion import sample as run_sample
    from model.limits import as_flags, check_sampling
    from model.pdb_io import ca_to_pdb

    dev = _device(device)
    if weights.is_file() and weights.suffix == ".ckpt":
        from model.training import load_checkpoint_denoiser

        denoiser = load_checkpoint_denoiser(weights, dev)
    else:
        from model.weights_io import load_weights

        denoiser = load_weights(weights, dev).denoiser
    violations = check_sampling(denoiser.config, length, count, seed, noise_scale, steps)  # the service's checks
    if violations:
        _fail(f"{as_flags(violations)} ({weights})")
    lengths = [L for L in length for _ in range(count)]
    seeds = [seed + i for i in range(len(lengths))]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="sampling", unit="step", file=sys.stderr)

    def tick(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        traces = run_sample(denoiser, lengths, seeds, noise_scale, device=dev, max_batch_size=batch_size,
                            progress=tick, steps=steps)
    finally:
        if bar is not None:
            bar.close()
    out.mkdir(parents=True, exist_ok=True)
    for L, s, ca in zip(lengths, seeds, traces):
        path = out / f"sample_len{L}_seed{s}.pdb"
        used = steps or denoiser.config.numTimesteps
        path.write_text(ca_to_pdb(ca, remarks=[(f"mhcflash sample: length {L}, seed {s}, noise scale {noise_scale}, "
                                              f"steps {used}, mode {denoiser.config.mode}")]))
        typer.echo(str(path))


# -------------------------------------------------------------------------------------- selfcheck
NOT_AVAILABLE = "mHC + Flash-IPA Denoiser not available"
INSTALL_HINT = "pip install flash-attn --no-build-isolation"


@app.command()
@_user_errors
def selfcheck(
    config: ConfigOpt = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N")] = "auto",
) -> None:
    """Check torch / CUDA / GPU, attention backends, and whether mHC + Flash-IPA runs here.

    Prints the attention backends found (FA3, FA2, each SDPA kernel, math), what useFlashAttn3
    resolves to, and runs the combined denoiser once; exit status 1 if it cannot run at all.
    """
    import torch

    from model.ipa.backends import available_backends, describe

    cfg = _load(config, [])
    dev = torch.device(_device(device))
    typer.echo(f"torch {torch.__version__}; CUDA build {torch.version.cuda or 'none'}; "
               f"CUDA available: {torch.cuda.is_available()}")
    if dev.type == "cuda":
        cap = torch.cuda.get_device_capability(dev)
        arch = {9: "Hopper", 8: "Ampere/Ada", 10: "Blackwell", 7: "Volta/Turing"}.get(cap[0], "unknown")
        typer.echo(f"GPU: {torch.cuda.get_device_name(dev)} (sm {cap[0]}.{cap[1]}, {arch})")
    else:
        typer.echo("GPU: none (running on the CPU)")
    typer.echo("attention backends:")
    for name, st in available_backends(dev).items():
        typer.echo(f"  {name:15s} found={'yes' if st.found else 'no ':3s} usable={'yes' if st.usable else 'no '}  "
                   f"{st.detail}")
    combined = cfg.replace(useMHCMode=True, useFlashMode=True)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    why, backend = None, None
    try:
        from model.network.builder import build_ipa

        backend = build_ipa(combined).backend(dev, dtype)
        typer.echo(f"useFlashAttn3 {cfg.useFlashAttn3} resolves to: {describe(backend)}")
        _run_combined(combined, dev, dtype)
        typer.echo(f"combined denoiser (mHCFlashDenoiser): runs on {dev} ({dtype})")
    except Exception as exc:  # noqa: BLE001 - reported, not raised: this is the point of a self-check
        why = f"{type(exc).__name__}: {exc}"
    if why is None and backend is not None and backend.name in ("fa4", "fa3", "fa2"):
        typer.echo("OK: mHC + Flash-IPA runs with FlashAttention here.")
        return
    if why is None:
        reason = ("no CUDA device (FlashAttention needs an NVIDIA GPU: FA2 sm 8.0+, FA3 Hopper sm 9.0, "
                  "FA4 Hopper / Blackwell)"
                  if dev.type != "cuda" else "FlashAttention 2/3/4 is not installed or not usable on this GPU")
        typer.echo(f"{NOT_AVAILABLE} with FlashAttention: {reason}. To install it: {INSTALL_HINT} "
                   f"(Hopper FA3: build the hopper/ folder of the flash-attention repository). Falling back "
                   f"to the '{backend.name}' attention backend: same results, slower.")
        return
    typer.echo(f"{NOT_AVAILABLE}: {why}. If FlashAttention is missing: {INSTALL_HINT}. Falling back: train or "
               f"serve with 'useFlashMode False' (standard IPA, mHC still available with 'useMHCMode True').")
    raise typer.Exit(1)


def _run_combined(config, device, dtype) -> None:
    """Build mHCFlashDenoiser and run one forward and backward pass on a 2 x 24 batch."""
    import torch

    from model.mhc_flash_denoiser import mHCFlashDenoiser

    net = mHCFlashDenoiser(config).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 24, 3, generator=gen).mul(8.0).to(device)  # [B, L, 3]
    mask = torch.ones(2, 24, device=device)
    mask[1, 19:] = 0.0
    t = torch.tensor([1, config.numTimesteps], device=device)  # [B]
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        eps = net(x, t, mask)
    eps.float().square().mean().backward()
    if not torch.isfinite(eps).all():
        raise RuntimeError("the forward pass produced NaN/Inf")


# --------------------------------------------------------------------------------------- evaluate
def _mount_evaluate() -> None:
    from model.evaluation.cli import evaluate, steps_curve

    app.command("evaluate")(evaluate)
    app.command("steps-curve")(steps_curve)


_mount_evaluate()


def main() -> None:  # pragma: no cover - `python -m model.cli`: the offline commands alone
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
