"""Chain breaks: parsed chains cut into unbroken examples, CA-only files, per-source counts, and the
longest-segment mode reproducing the shipped training index."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
from test_data import DATA_DIR, PDB20, REPO, atom, write

from model.data import Chain, build_dataset, parse_structure_file, read_index, resolve_example
from model.data.cache import MANIFEST, load_manifest
from model.data.datamodule import collate
from model.data.parse import BREAK_DISTANCE, PARSER_VERSION
from model.data.segments import cut_chain, cut_chains, parent_id, segment_bounds
from model.data.sources import cgdms_chain_dir
from model.data.split import index_rows, training_set

RESEEK = DATA_DIR / "reseek"
SHIPPED_INDEX = REPO / "weights" / "mhc_flash_pairfree_v1" / "training_index.csv"


def broken_chain(pieces, *, chain_id="toy:1abc_A", gap=9.0, seed=0) -> Chain:
    """Random-walk CA trace made of ``pieces`` (lengths), consecutive pieces ``gap`` A apart."""
    rng = np.random.default_rng(seed)
    points, x = [], np.zeros(3)
    for k, n in enumerate(pieces):
        if k:
            x = x + np.array([gap, 0.0, 0.0])
        for i in range(n):
            if i:
                step = rng.normal(size=3)
                x = x + 3.8 * step / np.linalg.norm(step)
            points.append(x.copy())
    ca = np.array(points, dtype=np.float32)  # [L, 3]
    aa = "ACDEFGHIKLMNPQRSTVWY"
    sequence = "".join(aa[int(v)] for v in rng.integers(0, 20, size=len(ca)))
    return Chain(id=chain_id, sequence=sequence, ca=ca, residue_index=np.arange(len(ca), dtype=np.int32),
                 source="toy", path="1abc.pdb", num_breaks=len(pieces) - 1)


def max_step(ca: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(ca, axis=0), axis=-1).max())


# ----------------------------------------------------------------------------- cutting rules
def test_segments_split_at_every_break_and_drop_short_pieces():
    chain = broken_chain([45, 12, 61, 40])
    assert [stop - start for start, stop in segment_bounds(chain.ca)] == [45, 12, 61, 40]
    pieces = cut_chain(chain, min_segment_length=40)
    assert [p.id for p in pieces] == ["toy:1abc_A/seg0", "toy:1abc_A/seg2", "toy:1abc_A/seg3"]
    assert [len(p) for p in pieces] == [45, 61, 40]  # 12 < 40 dropped; 40 kept (the minimum is inclusive)
    for piece, start in zip(pieces, (0, 57, 118)):
        assert max_step(piece.ca) <= BREAK_DISTANCE  # never glued across a break
        np.testing.assert_array_equal(piece.ca, chain.ca[start : start + len(piece)])
        assert piece.sequence == chain.sequence[start : start + len(piece)]
        np.testing.assert_array_equal(piece.residue_index, np.arange(len(piece)))  # from 0 per piece
        assert parent_id(piece.id) == chain.id and piece.num_dropped == len(chain) - len(piece)
    assert [len(p) for p in cut_chain(chain, min_segment_length=41)] == [45, 61]
    assert [len(p) for p in cut_chain(chain, min_segment_length=10)] == [45, 12, 61, 40]


def test_unbroken_chain_keeps_its_id_and_cutting_is_idempotent():
    whole = broken_chain([23])
    assert cut_chain(whole, min_segment_length=40) == [whole]  # short but unbroken: kept as is
    pieces, stats = cut_chains([broken_chain([50, 44]), whole], min_segment_length=40)
    again, _ = cut_chains(pieces, min_segment_length=40)
    assert [p.id for p in again] == [p.id for p in pieces] == ["toy:1abc_A/seg0", "toy:1abc_A/seg1", whole.id]
    counts = stats["toy"]
    assert (counts.chains, counts.broken, counts.breaks, counts.examples, counts.segments) == (2, 1, 1, 3, 2)
    assert counts.residues == 50 + 44 + 23 and counts.dropped_cut == 0


def test_longest_mode_keeps_the_first_longest_piece_under_the_chain_id():
    chain = broken_chain([30, 61, 61, 5])
    (piece,) = cut_chain(chain, mode="longest")
    assert piece.id == chain.id and len(piece) == 61 and piece.num_dropped == 96
    np.testing.assert_array_equal(piece.ca, chain.ca[30:91])  # ties: the first
    with pytest.raises(ValueError, match="chainBreaks 'glue'"):
        cut_chain(chain, mode="glue")


def test_resolve_example_finds_ids_of_both_modes():
    chain = broken_chain([45, 12, 61])
    by_id = {chain.id: chain}
    for mode in ("segments", "longest"):
        for piece in cut_chain(chain, mode=mode, min_segment_length=10):
            found = resolve_example(piece.id, by_id)
            assert found.id == piece.id
            np.testing.assert_array_equal(found.ca, piece.ca)
    assert resolve_example("toy:1abc_A/seg7", by_id) is None and resolve_example("toy:nope", by_id) is None
    assert cut_chain(chain, mode=None) == [chain]  # uncut: what resolve_example starts from


def test_batch_of_segments_has_real_zeros_in_masks_and_no_fake_step():
    pieces = cut_chain(broken_chain([45, 31, 61]), min_segment_length=20)
    batch = collate(pieces, pad_to_multiple=16)
    assert batch["x0"].shape == (3, 64, 3)
    mask = batch["mask"].numpy()
    assert mask.sum(1).tolist() == [45, 31, 61] and (mask == 0).sum() == 3 * 64 - 137
    for b, n in enumerate([45, 31, 61]):
        assert mask[b, :n].all() and not mask[b, n:].any()
        assert max_step(batch["x0"][b, :n].numpy()) <= BREAK_DISTANCE


# ----------------------------------------------------------------------------- CA-only files, cache
def ca_only(tmp_path: Path, name: str, coords, start=7) -> Path:
    """A CA-only PDB file (as the reseek chains: CA atoms only, one decimal, numbered from ``start``)."""
    lines = ["REMARK   1 CA-ONLY CHAIN"]
    for i, xyz in enumerate(coords):
        lines.append(atom(i + 1, " CA", "GLY" if i % 2 else "TRP", "A", start + i, tuple(round(v, 1) for v in xyz)))
    path = write(tmp_path, name, lines)
    gz = tmp_path / f"{name}.gz"
    gz.write_bytes(gzip.compress(path.read_bytes()))
    path.unlink()
    return gz


def test_ca_only_file_is_parsed_whole_with_its_numbering_and_breaks(tmp_path):
    chain = broken_chain([9, 14])
    (tmp_path / "ca").mkdir()
    path = ca_only(tmp_path / "ca", "1xyzA.pdb", chain.ca)
    (parsed,) = parse_structure_file(path, source="ca")
    assert parsed.id == "ca:1xyzA_A" and len(parsed) == 23 and parsed.num_breaks == 1
    assert parsed.sequence == "WG" * 11 + "W"
    np.testing.assert_array_equal(parsed.residue_index, np.arange(23))  # author 7..29 -> 0..22
    np.testing.assert_allclose(parsed.ca, np.round(chain.ca, 1), atol=1e-3)
    pieces, summary = build_dataset([tmp_path / "ca"], cache_dir=tmp_path / "c", min_segment_length=10,
                                    verbose=False)
    assert [p.id for p in pieces] == ["ca:1xyzA_A/seg1"]  # the 9-residue piece is dropped
    counts = summary.by_source["ca"]
    assert (counts.examples, counts.segments, counts.residues, counts.dropped_cut) == (1, 1, 14, 9)
    assert "ca: 1 chains (1 broken, 1 breaks) -> 1 examples (1 segments), 14 residues kept; dropped 9 in " \
           "segments < 10, 0 by the length filter" in summary.format()
    _, longest = build_dataset([tmp_path / "ca"], cache_dir=tmp_path / "c", chain_breaks="longest",
                               min_length=10, verbose=False)
    assert longest.files_cached == 1 and "dropped 9 outside the longest segment" in longest.format()
    (whole,), _ = build_dataset([tmp_path / "ca"], cache_dir=tmp_path / "c", chain_breaks=None, verbose=False)
    assert whole.id == "ca:1xyzA_A" and len(whole) == 23
    assert resolve_example("ca:1xyzA_A/seg1", {whole.id: whole}).sequence == pieces[0].sequence


def test_cache_is_per_parser_version(tmp_path):
    (tmp_path / "src").mkdir()
    ca_only(tmp_path / "src", "a.pdb", broken_chain([12]).ca)
    build_dataset([tmp_path / "src"], cache_dir=tmp_path / "c", verbose=False)
    assert MANIFEST == f"manifest-v{PARSER_VERSION}.json" and (tmp_path / "c" / MANIFEST).is_file()
    assert load_manifest(tmp_path / "c", PARSER_VERSION - 1)["sources"] == {}  # another version's is not read
    stores = [p.name for p in (tmp_path / "c").glob("*.npz")]
    assert len(stores) == 1 and stores[0].endswith(f"-v{PARSER_VERSION}.npz")


@pytest.mark.skipif(not RESEEK.is_dir(), reason="reseek chains not found")
def test_real_reseek_chains_parse_whole_and_cut_cleanly(tmp_path):
    files = sorted(RESEEK.glob("*.pdb.gz"))[:12]
    src = tmp_path / "reseek"
    src.mkdir()
    for f in files:
        os.symlink(f, src / f.name)
    pieces, summary = build_dataset([src], cache_dir=tmp_path / "c", verbose=False)
    counts = summary.by_source["reseek"]
    atoms = sum(gzip.decompress(f.read_bytes()).count(b"\nATOM ") for f in files)
    assert counts.chains == 12 and counts.residues + counts.dropped_cut == atoms  # every CA read
    assert counts.examples == len(pieces) >= 12
    for piece in pieces:
        assert max_step(piece.ca) <= BREAK_DISTANCE
        assert len(piece) >= 40 or parent_id(piece.id) == piece.id  # short: only whole chains


# ----------------------------------------------------------------------------- shipped index
@pytest.mark.skipif(not PDB20.is_dir() or cgdms_chain_dir() is None, reason="cgdms or pdb20 chains not found")
def test_longest_mode_reproduces_the_shipped_training_index(tmp_path):
    from model.config import load_config

    config = load_config(REPO / "configs" / "ship_pairfree.txt").replace(dataDirectory=str(DATA_DIR))
    assert config.datasetNames == "cgdms,pdb20"  # names, found under dataDirectory
    chains, assignment, _ = training_set(config, cache_dir=tmp_path, verbose=False)
    rows = [{k: str(v) for k, v in row.items()} for row in index_rows(chains, assignment)]
    shipped = [{k: str(v) for k, v in row.items()} for row in read_index(SHIPPED_INDEX)]
    assert len(rows) == len(shipped) == 2388
    assert rows == shipped
