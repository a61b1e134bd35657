"""CA traces <-> PDB text: CA-only poly-Ala files (as Genie 2 writes) and reading CA back.

Source: Genie 2 writes sampled backbones as CA-only poly-Ala PDB files; the records follow the
PDB 3.3 fixed-column ATOM format (biotite writes the ATOM lines, we add REMARK / TER / END).
Used by the CLI (``sample``) and the HTTP service (``POST /sample``).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

_PDB_MIN, _PDB_MAX = -999.999, 9999.999  # what fits the %8.3f coordinate columns


def _as_numpy(ca) -> np.ndarray:
    if hasattr(ca, "detach"):  # torch tensor, without importing torch here
        ca = ca.detach().cpu().float().numpy()
    return np.asarray(ca, dtype=np.float64)


def ca_to_pdb(
    ca,
    chain_id: str = "A",
    *,
    residue_name: str = "ALA",
    first_residue: int = 1,
    b_factors=None,
    remarks: list[str] | tuple[str, ...] = (),
) -> str:
    """A CA trace -> PDB text: one ``ATOM  ... CA  ALA`` record per residue, then TER and END.

    ca: [L, 3] (numpy array, list or torch tensor), Angstrom. b_factors: optional [L] (e.g.
    per-residue confidence), 0 otherwise. remarks: free-text lines written as ``REMARK   1``.
    Raises ValueError for a wrong shape, L == 0, NaN / inf, or coordinates outside the PDB columns.
    """
    import biotite.structure as struc
    from biotite.structure.io import pdb

    coords = _as_numpy(ca)
    if coords.ndim != 2 or coords.shape[1] != 3 or coords.shape[0] == 0:
        raise ValueError(f"ca must have shape [L, 3] with L >= 1, got {tuple(coords.shape)}")
    if not np.all(np.isfinite(coords)):
        raise ValueError("ca contains NaN or inf; cannot write a PDB file")
    if coords.min() < _PDB_MIN or coords.max() > _PDB_MAX:
        raise ValueError(f"coordinates outside [{_PDB_MIN}, {_PDB_MAX}] A do not fit PDB columns")
    if len(chain_id) != 1:
        raise ValueError(f"chain_id must be one character, got {chain_id!r}")
    length = coords.shape[0]
    if first_residue + length - 1 > 9999:
        raise ValueError(f"{length} residues from {first_residue} overflow the PDB residue number")
    atoms = struc.AtomArray(length)
    atoms.coord = coords.astype(np.float32)  # [L, 3]
    atoms.atom_name[:] = "CA"
    atoms.res_name[:] = residue_name
    atoms.element[:] = "C"
    atoms.chain_id[:] = chain_id
    atoms.res_id[:] = np.arange(first_residue, first_residue + length)
    atoms.hetero[:] = False
    atoms.add_annotation("b_factor", dtype=float)
    atoms.add_annotation("occupancy", dtype=float)
    atoms.occupancy[:] = 1.0
    if b_factors is not None:
        values = _as_numpy(b_factors).reshape(-1)  # [L]
        if values.shape[0] != length:
            raise ValueError(f"b_factors has {values.shape[0]} values for {length} residues")
        atoms.b_factor[:] = values
    handle = pdb.PDBFile()
    handle.set_structure(atoms)
    buffer = io.StringIO()
    handle.write(buffer)
    lines = [f"REMARK   1 {text}"[:80] for remark in remarks for text in str(remark).splitlines()]
    lines += [line for line in buffer.getvalue().splitlines() if line.startswith("ATOM")]
    # TER: serial, residue name, chain and residue number of the last ATOM (PDB 3.3 columns)
    lines.append(f"TER   {length + 1:5d}      {residue_name:>3s} {chain_id}{int(atoms.res_id[-1]):4d}")
    lines.append("END")
    return "\n".join(lines) + "\n"


def read_ca(source, chain_id: str | None = None) -> np.ndarray:
    """CA coordinates of the first model, in file order -> [L, 3] float32.

    source: a path (PDB / mmCIF / BinaryCIF, optionally .gz) or PDB text (a string with a
    newline). chain_id: only that chain (default: every chain). Only carbon ``CA`` atoms count
    (never calcium). No residue rules are applied: use `model.data.parse` for training data.
    Raises ValueError when there is no CA atom.
    """
    from biotite.structure.io import pdb

    if isinstance(source, str) and "\n" in source:
        atoms = pdb.get_structure(pdb.PDBFile.read(io.StringIO(source)), model=1, altloc="occupancy")
        where = "PDB text"
    else:
        from model.data.parse import read_atoms

        atoms = read_atoms(Path(source))
        where = str(source)
    keep = (atoms.atom_name == "CA") & (atoms.element == "C")
    if chain_id is not None:
        keep &= atoms.chain_id == chain_id
    if not keep.any():
        raise ValueError(f"no CA atoms in {where}" + (f" chain {chain_id}" if chain_id else ""))
    return atoms.coord[keep].astype(np.float32)  # [L, 3]
