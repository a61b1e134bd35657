"""Save and load a weights directory: `config.txt` + `model.safetensors` (+ optional `MODEL_CARD.md`).

Loading never runs arbitrary pickled code: safetensors files are plain tensors, and a PyTorch
checkpoint (`*.ckpt` / `*.pt`, e.g. a Lightning checkpoint with a `state_dict`) is read with
`torch.load(weights_only=True)`, whose unpickler only rebuilds tensors and plain containers and
refuses anything else. Every failure raises `WeightsError` naming the file and what is wrong
(missing file, unreadable file, missing / unexpected tensor names, expected vs found shape).

Layout of a weights directory:

    weights/<name>/config.txt           Genie config file (model.config), defines the architecture
    weights/<name>/model.safetensors    the denoiser's state_dict (float32 or bf16)
    weights/<name>/MODEL_CARD.md        optional: how it was trained, data, metrics

A weights root (`weights/`) holding several such directories is resolved by `resolve_weights_dir`:
a `DEFAULT` file naming one of them, or else the only one there is.

Source: safetensors (huggingface/safetensors) for the format; Genie saves a Lightning checkpoint and
a separate config, which `load_weights` also reads (a `.ckpt` next to `config.txt`).
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from model.atomic_io import atomic_write_bytes
from model.config import Config, ConfigError, load_config

__all__ = ["LoadedWeights", "WeightsError", "load_weights", "resolve_weights_dir", "save_weights"]

CONFIG_FILE = "config.txt"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "MODEL_CARD.md"
DEFAULT_POINTER = "DEFAULT"
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
# Prefixes a training checkpoint puts in front of the denoiser's own parameter names.
STATE_PREFIXES = ("denoiser.", "model.", "module.", "_orig_mod.")


class WeightsError(RuntimeError):
    """A weights directory or file that cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class LoadedWeights:
    denoiser: torch.nn.Module  # eval mode, on the requested device
    config: Config
    sha256: str  # of the weights file, hex
    name: str  # the weights directory's name
    path: Path  # the weights file that was read


def save_weights(directory: str | Path, denoiser: torch.nn.Module, extra_card: str | None = None,
                 *, dtype: torch.dtype | None = None) -> Path:
    """Write `config.txt` and `model.safetensors` (cast to `dtype`, e.g. bf16, if given); return the dir."""
    from safetensors.torch import save

    config = getattr(denoiser, "config", None)
    if not isinstance(config, Config):
        raise WeightsError("the denoiser has no .config (build it with model.build_denoiser(config))")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in denoiser.state_dict().items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state[key] = value.contiguous().clone()  # clone: safetensors refuses shared storage
    atomic_write_bytes(directory / CONFIG_FILE, config.to_text().encode("utf-8"))
    # NOTE: a single metadata key: safetensors writes metadata in hash-map order, so several keys
    # would make the file bytes (and its sha256, the model's identity on /info) vary between saves.
    atomic_write_bytes(directory / WEIGHTS_FILE, save(state, metadata={"format": "pt"}))
    if extra_card is not None:
        atomic_write_bytes(directory / CARD_FILE, extra_card.encode("utf-8"))
    return directory


def resolve_weights_dir(path: str | Path) -> Path:
    """The weights directory meant by `path`: itself, its `DEFAULT` pointer, or its only model dir."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights path {path} does not exist")
    if path.is_file():
        if path.suffix in CHECKPOINT_SUFFIXES or path.name.endswith(".safetensors"):
            return path.parent
        raise WeightsError(f"{path} is not a weights directory or a weights file")
    if (path / CONFIG_FILE).is_file():
        return path
    pointer = path / DEFAULT_POINTER
    if pointer.is_file():
        name = pointer.read_text().strip()
        target = (path / name).resolve()
        if not name or path.resolve() not in target.parents or not (target / CONFIG_FILE).is_file():
            raise WeightsError(f"{pointer} names {name!r}, which is not a weights directory inside {path}")
        return target
    candidates = sorted(p for p in path.iterdir() if p.is_dir() and (p / CONFIG_FILE).is_file())
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise WeightsError(f"no weights in {path}: expected {CONFIG_FILE} + {WEIGHTS_FILE} there, or a "
                           f"sub-directory holding them")
    raise WeightsError(f"{path} holds several weights directories ({', '.join(p.name for p in candidates)}); "
                       f"write the one to serve into {pointer} or point at it directly")


def _weights_file(directory: Path, explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    if (directory / WEIGHTS_FILE).is_file():
        return directory / WEIGHTS_FILE
    found = sorted(p for p in directory.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(found) == 1:
        return found[0]
    if found:
        raise WeightsError(f"{directory} holds several checkpoints ({', '.join(p.name for p in found)}) and no "
                           f"{WEIGHTS_FILE}; point at one file")
    raise WeightsError(f"{directory / WEIGHTS_FILE} is missing (no {WEIGHTS_FILE} or .ckpt/.pt in {directory})")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL [\w.]+|Unsupported operand \d+", str(exc))
        raise WeightsError(f"{path} refused: it holds Python objects beyond tensors and plain containers"
                           f"{' (' + found.group(0) + ')' if found else ''}; this service never unpickles "
                           f"arbitrary code. Re-save the weights with model.weights_io.save_weights "
                           f"(model.safetensors).") from None
    except Exception as exc:  # noqa: BLE001 - zip / EOF / runtime errors of a corrupt file
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path} holds no state_dict (a dict of tensor name -> tensor)")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a training wrapper's prefix (`denoiser.`, `model.`, ...) when that makes the names match."""
    for _ in range(2):
        if set(state) & expected:
            break
        for prefix in STATE_PREFIXES:
            if any(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                break
    return state


def _check_state(path: Path, state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}")
    for key in sorted(set(state) & set(expected)):
        if tuple(state[key].shape) != tuple(expected[key].shape):
            problems.append(f"tensor '{key}': expected shape {tuple(expected[key].shape)} from the config, "
                            f"found {tuple(state[key].shape)}")
            if len(problems) > 6:
                break
    if problems:
        raise WeightsError(f"{path} does not match its config: " + "; ".join(problems)
                           + " (wrong config.txt for these weights, or a different model mode)")
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise WeightsError(f"{path}: tensor '{key}' contains NaN or Inf")


def load_weights(directory: str | Path, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> LoadedWeights:
    """Build the denoiser from `config.txt` and load its weights; eval mode, on `device` in `dtype`.

    `directory` may be a weights directory, a weights root (see `resolve_weights_dir`), or a weights
    file (`.safetensors` / `.ckpt` / `.pt`) whose directory holds `config.txt`.
    """
    from model import build_denoiser
    from model.ipa.flash import upgrade_legacy_state

    path = Path(directory)
    explicit = path if path.is_file() else None
    directory = resolve_weights_dir(path)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise WeightsError(f"{config_path} is missing: the config defines the architecture of the weights")
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        raise WeightsError(f"{config_path}: {exc}") from None
    weights_path = _weights_file(directory, explicit)
    state = _read_state(weights_path)
    denoiser = build_denoiser(config)
    expected = denoiser.state_dict()
    state = upgrade_legacy_state(_strip_prefixes(state, set(expected)))
    _check_state(weights_path, state, expected)
    denoiser.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)
    denoiser = denoiser.to(device=device, dtype=dtype).eval()
    return LoadedWeights(denoiser, config, sha256_file(weights_path), directory.name, weights_path)
