"""CA-only poly-Ala PDB writing and reading back (model/pdb_io.py)."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import torch

from model.pdb_io import ca_to_pdb, read_ca

ATOL_PDB = 5.5e-4  # %8.3f rounding (5e-4) + float32 storage at |x| < 400 A; inside the 1e-3 A brief
L = 37


def trace(n=L, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    steps = rng.normal(size=(n, 3))
    steps *= 3.8 / np.linalg.norm(steps, axis=-1, keepdims=True)
    return (np.cumsum(steps, axis=0) * scale + rng.uniform(-300, 300, size=3)).astype(np.float64)


def test_round_trip_through_biotite():
    from biotite.structure.io import pdb

    ca = trace()
    text = ca_to_pdb(ca, chain_id="B", b_factors=np.linspace(0, 99, L), remarks=["sampled", "seed 3"])
    atoms = pdb.get_structure(pdb.PDBFile.read(io.StringIO(text)), model=1, extra_fields=["b_factor"])
    assert atoms.array_length() == L
    assert set(atoms.atom_name) == {"CA"} and set(atoms.res_name) == {"ALA"} and set(atoms.chain_id) == {"B"}
    assert set(atoms.element) == {"C"} and not atoms.hetero.any()
    np.testing.assert_array_equal(atoms.res_id, np.arange(1, L + 1))
    np.testing.assert_allclose(atoms.coord, ca, atol=ATOL_PDB, rtol=0)
    np.testing.assert_allclose(atoms.b_factor, np.linspace(0, 99, L), atol=5e-3)
    np.testing.assert_allclose(read_ca(text), ca, atol=ATOL_PDB, rtol=0)


def test_fixed_columns_ter_and_end():
    ca = trace(n=13, seed=1)
    lines = ca_to_pdb(ca, remarks=["hello"]).splitlines()
    assert lines[0] == "REMARK   1 hello" and lines[-1] == "END" and lines[-2].startswith("TER")
    atoms = [line for line in lines if line.startswith("ATOM")]
    assert len(atoms) == 13
    for i, line in enumerate(atoms):
        assert len(line) == 80
        assert line[:6] == "ATOM  " and int(line[6:11]) == i + 1 and line[12:16] == " CA "
        assert line[17:20] == "ALA" and line[21] == "A" and int(line[22:26]) == i + 1
        xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
        np.testing.assert_allclose(xyz, ca[i], atol=ATOL_PDB, rtol=0)
        assert float(line[54:60]) == 1.0 and line[76:78] == " C"


def test_read_ca_from_files_and_torch_input(tmp_path):
    ca = torch.from_numpy(trace(n=21, seed=2)).float()
    text = ca_to_pdb(ca)
    (tmp_path / "s.pdb").write_text(text)
    (tmp_path / "s.pdb.gz").write_bytes(gzip.compress(text.encode()))
    for name in ("s.pdb", "s.pdb.gz"):
        got = read_ca(tmp_path / name)
        assert got.dtype == np.float32 and got.shape == (21, 3)
        np.testing.assert_allclose(got, ca.numpy(), atol=ATOL_PDB, rtol=0)
    with pytest.raises(ValueError, match="no CA atoms"):
        read_ca(text, chain_id="Z")


def test_read_ca_ignores_calcium_ions():
    text = ca_to_pdb(trace(n=5, seed=3)).replace(
        "TER", ("HETATM    9 CA    CA A 101      10.000  10.000  10.000  1.00  0.00          CA  \nTER")
    )
    assert read_ca(text).shape == (5, 3)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((0, 3)), "shape"),
        (np.zeros((4, 2)), "shape"),
        (np.array([[0.0, 0.0, np.nan]] * 3), "NaN"),
        (np.array([[0.0, 0.0, 1.0e5]] * 3), "columns"),
    ],
)
def test_bad_input_raises(bad, message):
    with pytest.raises(ValueError, match=message):
        ca_to_pdb(bad)
