"""Genie-style configuration file -> a typed, validated, frozen ``Config``.

Format (Genie, aqlaboratory/genie ``genie/config.py``): one ``key value`` pair per line, booleans
written ``True`` / ``False``. Blank lines and ``#`` comments (whole line or after a value) are allowed.

NOTE: Genie's own parser silently drops any line that is not exactly two tokens, so
``key value  # comment`` was ignored without a word. Here every line must parse; an unknown key,
a value of the wrong type or out of range, or a duplicate key raises :class:`ConfigError` naming
the file, the line, the key, and the nearest valid key or the allowed range.

Attribute names are exactly the file's keys (``config.useMHCMode``), so a key in a file, in the
table of docs/CONFIG.md and in the code are spelled the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["KEY_DOCS", "MODES", "Config", "ConfigError", "key_location", "load_config", "parse_config"]

# The four modes: name -> (useMHCMode, useFlashMode).
MODES = {"standard": (False, False), "mhc": (True, False), "flash": (False, True), "mhc_flash": (True, True)}


class ConfigError(ValueError):
    """A configuration file or value that cannot be used. The message says where and what to do."""


def _key(default: Any, doc: str, *, lo: float | None = None, hi: float | None = None,
         choices: tuple[str, ...] | None = None, optional: bool = False, lo_open: bool = False,
         check=None):
    """A config key: default, one-line meaning, its valid range or choices, and optionally ``check``
    (value -> None, raising ValueError with what is wrong) for structured text values."""
    return field(default=default, metadata={"doc": doc, "lo": lo, "hi": hi, "choices": choices,
                                            "optional": optional, "lo_open": lo_open, "check": check})


def _band_weights(value: str) -> None:
    from model.data.bands import parse_band_weights  # numpy only

    parse_band_weights(value)


@dataclass(frozen=True)
class Config:
    """Every key of a config file, with its default. See the key table in docs/CONFIG.md."""

    # --- run / data (Genie) ---
    name: str = _key("mhc_flash", "Run / model name (log and weights directory name).")
    maximumNumResidues: int = _key(256, "Longest chain used for training; the service's default length limit.",
                                   lo=4, hi=65536)
    minimumNumResidues: int = _key(20, "Shortest chain used for training.", lo=4, hi=65536)
    logDirectory: str = _key("runs", "Where training runs (logs, checkpoints) are written.")
    dataDirectory: str = _key("data", "Folder that holds the sources named in datasetNames (relative: from the "
                              "working directory); set it per machine: --set dataDirectory=/path/to/data.")
    datasetNames: str = _key("cgdms", "Comma-separated data sources: 'cgdms' (chains shipped in the cgdms "
                             "package) and/or folders of PDB/mmCIF files (plain or .gz): a name (pdb20) is "
                             "that folder under dataDirectory, a path is used as written (relative: from "
                             "dataDirectory).")
    datasetSize: int | None = _key(None, "Use at most this many chains (None = all).", lo=1, optional=True)
    datasetClasses: str | None = _key(None, "Genie's SCOPe class filter (comma-separated), unused for "
                                      "directory sources.", optional=True)
    validationFraction: float = _key(0.05, "Fraction of sequence groups held out for validation.",
                                     lo=0.0, hi=0.9)
    validationByLengthBand: bool = _key(True, "Hold out validationFraction in every length band (<64, 64-127, "
                                        "128-255, 256-511, >=512), so each band has validation chains; False: "
                                        "over all chains at once.")
    chainBreaks: str = _key("segments", "At a chain break (CA-CA > 4.2 A): 'segments' (each unbroken piece of at "
                            "least minimumSegmentLength residues is an example) or 'longest' (only the longest "
                            "piece).", choices=("segments", "longest"))
    minimumSegmentLength: int = _key(40, "chainBreaks segments: shortest piece of a broken chain kept (an "
                                     "unbroken chain needs only minimumNumResidues).", lo=4, hi=65536)
    cropLength: int | None = _key(None, "Train on a random contiguous window of this many residues of longer "
                                  "chains, a new window each time one is drawn (None = whole chains).",
                                  lo=4, hi=65536, optional=True)
    lengthBandWeights: str | None = _key(None, "Share of training batches drawn from each length band <64, "
                                         "64-127, 128-255, 256-511, >=512 (five comma-separated weights, e.g. "
                                         "1,1,1,1,1); None = every training chain once per epoch.", optional=True,
                                         check=_band_weights)
    batchesPerEpoch: int | None = _key(None, "With lengthBandWeights: training batches per epoch (None = about "
                                       "one pass over the training chains).", lo=1, hi=10**9, optional=True)
    maxResiduesPerBatch: int | None = _key(None, "Cap on padded residues per batch, B * L_max (None = batchSize "
                                           "alone).", lo=1, hi=10**9, optional=True)
    numDataWorkers: int = _key(0, "DataLoader worker processes.", lo=0, hi=64)

    # --- diffusion (Genie) ---
    numTimesteps: int = _key(1000, "Diffusion steps T.", lo=2, hi=100000)
    schedule: str = _key("cosine", "Noise schedule.", choices=("cosine",))

    # --- features (Genie) ---
    singleFeatureDimension: int = _key(128, "C_s, single representation channels.", lo=1, hi=4096)
    pairFeatureDimension: int = _key(128, "C_p, pair representation channels.", lo=1, hi=4096)
    positionalEmbeddingDimension: int = _key(128, "Residue-index sinusoidal embedding size.", lo=2, hi=4096)
    timestepEmbeddingDimension: int = _key(128, "Timestep sinusoidal embedding size.", lo=2, hi=4096)
    relativePositionK: int = _key(32, "Relative sequence offsets are clipped to [-K, K].", lo=1, hi=4096)
    templateType: str = _key("v1", "Pair template features from the noisy CA trace.", choices=("v1",))

    # --- pair transform (Genie) ---
    numPairTransformLayers: int = _key(5, "Pair transform layers (triangle updates + transition).",
                                       lo=0, hi=64)
    includeTriangularMultiplicativeUpdate: bool = _key(True, "Triangle multiplicative updates (out + in).")
    includeTriangularAttention: bool = _key(False, "Triangle attention (starting + ending node).")
    triangularMultiplicativeHiddenDimension: int = _key(128, "Hidden channels of triangle mult. updates.",
                                                        lo=1, hi=4096)
    triangularAttentionHiddenDimension: int = _key(32, "Per-head channels of triangle attention.", lo=1, hi=1024)
    triangularAttentionNumHeads: int = _key(4, "Heads of triangle attention.", lo=1, hi=64)
    triangularDropout: float = _key(0.25, "Row/column dropout in the pair transform.", lo=0.0, hi=0.99)
    pairTransitionN: int = _key(4, "Pair transition hidden expansion factor.", lo=1, hi=16)

    # --- structure (Genie) ---
    numStructureLayers: int = _key(5, "Structure (IPA) layers.", lo=1, hi=64)
    numStructureBlocks: int = _key(1, "Repeats of the structure layer stack (shared weights).", lo=1, hi=16)
    ipaHiddenDimension: int = _key(16, "IPA per-head scalar channels.", lo=1, hi=1024)
    ipaNumHeads: int = _key(12, "IPA heads.", lo=1, hi=128)
    ipaNumQkPoints: int = _key(4, "IPA query/key points per head.", lo=1, hi=64)
    ipaNumVPoints: int = _key(8, "IPA value points per head.", lo=1, hi=64)
    ipaDropout: float = _key(0.1, "Dropout after IPA.", lo=0.0, hi=0.99)
    numStructureTransitionLayers: int = _key(1, "Layers in the structure transition MLP.", lo=1, hi=16)
    structureTransitionDropout: float = _key(0.1, "Dropout in the structure transition.", lo=0.0, hi=0.99)

    # --- training (Genie + the reference configuration) ---
    seed: int = _key(100, "Random seed (data split, init, noise).", lo=0, hi=2**63 - 1)
    numEpoches: int = _key(1, "Training epochs (Genie's spelling).", lo=1, hi=10**9)
    batchSize: int = _key(32, "Chains per batch (per device).", lo=1, hi=65536)
    logEverySteps: int = _key(1000, "Log scalars every N optimizer steps.", lo=1, hi=10**9)
    checkpointEveryEpoches: int = _key(500, "Write a checkpoint every N epochs (plus last.ckpt).", lo=1, hi=10**9)
    lastCheckpointEveryMinutes: float = _key(0.0, "Rewrite last.ckpt at an epoch's end only when this many minutes "
                                             "have passed since the last write (0 = every epoch); always at the "
                                             "end of training and on a NaN / out-of-memory stop.", lo=0.0, hi=1e6)
    validationEverySteps: int = _key(0, "Validate every N training batches, across epochs (0 = at the end of "
                                     "every epoch).", lo=0, hi=10**9)
    learningRate: float = _key(1e-4, "AdamW learning rate after warm-up.", lo=0.0, hi=1.0, lo_open=True)
    warmupEpoches: int = _key(10, "Linear learning-rate warm-up, in epochs (spelled like Genie's numEpoches).",
                              lo=0, hi=10**9)
    gradientClipVal: float = _key(1.0, "Gradient-norm clipping (0 = off).", lo=0.0, hi=1e6)
    useGradientCheckpointing: bool = _key(False, "Recompute structure and pair-transform layers in backward.")
    nanPolicy: str = _key("stop", "On a NaN/Inf loss: 'stop' (checkpoint and exit) or 'skip' the step.",
                          choices=("stop", "skip"))
    precision: str = _key("auto", "'auto' (bf16-mixed on CUDA, else 32), '32' or 'bf16-mixed'.",
                          choices=("auto", "32", "bf16-mixed"))
    compileModel: bool = _key(False, "torch.compile the denoiser (its pair-transform layers) for training; the service: MHCFLASH_COMPILE.")
    graphTrainingStep: bool = _key(False, "Replay the training forward + backward from CUDA graphs, one per batch shape "
                                   "(GPU; lengths padded to a multiple of 16; host-bound small models train faster).")

    # --- modes (the reference configuration) ---
    useMHCMode: bool = _key(False, "Wrap structure layers in manifold-constrained hyper-connections.")
    useFlashMode: bool = _key(False, "Flash-IPA over factorized pair features instead of dense IPA.")
    usePairFree: bool = _key(False, "Flash mode only: build the factors from single features and k-NN "
                             "geometry, no L x L tensor anywhere (long chains).")
    selfConditioning: bool = _key(False, "Self-conditioning (Genie 2, FrameDiff): the denoiser also sees its previous "
                                  "estimate of the clean CA trace; trained on half the samples, carried from step to "
                                  "step when sampling.")

    # --- Flash-IPA (the reference configuration) ---
    zFactorRank: int = _key(2, "Rank of the factorized pair features (1: longest chains; 2: balanced).",
                            lo=1, hi=64)
    kNeighbors: int = _key(10, "Nearest neighbours (by CA distance) feeding the factorizer.", lo=1, hi=256)
    useFlashAttn3: bool = _key(True, "Allow the FlashAttention built for this GPU: FA3 on Hopper first; "
                                     "FA4 (Hopper / Blackwell) after PyTorch's cuDNN attention, which measured as "
                                     "fast. Order: FA3, FA2, cuDNN, FA4, other PyTorch SDPA kernels.")

    # --- mHC (the reference configuration) ---
    mhcExpansionRate: int = _key(4, "n, residual streams (2: cheapest, 4: standard, 6-8: more capacity).",
                                 lo=1, hi=16)
    mhcSinkhornIters: int = _key(20, "Sinkhorn-Knopp iterations for H_res.", lo=1, hi=1000)
    mhcAlphaInit: float = _key(0.01, "Initial gate scale alpha of the mHC mappings.", lo=0.0, hi=10.0,
                               lo_open=True)
    mhcResLogitCap: float = _key(0.0, "Soft cap c of the H_res logits, c tanh(logit / c), so that the Sinkhorn "
                                      "converges in mhcSinkhornIters iterations (0: none; 5 keeps columns within "
                                      "~6 % of 1 at 20 iterations).", lo=0.0, hi=100.0)
    mhcReadout: str = _key("mean", "Stream contraction after the last layer: 'mean' or learned 'gated'.",
                           choices=("mean", "gated"))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_value(f, getattr(self, f.name), where=f"key '{f.name}'")
        if self.minimumNumResidues > self.maximumNumResidues:
            raise ConfigError(
                f"minimumNumResidues ({self.minimumNumResidues}) is larger than maximumNumResidues "
                f"({self.maximumNumResidues}); lower minimumNumResidues or raise maximumNumResidues.")
        if self.usePairFree and not self.useFlashMode:
            raise ConfigError("usePairFree True needs useFlashMode True (the pair-free path builds "
                              "Flash-IPA factors); set useFlashMode True or usePairFree False.")

    # -- derived -----------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """One of the four modes: 'standard', 'mhc', 'flash', 'mhc_flash'."""
        return next(name for name, flags in MODES.items() if flags == (self.useMHCMode, self.useFlashMode))

    def with_mode(self, mode: str) -> Config:
        """A copy switched to one of :data:`MODES` (sets useMHCMode and useFlashMode)."""
        if mode not in MODES:
            raise ConfigError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        mhc, flash = MODES[mode]
        return self.replace(useMHCMode=mhc, useFlashMode=flash)

    def replace(self, **changes: Any) -> Config:
        """A validated copy with ``changes`` applied (unknown keys raise ConfigError)."""
        names = {f.name for f in dataclasses.fields(self)}
        for k in changes:
            if k not in names:
                raise ConfigError(f"unknown key '{k}'{_suggest(k, names)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_text(self) -> str:
        """The config file text; ``parse_config(cfg.to_text()) == cfg``."""
        lines = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue  # None is the default for optional keys: omitted
            lines.append(f"{f.name} {_format(v)}")
        return "\n".join(lines) + "\n"


KEY_DOCS: dict[str, str] = {f.name: f.metadata["doc"] for f in dataclasses.fields(Config)}
_FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def _format(v: Any) -> str:
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _suggest(key: str, names) -> str:
    close = difflib.get_close_matches(key, list(names), n=1, cutoff=0.5)
    if not close:
        low = {n.lower(): n for n in names}
        if key.lower() in low:
            close = [low[key.lower()]]
    return f"; did you mean '{close[0]}'?" if close else "; see the table of config keys in docs/CONFIG.md"


def _range_text(f: dataclasses.Field) -> str:
    m = f.metadata
    if m["choices"]:
        return "one of " + ", ".join(repr(c) for c in m["choices"])
    lo, hi = m["lo"], m["hi"]
    lo_s = "" if lo is None else (f"> {lo:g}" if m["lo_open"] else f">= {lo:g}")
    hi_s = "" if hi is None else f"<= {hi:g}"
    return " and ".join(s for s in (lo_s, hi_s) if s) or "any value"


def _type_of(f: dataclasses.Field) -> type:
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return {"str": str, "int": int, "float": float, "bool": bool}[t.split("|")[0].strip()]


def _check_value(f: dataclasses.Field, v: Any, where: str) -> None:
    m, typ = f.metadata, _type_of(f)
    if v is None:
        if m["optional"]:
            return
        raise ConfigError(f"{where}: a value is required ({_range_text(f)})")
    ok_type = isinstance(v, typ) and not (typ is not bool and isinstance(v, bool))
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        ok_type = True
    if not ok_type:
        raise ConfigError(f"{where}: expected {typ.__name__}, got {v!r}")
    if typ in (int, float):
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: {v!r} is not finite; allowed: {_range_text(f)}")
        lo, hi = m["lo"], m["hi"]
        if (lo is not None and (v <= lo if m["lo_open"] else v < lo)) or (hi is not None and v > hi):
            raise ConfigError(f"{where}: {v!r} is out of range; allowed: {_range_text(f)}")
    if m["choices"] and v not in m["choices"]:
        raise ConfigError(f"{where}: {v!r} is not allowed; allowed: {_range_text(f)}")
    if m["check"] is not None:
        try:
            m["check"](v)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


def _parse_value(f: dataclasses.Field, raw: str, where: str) -> Any:
    typ = _type_of(f)
    if f.metadata["optional"] and raw in ("None", "none", "null"):
        return None
    if typ is bool:
        if raw in ("True", "False"):
            return raw == "True"
        raise ConfigError(f"{where}: expected True or False, got '{raw}'")
    if typ is int:
        try:
            return int(raw, 10)
        except ValueError:
            try:  # allow 1e3-style integers written by people
                x = float(raw)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got '{raw}'") from None
            if x.is_integer():
                return int(x)
            raise ConfigError(f"{where}: expected an integer, got '{raw}'") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got '{raw}'") from None
    return raw


def parse_config(text: str, source: str = "<string>") -> Config:
    """Parse config text; ``source`` names the file in error messages."""
    values: dict[str, Any] = {}
    seen_at: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        parts = body.split()
        key = parts[0]
        where = f"{source}, line {lineno}, key '{key}'"
        if key not in _FIELDS:
            raise ConfigError(f"{source}, line {lineno}: unknown key '{key}'{_suggest(key, _FIELDS)}")
        if len(parts) != 2:
            raise ConfigError(f"{where}: expected 'key value' (one value), got {line.strip()!r}")
        if key in seen_at:
            raise ConfigError(f"{where}: duplicate key (first set on line {seen_at[key]}); keep one")
        f = _FIELDS[key]
        value = _parse_value(f, parts[1], where)
        _check_value(f, value, where)
        values[key] = value
        seen_at[key] = lineno
    try:
        return Config(**values)
    except ConfigError as e:  # cross-key checks: name the file
        raise ConfigError(f"{source}: {e}") from None


def load_config(path: str | Path) -> Config:
    """Load and validate a Genie-style config file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    return parse_config(text, source=str(p))


