"""Typed results of the client, mirroring the service's response schema (`service/schemas.py`).

`SampleResult` is `POST /sample`'s JSON (`SampleResponse`): request id, model, mode, weights hash, noise
scale, one `Sample` (id, index, length, seed, PDB text) per sample, and `Timings`. `ServiceInfo` is
`GET /info` (the fields a caller uses typed, everything in `raw`). Unknown fields a newer service adds
are ignored; a missing one raises `UnexpectedResponse`.

PDB files: `write_pdbs` writes one file per sample, named `<prefix>_len<L>_seed<S>.pdb` (the names
`mhcflash sample` gives) or `<sample id>.pdb` with `prefix=None`. An existing file is never replaced
unless `overwrite=True`: every name is checked before the first file is written.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.client.errors import UnexpectedResponse


def _take(data: Any, key: str, kind: type | tuple[type, ...], where: str):
    if not isinstance(data, dict) or key not in data:
        raise UnexpectedResponse(f"{where}: missing field {key!r} (is this an mhcflash sampling service?)")
    value = data[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
        raise UnexpectedResponse(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Timings:
    queue_wait_s: float  # submit to the first sample entering a batch
    sampling_s: float  # first sample entering a batch to the last sample finished
    total_s: float  # request received to response ready (on the server)

    @classmethod
    def from_json(cls, data: dict) -> Timings:
        return cls(**{k: float(_take(data, k, (int, float), "timings")) for k in ("queue_wait_s", "sampling_s",
                                                                                 "total_s")})


@dataclass(frozen=True)
class Sample:
    id: str  # <request id>-<index>
    index: int
    length: int
    seed: int
    pdb: str  # CA-only poly-Ala PDB text (one MODEL)

    @classmethod
    def from_json(cls, data: dict) -> Sample:
        return cls(id=_take(data, "id", str, "sample"), index=_take(data, "index", int, "sample"),
                   length=_take(data, "length", int, "sample"), seed=_take(data, "seed", int, "sample"),
                   pdb=_take(data, "pdb", str, "sample"))

    def filename(self, prefix: str | None = "sample") -> str:
        """`<prefix>_len<L>_seed<S>.pdb`, or `<id>.pdb` when `prefix` is None."""
        return f"{self.id}.pdb" if prefix is None else pdb_name(prefix, self.length, self.seed)


def pdb_name(prefix: str, length: int, seed: int) -> str:
    """The file name of a sample: `<prefix>_len<L>_seed<S>.pdb` (as `mhcflash sample` names its files)."""
    return f"{prefix}_len{length}_seed{seed}.pdb"


@dataclass(frozen=True)
class SampleResult:
    request_id: str
    model: str  # name of the loaded weights
    mode: str  # standard, mhc, flash or mhc_flash
    weights_sha256: str
    noise_scale: float
    samples: tuple[Sample, ...]
    timings: Timings
    steps: int | None = None  # sampling steps each sample took (None: a server that does not say)

    @classmethod
    def from_json(cls, data: dict) -> SampleResult:
        where = "POST /sample response"
        return cls(request_id=_take(data, "request_id", str, where), model=_take(data, "model", str, where),
                   mode=_take(data, "mode", str, where), weights_sha256=_take(data, "weights_sha256", str, where),
                   noise_scale=float(_take(data, "noise_scale", (int, float), where)),
                   samples=tuple(Sample.from_json(s) for s in _take(data, "samples", list, where)),
                   timings=Timings.from_json(_take(data, "timings", dict, where)),
                   steps=data["steps"] if isinstance(data.get("steps"), int) else None)

    def write_pdbs(self, directory: str | os.PathLike, *, prefix: str | None = "sample",
                   overwrite: bool = False) -> list[Path]:
        """Write one PDB file per sample into `directory` (created); see `write_pdbs`."""
        return write_pdbs(self.samples, directory, prefix=prefix, overwrite=overwrite)


@dataclass(frozen=True)
class ServiceLimits:
    """The requests this server accepts (`GET /info` `limits`): lengths, count, residues per request, steps."""

    min_length: int
    max_length: int
    max_count: int | None
    max_total_residues: int | None
    max_steps: int | None = None  # the model's T (None: a server that does not say)
    default_steps: int | None = None  # a request without `steps`


@dataclass(frozen=True)
class ServiceInfo:
    model: str
    mode: str
    weights_sha256: str
    num_timesteps: int
    device: str
    attention_backend: str  # fa4, fa3, fa2, sdpa, math, ...
    limits: ServiceLimits
    raw: dict = field(repr=False)  # the whole /info document (versions, queue, engine, ...)

    @classmethod
    def from_json(cls, data: dict) -> ServiceInfo:
        where = "GET /info response"
        limits = _take(data, "limits", dict, where)
        attention = data.get("attention") if isinstance(data.get("attention"), dict) else {}
        return cls(model=_take(data, "model", str, where), mode=_take(data, "mode", str, where),
                   weights_sha256=_take(data, "weights_sha256", str, where),
                   num_timesteps=_take(data, "num_timesteps", int, where), device=_take(data, "device", str, where),
                   attention_backend=str(attention.get("backend", "unknown")),
                   limits=ServiceLimits(min_length=_take(limits, "min_length", int, "limits"),
                                        max_length=_take(limits, "max_length", int, "limits"),
                                        max_count=limits.get("max_count"),
                                        max_total_residues=limits.get("max_total_residues"),
                                        max_steps=limits.get("max_steps"), default_steps=limits.get("default_steps")),
                   raw=data)


def write_pdbs(samples: Iterable[Sample], directory: str | os.PathLike, *, prefix: str | None = "sample",
               overwrite: bool = False) -> list[Path]:
    """Write each sample's PDB text to `directory / sample.filename(prefix)`; return the paths.

    Raises `FileExistsError` naming the first existing file (and how many exist) before writing
    anything, unless `overwrite=True`; two samples with the same name is a `ValueError`.
    """
    directory = Path(directory)
    samples = list(samples)
    paths = [directory / s.filename(prefix) for s in samples]
    if len(set(paths)) != len(paths):
        raise ValueError(f"two samples would be written to the same file name under {directory} (prefix "
                         f"{prefix!r}); use prefix=None for names from the sample ids")
    directory.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        existing = [p for p in paths if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise FileExistsError(f"{existing[0]} exists{more}; not overwritten (pass overwrite=True, or "
                                  f"another directory or prefix)")
    for sample, path in zip(samples, paths):
        if overwrite:
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(sample.pdb)
            os.replace(tmp, path)  # a reader never sees half a file
        else:
            with open(path, "x") as handle:  # "x": fails if the file appeared meanwhile
                handle.write(sample.pdb)
    return paths
