"""On-disk cache of parsed chains: one ``.npz`` per source plus ``manifest.json``.

Layout of ``cache_dir`` (file names carry the parser version, so builders of two versions can share
one directory without re-parsing each other's work):

- ``manifest-v<parser version>.json``: ``{"parser_version": int, "sources": {<abs root>: {"name", "kind",
  "store", "files": {<relpath>: {"mtime_ns", "size", "chains": [ids], "skipped": null |
  [reason, detail]}}}}}``. A file is reused when path, mtime_ns, size and parser version all
  match; failures are cached too, so a bad file is reported again without re-parsing it.
- ``<name>-<hash of root>-v<parser version>.npz``: every parsed (uncut) chain of that source, concatenated (no pickles):
  ``ids [N], paths [N], lengths [N], num_breaks [N], num_dropped [N]`` and the per-residue
  ``ca [sum L, 3] float32, residue_index [sum L] int32, sequence [sum L] uint8 (ASCII)``.

Every write goes to a temporary file in the same directory and is moved into place with
``os.replace``, so a crash or two concurrent builders (DDP ranks) never leave a torn file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from model.atomic_io import atomic_write_bytes
from model.data.parse import PARSER_VERSION, Chain


def manifest_name(parser_version: int) -> str:
    return f"manifest-v{parser_version}.json"


MANIFEST = manifest_name(PARSER_VERSION)


def default_cache_dir() -> Path:
    """``$MHCFLASH_CACHE`` or ``$XDG_CACHE_HOME/mhcflash/data`` (``~/.cache/...``)."""
    if os.environ.get("MHCFLASH_CACHE"):
        return Path(os.environ["MHCFLASH_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "mhcflash" / "data"


def file_key(path: Path) -> dict:
    """The part of the manifest that says whether a file changed."""
    stat = path.stat()
    return {"mtime_ns": stat.st_mtime_ns, "size": stat.st_size}


def store_name(name: str, root: Path) -> str:
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return f"{name}-{digest}-v{PARSER_VERSION}.npz"


def load_manifest(cache_dir: Path, parser_version: int) -> dict:
    """The manifest, or an empty one if absent, unreadable or from another parser version."""
    path = Path(cache_dir) / manifest_name(parser_version)
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("parser_version") == parser_version:
            return manifest
    except (OSError, ValueError):
        pass
    return {"parser_version": parser_version, "sources": {}}


def save_manifest(cache_dir: Path, manifest: dict) -> None:
    data = json.dumps(manifest, indent=1, sort_keys=True).encode()
    atomic_write_bytes(Path(cache_dir) / manifest_name(manifest["parser_version"]), data)


def save_chains(path: Path, chains: list[Chain]) -> None:
    """Write chains to one ``.npz`` (layout in the module doc), atomically."""
    lengths = np.array([len(c) for c in chains], dtype=np.int64)  # [N]
    empty3 = np.zeros((0, 3), dtype=np.float32)
    arrays = {
        "ids": np.array([c.id for c in chains], dtype=str),
        "paths": np.array([c.path for c in chains], dtype=str),
        "lengths": lengths,
        "num_breaks": np.array([c.num_breaks for c in chains], dtype=np.int64),
        "num_dropped": np.array([c.num_dropped for c in chains], dtype=np.int64),
        "ca": np.concatenate([c.ca for c in chains]) if chains else empty3,  # [sum L, 3]
        "residue_index": np.concatenate([c.residue_index for c in chains])
        if chains
        else np.zeros(0, np.int32),  # [sum L]
        "sequence": np.frombuffer("".join(c.sequence for c in chains).encode("ascii"), np.uint8),
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_chains(path: Path, source: str) -> dict[str, Chain]:
    """Read a store written by `save_chains` -> {id: Chain}. Raises OSError / ValueError."""
    with np.load(path, allow_pickle=False) as data:
        lengths = data["lengths"]
        ends = np.cumsum(lengths)
        starts = ends - lengths
        ca, index = data["ca"], data["residue_index"]
        sequence = data["sequence"].tobytes().decode("ascii")
        chains = {}
        for i, chain_id in enumerate(data["ids"].tolist()):
            a, b = int(starts[i]), int(ends[i])
            chains[chain_id] = Chain(
                id=chain_id,
                sequence=sequence[a:b],
                ca=ca[a:b],
                residue_index=index[a:b],
                source=source,
                path=str(data["paths"][i]),
                num_breaks=int(data["num_breaks"][i]),
                num_dropped=int(data["num_dropped"][i]),
            )
    return chains