def key_location(path: str | Path | None, key: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """Where ``key`` was set, for an error about its value: ``--set key=...`` when an override sets it,
    else ``FILE, line N, key 'key'`` (``FILE, key 'key'`` when the file leaves it at its default), else
    ``the default config, key 'key'``."""
    for item in overrides:
        if item.partition("=")[0].strip() == key:
            return f"--set {item}, key '{key}'"
    if not path:
        return f"the default config, key '{key}'"
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        lines = []
    for lineno, line in enumerate(lines, start=1):
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == key:
            return f"{path}, line {lineno}, key '{key}'"
    return f"{path}, key '{key}'"


def load_config_with_overrides(path: str | Path | None, overrides: list[str]) -> Config:
    """Config file (or the defaults) with ``key=value`` overrides (``--set``), each validated like a file line.

    An error names the flag as given and the key: ``--set batchSize=-3, key 'batchSize': -3 is out of
    range; ...`` (an override has no line number).
    """
    config = load_config(path) if path else Config()
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = (part.strip() for part in item.partition("="))
        if not sep or not key or not raw:
            raise ConfigError(f"--set {item}: expected key=value, e.g. --set learningRate=5e-5")
        if key not in _FIELDS:
            raise ConfigError(f"--set {item}: unknown key '{key}'{_suggest(key, _FIELDS)}")
        where = f"--set {item}, key '{key}'"
        if key in changes:
            raise ConfigError(f"{where}: set twice on the command line; keep one")
        value = _parse_value(_FIELDS[key], raw, where)
        _check_value(_FIELDS[key], value, where)
        changes[key] = value
    try:
        return config.replace(**changes)
    except ConfigError as e:  # cross-key checks: name the file and the overrides
        flags = " ".join(f"--set {item}" for item in overrides)
        raise ConfigError(f"{path or 'the default config'} with {flags}: {e}") from None
